"""The parity checker (omnitalk.testing.parity), its independent oracle (omnitalk.testing.reference) and
fixtures generated from random weights (omnitalk.testing.make_fixture).

* the checker passes on the official fixture, every task folder included;
* the oracle alone reproduces the official outputs (so it may stand in for the release);
* fixtures of other shapes and seeds, written by the oracle, pass the checker with every file compared;
* tampered or incomplete fixtures fail, naming the item.
"""
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image, ImageDraw

from omnitalk.testing import make_fixture as MF
from omnitalk.testing import parity
from omnitalk.testing import reference as R

OFFICIAL = Path(__file__).resolve().parents[1] / "fixtures" / "parity"

# Seeds are ones whose first draw is usable (make_fixture would move on to the next seed otherwise).
SMALL = dict(seed=6, n_layer=1, n_head=4, n_query_groups=1, head_size=8, intermediate_size=32,
             whisper={"n_audio_state": 16, "n_audio_head": 2, "n_audio_layer": 1},
             clip={"width": 64, "layers": 1, "patch": 32, "output_dim": 16},
             snac={"encoder_dim": 8, "decoder_dim": 16},
             tasks=("T1T2", "AA_AT_batch"), max_tokens=24, min_chunks=3)
SHAPES = {
    # MQA, one layer, wide heads, 112-px CLIP input (patch 16), wide Whisper
    "mqa_1layer": dict(seed=101, n_layer=1, n_head=4, n_query_groups=1, head_size=16, intermediate_size=48,
                       whisper={"n_audio_state": 64, "n_audio_head": 4, "n_audio_layer": 1},
                       clip={"width": 64, "layers": 1, "patch": 16, "output_dim": 16},
                       snac={"encoder_dim": 8, "decoder_dim": 16}, max_tokens=32),
    # MHA, three layers, narrow Whisper with 3 heads, wider CLIP
    "mha_3layers": dict(seed=208, n_layer=3, n_head=4, n_query_groups=4, head_size=8, intermediate_size=96,
                        whisper={"n_audio_state": 24, "n_audio_head": 3, "n_audio_layer": 2},
                        clip={"width": 192, "layers": 3, "patch": 32, "output_dim": 40},
                        snac={"encoder_dim": 8, "decoder_dim": 32}, max_tokens=32),
    # GQA with 8 heads of size 4, other inputs (1.5-s question, portrait image, prompt), budget 40, stride 3
    "gqa_other_inputs": dict(seed=303, n_layer=2, n_head=8, n_query_groups=2, head_size=4, intermediate_size=64,
                             whisper={"n_audio_state": 48, "n_audio_head": 2, "n_audio_layer": 1},
                             clip={"width": 128, "layers": 2, "patch": 32, "output_dim": 24},
                             snac={"encoder_dim": 8, "decoder_dim": 32},
                             prompt="Tell me a story about a red bird.", max_tokens=40, stride=3),
}


def failures(items) -> dict[str, str]:
    return {i.name: i.detail for i in items if not i.ok}


def tasks_checked(items) -> set[str]:
    return {i.name.split("/")[0] for i in items if i.name.split("/")[0] in R.TASKS and "/tokens.npy" in i.name}


def assert_every_file_compared(items, fixture: Path) -> None:
    """Each file under expected/ (versions.json aside) is the subject of at least one checker item."""
    names = [i.name for i in items]
    exp = fixture / "expected"
    for f in sorted(exp.rglob("*")):
        rel = f.relative_to(exp).as_posix()
        if f.is_dir() or rel == "versions.json":
            continue
        assert any(n == rel or n.startswith(rel + "[") for n in names), f"{rel} was not compared"


def small_inputs(folder: Path) -> tuple[Path, Path]:
    """A 1.5-s slice of the official question and a portrait PNG (other lengths and aspect ratio)."""
    folder.mkdir(parents=True, exist_ok=True)
    x, _ = sf.read(OFFICIAL / "inputs" / "question.wav", dtype="int16")
    sf.write(folder / "short.wav", x[:24000], 16000, subtype="PCM_16")
    img = Image.new("RGB", (180, 260), (240, 240, 230))
    draw = ImageDraw.Draw(img)
    draw.ellipse((30, 60, 150, 180), fill=(200, 30, 40))
    draw.rectangle((60, 190, 120, 250), fill=(20, 90, 200))
    img.save(folder / "portrait.png")
    return folder / "short.wav", folder / "portrait.png"


# ---- (a) the checker on the official fixture ------------------------------------------------------
@pytest.mark.slow
def test_checker_passes_on_official_fixture():
    items = parity.check(OFFICIAL)
    assert not failures(items)
    assert tasks_checked(items) == set(R.TASKS)
    assert_every_file_compared(items, OFFICIAL)


@pytest.mark.slow
def test_checker_passes_with_the_compiled_step(monkeypatch):
    """`--compile`: every decode step through torch.compile's static step, the fixture's outputs still."""
    from omnitalk.model.llm import StaticStep
    steps = []
    call = StaticStep.__call__
    monkeypatch.setattr(StaticStep, "__call__", lambda self, ids, pos: steps.append(ids.size(0)) or call(self, ids, pos))
    items = parity.check(OFFICIAL, compile=True)
    assert not failures(items)
    assert tasks_checked(items) == set(R.TASKS)
    # the warm-up (3 per batch size on CUDA, 1 here) and then every decode step of the 7 tasks
    assert steps[:2] == [1, 2] and steps.count(2) > 40 and steps.count(1) > 40


# ---- (b) the oracle reproduces the official outputs -------------------------------------------------
@pytest.fixture(scope="module")
def official_reference():
    system = R.ReferenceSystem(OFFICIAL / "checkpoint")
    fe = system.frontend(OFFICIAL / "inputs" / "question.wav", OFFICIAL / "inputs" / "image.png")
    return system, fe


def compare_with_official(system, fe, task, budget=48):
    """Run one task with the oracle and compare with the official files. A budget below the official 48
    compares the first `budget` steps and the chunks streamed by then (the official run's prefix)."""
    prompt = (OFFICIAL / "inputs" / "prompt.txt").read_text(encoding="utf-8")
    rec = system.run_task(task, fe, prompt, budget=budget, stride=4, snac_seed=1234)
    d = OFFICIAL / "expected" / task
    meta = json.loads((d / "meta.json").read_text())
    whole = budget >= 48
    ids = torch.stack(rec.input_ids, dim=1).numpy()
    assert np.array_equal(ids, np.load(d / "input_ids.npy"))
    e = np.load(d / "prefill_logits.npz")
    for got, exp in ((rec.prefill_text, e["text"]), (rec.prefill_audio, e["audio"])):
        assert np.abs(got - exp).max() / np.abs(exp).max() < 1e-4
    exp_tokens = np.load(d / "tokens.npy")
    n = exp_tokens.shape[1] if whole else budget
    assert rec.steps == n
    assert np.array_equal(np.array(rec.tokens), exp_tokens[:, :n])
    assert np.abs(np.array(rec.margins) - np.load(d / "margins.npy")[:, :n]).max() < 1e-3
    if whole:
        assert rec.steps == meta["steps_recorded"] and rec.stop_kind == meta["stop_reason"]["kind"]
    if task not in R.BATCH_TASKS:
        assert system.decoded_text(task, rec) == meta["decoded_text"]
        return
    spec = json.loads((d / "stream.json").read_text())
    exp_chunks = [c for c in spec["chunks"] if c["emitted_after_step"] < n]
    assert len(rec.chunks) == len(exp_chunks) > 0
    for i, (got, exp) in enumerate(zip(rec.chunks, exp_chunks)):
        assert got["codes"] == exp["codes"] and got["text_delta"] == exp["text_delta"]
        assert got["emitted_after_step"] == exp["emitted_after_step"] and got["frames"] == exp["frames"]
        pcm = np.load(d / "stream" / f"chunk_{i:02d}.npy")
        assert np.abs(got["pcm"].astype(np.int32) - pcm).max() <= 1
    if whole:
        assert "".join(c["text_delta"] for c in rec.chunks) == meta["text_concat_of_deltas"]
        codes, full = system.decode_all(rec, snac_seed=1234)
        assert codes == json.loads((d / "snac_codes.json").read_text())
        assert np.abs(full - np.load(d / "full_float.npy")).max() < 1e-4


def test_reference_frontend_and_prompt_builders(official_reference):
    system, fe = official_reference
    exp = OFFICIAL / "expected"
    assert fe.L == json.loads((exp / "audio_len.json").read_text())["L"]
    assert np.abs(fe.mel - np.load(exp / "mel.npy")).max() < 1e-4
    assert np.abs(fe.clip_input - np.load(exp / "clip_input.npy")).max() < 1e-6
    prompt = (OFFICIAL / "inputs" / "prompt.txt").read_text(encoding="utf-8")
    ids = system.tokenizer.encode(prompt)
    built = {"T1T2": R.prompt_text_to_text(ids), "T1A2": R.prompt_text_to_speech(ids),
             "A1T2": R.prompt_speech(fe.L, R.PAD_A, R.ANSWER_T), "ASR": R.prompt_speech(fe.L, R.PAD_A, R.ASR),
             "A1A2": R.prompt_speech(fe.L, R.ANSWER_A, R.ANSWER_T), "AA_AT_batch": R.prompt_speech_pair(fe.L),
             "ImageQA_batch": R.prompt_image_speech_pair(fe.L)}
    for task, rows in built.items():
        assert np.array_equal(torch.stack(rows, dim=1).numpy(), np.load(exp / task / "input_ids.npy")), task


@pytest.mark.parametrize("task, budget", [("T1T2", 48), ("AA_AT_batch", 24)])
def test_reference_reproduces_official_outputs(official_reference, task, budget):
    compare_with_official(*official_reference, task, budget)


@pytest.mark.slow
@pytest.mark.parametrize("task", ["T1A2", "A1T2", "ASR", "A1A2", "AA_AT_batch", "ImageQA_batch"])
def test_reference_reproduces_official_outputs_other_tasks(official_reference, task):
    compare_with_official(*official_reference, task)


def test_reference_sampling_is_the_releases():
    logits = torch.tensor([0.5, 3.0, 2.9, -1.0])
    g = torch.Generator().manual_seed(0)
    # top_k=1: arg-max whatever the generator draws, but multinomial is still called
    assert {R.sample(logits, R.Sampling(0.9, 1, 1.0, g)) for _ in range(20)} == {1}
    # top-p keeps the smallest set whose probability exceeds top_p, most probable token always kept
    assert {R.sample(logits, R.Sampling(1.0, None, 0.05, g)) for _ in range(20)} == {1}
    # temperature 0 with top_p > 0 still samples (the release only takes arg-max when both are 0)
    drawn = {R.sample(logits, R.Sampling(0.0, None, 1.0, g)) for _ in range(200)}
    assert drawn >= {1, 2}
    assert R.sample(logits, R.Sampling(0.0, None, 0.0, g)) == 1
    assert R.margin(logits) == pytest.approx(0.1, abs=1e-6)


# ---- (c) generated fixtures of other shapes and seeds -------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_checker_passes_on_generated_fixture(tmp_path, shape):
    kw = dict(SHAPES[shape])
    if shape == "gqa_other_inputs":
        kw["question_wav"], kw["image"] = small_inputs(tmp_path / "in")
    fx = tmp_path / shape
    summary = MF.make_fixture(fx, **kw)
    assert summary["tasks"] == list(R.TASKS)
    cfg = (fx / "checkpoint" / "model_config.yaml").read_text()
    assert f"n_query_groups: {kw['n_query_groups']}" in cfg and f"n_layer: {kw['n_layer']}" in cfg
    items = parity.check(fx, max_tokens=kw["max_tokens"], stride=kw.get("stride", 4))
    assert not failures(items), failures(items)
    assert tasks_checked(items) == set(R.TASKS)
    assert_every_file_compared(items, fx)


@pytest.fixture(scope="module")
def small_fixture(tmp_path_factory):
    fx = tmp_path_factory.mktemp("generated") / "small"
    summary = MF.make_fixture(fx, **SMALL)
    return fx, summary


def test_generated_fixture_layout(small_fixture):
    fx, summary = small_fixture
    assert summary["tasks"] == ["T1T2", "AA_AT_batch"]
    ck = fx / "checkpoint"
    for f in ("model_config.yaml", "lit_model.pth", "small.pt", "ViT-B-32.pt", "tokenizer.json",
              "snac/config.json", "snac/pytorch_model.bin"):
        assert (ck / f).is_file(), f
    cfg = MF.yaml.safe_load((ck / "model_config.yaml").read_text())
    assert len(cfg) == 41 and list(cfg)[:3] == ["add_qkv_bias", "asr_adapter", "attn_dropout"]
    assert cfg["n_query_groups"] == 1 and cfg["whisper_adapter_dim"] == 16 and cfg["vision_adapter_dim"] == 16
    sd = torch.load(ck / "lit_model.pth", weights_only=True)
    assert len(sd) == 9 + 8 * SMALL["n_layer"]
    assert list(sd)[:4] == ["whisper_adapter.fc_1.weight", "whisper_adapter.fc_2.weight",
                            "whisper_adapter.proj.weight", "lm_head.weight"]
    assert not torch.equal(sd["lm_head.weight"], sd["transformer.wte.weight"])  # the tied-head quirk matters
    w = torch.load(ck / "small.pt", weights_only=True)
    assert w["dims"]["n_audio_state"] == 16
    assert all(v.dtype == torch.float16 for v in w["model_state_dict"].values())
    table = MF.sinusoid_table(1500, 16).half()
    assert torch.equal(w["model_state_dict"]["encoder.positional_embedding"], table)
    clip = torch.load(ck / "ViT-B-32.pt", weights_only=True)
    assert clip["visual.conv1.weight"].dtype == torch.float16 and clip["visual.ln_pre.weight"].dtype == torch.float32
    for f in ("question.wav", "image.png", "prompt.txt"):
        assert (fx / "inputs" / f).is_file()
    meta = json.loads((fx / "expected" / "AA_AT_batch" / "meta.json").read_text())
    assert meta["step_budget"] == 24 and meta["task_labels_seen_by_model"] == ["A1T2", "A1T2"]
    spec = json.loads((fx / "expected" / "AA_AT_batch" / "stream.json").read_text())
    assert spec["num_chunks"] >= 3
    versions = json.loads((fx / "expected" / "versions.json").read_text())
    assert versions["seeds"]["master"] == summary["seed_used"]


# ---- (d) tampered and incomplete fixtures fail -------------------------------------------------------
def test_checker_names_tampered_and_missing_files(small_fixture, tmp_path, capsys):
    fx = tmp_path / "tampered"
    shutil.copytree(small_fixture[0], fx)
    exp = fx / "expected"
    # a flipped text token
    t = np.load(exp / "T1T2" / "tokens.npy")
    k_text = min(3, t.shape[1] - 1)
    t[0, k_text] = (t[0, k_text] + 1) % 1000
    np.save(exp / "T1T2" / "tokens.npy", t)
    # a flipped audio token of a batch task
    t = np.load(exp / "AA_AT_batch" / "tokens.npy")
    k_audio = 5
    t[3, k_audio] = (t[3, k_audio] + 1) % 4096
    np.save(exp / "AA_AT_batch" / "tokens.npy", t)
    # one scaled logit
    e = dict(np.load(exp / "AA_AT_batch" / "prefill_logits.npz"))
    i = np.unravel_index(np.abs(e["text"]).argmax(), e["text"].shape)
    e["text"][i] *= 1.01
    np.savez(exp / "AA_AT_batch" / "prefill_logits.npz", **e)
    # a dropped chunk, a missing task file, a missing front-end file, a task folder nobody knows
    (exp / "AA_AT_batch" / "stream" / "chunk_01.npy").unlink()
    (exp / "T1T2" / "margins.npy").unlink()
    (exp / "clip_input.npy").unlink()
    (exp / "Bogus").mkdir()

    rc = parity.main([str(fx), "--max-tokens", str(SMALL["max_tokens"])])
    out = capsys.readouterr().out
    assert rc == 1
    failed = {line.split()[0]: line for line in out.splitlines() if "  FAIL  " in line}
    assert set(failed) == {"T1T2/tokens.npy", "AA_AT_batch/tokens.npy", "AA_AT_batch/prefill_logits.npz[text]",
                           "AA_AT_batch/stream/chunk_01.npy", "T1T2/margins.npy", "clip_input.npy", "Bogus"}
    assert f"first mismatching step {k_text}" in failed["T1T2/tokens.npy"]
    assert f"first mismatching step {k_audio}" in failed["AA_AT_batch/tokens.npy"]
    rel = float(re.search(r"max rel diff (\S+)", failed["AA_AT_batch/prefill_logits.npz[text]"]).group(1))
    assert 5e-3 < rel < 2e-2
    for name in ("AA_AT_batch/stream/chunk_01.npy", "T1T2/margins.npy", "clip_input.npy"):
        assert "expected file missing" in failed[name]
    assert "unknown task folder" in failed["Bogus"]
    # everything that was not touched still passes, and both task folders were recomputed
    assert "AA_AT_batch/stream/chunk_00.npy" in out and "AA_AT_batch/full.wav" in out
    assert out.strip().splitlines()[-1].endswith("passed, 7 failed")


def test_make_fixture_refuses_impossible_shapes(tmp_path, capsys):
    assert MF.main([str(tmp_path / "x"), "--seed", "1", "--clip-width", "100"]) == 2
    assert "multiple of 64" in capsys.readouterr().err
    with pytest.raises(MF.FixtureError, match="n_query_groups"):
        MF.make_fixture(tmp_path / "y", seed=1, n_head=4, n_query_groups=3)
    assert not (tmp_path / "x").exists()


def test_reference_is_independent_of_the_engine():
    """The oracle may share front ends with omnitalk, never its LLM, prompts, loops or engine."""
    import ast

    tree = ast.parse(Path(R.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    omnitalk = {m for m in imported if m.startswith("omnitalk")}
    assert omnitalk <= {"omnitalk", "omnitalk.audio", "omnitalk.vision", "omnitalk.model.whisper",
                        "omnitalk.model.clip"}, omnitalk
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module == "omnitalk"
             for a in n.names}
    assert names <= {"audio", "vision"}, names
