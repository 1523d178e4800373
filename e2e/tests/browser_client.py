#!/usr/bin/env python3
"""Drives a real browser (headless Chromium, through chromedriver and Selenium) against relay, for
e2e/tests/browser.rs.

Reads one JSON argument: {"relay": data plane URL, "key": relay key, "allowed_page": URL of the
test page on an origin relay allows, "denied_page": the same page on an origin it does not,
"client_request_id": the x-request-id the page sends}. On each page it runs the page's own
callRelay() (a `fetch` to relay's /v1/messages with x-api-key, anthropic-version and
anthropic-dangerous-direct-browser-access, reading the event stream as it arrives and appending
each text delta to the page), and reads back what callRelay() returned and what the page shows:

- streamed: the allowed origin, a streaming request with the right key
- bad_key:  the allowed origin, a non-streaming request with a wrong key (relay's 401)
- denied:   the denied origin, the same streaming request (the browser must refuse it)

Prints ONE JSON object on stdout: {"browser_version", "streamed", "bad_key", "denied"}. Exits 1
with a message on stderr on any failure (a missing browser, driver or Selenium included: never a
skip).
"""

import json
import os
import shutil
import sys
import tempfile
import traceback


def fail(message):
    print(f"browser_client.py: {message}", file=sys.stderr)
    sys.exit(1)


try:
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
except ImportError as e:
    fail(
        f"cannot import selenium ({e}): run scripts/test.sh, which installs it "
        "(or: python3 -m pip install selenium)"
    )


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
        fail(
            f"headless Chromium is missing (chromium: {chromium}, chromedriver: {driver}): run "
            "scripts/test.sh, which installs them (or: apt-get install chromium chromium-driver)"
        )
    opts = Options()
    opts.binary_location = chromium
    profile = tempfile.mkdtemp(prefix="relay-browser-")
    for arg in [
        "--headless=new",
        "--no-sandbox",  # tests run as root in CI containers
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--no-first-run",
        "--disable-extensions",
        "--disable-background-networking",
        f"--user-data-dir={profile}",
    ]:
        opts.add_argument(arg)
    # Chromium and chromedriver come from the system: Selenium must not look for or download others.
    os.environ["SE_OFFLINE"] = "true"
    service = Service(executable_path=driver)
    return webdriver.Chrome(service=service, options=opts)


CALL = """
const done = arguments[arguments.length - 1];
window.callRelay(arguments[0], arguments[1], arguments[2], arguments[3])
  .then(done, (e) => done({error: 'callRelay threw: ' + e}));
"""


def run(d, page, cfg, key, stream):
    d.get(page)
    if d.title != "relay browser test":
        fail(f"the test page did not load from {page}: title {d.title!r}")
    body = {
        "model": "claude-sonnet-4-5",
        "max_tokens": 256,
        "stream": stream,
        "messages": [{"role": "user", "content": "Say hello from a browser."}],
    }
    result = d.execute_async_script(CALL, cfg["relay"], key, body, cfg["client_request_id"])
    result["page_text"] = d.find_element(By.ID, "out").get_attribute("textContent")
    result["origin"] = d.execute_script("return window.location.origin")
    return result


def main():
    if len(sys.argv) != 2:
        fail("usage: browser_client.py CONFIG_JSON")
    cfg = json.loads(sys.argv[1])
    d = browser()
    try:
        d.set_script_timeout(60)
        d.set_page_load_timeout(30)
        report = {
            "browser_version": d.capabilities.get("browserVersion"),
            "streamed": run(d, cfg["allowed_page"], cfg, cfg["key"], True),
            "bad_key": run(d, cfg["allowed_page"], cfg, "rk-not-a-key", False),
            "denied": run(d, cfg["denied_page"], cfg, cfg["key"], True),
        }
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
