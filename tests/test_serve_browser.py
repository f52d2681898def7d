"""The search page in a real headless Chromium (the system's, through Selenium and its
chromedriver): type a query, see the thumbnails; upload an image, see its neighbours, itself
first; classify it. Screenshots go to the test's temporary directory (SCREENSHOTS=DIR keeps a
copy there too). Skipped, saying why, only where no Chromium is installed."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from stages.serve import Service
from tests.serve_helpers import COLOURS, build_pics, running

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER),
    reason="no chromium + chromedriver on PATH (apt-get install chromium chromium-driver; "
    ".ci/run installs them where apt-get works)",
)


def chromium():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as DriverService

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    options.add_argument("--window-size=1200,800")
    return webdriver.Chrome(service=DriverService(executable_path=DRIVER), options=options)


def loaded_thumbnails(browser) -> list[str]:
    """The ids of the result cards whose thumbnail the browser has decoded."""
    return browser.execute_script(
        "return [...document.querySelectorAll('#results .card img')]"
        ".filter(i => i.complete && i.naturalWidth > 0).map(i => i.alt);"
    )


def screenshot(browser, folder: Path, name: str) -> Path:
    path = folder / name
    browser.save_screenshot(str(path))
    keep = os.environ.get("SCREENSHOTS")
    if keep:
        shutil.copy(path, Path(keep) / name)
    return path


def test_search_page_in_chromium(tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    pics = build_pics(tmp_path / "data")
    with running(Service(pics["run"], pics["index"], "cpu")) as url:
        browser = chromium()
        wait = WebDriverWait(browser, 30)
        try:
            browser.get(url)
            wait.until(lambda b: "12 images of pics/train" in b.find_element(By.ID, "info").text)

            query = browser.find_element(By.ID, "q")
            query.clear()
            query.send_keys("a picture of a red thing")
            browser.find_element(By.ID, "k").clear()
            browser.find_element(By.ID, "k").send_keys("6")
            browser.find_element(By.CSS_SELECTOR, "#search-form button").click()
            wait.until(lambda b: len(loaded_thumbnails(b)) == 6)
            assert "6 results for" in browser.find_element(By.ID, "status").text
            assert screenshot(browser, tmp_path, "serve-text.png").stat().st_size > 0

            upload = pics["pics"] / "p5.png"
            browser.find_element(By.ID, "file").send_keys(str(upload))
            wait.until(lambda b: "results for p5.png" in b.find_element(By.ID, "status").text)
            wait.until(lambda b: len(loaded_thumbnails(b)) == 6)
            first = browser.find_element(By.CSS_SELECTOR, "#results .card")
            assert loaded_thumbnails(browser)[0] == "p5" and first.text.startswith("#1 1.000")
            screenshot(browser, tmp_path, "serve-image.png")

            labels = browser.find_element(By.ID, "labels")
            labels.clear()
            labels.send_keys(", ".join(COLOURS))
            browser.find_element(By.ID, "classify-button").click()
            wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#classes li")) == 3)
            shown = [
                li.text.split()[0] for li in browser.find_elements(By.CSS_SELECTOR, "#classes li")
            ]
            assert sorted(shown) == sorted(COLOURS)

            query.clear()
            query.send_keys(" ")
            browser.find_element(By.CSS_SELECTOR, "#search-form button").click()
            wait.until(lambda b: "empty" in b.find_element(By.ID, "status").text)
            assert browser.find_element(By.ID, "status").get_attribute("class") == "error"
            screenshot(browser, tmp_path, "serve-classify.png")
            errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
            assert all("400" in e["message"] for e in errors), errors  # only the refused query

            browser.get(f"{url}/docs")  # the OpenAPI docs render offline: no CDN is reachable
            wait.until(lambda b: "/api/search" in b.find_element(By.TAG_NAME, "body").text)
            screenshot(browser, tmp_path, "serve-docs.png")
        finally:
            browser.quit()
