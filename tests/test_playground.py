"""test_playground.py - the playground page at / in a real headless browser (Debian's chromium
driven through its chromedriver by Selenium): a completion typed and generated, a chat turn,
and the stop button ending a long answer early (the screenshot in the docs comes from
tools/playground_screenshot.py). Skips where chromium or Selenium are absent, unless
SMALLMIND_REQUIRE_BROWSER=1 (CI installs both and sets it)."""
import os
import shutil
import threading
import time
import warnings

import pytest

fastapi = pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from test_server import TOK, _free_port  # noqa: E402

import smallmind as sm  # noqa: E402
from smallmind.config import ServerOptions  # noqa: E402
from smallmind.generation.chat import DEFAULT_STOP, ChatTemplate  # noqa: E402
from smallmind.generation.server import create_app, uvicorn_config  # noqa: E402


def _browser():
    required = os.environ.get("SMALLMIND_REQUIRE_BROWSER") == "1"
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        if required:
            raise
        pytest.skip("selenium is not installed")
    if not (chromium and driver):
        if required:
            raise AssertionError("SMALLMIND_REQUIRE_BROWSER=1 but chromium / chromedriver are missing")
        pytest.skip("chromium and chromedriver are not installed (apt-get install chromium "
                    "chromium-driver)")
    os.environ.setdefault("SE_OFFLINE", "true")      # Selenium Manager must not download
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1100,1000"):
        opts.add_argument(arg)
    # the browser is not ours to instrument: under tools/sanitize.sh the sanitizer runtimes
    # preloaded into this process would be preloaded into chromedriver and chromium too (they
    # abort there), so the driver starts without them
    env = {k: v for k, v in os.environ.items()
           if k not in ("LD_PRELOAD", "ASAN_OPTIONS", "UBSAN_OPTIONS")}
    return webdriver.Chrome(service=Service(driver, env=env), options=opts)


def _wait(cond, timeout=60.0, what="the page"):
    end = time.time() + timeout
    while time.time() < end:
        got = cond()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _set(driver, element_id, value):
    el = driver.find_element("id", element_id)
    el.clear()
    el.send_keys(str(value))


def test_the_playground_in_a_real_browser(tmp_path):
    driver = _browser()
    # wide enough that 4000 tokens take seconds: the stop button has something to stop
    model = sm.TransformerModel(sm.ModelConfig(TOK.vocab_size, 64, 4, 4, 512, seed=2)).eval()
    port = _free_port()
    options = ServerOptions(host="127.0.0.1", port=port)
    app = create_app(model, TOK, options, model_name="playground-test")
    server = uvicorn.Server(uvicorn_config(app, options, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        _wait(lambda: server.started, 20, "the server")
        driver.get(f"http://127.0.0.1:{port}/")
        assert "smallmind playground" in driver.title
        # a completion, greedy: the streamed answer is the library's
        _set(driver, "prompt", "the qu")
        _set(driver, "max_tokens", 40)
        _set(driver, "temperature", 0)
        driver.find_element("id", "go").click()
        _wait(lambda: driver.find_element("id", "status").text == "done", what="the completion")
        want = sm.Sampling(model, TOK).generate("the qu", 40, temperature=0)
        assert driver.find_element("id", "out").get_attribute("textContent") == want
        # a chat turn through the default template
        driver.find_element("id", "mode-chat").click()
        assert driver.find_element("id", "go").text == "Send"
        _set(driver, "prompt", "the dog")
        driver.find_element("id", "go").click()
        _wait(lambda: driver.find_element("id", "status").text == "done", what="the chat answer")
        msgs = driver.find_elements("css selector", "#chat .msg")
        prompt = ChatTemplate.default().render([{"role": "user", "content": "the dog"}])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", sm.UnknownCharacterWarning)
            reply = sm.Sampling(model, TOK).generate(prompt, 40, temperature=0, stop=list(DEFAULT_STOP))
        assert [m.get_attribute("textContent") for m in msgs] == ["you: the dog", "model: " + reply]
        driver.save_screenshot(str(tmp_path / "playground.png"))
        assert (tmp_path / "playground.png").stat().st_size > 10_000
        # the stop button: a long completion, stopped once text arrives
        driver.find_element("id", "clear").click()
        driver.find_element("id", "mode-complete").click()
        _set(driver, "prompt", "the")
        _set(driver, "max_tokens", 4000)
        _set(driver, "temperature", 1)
        driver.find_element("id", "go").click()
        _wait(lambda: len(driver.find_element("id", "out").get_attribute("textContent")) > 5,
              what="the first text")
        driver.find_element("id", "stopbtn").click()
        _wait(lambda: driver.find_element("id", "status").text == "stopped", what="stopped")
        assert len(driver.find_element("id", "out").get_attribute("textContent")) < 4000
        engine = app.state.smallmind_engine
        _wait(lambda: engine.active == 0, 20, "the server to free the stopped generation")
    finally:
        driver.quit()
        server.should_exit = True
        thread.join(20)
