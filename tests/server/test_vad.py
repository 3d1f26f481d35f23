"""Server VAD (silero-vad), turn detection rules, the stop-command detector, and `omnitalk serve` args."""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest

from omnitalk.audio import load_audio
from omnitalk.server.vad import (WINDOW_MS, CommandDetector, TurnDetector, VADSettings, VADStream,
                                 VADUnavailable, load_silero, normalize)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def silero():
    try:
        return load_silero()
    except VADUnavailable as e:
        pytest.skip(str(e))


def test_loading_silero_leaves_torch_threads_alone(silero):
    import torch
    n = torch.get_num_threads()
    load_silero()
    import importlib
    assert importlib.util.find_spec("silero_vad") is not None
    assert torch.get_num_threads() == n


def test_silero_finds_the_spoken_question(silero):
    q = load_audio(ROOT / "examples" / "question.wav")
    x = np.concatenate([np.zeros(8000, np.float32), q, np.zeros(16000, np.float32)])
    st, td = VADStream(silero), TurnDetector(VADSettings(prefix_padding_ms=300, silence_duration_ms=500))
    events = []
    for i in range(0, len(x), 1000):    # odd chunk sizes: windows carry over
        events += td.push(st.feed(x[i:i + 1000]))
    assert [e.kind for e in events] == ["start", "stop"]
    assert 0 <= events[0].ms <= 600                          # speech at 500 ms, minus the prefix padding
    assert 3000 <= events[1].ms <= len(x) / 16               # the end includes the 500 ms of silence
    st.reset()
    noise = np.random.default_rng(0).normal(0, 0.003, 32000).astype(np.float32)
    assert max(st.feed(noise)) < 0.5


def test_turn_detector_rules():
    td = TurnDetector(VADSettings(threshold=0.6, prefix_padding_ms=100, silence_duration_ms=200))
    ev = td.push([0.1] * 10 + [0.9] * 5)
    assert len(ev) == 1 and ev[0].kind == "start" and ev[0].ms == pytest.approx(10 * WINDOW_MS - 100)
    assert td.push([0.5] * 20) == []                         # above threshold - 0.15: still speech
    assert td.push([0.1] * 6) == []                          # 192 ms of silence: not yet
    ev = td.push([0.1])
    assert [e.kind for e in ev] == ["stop"] and ev[0].ms == pytest.approx(td.t_ms)
    assert TurnDetector(VADSettings(prefix_padding_ms=1000)).push([0.9], floor_ms=0)[0].ms == 0
    with pytest.raises(ValueError):
        VADSettings(threshold=1.5).validate()


def test_command_phrases_and_windows():
    assert normalize("Stop, Omni!") == "stop omni" and normalize("ÖMNI   stop.") == "omni stop"
    calls = []
    det = CommandDetector(lambda x: calls.append(len(x)) or "uh, stop omni please", ["Stop omni"],
                          window_ms=1000, command_ms=200, max_window_ms=1000, min_new_ms=64, min_gap_ms=0,
                          max_inflight=2)
    assert not det.ready()
    det.feed(np.zeros(800, np.float32))                      # silence only: nothing to transcribe
    det.feed(np.zeros(800, np.float32))
    assert not det.ready()
    det.feed(0.2 * np.ones(1600, np.float32))
    assert det.ready()
    gen, window = det.take()
    assert len(window) == 3200 and not det.ready()           # needs new audio first
    long = CommandDetector(lambda x: "", ["stop omni"], window_ms=200, command_ms=300, max_window_ms=2000)
    long.feed(0.2 * np.ones(48000, np.float32))
    assert len(long.take()[1]) == 32000                       # everything since the last look (capped)
    long.feed(0.2 * np.ones(1600, np.float32))
    assert len(long.take()[1]) == 1600 + 4800                 # the new audio plus one command length
    det.feed(0.2 * np.ones(1600, np.float32))
    gen2, _ = det.take()                                      # a second look may overlap the first
    det.feed(0.2 * np.ones(1600, np.float32))
    assert not det.ready()                                    # ... but not a third
    assert det.check(window) == "stop omni" and calls == [3200]
    assert det.done(gen, "stop omni") is True
    assert det.done(gen2, "stop omni") is False               # the same words fire once
    det.feed(0.2 * np.ones(40000, np.float32))
    assert len(det.take()[1]) == 16000                        # the window slides (capped at 1 s here)
    det.done(det.generation, None)
    det.feed(np.zeros(1600, np.float32))                      # only silence since the last look: none
    assert not det.ready()
    det.feed(0.2 * np.ones(320, np.float32))                  # the end of a word, then silence: one more
    det.feed(np.zeros(1600, np.float32))
    assert det.ready()
    assert det.match("stop on me") is None and det.match("nonstop omnibus") is None
    assert CommandDetector(lambda x: "", []).ready() is False


def test_command_detector_asks_a_listening_head_instead_of_transcribing():
    transcribed, looked = [], []
    head = lambda x: looked.append(len(x)) or ("stop omni" if x.max() > 0.5 else None)
    det = CommandDetector(lambda x: transcribed.append(x) or "", [], min_new_ms=10, min_gap_ms=0, detect=head)
    det.feed(0.2 * np.ones(1600, np.float32))
    assert det.ready()                                        # no phrases needed: the head knows its command
    gen, window = det.take()
    assert det.check(window) is None and det.last_text == ""
    assert det.done(gen, None) is False
    det.feed(0.9 * np.ones(1600, np.float32))
    gen, window = det.take()
    assert det.check(window) == "stop omni" and det.last_text == "stop omni"
    assert det.match_window(window) == "stop omni"
    assert det.done(gen, "stop omni") is True
    assert transcribed == [] and len(looked) == 3             # the transcriber is never asked


def test_serve_arguments():
    from omnitalk.server.cli import register
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    a = parser.parse_args(["serve", "--checkpoint", "ck", "--port", "9000", "--api-key", "K", "--max-sessions", "3",
                           "--random-weights", "tiny", "--stop-phrase", "halt omni"])
    assert (a.checkpoint, a.host, a.port, a.api_key, a.max_sessions, a.random_weights, a.stop_phrases) == \
        ("ck", "127.0.0.1", 9000, "K", 3, "tiny", ["halt omni"])
    assert callable(a.run)


def test_stop_detector_choice():
    from types import SimpleNamespace

    from omnitalk.server.app import resolve_stop_detector

    def model(extra, head):
        return SimpleNamespace(cfg=SimpleNamespace(extra=extra), has_listening_head=head)
    assert resolve_stop_detector(model({}, False)) == "asr"                        # the released weights
    assert resolve_stop_detector(model({}, True)) == "listening"                   # interruption-trained
    assert resolve_stop_detector(model({"stop_detector": "asr"}, True)) == "asr"   # its config says otherwise
    assert resolve_stop_detector(model({"stop_detector": "asr"}, True), "listening") == "listening"
    with pytest.raises(ValueError, match="needs a checkpoint trained on the interruption task"):
        resolve_stop_detector(model({}, False), "listening")
    with pytest.raises(ValueError, match="must be one of auto, asr, listening"):
        resolve_stop_detector(model({}, True), "whisper")
    with pytest.raises(ValueError, match="model_config.yaml: stop_detector must be 'asr' or 'listening'"):
        resolve_stop_detector(model({"stop_detector": "ears"}, True))
