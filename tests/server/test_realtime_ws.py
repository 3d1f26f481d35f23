"""Hand-written WebSocket traffic against the realtime endpoint (small random-weight model): malformed
and unknown events, limits, half-written frames, clients that vanish mid-answer, slow clients, server
restarts, browser-style auth, and the beta/GA choice."""
from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import struct
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
websockets = pytest.importorskip("websockets")
from websockets.sync.client import connect  # noqa: E402

from omnitalk.server.app import BackgroundServer, Limits, create_app  # noqa: E402

pytestmark = pytest.mark.timeout(120)
KiB = 1024


@pytest.fixture(scope="module")
def model():
    from omnitalk.engine import OmniModel
    return OmniModel.from_random("tiny")


@pytest.fixture(scope="module")
def scheduler(model):
    from omnitalk.session import Scheduler
    s = Scheduler(model, max_sessions=4, asr_slots=1).start()
    yield s
    s.stop()


LIMITS = Limits(max_message_bytes=64 * KiB, hard_message_bytes=256 * KiB, audio_rate=1.0, audio_burst_s=5.0,
                messages_per_s=50, message_burst=60)


@pytest.fixture(scope="module")
def server(scheduler):
    app = create_app(scheduler, limits=LIMITS, server_vad=False)
    with BackgroundServer(app, limits=LIMITS) as srv:
        srv.app = app
        yield srv


def recv(ws, timeout: float = 30.0) -> dict:
    return json.loads(ws.recv(timeout=timeout))


def until(ws, types, timeout: float = 60.0, seen: list | None = None) -> dict:
    types = {types} if isinstance(types, str) else set(types)
    end = time.monotonic() + timeout
    while True:
        ev = recv(ws, max(end - time.monotonic(), 0.01))
        if seen is not None:
            seen.append(ev)
        if ev["type"] in types:
            return ev


def send(ws, ev: dict) -> None:
    ws.send(json.dumps(ev))


def ask(ws, text: str = "hi", **response) -> None:
    send(ws, {"type": "conversation.item.create", "item": {"type": "message", "role": "user",
                                                          "content": [{"type": "input_text", "text": text}]}})
    send(ws, {"type": "response.create", "response": response})


def wait_sessions(scheduler, n: int, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while scheduler.sessions != n and time.monotonic() < end:
        time.sleep(0.02)
    assert scheduler.sessions == n


def test_malformed_and_unknown_events_leave_the_connection_usable(server):
    with connect(server.ws_url) as ws:
        assert until(ws, "session.created")["session"]["type"] == "realtime"
        for raw, code in [("{not json", "invalid_json"), ("[1, 2]", "invalid_event"), ('{"type": 5}', "invalid_event"),
                          ('{"type": "response.fly", "event_id": "e1"}', "unknown_event")]:
            ws.send(raw)
            err = until(ws, "error")
            assert err["error"]["code"] == code and err["error"]["type"] == "invalid_request_error"
        assert err["error"]["event_id"] == "e1"
        ws.send(b"\x00\x01binary")
        assert until(ws, "error")["error"]["code"] == "invalid_event"
        send(ws, {"type": "response.create", "response": {"modalities": ["video"]}})
        assert until(ws, "error")["error"]["code"] == "invalid_value"
        send(ws, {"type": "conversation.item.create", "item": {"type": "function_call"}})
        assert until(ws, "error")["error"]["code"] == "unsupported_item"
        send(ws, {"type": "response.create"})   # nothing to answer yet
        err = until(ws, "error")
        assert "Traceback" not in err["error"]["message"] and os.sep + "work" not in err["error"]["message"]
        ask(ws, max_output_tokens=30)
        assert until(ws, "response.done")["response"]["status"] in ("completed", "incomplete")


def test_message_size_limits(server):
    with connect(server.ws_url, max_size=None) as ws:
        until(ws, "session.created")
        big = json.dumps({"type": "conversation.item.create", "item": {"type": "message", "role": "user",
                          "content": [{"type": "input_text", "text": "x" * (100 * KiB)}]}})
        ws.send(big)
        assert until(ws, "error")["error"]["code"] == "message_too_large"
        send(ws, {"type": "input_audio_buffer.clear"})
        until(ws, "input_audio_buffer.cleared")          # still usable
        ws.send("x" * (300 * KiB))                        # above the hard cap: the socket is closed
        with pytest.raises(websockets.exceptions.ConnectionClosed) as e:
            for _ in range(10):
                recv(ws, 10)
        assert e.value.rcvd is not None and e.value.rcvd.code == 1009


def test_rate_limits(server):
    with connect(server.ws_url, max_queue=None) as ws:   # unread events must not stall the client's close
        until(ws, "session.created")
        one_s = base64.b64encode(np.zeros(24000, "<i2").tobytes()).decode()
        for _ in range(7):                               # 7 s at once: over the 5-s burst
            send(ws, {"type": "input_audio_buffer.append", "audio": one_s})
        assert until(ws, "error")["error"]["code"] == "rate_limit_exceeded"
        for _ in range(80):                              # over the 60-event burst
            send(ws, {"type": "input_audio_buffer.clear"})
        codes = []
        while True:
            ev = recv(ws, 5)
            if ev["type"] == "error":
                codes.append(ev["error"]["code"])
            if len(codes) >= 5:
                break
        assert set(codes) == {"rate_limit_exceeded"}


def test_half_written_frame_then_vanish_frees_the_session(server, scheduler):
    wait_sessions(scheduler, 0)   # earlier tests' sessions are gone
    base = 0
    s = socket.create_connection(("127.0.0.1", server.port))
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall((f"GET /v1/realtime HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    head = s.recv(4096)
    assert head.startswith(b"HTTP/1.1 101")
    wait_sessions(scheduler, base + 1)
    # a masked text frame announcing 1000 bytes, of which only 10 arrive
    s.sendall(bytes([0x81, 0x80 | 126]) + struct.pack(">H", 1000) + os.urandom(4) + b"0123456789")
    with connect(server.ws_url) as other:               # others are not held up meanwhile
        until(other, "session.created")
        ask(other, max_output_tokens=20)
        assert until(other, "response.done")["response"]["status"] in ("completed", "incomplete")
    s.close()
    wait_sessions(scheduler, base)


def test_client_vanishing_mid_answer_frees_its_session_and_others_go_on(server, scheduler):
    wait_sessions(scheduler, 0)   # earlier tests' sessions are gone
    base = 0
    with connect(server.ws_url) as a, connect(server.ws_url) as b:
        _vanish_mid_answer(a, b)
    wait_sessions(scheduler, base)
    assert not scheduler._active                         # nothing is still decoding for the vanished client


def _vanish_mid_answer(a, b):
    until(a, "session.created"), until(b, "session.created")
    ask(a, "a long one", max_output_tokens=2000)
    until(a, "response.output_audio.delta")
    ask(b, "b", max_output_tokens=60)
    a.socket.shutdown(socket.SHUT_RDWR)                  # gone, without a close frame
    a.socket.close()
    seen = []
    done = until(b, "response.done", seen=seen)
    assert done["response"]["status"] in ("completed", "incomplete")
    assert sum(e["type"] == "response.output_audio.delta" for e in seen) > 0


class _StuckSocket:
    """A WebSocket whose peer never reads: every send blocks."""

    def __init__(self):
        self.closed = None

    async def send_text(self, data):
        await asyncio.sleep(3600)

    async def receive(self):
        await asyncio.sleep(3600)

    async def close(self, code=1000, reason=""):
        self.closed = code


def test_slow_client_is_dropped_alone(scheduler, server):
    from omnitalk.server.realtime import Connection
    ctx = server.app.state.ctx
    limits = Limits(send_queue_events=50, send_timeout_s=30)
    wait_sessions(scheduler, 0)   # earlier tests' sessions are gone
    base = 0

    async def main():
        conv = scheduler.open()
        conn = Connection(_StuckSocket(), ctx, conv, "ga", True)
        conn.limits = limits
        task = asyncio.create_task(conn.run())
        for i in range(60):          # the answer keeps coming; the client never reads
            conn.emit({"type": "response.output_audio.delta", "delta": "AAAA"})
        await asyncio.wait_for(task, 10)
        return conn

    with connect(server.ws_url) as other:
        until(other, "session.created")
        conn = asyncio.run(main())
        assert conn.ws.closed == 1008 and "too slow" in conn.close_reason
        assert conn.conv.closed
        ask(other, max_output_tokens=10)
        assert until(other, "response.done")["response"]["status"] in ("completed", "incomplete")
    wait_sessions(scheduler, base)


def test_server_restart_clients_reconnect(model):
    app = create_app(model, max_sessions=2)
    srv = BackgroundServer(app).start()
    port = srv.port
    with connect(srv.ws_url) as ws:
        until(ws, "session.created")
        srv.stop()
        with pytest.raises(websockets.exceptions.ConnectionClosed):
            for _ in range(10):
                recv(ws, 10)
    with BackgroundServer(create_app(model, max_sessions=2), port=port) as again:
        for attempt in range(50):     # the client retries until the new server listens
            try:
                ws2 = connect(again.ws_url).__enter__()
                break
            except OSError:
                time.sleep(0.1)
        with ws2:
            until(ws2, "session.created")
            ask(ws2, max_output_tokens=10)
            assert until(ws2, "response.done")["response"]["status"] in ("completed", "incomplete")


def test_browser_style_auth_and_subprotocol(scheduler):
    app = create_app(scheduler, api_key="k3y")
    with BackgroundServer(app) as srv:
        with pytest.raises(websockets.exceptions.InvalidStatus) as e:
            connect(srv.ws_url, subprotocols=["realtime"])
        assert e.value.response.status_code == 401
        assert b"k3y" not in (e.value.response.body or b"")
        with connect(srv.ws_url, subprotocols=["realtime", "openai-insecure-api-key.k3y"]) as ws:
            assert ws.subprotocol == "realtime"          # a browser needs one echoed; never the key
            until(ws, "session.created")
        with connect(srv.ws_url, additional_headers={"Authorization": "Bearer k3y"}) as ws:
            until(ws, "session.created")


def test_session_limit_closes_with_an_error(model):
    from omnitalk.session import Scheduler
    with Scheduler(model, max_sessions=1, asr_slots=1) as sched:
        with BackgroundServer(create_app(sched)) as srv:
            with connect(srv.ws_url) as first:
                until(first, "session.created")
                with connect(srv.ws_url) as second:
                    err = recv(second, 10)
                    assert err["type"] == "error" and err["error"]["code"] == "session_limit"
                    with pytest.raises(websockets.exceptions.ConnectionClosed) as e:
                        recv(second, 10)
                    assert e.value.rcvd.code == 1013


def test_beta_or_ga_names_per_connection(server):
    with connect(server.ws_url + "?api=beta") as ws:            # query parameter
        assert "modalities" in until(ws, "session.created")["session"]
        ask(ws, max_response_output_tokens=20)
        seen = []
        until(ws, "response.done", seen=seen)
        types = {e["type"] for e in seen}
        assert "response.audio.delta" in types and "conversation.item.created" in types
        assert not any(t.startswith(("response.output_audio", "response.output_text")) for t in types)
    with connect(server.ws_url, additional_headers={"OpenAI-Beta": "realtime=v1"}) as ws:   # the beta header
        assert "input_audio_format" in until(ws, "session.created")["session"]
    with connect(server.ws_url) as ws:                            # no hint: the session.update shape decides
        assert until(ws, "session.created")["session"]["type"] == "realtime"
        send(ws, {"type": "session.update", "session": {"modalities": ["text"], "input_audio_format": "pcm16"}})
        upd = until(ws, "session.updated")
        assert upd["session"]["modalities"] == ["text"]
        ask(ws, max_response_output_tokens=10)
        seen = []
        until(ws, "response.done", seen=seen)
        assert "response.text.done" in {e["type"] for e in seen}
    with connect(server.ws_url) as ws:
        until(ws, "session.created")
        ask(ws, max_output_tokens=20)
        seen = []
        until(ws, "response.done", seen=seen)
        types = {e["type"] for e in seen}
        assert "response.output_audio.delta" in types and "conversation.item.added" in types


def test_items_pending_until_answered_and_deletable(server):
    with connect(server.ws_url) as ws:
        until(ws, "session.created")
        send(ws, {"type": "conversation.item.create", "item": {"id": "item_mine", "type": "message", "role": "user",
                  "content": [{"type": "input_text", "text": "forget this"}]}})
        assert until(ws, "conversation.item.added")["item"]["id"] == "item_mine"
        send(ws, {"type": "conversation.item.delete", "item_id": "item_mine"})
        assert until(ws, "conversation.item.deleted")["item_id"] == "item_mine"
        send(ws, {"type": "conversation.item.delete", "item_id": "item_mine"})
        assert until(ws, "error")["error"]["code"] == "item_not_found"
        pcm = (0.1 * np.sin(np.arange(24000) / 5) * 32767).astype("<i2").tobytes()
        send(ws, {"type": "conversation.item.create", "item": {"type": "message", "role": "user",
                  "content": [{"type": "input_audio", "audio": base64.b64encode(pcm).decode()}]}})
        until(ws, "conversation.item.added")
        send(ws, {"type": "response.create", "response": {"max_output_tokens": 12}})
        done = until(ws, "response.done")
        assert done["response"]["usage"]["input_tokens"] > 50     # 1 s of audio = 51 positions
        send(ws, {"type": "response.create"})                      # and another one at once
        send(ws, {"type": "response.create"})
        err = until(ws, "error")
        assert err["error"]["code"] in ("conversation_already_has_active_response", "invalid_request")


def test_response_create_right_after_cancel_waits_for_it(server):
    with connect(server.ws_url) as ws:
        until(ws, "session.created")
        ask(ws, "a long one", max_output_tokens=2000)
        until(ws, "response.output_audio.delta")
        send(ws, {"type": "response.cancel"})
        ask(ws, "and now this", max_output_tokens=10)           # no waiting for response.done in between
        seen = []
        first = until(ws, "response.done", seen=seen)
        assert first["response"]["status"] == "cancelled"
        second = until(ws, "response.done", seen=seen)
        assert second["response"]["status"] in ("completed", "incomplete")
        assert second["response"]["id"] != first["response"]["id"]
        assert not [e for e in seen if e["type"] == "error"]


def test_vad_switched_on_later_keeps_the_timeline(server):
    from omnitalk.audio import load_audio
    from pathlib import Path
    q = load_audio(Path(__file__).resolve().parents[2] / "examples" / "question.wav")
    x = np.concatenate([q, np.zeros(16000, np.float32)])
    pcm = (np.clip(np.interp(np.arange(0, len(x), 2 / 3), np.arange(len(x)), x), -1, 1) * 32767).astype("<i2")
    with connect(server.ws_url) as ws:
        until(ws, "session.created")
        silence = base64.b64encode(np.zeros(24000, "<i2").tobytes()).decode()
        send(ws, {"type": "input_audio_buffer.append", "audio": silence})   # 1 s with turn detection off
        send(ws, {"type": "session.update", "session": {"type": "realtime", "max_output_tokens": 5,
                  "audio": {"input": {"turn_detection": {"type": "server_vad"}}}}})
        until(ws, "session.updated")
        for i in range(0, len(pcm), 4800):
            send(ws, {"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm[i:i + 4800].tobytes()).decode()})
        started = until(ws, "input_audio_buffer.speech_started")
        stopped = until(ws, "input_audio_buffer.speech_stopped")
        assert 650 <= started["audio_start_ms"] < 1300 and stopped["audio_end_ms"] > 3500   # speech from 1 s on, 300 ms padding
        until(ws, "input_audio_buffer.committed")
        assert until(ws, "response.done")["response"]["usage"]["input_tokens"] > 100   # the whole question
