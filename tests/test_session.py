"""Sessions: batched decoding equals single decoding, multi-turn cache reuse, limits, cancel, truncate."""
import threading
from pathlib import Path

import numpy as np
import pytest

from omnitalk.audio import load_audio
from omnitalk.engine import OmniModel
from omnitalk.errors import InputError
from omnitalk.session import FRAME_MS, CapacityError, Scheduler

FIX = Path(__file__).resolve().parent / "fixtures" / "parity"
PROMPT = "What is the capital of France?"


@pytest.fixture(scope="module")
def model():
    return OmniModel.from_pretrained(FIX / "checkpoint", download=False)


@pytest.fixture(scope="module")
def wav():
    return load_audio(FIX / "inputs" / "question.wav")


def tokens(resp):
    if resp.req.speaks:
        return np.array([[s.audio[j] for s in resp.steps] for j in range(7)] + [[s.text for s in resp.steps]])
    return np.array([[s.text for s in resp.steps]])


def test_concurrent_sessions_are_batched_and_exact(model, wav):
    single_pair = model.generate(audio=wav, sr=16000, max_tokens=48, decode_audio=False).tokens
    single_text = model.generate(text=PROMPT, reply="text", max_tokens=48).tokens
    with Scheduler(model, max_sessions=3) as s:
        a, b, c = s.open(), s.open(), s.open()
        ra = a.respond(audio=wav, max_tokens=48)
        rb = b.respond(text=PROMPT, reply="text", max_tokens=48)
        rc = c.respond(audio=wav, max_tokens=48)
        results = {}
        threads = [threading.Thread(target=lambda r=r: results.setdefault(r.id, list(r))) for r in (ra, rb, rc)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert np.array_equal(tokens(ra), single_pair) and np.array_equal(tokens(rc), single_pair)
        assert np.array_equal(tokens(rb), single_text)
        assert (ra.status, rb.status) == ("incomplete", "completed")
        assert s.max_batch_rows == 5  # two pairs and one text-only row in the same forward pass
        assert sum(len(ch.audio) for ch in results[ra.id]) == 41 * 2048


def test_second_turn_reuses_the_cache_exactly(model, wav):
    """Turn 2 decoded on the cached turn 1 equals turn 2 decoded after re-encoding everything."""
    with Scheduler(model, max_sessions=2) as s:
        a, b = s.open(), s.open()
        for conv in (a, b):
            conv.respond(audio=wav, max_tokens=30).wait()
        for row in b.rows:
            row.cached = 0  # force conversation b to re-encode its whole history
        ra = a.respond(text="and why?", max_tokens=30).wait()
        rb = b.respond(text="and why?", max_tokens=30).wait()
        assert np.array_equal(tokens(ra), tokens(rb))
        assert [t.role for t in a.history] == ["user", "assistant", "user", "assistant"]
        # both rows hold: prompt 1 + 29 fed answer columns + closing column, then the same for turn 2
        t2 = ra.usage["input_tokens"]
        assert [r.columns for r in a.rows] == [152 + 29 + 1 + t2 + 29 + 1] * 2


def test_history_changes_the_answer(model, wav):
    with Scheduler(model, max_sessions=2) as s:
        fresh = s.open().respond(text="and why?", reply="text", max_tokens=20).wait()
        conv = s.open()
        conv.respond(audio=wav, max_tokens=20).wait()
        follow = conv.respond(text="and why?", reply="text", max_tokens=20).wait()
        assert not np.array_equal(tokens(fresh), tokens(follow))


def test_oldest_turns_are_dropped_when_the_context_fills(model, wav):
    with Scheduler(model, max_sessions=1, max_len=400, answer_reserve=40) as s:
        conv = s.open()
        for _ in range(3):
            r = conv.respond(audio=wav, max_tokens=40).wait()
            assert r.status in ("completed", "incomplete") and r.steps
            assert all(row.columns <= 400 for row in conv.rows)
        first_turns = {seg.turn for seg in conv.rows[0].segments}
        assert 0 not in first_turns  # turn 0 (the first question) was dropped


def test_capacity_limit_and_release(model):
    with Scheduler(model, max_sessions=2) as s:
        a, _ = s.open(), s.open()
        with pytest.raises(CapacityError, match="all 2 sessions are in use"):
            s.open()
        a.close()
        s.open()  # the closed session's slot is free again at once
        assert s.sessions == 2


def test_cancel_stops_at_the_next_step(model, wav):
    with Scheduler(model, max_sessions=1) as s:
        conv = s.open()
        resp = conv.respond(audio=wav, max_tokens=1000)
        it = iter(resp)
        next(it)
        resp.cancel()
        list(it)
        assert resp.status == "cancelled" and len(resp.steps) < 1000
        assert conv.respond(text="again", reply="text", max_tokens=5).wait().status in ("completed", "incomplete")


def test_truncate_keeps_what_was_heard(model, wav):
    with Scheduler(model, max_sessions=1) as s:
        conv = s.open()
        resp = conv.respond(audio=wav, max_tokens=48).wait()
        full_cols = conv.rows[0].columns
        conv.truncate(resp.id, audio_end_ms=2 * FRAME_MS)  # the user heard 2 frames
        turn = conv.history[1]
        assert turn.audio_ms == pytest.approx(2 * FRAME_MS)
        assert conv.rows[0].columns == full_cols - (47 - 9)  # 2 frames -> 9 steps kept of 47 fed
        with pytest.raises(InputError, match="no assistant turn"):
            conv.truncate("resp_nope", 10)


def test_one_response_at_a_time_and_closed_conversations(model):
    with Scheduler(model, max_sessions=1) as s:
        conv = s.open()
        r = conv.respond(text="hi", reply="text", max_tokens=200)
        with pytest.raises(InputError, match="already in progress"):
            conv.respond(text="hi", reply="text")
        r.cancel()
        r.wait()
        conv.close()
        with pytest.raises(InputError, match="closed"):
            conv.respond(text="hi")


def test_transcribe_uses_the_asr_task(model, wav):
    expect = model.generate(audio=wav, sr=16000, task="asr", reply="text", max_tokens=256).text
    with Scheduler(model, max_sessions=1) as s:
        assert s.transcribe(wav) == expect


def test_asr_slots_scale_with_sessions(model):
    """Transcription slots (input transcription + stop-command looks) grow with the session limit."""
    for sessions, slots in ((1, 2), (8, 2), (12, 3), (32, 8)):
        s = Scheduler(model, max_sessions=sessions, max_len=64)
        assert s._asr_free.qsize() == slots
        assert s.caches[0].k.shape[0] == 2 * (sessions + slots)   # pair rows per slot
    assert Scheduler(model, max_sessions=4, asr_slots=1, max_len=64)._asr_free.qsize() == 1
    with pytest.raises(ValueError, match="asr_slots"):
        Scheduler(model, max_sessions=4, asr_slots=0)


def test_async_consumers_wait_without_a_thread(model, wav, monkeypatch):
    """`async for` over a Response gets the same chunks as blocking iteration, and waiting for the next
    step holds no executor thread (only SNAC decoding runs off the loop): many sessions cannot exhaust
    the server's thread pool by merely waiting."""
    import asyncio

    import omnitalk.session as session_mod

    offloaded = []
    real_to_thread = asyncio.to_thread

    async def recording_to_thread(fn, *a, **kw):
        offloaded.append(getattr(fn, "__name__", repr(fn)))
        return await real_to_thread(fn, *a, **kw)

    monkeypatch.setattr(session_mod.asyncio, "to_thread", recording_to_thread)
    with Scheduler(model, max_sessions=4) as s:
        ref = s.open().respond(audio=wav, max_tokens=30)
        blocking = list(ref)

        async def consume():
            resps = [s.open().respond(audio=wav, max_tokens=30) for _ in range(3)]

            async def collect(r):
                return [c async for c in r]
            return resps, await asyncio.wait_for(asyncio.gather(*(collect(r) for r in resps)), 120)

        resps, results = asyncio.run(consume())
    for resp, chunks in zip(resps, results):   # same tokens; the codec's noise makes samples differ
        assert np.array_equal(tokens(resp), tokens(ref)) and resp.status == ref.status
        assert [len(c.audio) for c in chunks] == [len(c.audio) for c in blocking]
        assert "".join(c.text for c in chunks) == "".join(c.text for c in blocking)
    assert offloaded and set(offloaded) <= {"push", "finish"}   # the chunk assembler only, never a queue wait
