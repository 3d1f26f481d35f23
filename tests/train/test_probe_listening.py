"""scripts/probe_listening.py: the detector probe of the interruption clips' SNAC frames learns a command
that is present in the codes and generalises to held-out clips, and reports the recipe's metric."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from omnitalk.testing import load_script

ROOT = Path(__file__).resolve().parents[2]
COMMAND = [[11, 12, 13, 14, 15, 16, 17], [21, 22, 23, 24, 25, 26, 27], [31, 32, 33, 34, 35, 36, 37]]


def _probe():
    return load_script(ROOT / "scripts" / "probe_listening.py")


def _clips(n: int, seed: int, prefix: str) -> list[dict]:
    """Random 'speech' codes (ids 100..399); positives hold the 3-frame command at a random place and are
    labelled irq from the frame after it on (tolerance 1), as omnitalk.train.interrupt labels clips."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        T = rng.randint(20, 40)
        frames = [[rng.randint(100, 399) for _ in range(7)] for _ in range(T)]
        labels, start_ms, end_ms = [0] * T, None, None
        if i % 2 == 0:
            at = rng.randint(2, T - 8)
            frames[at:at + 3] = [list(f) for f in COMMAND]
            labels = [int(f >= at + 3) for f in range(T)]
            start_ms, end_ms = at * 85.33, (at + 3) * 85.33 - 1
        out.append({"id": f"{prefix}-{i}", "task": "interrupt", "listen_frames": frames, "labels": labels,
                    "command_start_ms": start_ms, "command_end_ms": end_ms})
    return out


@pytest.fixture
def world(tmp_path):
    for split, n, seed in (("train", 64, 0), ("eval", 20, 1)):
        with (tmp_path / f"interrupt_{split}.jsonl").open("w") as fh:
            for c in _clips(n, seed, split):
                fh.write(json.dumps(c) + "\n")
    return tmp_path


def test_probe_detects_a_command_present_in_the_codes(world):
    out = world / "probe.json"
    assert _probe().main([str(world), "--steps", "300", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["n_train"] == 64 and res["n_held_out"] == 20 and res["steps"] == 300
    held = res["final"]["held_out"]
    assert held["clips"] == 20 and held["positives"] == 10
    assert held["f1"] >= 0.9 and held["false_interruption_rate"] <= 0.1, held
    # it fires right after the command: within two frames of its end
    assert held["median_delay_ms"] is not None and 0 < held["median_delay_ms"] <= 2 * 85.34


def test_probe_on_log_mel_hears_a_tone_command(tmp_path):
    """--input mel reads each clip's audio: a 1-kHz tone of 3 frames in noise is the 'command'."""
    import numpy as np
    import soundfile as sf

    (tmp_path / "interrupt").mkdir()
    for split, n, seed in (("train", 48, 0), ("eval", 16, 1)):
        clips = _clips(n, seed, split)
        rng = np.random.default_rng(seed)
        for c in clips:
            T = len(c["labels"])
            x = 0.05 * rng.standard_normal(T * 2048).astype(np.float32)
            if c["command_start_ms"] is not None:
                at = round(c["command_start_ms"] / 85.33)
                t = np.arange(3 * 2048) / 24000
                x[at * 2048:(at + 3) * 2048] += 0.5 * np.sin(2 * np.pi * 1000 * t)
            c["listen_audio"] = f"interrupt/{c['id']}.wav"
            sf.write(tmp_path / c["listen_audio"], x, 24000, subtype="PCM_16")
        with (tmp_path / f"interrupt_{split}.jsonl").open("w") as fh:
            for c in clips:
                fh.write(json.dumps(c) + "\n")
    out = tmp_path / "probe.json"
    assert _probe().main([str(tmp_path), "--input", "mel", "--steps", "300", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["input"] == "mel"
    held = res["final"]["held_out"]
    assert held["f1"] >= 0.9 and held["false_interruption_rate"] <= 0.1, held


def test_probe_refuses_a_world_without_clips(tmp_path):
    (tmp_path / "interrupt_train.jsonl").write_text("")
    (tmp_path / "interrupt_eval.jsonl").write_text("")
    with pytest.raises(SystemExit, match="no interruption clips"):
        _probe().main([str(tmp_path), "--steps", "1"])
    with pytest.raises(SystemExit, match="interrupt_train.jsonl not found"):
        _probe().main([str(tmp_path / "nowhere"), "--steps", "1"])
