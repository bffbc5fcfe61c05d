"""playground_screenshot.py - the screenshot of the playground in docs/img/playground.png: serves
a checkpoint, opens the page in headless chromium (Selenium), runs one chat turn and one
completion, and saves the window.

    smallmind demo --steps 800                       # a small trained model, smallmind-demo/
    python tools/playground_screenshot.py smallmind-demo/model_last.safetensors
"""
import os
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import uvicorn  # noqa: E402
from test_playground import _browser, _set, _wait  # noqa: E402
from test_server import _free_port  # noqa: E402

import smallmind as sm  # noqa: E402
from smallmind.config import ServerOptions  # noqa: E402
from smallmind.generation.server import create_app, uvicorn_config  # noqa: E402

OUT = os.path.join("docs", "img", "playground.png")


def main(checkpoint, out=OUT):
    model, tok = sm.load_checkpoint(checkpoint)
    port = _free_port()
    options = ServerOptions(host="127.0.0.1", port=port)
    app = create_app(model, tok, options, model_name="demo")
    server = uvicorn.Server(uvicorn_config(app, options, log_level="error"))
    threading.Thread(target=server.run, daemon=True).start()
    _wait(lambda: server.started, 20, "the server")
    driver = _browser()
    try:
        driver.get(f"http://127.0.0.1:{port}/")
        _set(driver, "max_tokens", 160)
        _set(driver, "temperature", 0.7)
        _set(driver, "seed", 1)
        _set(driver, "prompt", "The model ")
        driver.find_element("id", "go").click()
        _wait(lambda: driver.find_element("id", "status").text == "done")
        time.sleep(0.3)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        driver.save_screenshot(out)
        print("wrote", out)
    finally:
        driver.quit()
        server.should_exit = True


if __name__ == "__main__":
    main(*sys.argv[1:])
