"""End to end in headless Chromium (Debian's `chromium` + `chromium-driver`, driven by Selenium): the page
captures a fake microphone fed from the bundled spoken question, the server hears the turn and answers,
the page plays the audio and shows the text, and the Stop button interrupts playback."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
LONG = "Tell me a long story about a cat."

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(300),
    pytest.mark.skipif(CHROMIUM is None or DRIVER is None,
                       reason="needs Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver)"),
]
webdriver = pytest.importorskip("selenium.webdriver", reason="needs the selenium package (pip install selenium)")
pytest.importorskip("fastapi")


@pytest.fixture(scope="module")
def server():
    import torch

    from omnitalk.engine import OmniModel
    from omnitalk.server.app import BackgroundServer, Limits, create_app
    model = OmniModel.from_pretrained(ROOT / "tests" / "fixtures" / "parity" / "checkpoint", download=False)
    # The random weights end some answers' speech at once (layer 6's `_eoa` wins the argmax) depending
    # on exactly where VAD cut the turn, which varies with timing. With the `_eoa` rows zeroed the speech
    # runs to the token budget, so every answer has audio for the page to play.
    L, wte = model.layout, model.lm.transformer.wte.weight
    wte.data = wte.data.clone()
    with torch.no_grad():
        for j in range(L.n_audio_layers):
            wte[L.shift(L.eoa, j)] = 0
    app = create_app(model, max_sessions=2, limits=Limits(max_output_tokens=160))
    with BackgroundServer(app) as srv:
        yield srv


@pytest.fixture()
def browser(tmp_path):
    yield from _chrome(tmp_path, ROOT / "examples" / "question.wav")


def _chrome(tmp_path, question: Path):
    """Headless Chromium whose fake microphone plays `question` once, with pauses around it."""
    import soundfile as sf
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    from omnitalk.audio import load_audio
    q = load_audio(question)
    wav = tmp_path / "question.wav"   # the bundled question with a pause around it, played once
    sf.write(wav, np.concatenate([np.zeros(16000, np.float32), q, np.zeros(16000 * 4, np.float32)]), 16000,
             subtype="PCM_16")
    opts = Options()
    opts.binary_location = CHROMIUM
    for flag in ["--headless", "--no-sandbox", "--disable-gpu", "--use-fake-ui-for-media-stream",
                 "--use-fake-device-for-media-stream", f"--use-file-for-fake-audio-capture={wav}%noloop",
                 "--autoplay-policy=no-user-gesture-required", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-dev-shm-usage",
                 f"--user-data-dir={tmp_path / 'profile'}"]:
        opts.add_argument(flag)
    drv = webdriver.Chrome(service=Service(DRIVER), options=opts)
    try:
        yield drv
    finally:
        drv.quit()


def wait_for(drv, js: str, timeout: float = 60.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = drv.execute_script("return " + js)
        if v:
            return v
        time.sleep(0.1)
    stats = drv.execute_script("return JSON.stringify(window.omnitalk.stats)")
    log = drv.execute_script("return window.omnitalk.log.slice(-30).join(' ')")
    raise AssertionError(f"timed out waiting for {js}; page state: {stats} {log}")


def test_page_talks_and_can_be_interrupted(server, browser):
    drv = browser
    drv.get(server.url + "/")
    assert drv.execute_script("return window.isSecureContext")   # http://127.0.0.1 counts as potentially trustworthy
    drv.find_element("id", "connect").click()
    wait_for(drv, "window.omnitalk.connected", 30)
    # the spoken question: VAD turn -> answer audio and text
    wait_for(drv, "window.omnitalk.stats.speechStarted > 0", 60)
    wait_for(drv, "window.omnitalk.log.includes('input_audio_buffer.committed')", 60)
    wait_for(drv, "window.omnitalk.stats.audioChunks > 0", 120)
    wait_for(drv, "window.omnitalk.stats.completed + window.omnitalk.stats.cancelled > 0", 120)
    bot = drv.execute_script("return [...document.querySelectorAll('.line.bot span')].map(e => e.textContent).join('')")
    assert bot.strip(), "the answer's text is shown"
    assert drv.execute_script("return document.querySelectorAll('.line.user').length") >= 1
    assert drv.execute_script("return window.omnitalk.stats.errors.length") == 0

    # a long answer, then the Stop button while it plays
    box = drv.find_element("id", "text")
    box.send_keys(LONG)
    drv.find_element("id", "send").click()
    before = drv.execute_script("return window.omnitalk.stats.audioChunks")
    wait_for(drv, f"window.omnitalk.stats.audioChunks > {before} + 1", 120)
    wait_for(drv, "window.omnitalk.sources.length > 0", 30)
    drv.find_element("id", "stop").click()
    assert drv.execute_script("return window.omnitalk.sources.length") == 0      # queued audio flushed at once
    wait_for(drv, "window.omnitalk.stats.lastStatus === 'cancelled'", 30)
    wait_for(drv, "window.omnitalk.log.includes('conversation.item.truncated')", 30)
    chunks = drv.execute_script("return window.omnitalk.stats.audioChunks")
    time.sleep(1.0)
    assert drv.execute_script("return window.omnitalk.stats.audioChunks") == chunks   # nothing plays after stop
    assert not drv.execute_script("return window.omnitalk.sources.some(r => r.start + r.dur > window.omnitalk.ctx.currentTime)")


@pytest.fixture(scope="module")
def demo_server():
    from omnitalk import demo
    from omnitalk.server.app import BackgroundServer, create_app
    if not demo.available():
        pytest.skip("no embedded demo model")
    app = create_app(demo.load_model("demo")[0], max_sessions=2)
    with BackgroundServer(app) as srv:
        yield srv


def test_page_with_the_embedded_demo_model(demo_server, tmp_path):
    """The page on the offline demo model: its spoken question comes through the fake microphone, the
    server hears the turn, and the page shows an answer in the demo's own vocabulary and plays speech."""
    import json

    from omnitalk import demo
    vocab = json.loads((demo.DIR / "tokenizer.json").read_text())["model"]["vocab"]
    for drv in _chrome(tmp_path, demo.QUESTION):
        drv.get(demo_server.url + "/")
        drv.find_element("id", "connect").click()
        wait_for(drv, "window.omnitalk.connected", 30)
        wait_for(drv, "window.omnitalk.log.includes('input_audio_buffer.committed')", 60)
        wait_for(drv, "window.omnitalk.stats.completed > 0", 120)
        assert drv.execute_script("return window.omnitalk.stats.audioChunks") > 0
        assert drv.execute_script("return window.omnitalk.stats.errors.length") == 0
        bot = drv.execute_script("return [...document.querySelectorAll('.line.bot span')].map(e => e.textContent).join(' ')")
        words = bot.split()
        assert words and all(w in vocab for w in words), bot
