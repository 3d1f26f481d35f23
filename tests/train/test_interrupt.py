"""Interruption data: labels, clips, records, and the detection metrics."""
import numpy as np
import pytest

from omnitalk.train.interrupt import (FRAME_MS, InterruptConfig, InterruptionMetrics, build_interrupt_set, labels_for,
                                      make_clip, pink_noise, white_noise)
from omnitalk.train.tts import EspeakSynth, VoiceSpace

needs_espeak = pytest.mark.skipif(not EspeakSynth.available(),
                                  reason="espeak-ng is not installed (apt-get install espeak-ng)")


def test_labels_from_the_frame_after_the_command_ends():
    # the command's last sample is sample 4999 -> frame 2 (4096..6143); tolerance 1 -> irq from frame 3
    assert labels_for(6, 5000, tolerance_frames=1) == [0, 0, 0, 1, 1, 1]
    assert labels_for(6, 5000, tolerance_frames=0) == [0, 0, 1, 1, 1, 1]
    assert labels_for(6, 4096, tolerance_frames=0) == [0, 1, 1, 1, 1, 1]  # ends exactly at frame 1's end
    assert labels_for(6, 4097, tolerance_frames=0) == [0, 0, 1, 1, 1, 1]
    assert labels_for(4, None) == [0, 0, 0, 0]


def test_noise_generators():
    rng = np.random.default_rng(0)
    w, p = white_noise(48000, rng), pink_noise(48000, rng)
    assert w.shape == p.shape == (48000,) and abs(p.std() - 1) < 1e-3
    spec = np.abs(np.fft.rfft(p)) ** 2
    low, high = spec[10:200].mean(), spec[10000:20000].mean()
    assert low > 20 * high  # 1/f: far more power at low frequencies


def test_metrics_on_hand_made_cases():
    m = InterruptionMetrics()
    # positive, fires at frame 5; command 0..300 ms -> delay (5 + 1) * 85.33 - 300
    assert m.add([0, 0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 1, 1, 1], command_end_ms=300.0, command_start_ms=0.0) == 5
    m.add([0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 1, 1], command_end_ms=150.0, command_start_ms=0.0)   # TP
    m.add([0] * 6, [0, 0, 1, 1, 1, 1], command_end_ms=150.0)                                    # miss
    m.add([1, 1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1, 1, 1], command_end_ms=400.0,
          command_start_ms=200.0)                                                               # too early
    m.add([0] * 5, [0] * 5)                                                                      # TN
    m.add([0, 0, 1, 1, 1], [0] * 5)                                                              # false interruption
    r = m.result()
    assert (r["true_positives"], r["false_positives"], r["misses"]) == (2, 2, 2)
    assert r["precision"] == pytest.approx(0.5) and r["recall"] == pytest.approx(0.5) and r["f1"] == pytest.approx(0.5)
    assert r["false_interruption_rate"] == pytest.approx(0.5)
    d1, d2 = 6 * FRAME_MS - 300, 4 * FRAME_MS - 150
    assert r["delays_ms"] == [round(d1, 1), round(d2, 1)] and r["median_delay_ms"] == pytest.approx((d1 + d2) / 2)
    assert FRAME_MS == pytest.approx(85.333, abs=1e-3)
    # token ids as statuses
    m2 = InterruptionMetrics()
    assert m2.add([151942, 151942, 151941], [0, 0, 1], command_end_ms=100.0, irq=151941) == 2
    assert m2.result()["f1"] == 1.0
    assert InterruptionMetrics().result()["f1"] == 0.0


@needs_espeak
def test_clip_labels_follow_the_command():
    train, _ = VoiceSpace.espeak().split()
    s = EspeakSynth()
    cfg = InterruptConfig(noise_prob=1.0, noise_types=("babble",), confuser_prob=0.0)
    pos = make_clip(s, train, ["the cat sat on the mat", "it is sunny"], True, cfg, seed=1)
    n = pos.n_frames
    assert len(pos.wav) == n * 2048 and len(pos.labels) == n and pos.command == "stop omni"
    onset = pos.labels.index(1)
    assert onset == (pos.command_end_sample - 1) // 2048 + cfg.tolerance_frames
    assert pos.labels == [0] * onset + [1] * (n - onset) and n - onset >= 2
    assert 0.3 < (pos.command_end_sample - pos.command_start_sample) / 24000 < 2.0
    assert pos.meta["noise"] == "babble" and 0 <= pos.meta["snr_db"] <= 20 and np.abs(pos.wav).max() <= 0.95
    neg = make_clip(s, train, ["the cat sat on the mat"], False, cfg, seed=2)
    assert neg.command is None and not any(neg.labels) and neg.meta["other_speech"]
    again = make_clip(s, train, ["the cat sat on the mat", "it is sunny"], True, cfg, seed=1)
    assert np.array_equal(again.wav, pos.wav)  # deterministic


class FakeCodec:
    sample_rate = 24000

    def encode(self, wav):
        n = -(-len(wav) // 2048)
        return np.full((n, 7), 5, dtype=np.int64)


@needs_espeak
def test_build_interrupt_set_records(tmp_path):
    from omnitalk.train.data import read_manifest, write_manifest

    train, _ = VoiceSpace.espeak().split()
    cfg = InterruptConfig(clip_seconds=(1.5, 2.5), other_speech=(0, 1))
    recs = build_interrupt_set(tmp_path, 4, EspeakSynth(), train, ["good morning"], codec=FakeCodec(), config=cfg,
                               seed=3, progress=False)
    assert [r["id"] for r in recs] == [f"irq-{i:06d}" for i in range(4)]
    assert sum(1 for r in recs if r["command"]) == 2
    for r in recs:
        assert r["task"] == "interrupt" and len(r["listen_frames"]) == len(r["labels"])
        assert any(r["labels"]) == (r["command"] is not None)
        if r["command"]:
            assert r["command_end_ms"] > r["command_start_ms"] >= 0
    write_manifest(recs, tmp_path / "i.jsonl")
    back = read_manifest(tmp_path / "i.jsonl")
    assert back[0]["listen_audio"].endswith("irq-000000.wav") and back[0]["labels"] == recs[0]["labels"]
    # without a codec: audio only, `data prepare` fills listen_frames later
    recs = build_interrupt_set(tmp_path / "b", 1, EspeakSynth(), train, ["good morning"], config=cfg, seed=3,
                               progress=False)
    assert recs[0]["listen_frames"] is None and recs[0]["listen_audio"]
