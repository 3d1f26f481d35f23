"""The realtime API driven by the official `openai` client (GA `client.realtime` and beta
`client.beta.realtime`), against a uvicorn server on 127.0.0.1 running the parity fixture checkpoint
(random weights, real tokenizer, so answers carry text)."""
from __future__ import annotations

import asyncio
import base64
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

from omnitalk.audio import load_audio, resample  # noqa: E402
from omnitalk.server.app import BackgroundServer, create_app  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "fixtures" / "parity" / "checkpoint"
LONG = "Tell me a long story about a cat."   # the fixture's weights keep talking to this one
pytestmark = pytest.mark.timeout(180)


def pcm24(x16: np.ndarray) -> bytes:
    x = resample(x16, 16000, 24000)
    return (np.clip(x, -1, 1) * 32767).astype("<i2").tobytes()


def b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


QUESTION = load_audio(ROOT / "examples" / "question.wav")


@pytest.fixture(scope="module")
def model():
    from omnitalk.engine import OmniModel
    return OmniModel.from_pretrained(FIXTURE, download=False)


@pytest.fixture(scope="module")
def scheduler(model):
    from omnitalk.session import Scheduler
    s = Scheduler(model, max_sessions=6).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def server(scheduler):
    app = create_app(scheduler)
    with BackgroundServer(app) as srv:
        srv.app = app
        yield srv


def client(srv, key: str = "unused"):
    return openai.AsyncOpenAI(api_key=key, base_url=srv.url + "/v1", websocket_base_url=f"ws://127.0.0.1:{srv.port}/v1")


async def until(conn, types, timeout: float = 60.0, seen: list | None = None):
    """Receive events until one whose type is in `types`; returns it (all events go to `seen`)."""
    types = {types} if isinstance(types, str) else set(types)
    while True:
        ev = await asyncio.wait_for(conn.recv(), timeout)
        if seen is not None:
            seen.append(ev)
        if ev.type in types:
            return ev


def run(coro):
    return asyncio.run(coro)


async def long_answer_without_vad(conn) -> None:
    """Turn detection off, then a long spoken answer; returns once its first audio delta arrived."""
    await conn.session.update(session={"type": "realtime", "audio": {"input": {"turn_detection": None}}})
    await until(conn, "session.updated")
    await conn.conversation.item.create(item=text_item(LONG))
    await conn.response.create()
    await until(conn, "response.output_audio.delta")


def tone_pcm(seconds: float, amplitude: float) -> str:
    """A 440-Hz tone as base64 PCM16 at 24 kHz."""
    x = amplitude * np.sin(2 * np.pi * 440 * np.arange(int(24000 * seconds)) / 24000)
    return b64((x * 32767).astype("<i2").tobytes())


def text_item(text: str) -> dict:
    return {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}


def test_ga_text_response(server):
    async def main():
        async with client(server).realtime.connect(model="mini-omni2") as conn:
            created = await until(conn, "session.created")
            assert created.session.type == "realtime"
            await conn.session.update(session={"type": "realtime", "output_modalities": ["text"],
                                               "audio": {"input": {"turn_detection": None}}})
            upd = await until(conn, "session.updated")
            assert upd.session.output_modalities == ["text"] and upd.session.audio.input.turn_detection is None
            await conn.conversation.item.create(item=text_item("hello"))
            added = await until(conn, "conversation.item.added")
            assert added.item.role == "user"
            await conn.response.create()
            seen = []
            done = await until(conn, "response.done", seen=seen)
            types = [e.type for e in seen]
            assert types.index("response.created") < types.index("response.output_item.added") \
                < types.index("response.content_part.added") < types.index("response.output_text.done")
            deltas = "".join(e.delta for e in seen if e.type == "response.output_text.delta")
            final = next(e for e in seen if e.type == "response.output_text.done")
            assert deltas and final.text == deltas
            assert not any("audio" in t for t in types)
            r = done.response
            assert r.status == "completed" and r.output[0].content[0].text == deltas
            assert r.usage.input_tokens > 0 and r.usage.output_tokens > 0
            assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
            ids = {e.response_id for e in seen if hasattr(e, "response_id")}
            assert ids == {r.id}
    run(main())


def test_beta_audio_response_to_spoken_question(server):
    async def main():
        async with client(server).beta.realtime.connect(model="mini-omni2") as conn:
            created = await until(conn, "session.created")
            assert created.session.input_audio_format == "pcm16"   # beta shape: the client asked with OpenAI-Beta
            await conn.session.update(session={"turn_detection": None, "modalities": ["text", "audio"],
                                               "voice": "alloy", "max_response_output_tokens": 60})
            upd = await until(conn, "session.updated")
            assert upd.session.voice == "alloy" and upd.session.turn_detection is None
            await conn.input_audio_buffer.append(audio=b64(pcm24(QUESTION)))
            await conn.input_audio_buffer.commit()
            committed = await until(conn, "input_audio_buffer.committed")
            item = await until(conn, "conversation.item.created")
            assert item.item.id == committed.item_id and item.item.content[0].type == "input_audio"
            await conn.response.create(response={"modalities": ["text", "audio"]})
            seen = []
            done = await until(conn, "response.done", seen=seen)
            types = [e.type for e in seen]
            audio = b"".join(base64.b64decode(e.delta) for e in seen if e.type == "response.audio.delta")
            assert len(audio) > 0 and len(audio) % 2 == 0
            assert "response.audio.done" in types and "response.audio_transcript.done" in types
            assert not any(t.startswith("response.output_audio") for t in types)   # beta names only
            transcript = "".join(e.delta for e in seen if e.type == "response.audio_transcript.delta")
            assert next(e for e in seen if e.type == "response.audio_transcript.done").transcript == transcript
            assert done.response.status in ("completed", "incomplete") and done.response.usage.input_tokens > 100
            assert done.response.output[0].content[0].type == "audio"
    run(main())


def test_ga_server_vad_turn_with_transcription(server):
    async def main():
        async with client(server).realtime.connect(model="mini-omni2") as conn:
            await until(conn, "session.created")
            await conn.session.update(session={"type": "realtime", "max_output_tokens": 40, "audio": {"input": {
                "turn_detection": {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 200,
                                   "silence_duration_ms": 400},
                "transcription": {"model": "whisper-1"}}}})
            await until(conn, "session.updated")
            pcm = pcm24(np.concatenate([np.zeros(8000, np.float32), QUESTION, np.zeros(24000, np.float32)]))
            for i in range(0, len(pcm), 4800):   # 100 ms chunks
                await conn.input_audio_buffer.append(audio=b64(pcm[i:i + 4800]))
            seen = []
            started = await until(conn, "input_audio_buffer.speech_started", seen=seen)
            stopped = await until(conn, "input_audio_buffer.speech_stopped", seen=seen)
            assert stopped.item_id == started.item_id
            assert 0 <= started.audio_start_ms < 700 and stopped.audio_end_ms > 3000
            await until(conn, "input_audio_buffer.committed", seen=seen)
            done = await until(conn, "response.done", seen=seen)         # created by the VAD turn
            types = [e.type for e in seen]
            assert "response.created" in types and "response.output_audio.delta" in types
            assert done.response.output_modalities == ["audio"]
            if "conversation.item.input_audio_transcription.completed" not in types:
                await until(conn, "conversation.item.input_audio_transcription.completed")
    run(main())


def _history(srv):
    (conn,) = list(srv.app.state.ctx.connections)
    return conn.conv.history


def test_cancel_then_truncate_keeps_what_was_heard(server):
    async def main():
        async with client(server).realtime.connect(model="mini-omni2") as conn:
            await until(conn, "session.created")
            await conn.session.update(session={"type": "realtime", "audio": {"input": {"turn_detection": None}}})
            await until(conn, "session.updated")
            await conn.conversation.item.create(item=text_item(LONG))
            await conn.response.create(response={"output_modalities": ["audio"]})
            first = await until(conn, "response.output_audio.delta")
            await conn.response.cancel()
            seen = []
            done = await until(conn, "response.done", seen=seen)
            assert done.response.status == "cancelled"
            assert done.response.status_details.reason == "client_cancelled"
            assert "response.output_audio.done" in [e.type for e in seen]
            # the client heard 200 ms of it
            await conn.conversation.item.truncate(item_id=first.item_id, content_index=0, audio_end_ms=200)
            tr = await until(conn, "conversation.item.truncated")
            assert tr.item_id == first.item_id and tr.audio_end_ms == 200
            turn = next(t for t in _history(server) if t.response_id == done.response.id)
            assert turn.audio_ms <= 200
            # the conversation goes on
            await conn.conversation.item.create(item=text_item("hello"))
            await conn.response.create(response={"output_modalities": ["text"]})
            assert (await until(conn, "response.done")).response.status in ("completed", "incomplete")
            # errors for what cannot be done, connection still fine
            await conn.response.cancel()
            err = await until(conn, "error")
            assert err.error.code == "response_cancel_not_active"
            await conn.conversation.item.truncate(item_id="item_nope", content_index=0, audio_end_ms=10)
            assert (await until(conn, "error")).error.code == "item_not_found"
    run(main())


def test_barge_in_cancels_the_answer(server):
    async def main():
        async with client(server).beta.realtime.connect(model="mini-omni2") as conn:
            await until(conn, "session.created")   # server_vad is on by default
            await conn.conversation.item.create(item=text_item(LONG))
            await conn.response.create()
            await until(conn, "response.audio.delta")
            speech = pcm24(QUESTION)
            for i in range(0, len(speech), 4800):
                await conn.input_audio_buffer.append(audio=b64(speech[i:i + 4800]))
            seen = []
            done = await until(conn, "response.done", seen=seen)
            types = [e.type for e in seen]
            assert "input_audio_buffer.speech_started" in types
            assert done.response.status == "cancelled" and done.response.status_details.reason == "turn_detected"
            assert "output_audio_buffer.cleared" in types
    run(main())


def test_bad_events_get_errors_and_the_connection_stays_usable(server):
    async def main():
        async with client(server).realtime.connect(model="mini-omni2") as conn:
            await until(conn, "session.created")
            await conn.session.update(session={"type": "realtime", "audio": {"input": {
                "format": {"type": "audio/pcmu"}}}})
            err = await until(conn, "error")
            assert err.error.code == "unsupported_audio_format" and err.error.type == "invalid_request_error"
            await conn.send_raw('{"type": "session.update", "session": {"input_audio_format": "g711_ulaw"}}')
            assert (await until(conn, "error")).error.code == "unsupported_audio_format"
            await conn.send_raw('{"type": "no.such.event", "event_id": "evt_1"}')
            err = await until(conn, "error")
            assert err.error.code == "unknown_event" and err.error.event_id == "evt_1"
            await conn.send_raw('{"type": "input_audio_buffer.append", "audio": "not base64!"}')
            assert (await until(conn, "error")).error.code == "invalid_value"
            await conn.input_audio_buffer.commit()
            assert (await until(conn, "error")).error.code == "input_audio_buffer_commit_empty"
            await conn.send_raw('{"type": "session.update", "session": {"audio": {"input": {"turn_detection": '
                                '{"type": "server_vad", "threshold": 7}}}}}')
            assert (await until(conn, "error")).error.code == "invalid_value"
            await conn.send_raw('{"type": "conversation.item.create", "item": {"type": "message", "role": "user", '
                                '"content": [{"type": "input_image", "image_url": "data:image/png;base64,AAAA"}]}}')
            err = await until(conn, "error")
            assert err.error.code == "invalid_image" and "/" not in err.error.message
            # still usable
            await conn.session.update(session={"type": "realtime", "output_modalities": ["text"]})
            await until(conn, "session.updated")
            await conn.conversation.item.create(item=text_item("hello"))
            await conn.response.create()
            assert (await until(conn, "response.done")).response.status == "completed"
    run(main())


def test_image_and_text_in_one_turn(server):
    png = (ROOT / "examples" / "shapes.png").read_bytes()

    async def main():
        async with client(server).realtime.connect(model="mini-omni2") as conn:
            await until(conn, "session.created")
            await conn.conversation.item.create(item={"type": "message", "role": "user", "content": [
                {"type": "input_image", "image_url": "data:image/png;base64," + b64(png)},
                {"type": "input_text", "text": "What is in the picture?"}]})
            added = await until(conn, "conversation.item.added")
            assert [c.type for c in added.item.content] == ["input_image", "input_text"]
            await conn.response.create(response={"output_modalities": ["text"], "max_output_tokens": 20})
            done = await until(conn, "response.done")
            assert done.response.status in ("completed", "incomplete")
            assert done.response.usage.input_tokens > 50   # the 50 image positions are in the prompt
    run(main())


def test_api_key(scheduler):
    app = create_app(scheduler, api_key="sekret")
    with BackgroundServer(app) as srv:
        async def main():
            with pytest.raises(Exception):
                async with client(srv, key="wrong").realtime.connect(model="mini-omni2") as conn:
                    await until(conn, "session.created", timeout=10)
            async with client(srv, key="sekret").realtime.connect(model="mini-omni2") as conn:
                await until(conn, "session.created", timeout=10)
        run(main())


def test_spoken_stop_command_cancels_without_vad(scheduler):
    heard = []

    def transcriber(x16):   # stands in for the model's ASR (random weights cannot recognise words)
        heard.append(len(x16))
        return "okay, stop omni!" if np.abs(x16).max() > 0.3 else ""

    app = create_app(scheduler, transcriber=transcriber)
    with BackgroundServer(app) as srv:
        async def main():
            async with client(srv).realtime.connect(model="mini-omni2") as conn:
                await until(conn, "session.created")
                await long_answer_without_vad(conn)
                await conn.input_audio_buffer.append(audio=tone_pcm(0.6, 0.5))
                seen = []
                done = await until(conn, "response.done", seen=seen)
                types = [e.type for e in seen]
                assert done.response.status == "cancelled"
                assert "output_audio_buffer.cleared" in types
                if "input_audio_buffer.cleared" not in types:   # the command's audio is not kept
                    await until(conn, "input_audio_buffer.cleared")
        run(main())
    assert heard


def test_trained_listening_head_stops_the_answer(scheduler, model, monkeypatch):
    """A checkpoint trained on the interruption task (model_config.yaml: interrupt_trained) is asked
    through its listening item (Scheduler.listen -> OmniModel.listen) instead of the ASR. The fixture's
    random weights run the real forward; a loudness rule stands in for a trained head's verdict."""
    looks, transcribed = [], []
    real = model.listen

    def listen(audio=None, *, frames=None, sr=None):
        statuses = real(audio, frames=frames, sr=sr)
        looks.append(len(statuses))
        return [int(np.abs(audio).max() > 0.3)] * len(statuses)

    monkeypatch.setattr(model, "listen", listen)
    monkeypatch.setitem(model.cfg.extra, "interrupt_trained", True)
    monkeypatch.setattr(scheduler, "transcribe", lambda *a, **k: transcribed.append(1) or "")
    app = create_app(scheduler)
    assert app.state.ctx.command_detect is not None
    with BackgroundServer(app) as srv:
        async def main():
            async with client(srv).realtime.connect(model="mini-omni2") as conn:
                created = await until(conn, "session.created")
                assert created.session.model_extra.get("stop_detector") == "listening_head"
                await long_answer_without_vad(conn)
                await conn.input_audio_buffer.append(audio=tone_pcm(0.4, 0.1))
                await asyncio.sleep(0.5)
                await conn.input_audio_buffer.append(audio=tone_pcm(0.6, 0.5))
                done = await until(conn, "response.done")
                assert done.response.status == "cancelled"
        run(main())
    assert looks and all(n > 0 for n in looks)   # one status per SNAC frame of each window
    assert transcribed == []                      # "stop omni" never went through the ASR


def test_session_limit_is_an_error_event_not_a_hang(model):
    from omnitalk.session import Scheduler
    with Scheduler(model, max_sessions=1, asr_slots=1) as sched:
        app = create_app(sched)
        with BackgroundServer(app) as srv:
            async def main():
                async with client(srv).realtime.connect(model="mini-omni2") as first:
                    await until(first, "session.created")
                    async with client(srv).realtime.connect(model="mini-omni2") as second:
                        err = await until(second, "error", timeout=10)
                        assert err.error.code == "session_limit"
                # the first one left: its session is free again
                for _ in range(100):
                    if sched.sessions == 0:
                        break
                    await asyncio.sleep(0.05)
                async with client(srv).realtime.connect(model="mini-omni2") as third:
                    await until(third, "session.created", timeout=10)
            run(main())
