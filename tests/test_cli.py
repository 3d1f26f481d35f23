"""The `omnitalk` command, run in-process on the tiny random-weight fixture checkpoint."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import soundfile as sf

from omnitalk import cli

ROOT = Path(__file__).resolve().parent.parent
CKPT = Path(__file__).resolve().parent / "fixtures" / "parity" / "checkpoint"
QUESTION = ROOT / "examples" / "question.wav"
SHAPES = ROOT / "examples" / "shapes.png"
TEXT = ["--text", "What is the capital of France?", "--reply", "text"]


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_examples_are_small_and_in_format():
    info = sf.info(str(QUESTION))
    assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
    assert 1.0 < info.duration < 10.0
    assert QUESTION.stat().st_size < 200_000 and SHAPES.stat().st_size < 200_000


def test_chat_audio_image_speech(capsys, tmp_path):
    out_wav = tmp_path / "answer.wav"
    code, out, err = run(capsys, "chat", "--checkpoint", CKPT, "--device", "cpu", "--audio", QUESTION,
                         "--image", SHAPES, "--out", out_wav, "--max-tokens", 24)
    assert code == 0, err
    assert out.strip()  # the random model "says" something
    info = sf.info(str(out_wav))
    assert (info.samplerate, info.channels, info.subtype) == (24000, 1, "PCM_16")
    assert info.frames > 0
    assert str(out_wav) in err and "first audio after" in err and "elapsed" in err


def test_chat_text_reply_and_convert_round_trip(capsys, tmp_path):
    code, original, err = run(capsys, "chat", "--checkpoint", CKPT, *TEXT, "--out", tmp_path / "x.wav")
    assert code == 0, err
    assert original.strip()
    assert not (tmp_path / "x.wav").exists()  # text replies write no audio

    dst = tmp_path / "ours"
    code, out, err = run(capsys, "convert", CKPT, dst)
    assert code == 0, err
    assert (dst / "omnitalk.safetensors").is_file()
    assert "verified: all" in out and "tensors equal the source's" in out

    code, converted, err = run(capsys, "chat", "--checkpoint", dst, "--no-download", *TEXT)
    assert code == 0, err
    assert converted == original


def test_transcribe(capsys):
    code, out, err = run(capsys, "transcribe", QUESTION, "--checkpoint", CKPT, "--device", "cpu")
    assert code == 0, err
    assert out.strip()


def test_info(capsys):
    code, out, err = run(capsys, "info", "--checkpoint", CKPT)
    assert code == 0, err
    for word in ("omnitalk", "torch", "snac", "tokenizers", "numpy", "threads", "cuda", "mps", "hf cache",
                 "offline", "present  lit_model.pth", "demo model  the embedded demo model ("):
        assert word in out
    assert "MISSING" not in out


def test_missing_checkpoint_offline(capsys, tmp_path, monkeypatch):
    """No weights and no way to fetch them: the embedded demo model answers and the user is told why
    and how to get the released weights (tests/test_demo.py has the rest of the fallback's rules)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, out, err = run(capsys, "chat", "--checkpoint", tmp_path / "nowhere", *TEXT)
    assert code == 0, err
    assert "Traceback" not in err and out.strip()
    assert f"no released weights in {tmp_path / 'nowhere'} (HF_HUB_OFFLINE is set)" in err
    assert f"omnitalk download --checkpoint {tmp_path / 'nowhere'}" in err


def test_failed_download_lists_missing_files(capsys, tmp_path, monkeypatch):
    import huggingface_hub

    def no_network(*args, **kwargs):  # what the hub client raises with no route to the hub
        raise ConnectionError("ConnectError: no route to huggingface.co")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.HfApi, "get_paths_info", no_network)
    code, _, err = run(capsys, "chat", "--checkpoint", tmp_path / "new", *TEXT)
    assert code == 0, err                   # the demo model stood in, saying why
    assert not (tmp_path / "new").exists()  # a failed download leaves no empty checkpoint folder behind
    assert "the download failed: ConnectionError: ConnectError: no route to huggingface.co" in err
    assert "omnitalk download" in err and "the embedded demo model" in err

    (tmp_path / "partial").mkdir()          # a folder with files: the download error itself, no demo
    (tmp_path / "partial" / "model_config.yaml").write_text("n_layer: 1\n")
    code, _, err = run(capsys, "chat", "--checkpoint", tmp_path / "partial", *TEXT)
    assert code == 2 and "demo" not in err
    assert "ConnectError" in err and "lit_model.pth" in err and "omnitalk download" in err


def test_missing_audio(capsys, tmp_path):
    missing = tmp_path / "nope.wav"
    code, _, err = run(capsys, "chat", "--checkpoint", CKPT, "--audio", missing)
    assert code == 2
    assert err.startswith("omnitalk: error: ") and str(missing) in err
    code, _, err = run(capsys, "transcribe", missing, "--checkpoint", CKPT)
    assert code == 2 and str(missing) in err


def test_corrupt_image(capsys, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not a picture")
    code, _, err = run(capsys, "chat", "--checkpoint", CKPT, "--device", "cpu", "--image", bad, *TEXT)
    assert code == 2
    assert err.startswith("omnitalk: error: ") and "bad.png" in err and "Traceback" not in err


def test_unknown_device(capsys):
    code, _, err = run(capsys, "chat", "--checkpoint", CKPT, "--device", "tpu9", *TEXT)
    assert code == 2
    assert err.startswith("omnitalk: error: ") and "tpu9" in err


def test_usage_errors_and_interrupt(capsys, monkeypatch):
    assert run(capsys, "chat", "--reply", "song")[0] == 2  # argparse
    code, _, err = run(capsys, "chat", "--checkpoint", CKPT)  # no input at all
    assert code == 2 and "nothing to answer" in err

    from omnitalk.engine import OmniModel

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(OmniModel, "from_pretrained", interrupted)
    code, out, err = run(capsys, "chat", "--checkpoint", CKPT, *TEXT)
    assert code == 130 and err == ""


def test_console_script_version():
    exe = Path(sys.executable).parent / "omnitalk"  # this environment's script, not another on PATH
    exe = str(exe) if exe.is_file() else shutil.which("omnitalk")
    assert exe, "the omnitalk console script is not installed (pip install -e .)"
    res = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0
    assert res.stdout.startswith("omnitalk ")


def test_whisper_window_option(capsys):
    """--whisper-window sets how the loaded model runs Whisper (default: the encoder's own, exact for the
    release); an unknown window is refused by the parser."""
    import argparse

    args = dict(checkpoint=CKPT, device="cpu", mode="fp32", no_download=True)
    assert cli._load_model(argparse.Namespace(**args, whisper_window=None)).whisper_window == "exact"
    assert cli._load_model(argparse.Namespace(**args, whisper_window="trimmed")).whisper_window == "trimmed"
    code, out, err = run(capsys, "transcribe", "--checkpoint", CKPT, "--device", "cpu",
                         "--whisper-window", "trimmed", QUESTION)
    assert code == 0, err
    code, out, err = run(capsys, "chat", "--whisper-window", "half", *TEXT)
    assert code == 2 and "invalid choice: 'half'" in err


def test_audio_grammar_keeps_the_speech_of_a_model_that_breaks_the_delay_pattern(capsys, tmp_path, monkeypatch):
    """A model whose layer 3 prefers `_pad_a` everywhere: by default layer 3 speaks its best SNAC code from
    step 4 on and the answer has speech; with --no-audio-grammar (the release's loop) the first frame holds
    the pad, so there is no speech to write (the release would index past the SNAC codebook there)."""
    load = cli._load_model

    def breaks_layer3(args):
        model = load(args)
        lm, pad = model.lm, model.layout.pad_a
        audio_logits = lm.audio_logits

        def logits(h):  # (7, Va) with layer 3's `_pad_a` far ahead
            out = audio_logits(h).clone()
            out[3, pad] += 1e4
            return out
        lm.audio_logits = logits
        return model

    monkeypatch.setattr(cli, "_load_model", breaks_layer3)
    argv = ["chat", "--checkpoint", CKPT, "--device", "cpu", "--text", "Hi", "--max-tokens", 24]
    code, out, err = run(capsys, *argv, "--out", tmp_path / "a.wav")
    assert code == 0, err
    assert sf.info(str(tmp_path / "a.wav")).frames > 0 and "audio" in err
    code, out, err = run(capsys, *argv, "--out", tmp_path / "b.wav", "--no-audio-grammar")
    assert code == 0 and "no audio produced" in err
    assert not (tmp_path / "b.wav").exists()
