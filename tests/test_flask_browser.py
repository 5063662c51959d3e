"""A real browser through the whole failover: refused while read-only, saved after promotion.

Headless Chromium from Debian (``/usr/bin/chromium``, ``/usr/bin/chromedriver``) driven by
Selenium, against the git.sr.ht stand-in served by a real HTTP server, whose database URL goes
through the lab's PgBouncer. Screenshots go to ``test-artifacts/`` at the repository root.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.wait import WebDriverWait
from sqlalchemy import create_engine

from integrations.gitsrht.web import create_app, init_db, serve
from srht_readonly.ops import sql

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
)
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
RECHECK = 0.5


@pytest.fixture
def browser() -> Iterator[webdriver.Chrome]:
    """Headless Chromium with a fresh profile; missing Chromium fails the test (never skips)."""
    profile = tempfile.mkdtemp(prefix="srht-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    options.add_argument("--window-size=1024,768")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def replaced(page: Any) -> Any:
    """A wait condition: the document ``page`` (its ``<html>`` element) belongs to is gone.

    Selenium's ``staleness_of`` asks the element and expects "stale element"; Chromium 156 sometimes
    answers a navigation in progress with "Node with given id does not belong to the document"
    instead (seen once in a second tab), which says the same thing.
    """

    def gone(_driver: webdriver.Chrome) -> bool:
        try:
            page.is_enabled()
        except StaleElementReferenceException:
            return True
        except WebDriverException as exc:
            if "does not belong to the document" in str(exc):
                return True
            raise
        return False

    return gone


def submit_create_form(driver: webdriver.Chrome, base: str, name: str, description: str) -> None:
    driver.get(f"{base}/create")
    driver.find_element(By.ID, "name").send_keys(name)
    driver.find_element(By.ID, "description").send_keys(description)
    page = driver.find_element(By.TAG_NAME, "html")
    driver.find_element(By.ID, "create-submit").click()
    WebDriverWait(driver, 10).until(replaced(page))


def explanation(driver: webdriver.Chrome) -> str:
    return driver.find_element(By.ID, "srht-readonly-message").text


def until_saved(driver: webdriver.Chrome, name: str, retry: Any, *, timeout: float = 10) -> int:
    """Retry (as a user would) until the repository page shows; returns how many retries it took."""
    started, tries = time.monotonic(), 0
    while driver.find_elements(By.ID, "srht-readonly-message"):
        assert time.monotonic() - started < timeout, f"still refused after {tries} retries"
        time.sleep(0.1)
        page = driver.find_element(By.TAG_NAME, "html")
        retry()
        WebDriverWait(driver, 10).until(replaced(page))  # the new page loaded
        tries += 1
    assert driver.find_element(By.ID, "repo-name").text == f"~alice/{name}"
    return tries


def test_a_form_refused_while_read_only_is_saved_by_refreshing_after_promotion(srht_fresh_lab, browser, capsys):
    lab = srht_fresh_lab
    engine = create_engine(lab.primary.url)
    init_db(engine, "alice")
    engine.dispose()
    lab.wait_caught_up(timeout=10)
    standby = lab.standby
    lab.pgbouncer.point_at(standby)  # the plan's read-only failover
    app = create_app(lab.pgbouncer.url, config={
        "SRHT_READONLY_RECHECK": RECHECK, "SRHT_READONLY_STATUS_URL": "https://status.sr.ht",
    })
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "flask_read_only_page.png"
    try:
        with serve(app) as base:
            # Tab 1: the first write of the failover fails in the view; tab 2: refused before it.
            submit_create_form(browser, base, "by-refresh", "saved by refreshing")
            assert "git.sr.ht is in read-only mode" in explanation(browser)
            page = browser.find_element(By.TAG_NAME, "body").text
            assert browser.find_element(By.TAG_NAME, "h1").text == "Your change could not be saved right now"
            assert "Nothing was saved." in page and "refreshing this page" in page
            assert browser.find_element(By.LINK_TEXT, "status page").get_attribute("href") == "https://status.sr.ht/"
            browser.save_screenshot(str(shot))
            refresh_tab = browser.current_window_handle
            browser.switch_to.new_window("tab")
            submit_create_form(browser, base, "by-button", "saved by the retry button")
            assert "git.sr.ht is in read-only mode" in explanation(browser)
            button_tab = browser.current_window_handle
            assert browser.find_element(By.ID, "srht-readonly-retry").text == "Try again"

            promotion = lab.promote(standby)  # PgBouncer already points at it
            lab.pgbouncer.point_at(standby)  # (a no-op here, as in the runbook's order)

            browser.switch_to.window(refresh_tab)
            refreshes = until_saved(browser, "by-refresh", browser.refresh)
            assert browser.find_element(By.ID, "repo-description").text == "saved by refreshing"
            browser.switch_to.window(button_tab)
            presses = until_saved(
                browser, "by-button", lambda: browser.find_element(By.ID, "srht-readonly-retry").click()
            )
            assert browser.find_element(By.ID, "repo-description").text == "saved by the retry button"
            browser.save_screenshot(str(ARTIFACTS / "flask_saved_after_promotion.png"))
            browser.get(f"{base}/")
            assert "read-only-banner" not in browser.page_source
    finally:
        app.extensions["gitsrht.db"].get_bind().dispose()
    saved = sql.query(standby.dsn, "SELECT name, description FROM repository ORDER BY name")
    assert saved == [("by-button", "saved by the retry button"), ("by-refresh", "saved by refreshing")]
    assert shot.stat().st_size > 10_000
    with capsys.disabled():
        print(f"\n[browser] read-only page screenshot: {shot}\n[browser] promotion {promotion.seconds:.2f} s; "
              f"saved after {refreshes} refresh(es) and {presses} press(es) of Try again (recheck {RECHECK} s)")
