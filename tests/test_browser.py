"""The HTML report in a real browser: Debian's chromium, headless, driven by Selenium
through chromedriver (both installed by scripts/install-system-deps.sh, which the
Makefile's test target runs).

Opened from disk with no network: no console errors, no resource loaded, the chart is
drawn with a non-zero size, a finding's fix is on the page, the injected module name
``<img src=x onerror=alert(1)>`` is shown as text and raises no alert, and dark mode
follows prefers-color-scheme. A screenshot of each run is kept in test-artifacts/.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GOLD = Path(__file__).parent / "gold"
ARTIFACTS = ROOT / "test-artifacts"
EVIL = "<img src=x onerror=alert(1)>"


def _require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} is not installed: run scripts/install-system-deps.sh (make test does)", pytrace=False)
    return path


@pytest.fixture(scope="module")
def report_file(tmp_path_factory):
    import gradaudit
    from gradaudit.loading import load_target
    from gradaudit.report import html

    loaded = load_target(str(GOLD / "evil_names.py"))
    report = gradaudit.audit(loaded.model, loaded.inputs, target="tests/gold/evil_names.py",
                             input_source=loaded.input_source)
    path = tmp_path_factory.mktemp("html") / "audit.html"
    path.write_text(html.render(report), encoding="utf-8")
    return report, path


@pytest.fixture(scope="module")
def driver():
    chromium = _require("chromium")
    chromedriver = _require("chromedriver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("selenium is not installed: pip install -e '.[dev]'", pytrace=False)
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1200,1600", "--no-first-run", "--disable-extensions"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    drv = webdriver.Chrome(service=Service(executable_path=chromedriver), options=opts)
    drv.set_page_load_timeout(60)
    yield drv
    drv.quit()


@pytest.fixture(scope="module")
def page(driver, report_file):
    report, path = report_file
    driver.get(path.as_uri())
    ARTIFACTS.mkdir(exist_ok=True)
    driver.save_screenshot(str(ARTIFACTS / "report.png"))
    return driver, report


def test_no_console_errors(page):
    driver, _ = page
    logs = driver.get_log("browser")
    assert [e for e in logs if e["level"] in ("SEVERE", "ERROR")] == []


def test_no_alert_and_no_injected_element(page):
    from selenium.common.exceptions import NoAlertPresentException

    driver, _ = page
    with pytest.raises(NoAlertPresentException):
        driver.switch_to.alert  # noqa: B018 - the property raises when no alert is open
    assert driver.execute_script("return document.querySelectorAll('img').length") == 0


def test_injected_name_shown_as_text(page):
    driver, _ = page
    assert EVIL in driver.execute_script("return document.body.innerText")


def test_nothing_loaded_from_anywhere(page):
    driver, _ = page
    assert driver.execute_script("return performance.getEntriesByType('resource').length") == 0


def test_chart_is_visible(page):
    driver, _ = page
    from selenium.webdriver.common.by import By

    svg = driver.find_element(By.CSS_SELECTOR, "svg.chart")
    driver.execute_script("arguments[0].scrollIntoView()", svg)
    size = svg.size
    assert svg.is_displayed() and size["width"] > 300 and size["height"] > 100
    # the plotted lines are there, drawn with a length
    lengths = driver.execute_script(
        "return [...document.querySelectorAll('svg.chart g.series polyline')].map(p => p.getTotalLength())")
    assert len(lengths) >= 2 and min(lengths) > 100


def test_fix_is_on_the_page(page):
    driver, report = page
    from selenium.webdriver.common.by import By

    fixes = [f.fix for f in report.findings if f.fix]
    assert fixes
    shown = [el.text for el in driver.find_elements(By.CSS_SELECTOR, "pre.fix")]
    assert fixes[0] in shown


def test_dark_mode_follows_the_system(driver, report_file):
    _, path = report_file
    driver.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": [{"name": "prefers-color-scheme", "value": "dark"}]})
    try:
        driver.get(path.as_uri())
        bg = driver.execute_script("return getComputedStyle(document.body).backgroundColor")
        driver.save_screenshot(str(ARTIFACTS / "report-dark.png"))
    finally:
        driver.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": []})
    assert bg == "rgb(13, 17, 23)"
    driver.get(path.as_uri())
    assert driver.execute_script("return getComputedStyle(document.body).backgroundColor") == "rgb(255, 255, 255)"
