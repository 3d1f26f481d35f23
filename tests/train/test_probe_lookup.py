"""scripts/probe_lookup.py: the picture-lookup probe draws colour/shape questions on the right side of the
split, both bodies and every knob train and write their curve, and bad arguments are refused by name."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from omnitalk.testing import load_script
from omnitalk.train import world as W

ROOT = Path(__file__).resolve().parents[2]
WORLD = {"seed": 0, "held_out_fraction": 0.15, "image_size": 224, "image_layout": "grid"}


@pytest.fixture(scope="module")
def probe():
    return load_script(ROOT / "scripts" / "probe_lookup.py")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from omnitalk.model.clip import VisionDims, VisionTransformer

    run = tmp_path_factory.mktemp("run")
    (run / "world").mkdir()
    (run / "world" / "world.json").write_text(json.dumps(WORLD))
    (run / "assets").mkdir()
    torch.manual_seed(0)
    torch.save(VisionTransformer(VisionDims(224, 32, 64, 1, 1, 16)).state_dict(), run / "assets" / "ViT-B-32.pt")
    return run


def test_questions_are_colour_and_shape_lookups_in_the_split_phrasings(probe, run):
    from omnitalk.train.loop import _encoders_from_dir

    vit = _encoders_from_dir(run / "assets").clip.eval()
    vocab = {"<pad>": 0, "<bos>": 1, "<answer>": 2}
    words = {i: w for w, i in vocab.items()}
    for held in (False, True):
        items = probe.questions(WORLD, 40, held, "t", vit, vocab)
        words = {i: w for w, i in vocab.items()}
        phrasings = {q for f, _, q in W._Pools(0, 0.15, held).image if f in ("color", "shape")}
        assert len(items) == 40 and {it[3] for it in items} == {"color", "shape"}
        for feats, q, y, family in items:
            assert feats.shape == (50, 16) and feats.dtype == torch.float32
            assert q[-1] == vocab["<answer>"] and " ".join(words[i] for i in q[:-1]) in phrasings
            assert words[y] in (W.COLORS if family == "color" else W.SHAPES)
    feats, first, question, y = probe.stack(items[:5], vocab)
    assert feats.shape == (5, 50, 16) and first.shape == (5, 1) and question.shape[0] == 5
    assert (question[:, -1] == vocab["<answer>"]).all()  # left-padded: every answer is read last


@pytest.mark.parametrize("args", [
    ["--body", "gpt", "--heads", "2"],
    ["--body", "omni", "--heads", "2", "--groups", "1", "--adapter", "gated", "--streams-mean",
     "--adapter-lr-scale", "10"],
    ["--body", "omni", "--heads", "2", "--init", "torch", "--mlp", "gelu", "--norm", "layernorm",
     "--positions", "learned", "--head", "untied"],
    ["--body", "omni", "--heads", "2", "--init-std", "0.05", "--embedding-std", "0.1", "--final-norm-init", "0.5"],
])
def test_a_short_run_trains_and_writes_its_curve(probe, run, tmp_path, args):
    out = tmp_path / "c.json"
    assert probe.main(["--run", str(run), "--out", str(out), "--layers", "1", "--width", "32", "--n-train", "16",
                       "--n-eval", "24", "--steps", "40", "--eval-every", "20", "--batch-size", "8", "--lr", "3e-3",
                       "--threads", "1", *args]) == 0
    res = json.loads(out.read_text())
    assert [c["step"] for c in res["curve"]] == [0, 20, 40]
    for row in res["curve"]:
        x = row["heldout_all"] * 24
        assert 0.0 <= row["heldout_all"] <= 1.0 and abs(x - round(x)) < 0.01  # a share of the 24 questions
    # 16 training scenes: it memorises them, the loss falls
    assert res["curve"][2]["train_loss"] < 0.8 * res["curve"][1]["train_loss"]
    assert res["args"]["body"] == args[1]


def test_probe_refuses_bad_arguments_by_name(probe, run, tmp_path, capsys):
    (tmp_path / "world").mkdir()
    (tmp_path / "world" / "world.json").write_text(json.dumps(WORLD))
    for args, message in (([], "ViT-B-32.pt is missing: --run takes a folder that scripts/train_small.py wrote"),
                          (["--run", str(run), "--body", "gpt", "--streams-mean"], "knobs of --body omni"),
                          (["--run", str(run), "--body", "gpt", "--norm", "layernorm"], "knobs of --body omni"),
                          (["--run", str(run), "--body", "gpt", "--mlp", "gelu"], "knobs of --body omni"),
                          (["--run", str(run), "--body", "gpt", "--init-std", "0.05"], "knobs of --body omni"),
                          (["--run", str(run), "--init", "torch", "--init-std", "0.05"], "use them with --init recipe"),
                          (["--run", str(run), "--heads", "3"], "--width 128 must split into --heads 3")):
        with pytest.raises(SystemExit):
            probe.main(["--run", str(tmp_path), "--out", str(tmp_path / "o.json"), *args])
        assert message in capsys.readouterr().err


def test_omni_knobs_change_the_blocks_and_their_start(probe):
    import argparse

    from omnitalk.model.llm import GatedMLP, RMSNorm

    base = dict(body="omni", layers=1, width=32, heads=2, groups=1, adapter="linear", streams_mean=False)

    def reader(**knobs):
        return probe.Reader(argparse.Namespace(**base, **knobs), 10, 16)

    recipe = reader(init="recipe", init_std=0.02, embedding_std=None, final_norm_init=1.0, mlp="swiglu",
                    norm="rmsnorm", positions="rope", head="tied")
    other = reader(init="torch", init_std=0.02, embedding_std=None, final_norm_init=1.0, mlp="gelu",
                   norm="layernorm", positions="learned", head="untied")
    wider = reader(init="recipe", init_std=0.05, embedding_std=0.1, final_norm_init=0.25, mlp="gelu",
                   norm="rmsnorm", positions="rope", head="tied")
    w = recipe.lm.transformer.h[0].attn.attn.weight.detach()
    assert float(w.std()) == pytest.approx(0.02, rel=0.2)   # loop.init_weights
    w = other.lm.transformer.h[0].attn.attn.weight.detach()
    assert float(w.abs().max()) <= 32 ** -0.5 and float(w.std()) > 0.1  # nn.Linear's uniform +-1/sqrt(fan_in)
    assert float(other.lm.transformer.wte.weight.detach().std()) == pytest.approx(1.0, rel=0.05)
    assert float(recipe.lm.transformer.wte.weight.detach().std()) == pytest.approx(0.16, rel=0.05)  # 8 x 0.02
    assert float(wider.lm.transformer.h[0].attn.attn.weight.detach().std()) == pytest.approx(0.05, rel=0.2)
    assert float(wider.lm.transformer.wte.weight.detach().std()) == pytest.approx(0.1, rel=0.05)
    assert bool((wider.lm.transformer.ln_f.weight == 0.25).all())  # the tied head's first logits / 4
    assert bool((recipe.lm.transformer.ln_f.weight == 1).all())
    assert isinstance(recipe.lm.transformer.h[0].mlp, GatedMLP)
    gelu = wider.lm.transformer.h[0].mlp  # nanoGPT's MLP, drawn by the recipe's init (zero biases)
    assert isinstance(gelu[1], torch.nn.GELU) and gelu[0].weight.shape == (128, 32) and not gelu[0].bias.any()
    assert float(gelu[2].weight.detach().std()) == pytest.approx(0.05, rel=0.2)
    assert isinstance(recipe.lm.transformer.h[0].norm_1, RMSNorm)
    assert all(isinstance(m, torch.nn.LayerNorm) for m in (other.lm.transformer.h[0].norm_1,
                                                           other.lm.transformer.h[0].norm_2, other.lm.transformer.ln_f))
    assert recipe.pos is None and float(recipe.lm.rope_sin[5].abs().max()) > 0.1
    assert other.pos.weight.shape == (96, 32) and float(other.lm.rope_sin.abs().max()) == 0.0  # no rotation
    assert bool((other.lm.rope_cos == 1).all())
    assert recipe.head is None and other.head.weight.shape == (10, 32)
    x = torch.randn(2, 50, 16), torch.ones(2, 1, dtype=torch.long), torch.ones(2, 3, dtype=torch.long)
    assert recipe(*x).shape == (2, recipe.lm.cfg.text_vocab_size) and other(*x).shape == (2, 10)
