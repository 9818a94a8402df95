"""The page at / in a real headless Chromium (Debian's ``chromium`` + ``chromium-driver``, driven
by selenium): upload a real CIFAR-10 JPEG, see a label, explain it through a real RQ worker,
wait for the heatmap to load, read the model card; with API keys on, a plain 401 without a key
and a working page once one is typed. Screenshots go to ``var/screenshots/`` (git-ignored).

Locally the tests skip when Chromium is not installed; in CI (``CI`` set; ``.ci/run`` installs
it) they fail instead, so the browser test cannot silently vanish.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(600)

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
SHOTS = ROOT / "var" / "screenshots"
QUEUE = f"explain-web-{uuid.uuid4().hex[:6]}"
# a small explanation: the page sends no sizes, so the service's defaults decide
FAST_EXPLAIN = {"EXPLAIN_DEFAULT_SEGMENTS": "12", "EXPLAIN_DEFAULT_SAMPLES": "120", "EXPLAIN_QUEUE": QUEUE}


def _missing() -> str | None:
    for path in (CHROMIUM, CHROMEDRIVER):
        if not Path(path).exists():
            return f"{path} is not installed (apt-get install chromium chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[dev]')"
    return None


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    why = _missing()
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"the browser test cannot run in CI: {why}")
        pytest.skip(why)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1200,2400", "--disable-extensions"):  # fmt: skip
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    SHOTS.mkdir(parents=True, exist_ok=True)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def jpeg_path(cifar_jpeg: bytes, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("upload") / "cifar.jpg"
    path.write_bytes(cifar_jpeg)
    return path


def wait(driver, condition, timeout: float = 120, what: str = ""):
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.25).until(condition)
    except Exception:
        driver.save_screenshot(str(SHOTS / f"failed-{uuid.uuid4().hex[:6]}.png"))
        error = driver.find_element("id", "error").text
        raise AssertionError(f"timed out waiting for {what}; the page's error box says: {error!r}") from None


def loaded(driver, element_id: str) -> bool:
    """The <img> is shown and its picture has decoded (a blob: URL fetched with the key)."""
    return bool(driver.execute_script(
        "const i = document.getElementById(arguments[0]);"
        "return !i.hidden && i.complete && i.naturalWidth > 0 && i.src.startsWith('blob:');", element_id))  # fmt: skip


def test_upload_predict_explain_and_model_card(
    browser, jpeg_path: Path, start_service, start_worker, explain_redis_url: str, service_registry: Path
) -> None:
    from selenium.webdriver.common.by import By

    api = start_service(env={"REDIS_URL": explain_redis_url, **FAST_EXPLAIN})
    start_worker(service_registry, env={"EXPLAIN_QUEUE": QUEUE})
    version = api.client.get("/model").json()["version"]
    browser.get(api.url + "/")
    assert browser.title.startswith("shapserve")
    assert browser.find_element(By.ID, "key-form").is_displayed() is False  # no keys: no key field

    browser.find_element(By.ID, "file").send_keys(str(jpeg_path))
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#predictions li"), what="the predictions")
    classes = api.client.get("/model").json()["class_names"]
    items = browser.find_elements(By.CSS_SELECTOR, "#predictions li")
    labels = [li.find_element(By.CLASS_NAME, "label").text for li in items]
    assert len(labels) == 5 and set(labels) <= set(classes), labels
    assert "percent" in browser.find_element(By.CSS_SELECTOR, "#predictions .bar").get_attribute("aria-label")

    browser.find_element(By.ID, "explain").click()
    wait(browser, lambda d: loaded(d, "heatmap"), timeout=300, what="the heatmap")
    alt = browser.find_element(By.ID, "heatmap").get_attribute("alt")
    assert alt.startswith("SHAP heatmap of class ") and alt.split("class ")[1].split(" ")[0] in classes
    tabs = browser.find_elements(By.CSS_SELECTOR, "#tabs [role=tab]")
    assert len(tabs) == len(classes) + 1 and tabs[0].get_attribute("aria-selected") == "true"
    facts = browser.find_element(By.ID, "faithfulness").text
    assert "deletion AUC" in facts and "insertion AUC" in facts and "adjusted" in facts
    wait(browser, lambda d: loaded(d, "curves"), what="the faithfulness curves")
    browser.save_screenshot(str(SHOTS / "page-explained.png"))

    # another class's tab, by keyboard: its heatmap replaces the first
    tabs[0].send_keys("\ue014")  # ArrowRight
    wait(browser, lambda d: d.find_element(By.ID, "heatmap").get_attribute("data-classes") == tabs[1].text
         and loaded(d, "heatmap"), what="the second tab's heatmap")  # fmt: skip

    card = browser.find_element(By.ID, "model-card").text
    assert version in card and "accuracy on" in card and "macro precision / recall / F1" in card
    wait(browser, lambda d: loaded(d, "confusion"), what="the confusion matrix")
    rows = browser.find_elements(By.CSS_SELECTOR, "#per-class tbody tr")
    assert [r.find_element(By.TAG_NAME, "th").text for r in rows] == classes
    browser.execute_script("window.scrollTo(0, 0)")
    browser.save_screenshot(str(SHOTS / "page.png"))


def test_with_keys_the_page_says_401_plainly_then_works_once_a_key_is_typed(
    browser, jpeg_path: Path, start_service
) -> None:
    from selenium.webdriver.common.by import By

    from service import auth

    secret, key = auth.mint("page")
    api = start_service(env={"API_KEYS": key.entry()})
    browser.get(api.url + "/")
    browser.execute_script("sessionStorage.clear()")
    browser.get(api.url + "/")
    wait(browser, lambda d: d.find_element(By.ID, "key-form").is_displayed(), what="the key field")
    assert "401" in browser.find_element(By.ID, "model-card").text

    browser.find_element(By.ID, "file").send_keys(str(jpeg_path))
    wait(browser, lambda d: d.find_element(By.ID, "error").is_displayed(), what="the 401 message")
    error = browser.find_element(By.ID, "error").text
    assert error.startswith("401: ") and "API key" in error, error
    assert not browser.find_elements(By.CSS_SELECTOR, "#predictions li")

    browser.find_element(By.ID, "api-key").send_keys(secret)
    browser.find_element(By.CSS_SELECTOR, "#key-form button").click()
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#predictions li"), what="predictions with the key")
    assert not browser.find_element(By.ID, "error").is_displayed()
    version = api.client.get("/model", headers={"X-API-Key": secret}).json()["version"]
    wait(browser, lambda d: version in d.find_element(By.ID, "model-card").text, what="the model card with the key")
    browser.save_screenshot(str(SHOTS / "page-with-key.png"))
