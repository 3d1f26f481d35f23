"""Stage 0 of the small recipe: the narrow encoders learn the world (omnitalk.train.stage0)."""
import random

import numpy as np
import pytest
import soundfile as sf
import torch

from omnitalk.model.clip import VisionDims, VisionTransformer
from omnitalk.model.whisper import AudioEncoder, WhisperDims, sinusoids
from omnitalk.train import stage0


def test_transcribed_audio_takes_transcripts_and_asr_answers():
    recs = [{"id": "a", "task": "qa", "question_audio": "/q1.wav", "question_transcript": "what is two plus two",
             "answer_text": "four"},
            {"id": "b", "task": "asr", "question_audio": "/q2.wav", "answer_text": "the red star"},
            {"id": "c", "task": "qa", "question_audio": "/q3.wav", "answer_text": "four"},   # no transcript
            {"id": "d", "task": "text", "question_text": "two plus two", "answer_text": "four"}]
    assert stage0.transcribed_audio(recs) == [("/q1.wav", "what is two plus two"), ("/q2.wav", "the red star")]


def test_augment_changes_speed_gain_and_adds_noise():
    rng = np.random.default_rng(0)
    x = np.sin(np.arange(16000) / 16000 * 2 * np.pi * 300).astype(np.float32)
    for _ in range(20):
        y = stage0.augment(x, rng, speed=(0.9, 1.1), gain=(0.3, 0.95))
        assert y.dtype == np.float32 and np.isfinite(y).all()
        assert 16000 / 1.1 - 1 <= len(y) <= 16000 / 0.9 + 1
        assert 0.3 - 1e-5 <= np.abs(y).max() <= 0.95 + 1e-5
    clean = stage0.augment(x, np.random.default_rng(1), speed=(1, 1), noise_prob=0.0, gain=(0.5, 0.5))
    np.testing.assert_allclose(clean, 0.5 * x / np.abs(x).max(), atol=1e-6)


def test_spec_augment_masks_bands_and_spans_with_the_mean():
    mel = torch.arange(80 * 200, dtype=torch.float32).reshape(80, 200) / 1000
    fill = float(mel.mean())
    for seed in range(20):
        out = stage0.spec_augment(mel, np.random.default_rng(seed), freq_masks=2, freq_width=10, time_masks=2,
                                  time_width=12)
        assert out.shape == mel.shape
        changed = out != mel
        rows = changed.all(1).nonzero().flatten().tolist()      # masked mel bins (whole rows)
        cols = changed.all(0).nonzero().flatten().tolist()      # masked frames (whole columns)
        assert len(rows) <= 20 and len(cols) <= 2 * min(12, 200 // 10)
        # every changed value is the fill and lies in a masked row or column
        assert torch.all(out[changed] == fill)
        extra = changed.clone()
        extra[rows] = False
        extra[:, cols] = False
        assert not extra.any()
    assert torch.equal(stage0.spec_augment(mel, np.random.default_rng(3)), stage0.spec_augment(mel, np.random.default_rng(3)))
    assert torch.equal(mel, torch.arange(80 * 200, dtype=torch.float32).reshape(80, 200) / 1000)  # input untouched
    short = torch.zeros(80, 9) + torch.arange(9.0)
    assert torch.equal(stage0.spec_augment(short, np.random.default_rng(0), freq_masks=0), short)  # T // 10 = 0


def test_ctc_greedy_collapses_repeats_and_blanks():
    blank = 3
    path = [3, 0, 0, 3, 0, 1, 1, 3, 3, 2]
    logp = torch.full((len(path), 4), -10.0)
    logp[torch.arange(len(path)), torch.tensor(path)] = 0
    assert stage0.ctc_greedy(logp, blank) == [0, 0, 1, 2]


TONES = {0: 400.0, 1: 1500.0, 2: 3200.0}


def _tone_utterance(words, rng):
    sr = 16000
    parts = [np.zeros(int(0.1 * sr), np.float32)]
    for w in words:
        t = np.arange(int(rng.uniform(0.2, 0.3) * sr)) / sr
        parts += [0.5 * np.sin(2 * np.pi * TONES[w] * t).astype(np.float32), np.zeros(int(0.1 * sr), np.float32)]
    return np.concatenate(parts)


@pytest.mark.slow
def test_ctc_pretraining_learns_a_tone_language(tmp_path):
    """Three 'words' (tones), sequences of 1-3: CTC must learn to transcribe unseen sequences."""
    rng = np.random.default_rng(0)
    items = []
    for i in range(80):
        words = list(rng.integers(0, 3, rng.integers(1, 4)))
        p = tmp_path / f"{i}.wav"
        sf.write(p, _tone_utterance(words, rng), 16000)
        items.append((str(p), " ".join(f"w{w}" for w in words)))
    enc_text = lambda t: [int(w[1:]) for w in t.split()]
    torch.manual_seed(0)
    dims = WhisperDims(80, 1500, 32, 2, 1)
    enc = AudioEncoder(dims)
    with torch.no_grad():
        enc.positional_embedding.copy_(sinusoids(1500, 32))
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    res = stage0.pretrain_audio_encoder(enc, items[:64], enc_text, 3, steps=500, batch_size=8, lr=2e-3, warmup=20,
                                        held_out=items[64:], progress=False, log_every=50)
    assert res.steps == 500 and res.losses[-1][1] < res.losses[0][1] / 20
    assert res.metrics["n"] == 16 and res.metrics["ctc_wer"] < 0.15
    assert not enc.training and not any(p.requires_grad for p in enc.parameters())
    assert not torch.equal(before["conv1.weight"], enc.conv1.weight)
    # the trained head comes back (frozen) and travels in small.pt for audio_compress: ctc
    assert isinstance(res.head, stage0.CTCHead) and not res.head.proj.weight.requires_grad
    stage0.save_audio_encoder(tmp_path / "small.pt", enc, res.head)
    from omnitalk.model.whisper import load_whisper_encoder
    loaded = load_whisper_encoder(tmp_path / "small.pt")
    x = torch.randn(7, 32)
    torch.testing.assert_close(loaded.ctc_head(x).log_softmax(-1), res.head(x), rtol=0, atol=0)


def test_random_scene_labels_match_the_drawing():
    from omnitalk.train.world import COLORS, SHAPES

    rng = random.Random(3)
    for _ in range(30):
        img, lab = stage0.random_scene(rng, 224)
        counts, pairs = lab["counts"], lab["pairs"]
        assert img.size == (224, 224)
        assert counts.shape == (4,) and pairs.shape == (4, 6)
        assert 1 <= counts.sum() <= 9
        for s in range(len(SHAPES)):  # a shape is present exactly when some colour of it is
            assert (counts[s] > 0) == (pairs[s].sum() > 0)
            assert pairs[s].sum() <= counts[s]
        # per patch of the 7 x 7 grid: every centred item sits on a covered patch of its own shape
        assert lab["cover_shape"].shape == lab["cover_color"].shape == lab["centre"].shape == (49,)
        assert (lab["centre"] > 0).sum() <= counts.sum()
        for k in np.flatnonzero(lab["centre"]):
            s = lab["centre"][k] - 1
            assert counts[s] > 0
        covered = lab["cover_shape"] > 0
        assert covered.any() and ((lab["cover_color"] > 0) == covered).all()
        colours = np.array(list(COLORS))
        for k in np.flatnonzero(covered):  # the covering item's (shape, colour) is one the scene holds
            assert pairs[lab["cover_shape"][k] - 1, lab["cover_color"][k] - 1] == 1, colours


def test_grid_scenes_put_one_whole_shape_in_a_patch():
    """layout grid: each item covers exactly the patch it is centred in (and no other patch over 10 %)."""
    rng = random.Random(5)
    for _ in range(30):
        img, lab = stage0.random_scene(rng, 224, 32, layout="grid")
        centred = lab["centre"] > 0
        assert (lab["cover_shape"] > 0).sum() == centred.sum() == lab["counts"].sum()
        assert ((lab["cover_shape"] > 0) == centred).all() and (lab["cover_shape"] == lab["centre"]).all()
    x, y = stage0.make_scenes(3, 0, 224, 32, layout="grid")
    assert x.shape == (3, 3, 224, 224) and (y["cover_shape"] == y["centre"]).all()


def test_label_map_is_drawn_with_the_same_geometry():
    """draw_scene's label map marks exactly the pixels each item paints (value = item index + 1)."""
    from PIL import Image

    from omnitalk.train.world import Scene, draw_scene

    scene = Scene(items=[("square", "red", 60.0, 60.0, 30.0), ("circle", "blue", 160.0, 160.0, 25.0)])
    lab = Image.new("L", (224, 224), 0)
    img = np.asarray(draw_scene(scene, 224, random.Random(0), label_map=lab)).astype(int)
    m = np.asarray(lab)
    assert m[60, 60] == 1 and m[160, 160] == 2 and m[0, 0] == 0 and m[112, 200] == 0
    red = (img[..., 0] > 150) & (img[..., 2] < 100)
    blue = (img[..., 2] > 150) & (img[..., 0] < 100)
    assert ((m == 1) == red).mean() > 0.995 and ((m == 2) == blue).mean() > 0.995


def test_vision_pretraining_runs_and_freezes():
    torch.manual_seed(0)
    vit = VisionTransformer(VisionDims(224, 32, 64, 1, 1, 64))
    before = vit.conv1.weight.clone()
    res = stage0.pretrain_vision_encoder(vit, steps=12, batch_size=8, n_images=40, n_held_out=16, lr=3e-3,
                                         warmup=2, progress=False, log_every=4)
    assert res.steps == 12 and len(res.losses) == 4
    assert res.losses[-1][1] < res.losses[0][1]
    assert set(res.metrics) == {"count_accuracy", "scene_count_exact", "pair_accuracy", "patch_shape_accuracy",
                                "patch_color_accuracy", "centre_accuracy", "shape_patch_accuracy", "n", "layout"}
    assert res.metrics["layout"] == "free" and 0 <= res.metrics["shape_patch_accuracy"] <= 1
    assert 0 <= res.metrics["count_accuracy"] <= 1 and res.metrics["n"] == 16
    assert not torch.equal(before, vit.conv1.weight)
    assert not vit.training and not any(p.requires_grad for p in vit.parameters())


def test_vision_pretraining_on_fresh_scenes_draws_every_batch(monkeypatch):
    """n_images None: every step draws new scenes (the same ones for the same seed); held-out as before."""
    drawn = []
    real = stage0.make_scenes
    monkeypatch.setattr(stage0, "make_scenes", lambda n, seed, *a, **k: drawn.append((n, seed)) or real(n, seed, *a, **k))

    def run():
        torch.manual_seed(0)
        vit = VisionTransformer(VisionDims(224, 32, 64, 1, 1, 64))
        res = stage0.pretrain_vision_encoder(vit, steps=5, batch_size=4, n_images=None, n_held_out=8, lr=3e-3,
                                             warmup=1, progress=False, log_every=1)
        return res, vit
    (res, vit), calls = run(), list(drawn)
    assert res.steps == 5 and res.metrics["n"] == 8
    assert calls[0] == (8, 10_000)  # the held-out scenes, from their own seed
    assert [n for n, _ in calls[1:]] == [4] * 5 and all(isinstance(r, random.Random) for _, r in calls[1:])
    drawn.clear()
    res2, vit2 = run()
    assert torch.equal(vit.conv1.weight, vit2.conv1.weight)  # seeded: the same scenes, the same weights


def test_cosine_lr_warms_up_then_decays():
    lrs = [stage0.cosine_lr(s, 100, 1.0, 0.1, 10) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] == pytest.approx(0.1, abs=1e-3)
