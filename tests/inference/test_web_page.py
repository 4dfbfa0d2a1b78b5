"""The chat page at / in a real headless browser (Debian's chromium + chromedriver, via selenium):
a typed message streams a reply into the page, and the reply equals the API's answer."""
from __future__ import annotations

import shutil
import time

import httpx
import pytest

from inference import server
from inference.async_engine import AsyncEngine
from tests.inference import test_server_helpers as H

MODEL = "tiny"
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER),
    reason="chromium/chromedriver not installed: apt-get install -y chromium chromium-driver",
)


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    tok = H.load_tokenizer(H.train_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json"))
    engine = H.slow_down(H.tiny_engine(tok, 256), 0.03)  # slow enough to watch the text grow
    settings = server.ServerSettings(model_name=MODEL, max_model_len=256)
    with H.LiveServer(server.build_app(AsyncEngine(engine), tok, settings)) as url:
        yield url


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={tmp_path_factory.mktemp('chrome')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=options)
    yield driver
    driver.quit()


def wait_for(predicate, timeout: float = 20.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError("timed out waiting for the page")


def test_message_streams_into_the_page(live, browser):
    from selenium.webdriver.common.by import By

    url = live
    message = "Once upon a time there was a little robot"
    expected = httpx.post(url + "/v1/chat/completions", timeout=30, json={
        "model": MODEL, "messages": [{"role": "user", "content": message}], "temperature": 0, "max_tokens": 30,
    }).json()["choices"][0]["message"]["content"]
    assert len(expected) > 5, "the tiny model should say something"

    browser.get(url + "/")
    wait_for(lambda: browser.find_element(By.ID, "model").text == MODEL)
    for field, value in (("temperature", "0"), ("max-tokens", "30")):
        box = browser.find_element(By.ID, field)
        box.clear()
        box.send_keys(value)
    browser.find_element(By.ID, "input").send_keys(message)
    browser.find_element(By.ID, "send").click()

    bubble = wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, ".msg.assistant"))[-1]
    seen = set()
    while bubble.get_attribute("data-state") != "done":
        seen.add(bubble.get_attribute("textContent"))
        time.sleep(0.01)
    partial = {t for t in seen if t and t != expected}
    assert partial, "the reply appeared all at once, not streamed"
    assert all(expected.startswith(t) for t in partial)
    assert bubble.get_attribute("textContent") == expected
    assert browser.find_elements(By.CSS_SELECTOR, ".msg.user")[-1].text == message
    assert not browser.find_elements(By.CSS_SELECTOR, ".msg.error")


def test_a_long_conversation_drops_old_turns_and_goes_on(live, browser):
    """Found under test: on a 256-token model every turn after the fifth failed ("the prompt is 265
    tokens but the context is 256") until "New chat", and the empty failed reply stayed."""
    from selenium.webdriver.common.by import By

    browser.get(live + "/")
    wait_for(lambda: browser.find_element(By.ID, "model").text == MODEL)
    browser.find_element(By.ID, "reset").click()
    for field, value in (("temperature", "0"), ("max-tokens", "40")):
        box = browser.find_element(By.ID, field)
        box.clear()
        box.send_keys(value)
    for turn in range(8):
        browser.find_element(By.ID, "input").send_keys(f"Turn {turn}: once upon a time there was a little robot who loved to count.")
        browser.find_element(By.ID, "send").click()
        wait_for(lambda: len(browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")) == turn + 1
                 and browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1].get_attribute("data-state") == "done"
                 and browser.find_element(By.ID, "send").is_enabled(), timeout=60)
    assert not browser.find_elements(By.CSS_SELECTOR, ".msg.error")
    assert browser.find_elements(By.CSS_SELECTOR, ".msg.notice"), "old turns should have been dropped, and said so"
    replies = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")
    assert all(r.get_attribute("textContent") for r in replies)
