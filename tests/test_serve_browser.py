"""The web chat page in a real headless Chromium, driven over the Chrome DevTools Protocol.

Loads ``/``, attaches an image through the file input, types a question, clicks Send, and waits
for the streamed answer — which must equal the engine's own greedy answer for the same image and
question — then continues the conversation and clears it. A screenshot is saved as
``test-artifacts/serve_web_chat.png``. Skipped only when no Chromium executable exists (Debian:
``apt-get install chromium``).
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from serve_helpers import ThreadServer, tiny_engine  # noqa: F401  (tiny_engine is a fixture)

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
CHROMIUM = next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome"))
                 if p), None)

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium executable (apt-get install chromium)")


class CDP:
    """A minimal Chrome DevTools Protocol client over one page's websocket."""

    def __init__(self, ws_url: str):
        from websockets.sync.client import connect

        self.ws = connect(ws_url, max_size=64 * 1024 * 1024, open_timeout=20)
        self.next_id = 0

    def call(self, method: str, **params):
        """Send a command and return its result (events in between are ignored)."""
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=60))
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def js(self, expression: str):
        """Evaluate JavaScript in the page and return its value."""
        res = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in res:
            raise RuntimeError(f"{expression}: {res['exceptionDetails']}")
        return res["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60.0):
        """Poll a JavaScript expression until it is truthy; return its value."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.1)
        raise TimeoutError(f"page never satisfied: {expression}")

    def click(self, selector: str):
        """A real mouse click at the centre of an element."""
        box = self.js(f"(() => {{ const r = document.querySelector({json.dumps(selector)})"
                      f".getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; }})()")
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1], button="left", clickCount=1)

    def type_into(self, selector: str, text: str):
        """Focus an element and type text into it as keyboard input."""
        self.js(f"document.querySelector({json.dumps(selector)}).focus()")
        self.call("Input.insertText", text=text)

    def close(self):
        self.ws.close()


@pytest.fixture
def browser(tmp_path):
    profile = tempfile.mkdtemp(prefix="chromium-", dir=tmp_path)
    proc = subprocess.Popen(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-extensions", "--mute-audio", f"--user-data-dir={profile}",
         "--remote-debugging-port=0", "--window-size=1100,820", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    port_file = Path(profile) / "DevToolsActivePort"
    deadline = time.monotonic() + 30
    while not (port_file.exists() and port_file.read_text().strip()):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"chromium did not start (exit code {proc.poll()})")
        time.sleep(0.05)
    port = int(port_file.read_text().split()[0])
    pages = [t for t in httpx.get(f"http://127.0.0.1:{port}/json/list").json() if t["type"] == "page"]
    cdp = CDP(pages[0]["webSocketDebuggerUrl"])
    yield cdp
    cdp.close()
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def _scan(path: Path):
    """A real fundus photograph from scikit-image's sample data, 256 px, saved as PNG."""
    from PIL import Image
    from skimage import data

    img = Image.fromarray(data.retina()).resize((256, 256), Image.BICUBIC)
    img.save(path)
    return Image.open(path).convert("RGB")


def test_web_chat_page_in_chromium(browser, tiny_ckpt, tiny_engine, tmp_path):
    from llavamed_core.infer import ChatRequest, GenerationParams
    from llavamed_core.serve.config import ServeConfig

    image_path = tmp_path / "retina.png"
    image = _scan(image_path)
    question = "Is there an abnormality in this fundus photograph?"
    want = tiny_engine.generate([ChatRequest(
        [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}],
        GenerationParams(max_new_tokens=24))])[0]

    with ThreadServer(ServeConfig(model=tiny_ckpt, port=0), engine_loader=lambda: tiny_engine) as srv:
        cdp = browser
        cdp.call("Page.enable")
        cdp.call("Page.navigate", url=srv.url + "/")
        status = cdp.wait_for("document.readyState === 'complete' && "
                              "document.getElementById('status').className === 'ready' && "
                              "document.getElementById('status').textContent")
        assert status == "tiny ready"
        # Greedy decoding and a short answer, through the page's own controls.
        cdp.js("(() => { const t = document.getElementById('temperature'); t.value = '0';"
               " t.dispatchEvent(new Event('input')); document.getElementById('max-tokens').value = '24'; })()")
        assert cdp.js("document.getElementById('temperature-value').textContent") == "0"
        # Attach the image through the real file input.
        doc = cdp.call("DOM.getDocument")
        node = cdp.call("DOM.querySelector", nodeId=doc["root"]["nodeId"], selector="#image-input")
        cdp.call("DOM.setFileInputFiles", nodeId=node["nodeId"], files=[str(image_path)])
        cdp.wait_for("document.getElementById('preview').style.display === 'flex'")
        cdp.type_into("#question", question)
        cdp.click("#send")
        answer = cdp.wait_for("(() => { const m = document.querySelector('.msg.assistant');"
                              " return m && m.dataset.state === 'done' && m.querySelector('.text').textContent; })()")
        assert answer == want.text
        meta = cdp.js("document.querySelector('.msg.assistant .meta').textContent")
        assert meta == f"{want.completion_tokens} tokens"
        assert cdp.js("document.querySelectorAll('.msg.user img').length") == 1
        # Continue the conversation: the second request carries the history (4 messages after it).
        cdp.type_into("#question", "What colour is it?")
        cdp.click("#send")
        cdp.wait_for("document.querySelectorAll('.msg.assistant[data-state=done]').length === 2")
        assert cdp.js("state.history.length") == 4
        assert cdp.js("state.history[0].content[0].image_url.url.startsWith('data:image/png;base64,')")
        # The research-use notice, and the conversation exported as JSON and Markdown.
        assert "not for clinical diagnosis" in cdp.js("document.getElementById('notice').textContent").lower()
        assert cdp.js("document.getElementById('export-json').disabled") is False
        exported = json.loads(cdp.js("conversationAs('json')"))
        assert exported["model"] == "tiny" and exported["messages"] == cdp.js("state.history")
        md = cdp.js("conversationAs('md')")
        assert f"**You:**\n\n*[image attached]*\n\n{question}" in md and want.text in md
        assert "What colour is it?" in md and "research use" in md
        # A click on the image enlarges it; a second shows its own pixels; Escape closes.
        cdp.click(".msg.user img")
        assert cdp.js("!document.getElementById('zoom').hidden && document.getElementById('zoom-img').naturalWidth") == 256
        cdp.click("#zoom")
        assert cdp.js("document.getElementById('zoom').className") == "actual"
        cdp.call("Input.dispatchKeyEvent", type="keyDown", key="Escape", code="Escape", windowsVirtualKeyCode=27)
        assert cdp.js("document.getElementById('zoom').hidden") is True
        shot = cdp.call("Page.captureScreenshot", format="png")
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / "serve_web_chat.png").write_bytes(base64.b64decode(shot["data"]))
        # At a phone's width (400 px) nothing sticks out sideways and every control is reachable.
        cdp.call("Emulation.setDeviceMetricsOverride", width=400, height=800, deviceScaleFactor=1, mobile=True)
        assert cdp.js("document.documentElement.scrollWidth") <= 400
        assert cdp.js("[...document.querySelectorAll('button:not([hidden]), label.button, textarea, .msg')]"
                      ".every((e) => { const r = e.getBoundingClientRect(); return r.left >= 0 && r.right <= 400; })")
        shot = cdp.call("Page.captureScreenshot", format="png")
        (ARTIFACTS / "serve_web_chat_400px.png").write_bytes(base64.b64decode(shot["data"]))
        cdp.call("Emulation.clearDeviceMetricsOverride")
        # Clear starts over.
        cdp.click("#clear")
        assert cdp.js("document.querySelectorAll('.msg').length") == 0
        assert cdp.js("state.history.length") == 0
        assert cdp.js("document.getElementById('export-json').disabled") is True
        # One token is "1 token".
        cdp.js("document.getElementById('max-tokens').value = '1'")
        cdp.type_into("#question", "hi")
        cdp.click("#send")
        meta = cdp.wait_for("document.querySelector('.msg.assistant[data-state=done] .meta')?.textContent")
        assert meta == "1 token"
        cdp.click("#clear")
        # An error from the API is shown on the page, not swallowed.
        cdp.js("document.getElementById('max-tokens').value = '999999'")
        cdp.type_into("#question", "hello")
        cdp.click("#send")
        err = cdp.wait_for("document.querySelector('.msg.error')?.textContent")
        assert "over this server's limit of 2048" in err
        assert cdp.js("document.getElementById('question').value") == "hello"  # kept for a retry
