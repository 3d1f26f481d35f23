"""POST /chat: the official Mini-Omni2 multipart stream (small random-weight model)."""
from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from omnitalk.server.app import BackgroundServer, create_app  # noqa: E402
from omnitalk.server.chat import AUDIO_HEAD, TEXT_HEAD, Rechunker, encode_parts, parse_stream  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(120)
QUESTION = base64.b64encode((ROOT / "examples" / "question.wav").read_bytes()).decode()
IMAGE = base64.b64encode((ROOT / "examples" / "shapes.png").read_bytes()).decode()


def http(method: str, url: str, payload=None, headers=None) -> tuple[int, dict, bytes]:
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


@pytest.fixture(scope="module")
def server():
    from omnitalk.engine import OmniModel
    app = create_app(OmniModel.from_random("tiny"), max_sessions=2, api_key=None)
    with BackgroundServer(app) as srv:
        srv.app = app
        yield srv


def test_parse_and_rechunk_units():
    body = encode_parts(b"\x01\x00\x02\x00", "hel") + encode_parts(b"", "lo")
    assert body.startswith(AUDIO_HEAD) and TEXT_HEAD in body
    assert parse_stream(body) == [("audio/wav", b"\x01\x00\x02\x00"), ("text/plain", b"hel"),
                                  ("audio/wav", b""), ("text/plain", b"lo")]
    rc = Rechunker(stride=1)   # 2048 samples per part
    out = rc.push(np.ones(3000, np.int16), "a") + rc.push(np.zeros(0, np.int16), "b") + rc.push(np.ones(2000, np.int16), "")
    assert [len(p) for p, _ in out] == [4096, 4096] and [t for _, t in out] == ["a", "b"]
    tail = rc.flush()
    assert len(tail) == 1 and len(tail[0][0]) == (5000 - 4096) * 2 and rc.flush() == []


def test_chat_streams_pcm_and_text_parts(server):
    status, headers, body = http("POST", server.url + "/chat", {"audio": QUESTION, "image": IMAGE,
                                                                "stream_stride": 2, "max_tokens": 60})
    assert status == 200
    assert headers["content-type"].startswith("multipart/x-mixed-replace; boundary=frame")
    parts = parse_stream(body)
    assert parts and len(parts) % 2 == 0
    assert [t for t, _ in parts] == ["audio/wav", "text/plain"] * (len(parts) // 2)
    audio = [p for t, p in parts if t == "audio/wav"]
    assert all(len(a) == 2 * 2048 * 2 for a in audio[:-1]) and 0 < len(audio[-1]) <= 2 * 2048 * 2
    for _, text in parts[1::2]:
        text.decode("utf-8")   # whole characters only


@pytest.mark.parametrize("payload, status", [
    ({}, 400),
    ({"audio": "not base64!"}, 400),
    ({"audio": base64.b64encode(b"not a wav file").decode()}, 400),
    ({"audio": QUESTION, "stream_stride": 0}, 400),
    ({"audio": QUESTION, "max_tokens": "many"}, 400),
])
def test_chat_rejects_bad_requests_without_leaking(server, payload, status):
    code, _, body = http("POST", server.url + "/chat", payload)
    assert code == status
    msg = json.dumps(json.loads(body))
    assert "Traceback" not in msg and "/work" not in msg and "site-packages" not in msg


def test_chat_needs_the_key_when_set():
    from omnitalk.engine import OmniModel
    app = create_app(OmniModel.from_random("tiny"), max_sessions=1, api_key="k")
    with BackgroundServer(app) as srv:
        assert http("POST", srv.url + "/chat", {"audio": QUESTION})[0] == 401
        assert http("POST", srv.url + "/chat", {"audio": QUESTION, "max_tokens": 10},
                    {"Authorization": "Bearer k"})[0] == 200


def test_page_and_health(server):
    status, _, body = http("GET", server.url + "/")
    assert status == 200 and b"<title>omnitalk</title>" in body
    for f in ("app.js", "worklet.js", "style.css"):
        assert http("GET", server.url + "/static/" + f)[0] == 200
    h = json.loads(http("GET", server.url + "/healthz")[2])
    assert h["status"] == "ok" and h["max_sessions"] == 2


def test_chat_client_leaving_mid_stream_frees_the_session(server):
    import socket
    import time
    sched = server.app.state.ctx.scheduler
    body = json.dumps({"audio": QUESTION, "max_tokens": 2000}).encode()
    s = socket.create_connection(("127.0.0.1", server.port))
    s.sendall(b"POST /chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: "
              + str(len(body)).encode() + b"\r\n\r\n" + body)
    got = b""
    while b"audio/wav" not in got:
        got += s.recv(65536)
    assert sched.sessions == 1
    s.close()
    end = time.monotonic() + 20
    while sched.sessions and time.monotonic() < end:
        time.sleep(0.05)
    assert sched.sessions == 0
    assert http("POST", server.url + "/chat", {"audio": QUESTION, "max_tokens": 10})[0] == 200
