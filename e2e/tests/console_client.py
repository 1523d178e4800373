#!/usr/bin/env python3
"""Drives the web console in a real browser (headless Chromium, through chromedriver and Selenium)
for e2e/tests/console.rs.

Reads one JSON argument: {"web": console URL, "relay": data plane URL, "admin_token",
"ro_token", "upstream": the mock upstream's URL, "shots": directory for screenshots}. It signs in,
adds an account through the form, creates two keys through the form (reading the first once),
sends traffic with it to relay (plain HTTP from this script, like any client), waits for the
overview and the key's spend to move, opens the key holder's page with it, revokes it through the
form and waits for relay to refuse it, then signs in with the read-only token and looks for
controls, and posts a forged form from the page. Browser console messages of level SEVERE are
collected on every page.

Prints ONE JSON object on stdout (see `report` below). Exits 1 with a message on stderr on any
failure (a missing browser, driver or Selenium included: never a skip).
"""

import json
import os
import shutil
import sys
import tempfile
import time
import traceback
import urllib.error
import urllib.request


def fail(message):
    print(f"console_client.py: {message}", file=sys.stderr)
    sys.exit(1)


try:
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError as e:
    fail(f"cannot import selenium ({e}): run scripts/test.sh, which installs it")


def find(names):
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    return None


def browser():
    chromium = find(["chromium", "chromium-browser", "google-chrome"])
    driver = find(["chromedriver"]) or (
        "/usr/lib/chromium/chromedriver" if os.path.exists("/usr/lib/chromium/chromedriver") else None
    )
    if not chromium or not driver:
        fail(f"headless Chromium is missing (chromium: {chromium}, chromedriver: {driver}): run scripts/test.sh")
    opts = Options()
    opts.binary_location = chromium
    profile = tempfile.mkdtemp(prefix="relay-console-")
    for arg in [
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--no-first-run",
        "--disable-extensions",
        "--disable-background-networking",
        "--window-size=1280,1000",
        f"--user-data-dir={profile}",
    ]:
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    os.environ["SE_OFFLINE"] = "true"
    return webdriver.Chrome(service=Service(executable_path=driver), options=opts)


class Run:
    def __init__(self, cfg, d):
        self.cfg = cfg
        self.d = d
        self.console_errors = []
        self.external = []
        self.pages = []

    def logs(self, page):
        for entry in self.d.get_log("browser"):
            if entry.get("level") == "SEVERE":
                self.console_errors.append({"page": page, "message": entry.get("message")})
        # Every resource the page loaded came from the console itself.
        for url in self.d.execute_script(
            "return performance.getEntriesByType('resource').map(function (e) { return e.name; })"
        ):
            if not url.startswith(self.cfg["web"] + "/"):
                self.external.append({"page": page, "url": url})

    def open(self, path):
        self.d.get(self.cfg["web"] + path)
        self.pages.append(path)
        self.logs(path)
        return self.d.page_source

    def fill(self, form_css, fields):
        found = self.d.find_elements(By.CSS_SELECTOR, form_css)
        if not found:
            fail(f"no {form_css} on {self.d.current_url}: {self.d.find_element(By.TAG_NAME, 'main').text[:2000]}")
        form = found[0]
        for name, value in fields.items():
            el = form.find_element(By.NAME, name)
            if el.tag_name == "select":
                el.find_element(By.CSS_SELECTOR, f"option[value='{value}']").click()
            else:
                el.clear()
                el.send_keys(value)
        mark = self.mark()
        form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        # Every form posts and navigates: wait for the answer's page to replace this one, and to
        # be loaded (the old page going away is not the new one being parsed).
        self.replaced(mark)
        self.loaded()
        self.logs(form_css)
        return self.d.page_source

    def mark(self):
        """Tags the current document, so that replaced() can tell when a navigation has left it."""
        self.marks = getattr(self, "marks", 0) + 1
        self.d.execute_script("window.__relayPage = arguments[0]", self.marks)
        return self.marks

    def replaced(self, mark):
        """Waits until the tagged document is gone: a new document has a new window without the tag.
        Asking for an element's staleness instead races with the navigation itself (chromedriver can
        answer "node does not belong to the document", which is neither stale nor present)."""

        def left(d):
            try:
                return d.execute_script("return window.__relayPage || 0") != mark
            except WebDriverException:
                return False  # mid-navigation: ask again

        WebDriverWait(self.d, 30).until(left)

    def loaded(self):
        def ready(d):
            try:
                return d.execute_script("return document.readyState") == "complete" and d.find_elements(By.TAG_NAME, "main")
            except WebDriverException:
                return False  # still navigating

        WebDriverWait(self.d, 30).until(ready)

    def click(self, css, page):
        """Clicks what navigates (a link, a form's button) and waits for the next page."""
        el = self.d.find_element(By.CSS_SELECTOR, css)
        mark = self.mark()
        el.click()
        self.replaced(mark)
        self.loaded()
        self.logs(page)

    def tab_walk(self, limit=400):
        """Presses Tab until focus comes back round to a control it reached (wherever it starts, an
        autofocused field for one): the visible controls (links, buttons, fields, summaries) focus
        never reached."""
        d = self.d
        d.execute_script("document.activeElement && document.activeElement.blur(); window.scrollTo(0, 0);")
        d.execute_script(
            """
            document.querySelectorAll('a[href],button,input,select,textarea,summary').forEach(function (e, i) {
              e.setAttribute('data-tab-id', String(i));
            });
            """
        )
        seen = set()
        for _ in range(limit):
            ActionChains(d).send_keys(Keys.TAB).perform()
            at = d.execute_script("var a = document.activeElement; return a ? a.getAttribute('data-tab-id') : null")
            if at is None:
                # Past the last control (focus on the page itself): the next Tab starts over.
                continue
            if at in seen:
                break
            seen.add(at)
        return d.execute_script(
            """
            var seen = arguments[0];
            var out = [];
            document.querySelectorAll('[data-tab-id]').forEach(function (e) {
              if (e.type === 'hidden' || e.hidden || e.disabled) return;
              var d = e.closest('details');
              if (d && !d.open && e.tagName !== 'SUMMARY') return;
              if (d && e.tagName === 'SUMMARY' && d.parentElement.closest('details:not([open])')) return;
              if (!e.getClientRects().length) return;
              if (seen.indexOf(e.getAttribute('data-tab-id')) < 0) out.push(e.outerHTML.slice(0, 120));
            });
            return out;
            """,
            sorted(seen),
        )

    def shot(self, name):
        self.d.save_screenshot(os.path.join(self.cfg["shots"], name + ".png"))


HOSTILE_MODEL = "<img src=x onerror=window.__xss=1>"


def relay_call(cfg, key, stream=False, model="claude-sonnet-4-5"):
    body = json.dumps(
        {
            "model": model,
            "max_tokens": 64,
            "stream": stream,
            "messages": [{"role": "user", "content": "Hello from the console test."}],
        }
    ).encode()
    req = urllib.request.Request(
        cfg["relay"] + "/v1/messages",
        data=body,
        headers={"x-api-key": key, "anthropic-version": "2023-06-01", "content-type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            r.read()
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def until(what, f, timeout=30):
    end = time.time() + timeout
    while time.time() < end:
        v = f()
        if v:
            return v
        time.sleep(0.5)
    fail(f"timed out waiting for {what}")


def cell(d, css):
    return d.find_element(By.CSS_SELECTOR, css).text.strip()


def main():
    cfg = json.loads(sys.argv[1])
    d = browser()
    r = Run(cfg, d)
    report = {}
    try:
        d.set_page_load_timeout(30)
        r.open("/signin")
        r.shot("signin")
        signin_tab_missing = r.tab_walk()
        r.fill("form[action='/signin']", {"token": cfg["admin_token"]})
        report["signed_in_title"] = d.title

        r.open("/accounts")
        r.fill(
            "form[action='/accounts']",
            {
                "name": "acct-browser",
                "kind": "anthropic-api-key",
                "base_url": cfg["upstream"],
                "credential": "sk-ant-api03-browser-SECRET-0123456789",
            },
        )
        page = d.page_source
        report["account_added"] = "acct-browser" in page
        report["account_secret_shown"] = "browser-SECRET" in page

        r.open("/keys")
        r.fill("form[action='/keys']", {"name": "browser-key", "daily": "5"})
        key = d.find_element(By.ID, "new-key").text.strip()
        report["key_prefix"] = key[:3]
        d.find_element(By.CSS_SELECTOR, "button[data-copy='new-key']").click()
        copy = d.find_element(By.CSS_SELECTOR, "button[data-copy='new-key']")
        # The clipboard write answers asynchronously.
        report["copy_button"] = until(
            "the copy button to answer",
            lambda: copy.text if copy.text.startswith(("Copied", "Selected")) else None,
            timeout=10,
        )
        r.logs("/keys (created)")
        r.shot("key-created")
        r.open("/keys")
        report["key_shown_again"] = key in d.page_source
        r.fill("form[action='/keys']", {"name": "other-key"})
        r.open("/keys")
        spend_before = cell(d, "tr[data-key='browser-key'] td[data-spend='day']")

        report["traffic"] = [until("relay to accept the new key", lambda: relay_call(cfg, key) == 200 and 200)]
        report["traffic"] += [relay_call(cfg, key) for _ in range(2)]

        def spend_moved():
            r.open("/keys")
            now = cell(d, "tr[data-key='browser-key'] td[data-spend='day']")
            return now if now != spend_before else None

        report["spend_before"] = spend_before
        report["spend_after"] = until("the key's spend to move", spend_moved)
        r.shot("keys")

        def overview_moved():
            r.open("/")
            n = cell(d, "td[data-total='requests']")
            return n if n not in ("", "0") else None

        report["overview_requests_last_hour"] = until("the overview to count the requests", overview_moved)
        report["overview_lists_key"] = "browser-key" in d.find_element(By.ID, "spend-by-key").text
        r.shot("overview")

        # A Claude subscription by the OAuth login: the console shows the authorize URL, the user
        # approves (the mock's page shows CODE#STATE; fetched here as the user's other tab would),
        # the code is pasted back.
        r.open("/accounts")
        r.fill(
            "form[action='/accounts/oauth']",
            {"name": "sub-browser", "base_url": cfg["upstream"], "max_concurrency": "2"},
        )
        url = d.find_element(By.ID, "authorize-url").get_attribute("href")
        report["authorize_url_is_the_mocks"] = url.startswith(cfg["upstream"] + "/oauth/authorize?")
        r.shot("account-login")
        with urllib.request.urlopen(url, timeout=30) as resp:
            code = resp.read().decode().strip()
        r.fill("form[action='/accounts/oauth/finish']", {"code": code})
        report["login_notice"] = d.find_element(By.TAG_NAME, "main").text[:300]
        report["login_token_shown"] = "mock-oauth" in d.page_source
        r.shot("accounts")

        # Requests: the log, the live tail (an EventSource) showing a new request, one request.
        r.open("/requests")
        d.find_element(By.ID, "tail-toggle").click()
        until("the live tail to connect", lambda: "Following" in d.find_element(By.ID, "tail-state").text)
        relay_call(cfg, key, stream=True)
        until("the live tail to show the new request", lambda: d.find_elements(By.CSS_SELECTOR, "#tail-rows tr"))
        report["tail_row"] = d.find_element(By.CSS_SELECTOR, "#tail-rows tr").text
        report["request_rows"] = len(d.find_elements(By.CSS_SELECTOR, "#requests tbody tr[data-request]"))
        r.logs("/requests (tail)")
        r.shot("requests")
        # A model name a client chose, written as markup, arrives in the tail as text.
        relay_call(cfg, key, model=HOSTILE_MODEL)
        until(
            "the live tail to show the hostile model",
            lambda: [t for t in d.find_elements(By.CSS_SELECTOR, "#tail-rows td") if "onerror" in t.text],
        )
        report["tail_markup_elements"] = len(d.find_elements(By.CSS_SELECTOR, "#tail-rows img"))
        report["tail_script_ran"] = d.execute_script("return window.__xss === 1")
        r.logs("/requests (tail, a markup model)")
        # The streamed request's detail (the tail's oldest row): its capture (a capture-all rule)
        # arrives just after it.
        r.click("#tail-rows tr:last-child a", "/requests/ID")
        detail = d.current_url

        def captured():
            if d.find_elements(By.ID, "response-body"):
                return True
            r.open(detail.replace(cfg["web"], ""))
            return False

        until("the streamed request's capture", captured)
        report["detail_timeline_ticks"] = len(d.find_elements(By.CSS_SELECTOR, "svg.timeline .tick"))
        report["detail_title"] = d.title
        report["detail_attempt_account"] = d.find_element(By.CSS_SELECTOR, "#attempts tbody tr td:nth-child(3)").text
        r.shot("request-detail")

        # Groups: pause the default group, see it, resume it.
        r.open("/groups")
        r.click("tr[data-group='default'] form[action$='/pause'] button", "/groups (paused)")
        report["group_paused"] = d.find_element(By.CSS_SELECTOR, "tr[data-group='default'] [data-state]").text
        r.shot("groups")
        r.click("tr[data-group='default'] form[action$='/resume'] button", "/groups (resumed)")
        report["group_resumed"] = d.find_element(By.CSS_SELECTOR, "tr[data-group='default'] [data-state]").text

        # Usage by key, its download links; the audit log; settings; data planes.
        r.open("/usage?by=key&since=24h")
        report["usage_lists_key"] = "browser-key" in d.find_element(By.ID, "usage").text
        report["usage_csv"] = d.find_element(By.ID, "csv").get_attribute("href")
        r.shot("usage")
        r.open("/audit")
        report["audit_text"] = d.find_element(By.ID, "audit").text
        r.shot("audit")
        r.open("/settings")
        report["settings_rows"] = len(d.find_elements(By.CSS_SELECTOR, "#settings tr[data-setting]"))
        r.shot("settings")
        r.open("/planes")
        report["planes_text"] = d.find_element(By.ID, "planes").text
        r.shot("planes")
        # Keyboard: Tab reaches every visible control of every page, in the page's order.
        tab_missing = {}
        for path in ["/", "/keys", "/accounts", "/groups", "/requests", "/usage", "/audit", "/settings", "/planes"]:
            r.open(path)
            tab_missing[path] = r.tab_walk()
        r.open("/requests")
        r.click("#requests tbody tr[data-request] a", "/requests/ID")
        tab_missing["/requests/ID"] = r.tab_walk()
        # An error page (an unknown request) is a page too: no console error, its links reachable.
        d.get(cfg["web"] + "/requests/no-such-request")
        r.pages.append("/requests/no-such-request")
        for entry in d.get_log("browser"):
            # The page's own status (404) is logged by the browser; anything else is an error.
            if entry.get("level") == "SEVERE" and "status of 404" not in entry.get("message", ""):
                r.console_errors.append({"page": "/requests/no-such-request", "message": entry.get("message")})
        tab_missing["/requests/no-such-request"] = r.tab_walk()
        report["error_page_title"] = d.title

        # The key holder's page.
        r.open("/me")
        r.fill("form[action='/me']", {"key": key})
        me = d.find_element(By.TAG_NAME, "main").text
        report["me_shows_key"] = "browser-key" in me
        report["me_shows_other_key"] = "other-key" in me
        report["me_shows_account"] = "acct-browser" in me
        report["me_recent_rows"] = len(d.find_elements(By.CSS_SELECTOR, "#recent tbody tr td.num")) // 2
        r.shot("me")
        tab_missing["/me"] = r.tab_walk()
        d.set_window_size(375, 812)
        r.open("/me")
        me_overflow = d.execute_script(
            "return document.documentElement.scrollWidth - document.documentElement.clientWidth"
        )
        d.set_window_size(1280, 1000)

        # Revoke through the form; relay refuses the key.
        r.open("/keys")
        r.click("tr[data-key='browser-key'] form[action$='/revoke'] button", "/keys (revoked)")
        report["revoked_notice"] = d.find_element(By.CSS_SELECTOR, ".notice").text
        report["after_revoke"] = until("relay to refuse the revoked key", lambda: (s := relay_call(cfg, key)) != 200 and s)

        # Sign out; the read-only token sees no control.
        r.click("form[action='/signout'] button", "/signout")
        report["after_signout_title"] = d.title
        r.fill("form[action='/signin']", {"token": cfg["ro_token"]})
        controls = {}
        for path in ["/", "/keys", "/accounts", "/groups", "/requests", "/usage", "/audit", "/settings", "/planes"]:
            r.open(path)
            forms = [
                f.get_attribute("action")
                for f in d.find_elements(By.CSS_SELECTOR, "main form[method='post']")
            ]
            controls[path] = forms
        report["read_only_controls"] = controls
        r.shot("keys-read-only")
        # A forged form post from the page (no valid CSRF token): refused.
        d.get_log("browser")
        d.execute_script(
            """
            const f = document.createElement('form');
            f.method = 'post';
            f.action = '/keys';
            for (const [k, v] of [['name', 'forged'], ['csrf', 'forged']]) {
              const i = document.createElement('input');
              i.type = 'hidden'; i.name = k; i.value = v; f.appendChild(i);
            }
            document.body.appendChild(f);
            f.submit();
            """
        )
        until("the forged post's answer", lambda: d.title.startswith("Error"))
        report["forged_post_status"] = int(d.find_element(By.TAG_NAME, "h1").text)
        d.get_log("browser")  # the refused post's own log line (a 403) is expected
        # Readable at phone width (375 px, the narrowest common phone): the page itself does not
        # scroll sideways.
        d.set_window_size(375, 812)
        overflow = {"/me": me_overflow}
        for path in ["/", "/keys", "/accounts", "/groups", "/requests", "/usage", "/audit", "/settings", "/planes"]:
            r.open(path)
            overflow[path] = d.execute_script(
                "return document.documentElement.scrollWidth - document.documentElement.clientWidth"
            )
        r.open("/requests")
        r.click("#requests tbody tr[data-request]:last-child a", "/requests/ID (phone)")
        overflow["/requests/ID"] = d.execute_script(
            "return document.documentElement.scrollWidth - document.documentElement.clientWidth"
        )
        r.shot("requests-phone")
        report["phone_overflow_px"] = overflow
        r.d.delete_all_cookies()
        r.open("/signin")
        overflow["/signin"] = d.execute_script(
            "return document.documentElement.scrollWidth - document.documentElement.clientWidth"
        )
        r.open("/me")
        overflow["/me (sign-in)"] = d.execute_script(
            "return document.documentElement.scrollWidth - document.documentElement.clientWidth"
        )
        tab_missing["/signin"] = signin_tab_missing
        tab_missing["/me (sign-in)"] = r.tab_walk()
        report["tab_missing"] = tab_missing
        report["browser_version"] = d.capabilities.get("browserVersion")
        report["console_errors"] = r.console_errors
        report["external_requests"] = r.external
        report["pages"] = r.pages
    finally:
        d.quit()
    print(json.dumps(report))


if __name__ == "__main__":
    try:
        main()
    except SystemExit:
        raise
    except BaseException:
        fail(traceback.format_exc())
