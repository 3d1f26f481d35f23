"""The embedded demo model (omnitalk/demo_model, docs/demo-model.md): shipped, small, loadable offline, and
what the command line falls back to when a checkpoint folder is empty and nothing can be downloaded."""
from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch

from omnitalk import cli, demo
from omnitalk.errors import CheckpointError

CARD = json.loads((demo.DIR / "card.json").read_text()) if (demo.DIR / "card.json").is_file() else None


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_the_package_carries_the_demo_model_within_its_budget():
    assert demo.available(), f"missing: {demo.DIR}"
    files = [f for f in demo.DIR.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) <= 40e6
    assert {"omnitalk.safetensors", "model_config.yaml", "tokenizer.json", "snac/config.json",
            "snac/model.safetensors", "question.wav", "scene.png", "card.json"} <= \
        {str(f.relative_to(demo.DIR)) for f in files}
    info = sf.info(str(demo.QUESTION))
    assert (info.samplerate, info.channels) == (16000, 1) and 0.5 < info.duration < 5.0


def test_the_demo_codec_is_stored_in_half_and_runs_in_float():
    """make_demo_model stores the codec's weights in float16 (the budget); it loads into float32."""
    from safetensors import safe_open

    from omnitalk.codec import Codec
    with safe_open(str(demo.DIR / "snac" / "model.safetensors"), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes == {"F16"}
    codec = Codec.from_pretrained(demo.DIR / "snac")
    assert {p.dtype for p in codec.model.parameters()} == {torch.float32}
    frames = np.random.default_rng(0).integers(0, 4096, (4, 7))
    wav = codec.decode(frames, noise=False)
    assert wav.shape == (4 * 2048,) and wav.dtype == torch.float32 and torch.isfinite(wav).all()


def test_nothing_here(tmp_path):
    assert demo._nothing_here(str(tmp_path / "absent"))
    assert demo._nothing_here(str(tmp_path))                 # an empty folder
    (tmp_path / "model_config.yaml").write_text("n_layer: 1\n")
    assert not demo._nothing_here(str(tmp_path))             # some files: never replaced by the demo
    assert not demo._nothing_here("gpt-omni/mini-omni2")     # a hub repo id asks for those weights
    assert demo._nothing_here("checkpoint") == (not (demo.Path("checkpoint").exists()
                                                     and any(demo.Path("checkpoint").iterdir())))


def test_chat_with_the_demo_model_answers_in_text_and_speech(capsys, tmp_path):
    out_wav = tmp_path / "answer.wav"
    code, out, err = run(capsys, "chat", "--checkpoint", "demo", "--audio", demo.QUESTION,
                         "--image", demo.SCENE, "--out", out_wav, "--max-tokens", 64)
    assert code == 0, err
    assert out.strip() == CARD["answer_to_bundled_question"]   # greedy: what the builder recorded
    assert "the embedded demo model" in err
    pcm, sr = sf.read(str(out_wav), dtype="int16")
    assert sr == 24000 and len(pcm) >= 2048 and np.abs(pcm).max() > 100


@pytest.mark.parametrize("how", ["no-download", "offline"])
def test_an_empty_checkpoint_falls_back_to_the_demo_model(capsys, tmp_path, monkeypatch, how):
    empty = tmp_path / "checkpoint"
    empty.mkdir()
    args = ["chat", "--checkpoint", empty, "--text", "what is two plus three", "--reply", "text"]
    if how == "offline":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        args.append("--no-download")
    code, out, err = run(capsys, *args)
    assert code == 0, err
    assert f"no released weights in {empty}" in err
    assert ("--no-download" if how == "no-download" else "HF_HUB_OFFLINE") in err
    assert "omnitalk download --checkpoint" in err and "model the embedded demo model" in err
    assert out.strip()


def test_a_failed_download_falls_back_and_says_why(tmp_path, monkeypatch):
    from omnitalk import checkpoint as ckpt_io

    def unreachable(path, **kw):
        raise CheckpointError(f"download into {path} failed (ConnectError: [Errno -2] Name or service not "
                              "known). Still missing: lit_model.pth")
    monkeypatch.setattr(ckpt_io, "download", unreachable)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    said = []
    model, used = demo.load_model(str(tmp_path / "nothing"), say=said.append)
    assert used == demo.demo_description() and model.cfg.extra.get("interrupt_trained")
    assert len(said) == 1 and "the download failed: ConnectError: [Errno -2] Name or service not known" in said[0]


def test_a_partial_checkpoint_is_an_error_not_the_demo(capsys, tmp_path):
    (tmp_path / "model_config.yaml").write_text("n_layer: 1\n")
    code, out, err = run(capsys, "chat", "--checkpoint", tmp_path, "--no-download", "--text", "hi",
                         "--reply", "text")
    assert code == 2
    assert "is incomplete; missing: lit_model.pth" in err and "omnitalk download" in err
    assert "demo model" not in err


def _make_demo_script():
    from pathlib import Path

    from omnitalk.testing import load_script
    return load_script(Path(__file__).resolve().parents[1] / "scripts" / "make_demo_model.py")


def test_make_demo_model_picks_the_stop_detector_that_measured_better(tmp_path):
    from omnitalk.train.world import build_tokenizer
    mk = _make_demo_script()
    plain, commands = tmp_path / "plain.json", tmp_path / "cmd.json"
    build_tokenizer(["the", "red", "circle"], plain)
    build_tokenizer(["the", "red", "circle", "stop", "omni"], commands)
    weak = {"interrupt_f1": 0.59, "false_interruption_rate": 0.25}
    # the ASR cannot write the command: the listening item, however weak
    assert mk.choose_stop_detector({"summary": weak}, plain) == "listening"
    # it can, and only the listening item was measured (and is weak): the ASR
    assert mk.choose_stop_detector({"summary": weak}, commands) == "asr"
    # both measured: the higher F1, then the fewer false interruptions
    both = {**weak, "asr_stop_f1": 0.21, "asr_stop_false_rate": 0.675}
    assert mk.choose_stop_detector({"summary": both}, commands) == "listening"
    both.update(asr_stop_f1=0.97, asr_stop_false_rate=0.01)
    assert mk.choose_stop_detector({"summary": both}, commands) == "asr"
    both.update(asr_stop_f1=0.59, asr_stop_false_rate=0.30)
    assert mk.choose_stop_detector({"summary": both}, commands) == "listening"


def test_make_demo_model_can_store_the_encoders_in_half(tmp_path):
    """--encoder-dtype fp16: whisper.* and clip.* in float16 on disk, the LLM as it was; the engine loads the
    encoders into float32 with the rounded values and the file keeps its metadata."""
    from pathlib import Path

    from safetensors import safe_open

    from omnitalk import checkpoint as ck
    from omnitalk.engine import OmniModel

    fix = Path(__file__).resolve().parent / "fixtures" / "parity" / "checkpoint"
    ck.convert(fix, tmp_path)
    with safe_open(str(tmp_path / ck.OURS), "pt") as f:
        before, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    _make_demo_script().halve_encoders(tmp_path)
    with safe_open(str(tmp_path / ck.OURS), "pt") as f:
        after = {k: f.get_tensor(k) for k in f.keys()}
        assert f.metadata() == meta
    assert set(after) == set(before)
    for k, v in after.items():
        if k.startswith(("whisper.", "clip.")) and before[k].is_floating_point():
            assert v.dtype == torch.float16 and torch.equal(v, before[k].half()), k
        else:
            assert v.dtype == before[k].dtype and torch.equal(v, before[k]), k
    m = OmniModel.from_pretrained(tmp_path, device="cpu", download=False)
    assert {p.dtype for p in m.whisper.parameters()} == {torch.float32}
    w = dict(m.whisper.named_parameters())["conv1.weight"]
    assert torch.equal(w, before["whisper.conv1.weight"].half().float())
    assert {p.dtype for p in m.clip.parameters()} == {torch.float32}
