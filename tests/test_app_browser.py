"""`python -m infer.app` in a real browser: headless Chromium (Debian's chromium + chromium-driver, driven by
selenium; nothing is downloaded at run time) loads the page, finds the example story pre-filled, types a story,
clicks generate, watches the progress bar name the phases, waits for the panels in the gallery and saves a
screenshot (STORYDIFF_APP_SCREENSHOT=docs/app.png keeps it for the docs).
"""

import os
import shutil
import time

import numpy as np
import pytest
from PIL import Image
from test_app import STORY4, server  # noqa: F401  (the fixture: this module gets its own app process)

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="needs Debian's chromium and chromium-driver packages (`make test` installs them when run as root)")

# Every text the progress bar shows during the run is recorded in the page (the run can be faster than polling).
RECORD_PROGRESS = """
window.__progress = new Set();
new MutationObserver(() => {
  for (const el of document.querySelectorAll('.progress-level-inner')) {
    const t = el.innerText.trim();
    if (t) window.__progress.add(t);
  }
}).observe(document.body, {subtree: true, childList: true, characterData: true});
"""


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1600", "--force-device-scale-factor=1"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def _type_into(el, text):
    from selenium.webdriver.common.keys import Keys

    el.click()
    el.send_keys(Keys.CONTROL, "a")
    el.send_keys(Keys.DELETE)
    el.send_keys(text)


def test_story_in_the_browser(server, browser, tmp_path):  # noqa: F811  (the imported fixture, used as pytest does)
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server.url)
    editor = WebDriverWait(browser, 60).until(EC.element_to_be_clickable((By.CSS_SELECTOR, "#story-text textarea")))
    assert "[Lena]" in editor.get_attribute("value")          # pre-filled with the example story
    _type_into(editor, STORY4)
    for field, value in (("height", "64"), ("width", "64"), ("steps", "3")):   # id length stays "auto"
        _type_into(browser.find_element(By.CSS_SELECTOR, f"#{field} input"), value)
    assert browser.find_element(By.CSS_SELECTOR, "#story-text textarea").get_attribute("value") == STORY4
    browser.execute_script(RECORD_PROGRESS)
    t0 = time.perf_counter()
    browser.find_element(By.CSS_SELECTOR, "#generate").click()
    WebDriverWait(browser, 300).until(
        lambda d: len(d.find_elements(By.CSS_SELECTOR, "#panels img")) >= 4
        or d.find_elements(By.CSS_SELECTOR, ".toast-message-text"), "no panels appeared in the gallery")
    errors = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".toast-message-text")]
    assert not errors, f"the page shows an error: {errors}\n{server.log()}"
    print(f"panels in the gallery after {time.perf_counter() - t0:.1f} s")
    WebDriverWait(browser, 30).until(lambda d: "run folder: stories/" in d.find_element(
        By.CSS_SELECTOR, "#story-log textarea").get_attribute("value"))
    captions = browser.find_element(By.CSS_SELECTOR, "#panels").text
    assert "Monday." in captions and "The end." in captions
    progress = browser.execute_script("return Array.from(window.__progress)")
    print(f"progress texts seen: {progress}")
    seen = " ".join(progress)
    assert all(phase in seen for phase in ("write Ana", "read", "decode")), progress

    # The whole page after the run, at the page's height.
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(1280, min(max(height, 900), 3000))
    browser.execute_script("window.scrollTo(0, 0)")
    time.sleep(0.5)
    shot = tmp_path / "app.png"
    assert browser.save_screenshot(str(shot))
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[1] == 1280 and pixels.shape[0] >= 900 and pixels.std() > 10
    keep = os.environ.get("STORYDIFF_APP_SCREENSHOT")
    if keep:
        shutil.copyfile(shot, keep)

    # A malformed story: the CLI's one-line message in the page, and no new run folder.
    runs = sorted(os.listdir(os.path.join(server.out, "stories")))
    _type_into(browser.find_element(By.CSS_SELECTOR, "#story-text textarea"), STORY4 + "[Cid] jumps\n")
    browser.find_element(By.CSS_SELECTOR, "#generate").click()
    shown = WebDriverWait(browser, 60).until(lambda d: [e.text for e in d.find_elements(
        By.CSS_SELECTOR, ".toast-message-text") if "Cid" in e.text], "no error message appeared in the page")
    print(f"error shown in the page: {shown}")
    assert shown[0].startswith("line 7: unknown character [Cid]")
    assert sorted(os.listdir(os.path.join(server.out, "stories"))) == runs
