// relay console: the one script (progressive enhancement; every page works without it).
// Copy buttons: <button data-copy="ID"> copies the text of the element with that id.
document.addEventListener("click", function (e) {
  var b = e.target.closest ? e.target.closest("button[data-copy]") : null;
  if (!b) return;
  var el = document.getElementById(b.getAttribute("data-copy"));
  if (!el) return;
  var text = el.textContent;
  var done = function () { b.textContent = "Copied"; };
  if (navigator.clipboard && window.isSecureContext) {
    navigator.clipboard.writeText(text).then(done, function () { select(el); });
  } else {
    select(el);
    b.textContent = "Selected: press Ctrl+C";
  }
});
function select(el) {
  var r = document.createRange();
  r.selectNodeContents(el);
  var s = window.getSelection();
  s.removeAllRanges();
  s.addRange(r);
}

// Live tail (Requests page): an EventSource on the section's data-tail URL; each `record` event
// (JSON) becomes a row at the top of the tail table, built with textContent (never as HTML).
(function () {
  var live = document.getElementById("live");
  if (!live || !window.EventSource) return;
  var btn = document.getElementById("tail-toggle");
  var state = document.getElementById("tail-state");
  var rows = document.getElementById("tail-rows");
  var cols = ["time", "key", "model", "stream", "status", "outcome", "duration", "tokens", "cost"];
  var es = null;
  function stop(why) {
    if (es) es.close();
    es = null;
    btn.textContent = "Start live tail";
    state.textContent = why;
  }
  btn.hidden = false;
  btn.addEventListener("click", function () {
    if (es) return stop("Stopped.");
    es = new EventSource(live.getAttribute("data-tail"));
    btn.textContent = "Stop live tail";
    state.textContent = "Connecting…";
    es.addEventListener("open", function () { state.textContent = "Following new requests."; });
    es.addEventListener("record", function (e) {
      var r = JSON.parse(e.data);
      var tr = document.createElement("tr");
      tr.setAttribute("data-request", r.id);
      cols.forEach(function (c, i) {
        var td = document.createElement("td");
        if (i === 0) {
          var a = document.createElement("a");
          a.href = "/requests/" + encodeURIComponent(r.id);
          a.textContent = r[c];
          td.appendChild(a);
        } else {
          td.textContent = String(r[c]);
        }
        tr.appendChild(td);
      });
      rows.insertBefore(tr, rows.firstChild);
      while (rows.children.length > 200) rows.removeChild(rows.lastChild);
    });
    es.addEventListener("failed", function (e) { stop("Stopped: " + e.data); });
    es.onerror = function () { if (es) state.textContent = "Connection lost; reconnecting…"; };
  });
})();

// Pages whose <main> has data-refresh="SECONDS" (live state: groups, data planes) reload that
// often, unless the operator is typing in a form or has a section open.
(function () {
  var main = document.getElementById("main");
  var every = main ? parseInt(main.getAttribute("data-refresh") || "0", 10) : 0;
  if (!every) return;
  setInterval(function () {
    var a = document.activeElement;
    var busy = a && a !== document.body && /^(INPUT|SELECT|TEXTAREA|BUTTON|SUMMARY)$/.test(a.tagName);
    if (!busy && !document.querySelector("main details[open]")) window.location.reload();
  }, every * 1000);
})();

// Credentials file import (Accounts): the chosen file's text goes into the form's textarea, so
// the form posts it as text (nothing is sent anywhere before the operator submits).
document.addEventListener("change", function (e) {
  var input = e.target;
  if (!input.matches || !input.matches("input[type=file][data-into]")) return;
  var into = document.getElementById(input.getAttribute("data-into"));
  var file = input.files && input.files[0];
  if (!into || !file) return;
  file.text().then(function (t) { into.value = t; });
});
