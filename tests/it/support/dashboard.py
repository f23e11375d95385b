"""Drives serve's dashboard in headless Chromium (Debian's chromium and chromium-driver, through
python3-selenium) for tests/it/observe.rs. Usage: dashboard.py URL LOCK SCREENSHOT PROFILE_DIR.

It prints `ready` once the page shows LOCK, then follows commands read from stdin, one per line,
answering each with one line: `appears TICKET` waits until TICKET is on the page as a waiter of
LOCK (`seen`), `leaves TICKET` until it is gone from the page (`gone`), `shot` saves the
screenshot (`saved`). The page is never reloaded: what it shows comes from its own live
updates. Any failure prints `error: ...` and exits 1."""

import sys

from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait


def main():
    url, lock, shot, profile = sys.argv[1:5]
    opts = Options()
    opts.binary_location = "/usr/bin/chromium"
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1400,900",
                 "--user-data-dir=" + profile):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
    try:
        wait = WebDriverWait(driver, 20, poll_frequency=0.05)
        driver.get(url)
        card = '[data-lock="%s"]' % lock
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, card))
        # A reload would start a new document, without this mark.
        driver.execute_script("window.__firstLoad = true")
        print("ready", flush=True)
        for line in sys.stdin:
            cmd, _, arg = line.strip().partition(" ")
            row = '%s tr[data-role="waiter"][data-ticket="%s"]' % (card, arg)
            if cmd == "appears":
                wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, row))
                answer = "seen"
            elif cmd == "leaves":
                wait.until(lambda d: not d.find_elements(By.CSS_SELECTOR, row))
                answer = "gone"
            elif cmd == "shot":
                driver.save_screenshot(shot)
                answer = "saved"
            elif cmd == "":
                break
            else:
                print("error: unknown command %r" % cmd, flush=True)
                sys.exit(1)
            # Still the first page load: what was seen did not come from a reload.
            if driver.execute_script("return window.__firstLoad") is not True:
                print("error: the page was reloaded", flush=True)
                sys.exit(1)
            print(answer, flush=True)
    except Exception as e:  # noqa: BLE001 - any failure is the test's
        print("error: %r" % (e,), flush=True)
        sys.exit(1)
    finally:
        driver.quit()


main()
