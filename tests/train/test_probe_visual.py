"""scripts/probe_visual.py: the picture-question probe draws the world's questions on the right side of the
split, its scene-in-words control states the drawn scene, its feature transforms do what they say, and a
short run trains and writes its curve."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from omnitalk.testing import load_script
from omnitalk.train import world as W

ROOT = Path(__file__).resolve().parents[2]
WORLD = {"seed": 0, "held_out_fraction": 0.15, "image_size": 224, "image_layout": "grid"}


@pytest.fixture(scope="module")
def probe():
    return load_script(ROOT / "scripts" / "probe_visual.py")


def test_questions_keep_the_split_and_the_scene_in_words_states_the_answer(probe):
    train = probe.picture_questions(WORLD, 60, False, "train", text_scene=True)
    held = probe.picture_questions(WORLD, 60, True, "eval", text_scene=True)
    held_phrasings = {q for *_, q in W._Pools(0, 0.15, True).image}
    train_phrasings = {q for *_, q in W._Pools(0, 0.15, False).image}
    for recs, mine in ((train, train_phrasings), (held, held_phrasings)):
        assert {r["family"] for r, _ in recs} == {"count", "color", "shape"}
        for r, im in recs:
            assert im is None and r["question_image"] is None
            words = r["question_text"].split()
            n = next(i for i in range(0, len(words), 2) if words[i] not in W.COLORS)  # scene words end here
            pairs = [(words[i], words[i + 1]) for i in range(0, n, 2)]   # (colour, shape)
            assert " ".join(words[n:]) in mine
            if r["family"] == "color":   # the one shape asked about, in the answer's colour
                key = next(w for w in words[n:] if w in W.SHAPES)
                assert [c for c, s in pairs if s == key] == [r["answer_text"]]
            elif r["family"] == "shape":
                key = next(w for w in words[n:] if w in W.COLORS)
                assert [s for c, s in pairs if c == key] == [r["answer_text"]]
            else:
                key = next(s for s in W.SHAPES if W.plural(s) in words[n:])
                assert W.NUMBERS[sum(s == key for _, s in pairs)] == r["answer_text"]
    # the same draw as with pictures: the scene in words is the drawn scene
    pics = probe.picture_questions(WORLD, 5, False, "train")
    assert [r["answer_text"] for r, _ in pics] == [r["answer_text"] for r, _ in train[:5]]
    assert all(im.size == (224, 224) for _, im in pics)


def test_object_cells_find_the_grid_cells_with_shapes(probe):
    rng = random.Random(3)
    scene, _ = W.question_scene("count", "star", 224, rng, "grid")
    im = W.draw_scene(scene, 224, rng)
    cells = sorted({int(cy // 32) * 7 + int(cx // 32) for _, _, cx, cy, _ in scene.items})
    assert probe.object_cells(im) == cells and len(cells) == len(scene.items)


def test_whitener_gives_unit_variance_in_every_direction(probe):
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g))
    x = torch.randn(4000, 8, generator=g) @ torch.diag(torch.linspace(0.5, 20.0, 8)) @ q + 5.0  # correlated, offset
    assert (torch.cov(x.T) - torch.diag(torch.cov(x.T).diag())).abs().max() > 1.0
    mean, wh = probe.whitener(x.double())
    assert torch.allclose(mean, x.double().mean(0))
    cov = torch.cov(((x.double() - mean) @ wh).T)
    # every principal direction at unit variance, but for the floor of 1e-4 of the largest eigenvalue
    lam, u = torch.linalg.eigh(torch.cov(x.double().T))
    assert torch.allclose(cov, u @ torch.diag(lam / (lam + 1e-4 * lam.max())) @ u.T, atol=1e-9)
    assert torch.allclose(cov, torch.eye(8, dtype=torch.float64), atol=0.1)


def test_label_features_hold_log_probs_of_the_heads(probe):
    heads = {"cover_shape": torch.nn.Linear(16, 5), "cover_color": torch.nn.Linear(16, 7)}
    v = torch.randn(50, 16)
    out = probe.label_features(heads, v)
    assert out.shape == (50, 16) and not out[0].any() and not out[1:, 12:].any()
    assert torch.allclose(out[1:, :5].exp().sum(-1), torch.ones(49)) and torch.allclose(
        out[1:, 5:12], heads["cover_color"](v[1:]).log_softmax(-1))


def test_a_short_text_scene_run_trains_and_writes_its_curve(probe, tmp_path):
    run = tmp_path / "run"
    (run / "world").mkdir(parents=True)
    (run / "world" / "world.json").write_text(json.dumps(WORLD))
    W.build_tokenizer(W.world_words(), run / "world" / "tokenizer.json")
    from omnitalk.train.config import TrainConfig

    cfg = TrainConfig.from_dict({
        "model": {"config": {"n_layer": 2, "n_embd": 32, "n_head": 2, "n_query_groups": 1, "head_size": 16,
                             "intermediate_size": 64, "text_vocab_size": 192, "audio_vocab_size": 4160,
                             "whisper_adapter_dim": 16, "vision_adapter_dim": 16, "block_size": 128},
                  "tokenizer": str(run / "world" / "tokenizer.json")},
        "stage": 2, "optim": {"warmup_steps": 2}, "device": "cpu"})
    cfg.to_yaml(run / "stage2.yaml")
    out = tmp_path / "probe"
    import omnitalk.train.loop as L
    build = L.build_model
    assert probe.main(["--run", str(run), "--out", str(out), "--text-scene", "--model", "{}", "--n-train", "96",
                       "--n-eval", "32", "--steps", "30", "--eval-every", "15", "--batch-size", "16",
                       "--adapter-rms", "0.16"]) == 0
    assert L.build_model is build  # --adapter-rms wraps the model builder for that run only
    res = json.loads((out / "probe_visual.json").read_text())
    assert [c["step"] for c in res["curve"]] == [15, 30]
    fam = res["final"]
    for k in ("heldout_color", "heldout_count", "heldout_shape", "heldout_all", "train_all"):
        assert 0.0 <= fam[k] <= 1.0
    assert abs(fam["heldout_all"] * 32 - round(fam["heldout_all"] * 32)) < 1e-6  # a share of the 32 questions
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 30 and np.mean(losses[-5:]) < np.mean(losses[:5])


def test_probe_refuses_a_folder_that_is_not_a_run(probe, tmp_path):
    with pytest.raises(SystemExit, match="world.json not found"):
        probe.main(["--run", str(tmp_path), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="give one of them"):
        probe.main(["--run", str(tmp_path), "--out", str(tmp_path / "o"), "--class-only", "--objects"])
