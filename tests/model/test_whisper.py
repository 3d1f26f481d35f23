"""Whisper audio encoder: parity with the fixture, loader errors, full-size key/shape layout."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from omnitalk.errors import CheckpointError, InputError
from omnitalk.model.whisper import AudioEncoder, WhisperDims, encode, load_whisper_encoder, whisper_dims_small

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "parity"
CKPT = FIX / "checkpoint" / "small.pt"


@pytest.fixture(scope="module")
def encoder():
    return load_whisper_encoder(CKPT)


def _rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_features_match_fixture(encoder):
    mel = np.load(FIX / "expected" / "mel.npy")
    expected = np.load(FIX / "expected" / "whisper_features.npy")
    out = encode(encoder, mel)
    assert out.shape == (1, 1500, 32) and out.dtype == torch.float32
    assert _rel(out[0].numpy(), expected) < 1e-4


def test_end_to_end_from_wav(encoder):
    from omnitalk.audio import load_audio, log_mel_spectrogram

    out = encode(encoder, log_mel_spectrogram(load_audio(FIX / "inputs" / "question.wav")))
    assert _rel(out[0].numpy(), np.load(FIX / "expected" / "whisper_features.npy")) < 1e-4


def test_loader_uses_stored_positions_and_fp32(encoder):
    sd = torch.load(CKPT, map_location="cpu", weights_only=True)["model_state_dict"]
    stored = sd["encoder.positional_embedding"]
    assert stored.dtype == torch.float16
    torch.testing.assert_close(encoder.positional_embedding, stored.float(), rtol=0, atol=0)
    assert all(p.dtype == torch.float32 for p in encoder.state_dict().values())
    assert encoder.dims == WhisperDims(80, 1500, 32, 2, 2)
    assert not encoder.training


def test_batch_and_bad_mel_shape(encoder):
    mel = torch.from_numpy(np.load(FIX / "expected" / "mel.npy"))
    out = encode(encoder, torch.stack([mel, mel.flip(-1)]))
    torch.testing.assert_close(out[0], encode(encoder, mel)[0])
    for bad in (mel[:, :1001], mel[:40], torch.cat([mel, mel], -1)):  # odd, too few mels, over 30 s
        with pytest.raises(InputError, match=r"\(B, 80, 3000\)"):
            encode(encoder, bad)
    assert encode(encoder, mel[:, :1000]).shape[1] == 500  # a trimmed window: 2 mel frames per feature


def test_bfloat16_load():
    enc = load_whisper_encoder(CKPT, dtype=torch.bfloat16)
    assert enc.conv1.weight.dtype == torch.bfloat16
    out = encode(enc, np.load(FIX / "expected" / "mel.npy"))
    assert out.dtype == torch.bfloat16
    assert _rel(out[0].float().numpy(), np.load(FIX / "expected" / "whisper_features.npy")) < 0.1


def test_full_size_layout_matches_manifest():
    manifest = json.loads((FIX / "manifests" / "whisper_small.json").read_text())
    assert WhisperDims.from_dict(manifest["dims"]) == whisper_dims_small()
    expected = [(t["name"][len("encoder."):], tuple(t["shape"]))
                for t in manifest["tensors"] if t["name"].startswith("encoder.")]
    with torch.device("meta"):
        enc = AudioEncoder(whisper_dims_small())
    assert [(k, tuple(v.shape)) for k, v in enc.state_dict().items()] == expected


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_whisper_encoder(tmp_path / "small.pt")


def test_not_a_checkpoint(tmp_path):
    p = tmp_path / "small.pt"
    p.write_text("hello")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_whisper_encoder(p)


def test_wrong_shape_names_key_and_shapes(tmp_path):
    ckpt = torch.load(CKPT, map_location="cpu", weights_only=True)
    ckpt["model_state_dict"]["encoder.blocks.1.mlp.0.weight"] = torch.zeros(100, 32, dtype=torch.float16)
    p = tmp_path / "bad.pt"
    torch.save(ckpt, p)
    with pytest.raises(CheckpointError) as e:
        load_whisper_encoder(p)
    msg = str(e.value)
    assert "encoder.blocks.1.mlp.0.weight" in msg and "(100, 32)" in msg and "(128, 32)" in msg


def test_missing_dims_and_keys():
    ckpt = torch.load(CKPT, map_location="cpu", weights_only=True)
    with pytest.raises(CheckpointError, match="'dims'"):
        load_whisper_encoder({"model_state_dict": ckpt["model_state_dict"]})
    with pytest.raises(CheckpointError, match="not an OpenAI whisper checkpoint"):
        load_whisper_encoder(ckpt["model_state_dict"])  # a bare state dict
    with pytest.raises(CheckpointError, match="n_audio_head"):
        load_whisper_encoder({"dims": {"n_mels": 80}, "model_state_dict": ckpt["model_state_dict"]})
    sd = {k: v for k, v in ckpt["model_state_dict"].items() if k != "encoder.ln_post.bias"}
    with pytest.raises(CheckpointError, match="encoder.ln_post.bias"):
        load_whisper_encoder({"dims": ckpt["dims"], "model_state_dict": sd})
    dec = {k: v for k, v in ckpt["model_state_dict"].items() if not k.startswith("encoder.")}
    with pytest.raises(CheckpointError, match="no 'encoder"):
        load_whisper_encoder({"dims": ckpt["dims"], "model_state_dict": dec})


def test_window_read_from_checkpoint_and_used_by_features(tmp_path, encoder):
    """A checkpoint's "window" says how its encoder runs: the release's exact 30-s window by default,
    "trimmed" (only the frames the speech covers) for encoders trained that way (the small recipe)."""
    from omnitalk.audio import load_audio, log_mel_spectrogram
    from omnitalk.model.whisper import features, trimmed_mel

    assert encoder.window == "exact"
    x = load_audio(FIX / "inputs" / "question.wav")
    L = int(len(x) / 16000 * 1000 / 20) + 1
    exact = features(encoder, x)
    assert exact.shape == (L, 32)
    torch.testing.assert_close(exact, encode(encoder, log_mel_spectrogram(x))[0, :L])

    ckpt = dict(torch.load(CKPT, map_location="cpu", weights_only=True))
    ckpt["window"] = "trimmed"
    torch.save(ckpt, tmp_path / "small.pt")
    trimmed_enc = load_whisper_encoder(tmp_path / "small.pt")
    assert trimmed_enc.window == "trimmed"
    mel = trimmed_mel(x)
    assert mel.shape == (80, 2 * L)
    trimmed = features(trimmed_enc, x)
    torch.testing.assert_close(trimmed, encode(encoder, mel)[0])
    assert not torch.allclose(trimmed, exact)  # a different window really is a different computation
    torch.testing.assert_close(features(trimmed_enc, x, window="exact"), exact)

    ckpt["window"] = "sliding"
    torch.save(ckpt, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="unknown 'window' 'sliding'"):
        load_whisper_encoder(tmp_path / "bad.pt")
    with pytest.raises(InputError, match="unknown whisper window"):
        features(encoder, x, window="half")


def test_pool_frames_averages_runs_of_k():
    from omnitalk.model.whisper import pool_frames

    x = torch.arange(14, dtype=torch.float32).view(7, 2)   # 7 frames of width 2
    assert pool_frames(x, 1) is x
    y = pool_frames(x, 3)                                   # runs [0..2], [3..5], [6]
    assert y.shape == (3, 2)
    assert torch.equal(y, torch.stack([x[0:3].mean(0), x[3:6].mean(0), x[6:7].mean(0)]))
    assert torch.equal(pool_frames(x, 7), x.mean(0, keepdim=True))
    assert pool_frames(x, 10).shape == (1, 2)


def test_ctc_compress_merges_runs_of_equal_labels():
    from omnitalk.model.whisper import ctc_compress

    x = torch.arange(16, dtype=torch.float32).view(8, 2)    # 8 frames of width 2
    labels = torch.tensor([5, 5, 0, 0, 0, 5, 2, 2])          # runs [0,1] [2..4] [5] [6,7]
    y = ctc_compress(x, labels)
    assert torch.equal(y, torch.stack([x[0:2].mean(0), x[2:5].mean(0), x[5], x[6:8].mean(0)]))
    assert torch.equal(ctc_compress(x, torch.zeros(8, dtype=torch.long)), x.mean(0, keepdim=True))
    assert torch.equal(ctc_compress(x, torch.arange(8)), x)          # every frame its own run
    with pytest.raises(ValueError, match="labels of shape \\(7,\\) for 8 frames"):
        ctc_compress(x, labels[:7])


def _encoder_with_head(tmp_path, n_words=5):
    from omnitalk.train.stage0 import CTCHead, save_audio_encoder

    torch.manual_seed(0)
    enc = AudioEncoder(WhisperDims(80, 1500, 16, 2, 1))
    head = CTCHead(16, n_words)
    save_audio_encoder(tmp_path / "small.pt", enc, head)
    return enc, head


def test_ctc_head_travels_in_small_pt_and_drives_speech_positions(tmp_path):
    from omnitalk.model.whisper import ctc_compress, speech_positions

    enc, head = _encoder_with_head(tmp_path)
    loaded = load_whisper_encoder(tmp_path / "small.pt")
    assert loaded.window == "trimmed"
    torch.testing.assert_close(loaded.ctc_head.weight, head.proj.weight, rtol=0, atol=0)
    torch.testing.assert_close(loaded.ctc_head.bias, head.proj.bias, rtol=0, atol=0)
    ckpt = torch.load(tmp_path / "small.pt", weights_only=True)
    assert sorted(ckpt) == ["ctc_head", "dims", "model_state_dict", "window"]   # OpenAI's keys + ours
    assert not any("ctc" in k for k in ckpt["model_state_dict"])                 # OpenAI's loader stays strict-clean

    feats = torch.randn(40, 16)
    labels = head(feats).argmax(-1)
    out = speech_positions(feats, loaded, compress="ctc")
    assert torch.equal(out, ctc_compress(feats, labels))
    assert out.shape[0] == 1 + int((labels[1:] != labels[:-1]).sum())
    assert speech_positions(feats, loaded) is feats                               # 'none': the release
    with pytest.raises(CheckpointError, match="no 'ctc_head'.*audio_compress: none"):
        speech_positions(feats, load_whisper_encoder(CKPT), compress="ctc")
    with pytest.raises(ValueError, match="unknown audio_compress 'mean'"):
        speech_positions(feats, loaded, compress="mean")


def test_broken_ctc_head_is_named(tmp_path):
    _encoder_with_head(tmp_path)
    ckpt = torch.load(tmp_path / "small.pt", weights_only=True)
    ckpt["ctc_head"]["weight"] = torch.zeros(6, 15)          # width 15 for a 16-wide encoder
    torch.save(ckpt, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="'ctc_head' must hold 'weight' \\(classes, 16\\)"):
        load_whisper_encoder(tmp_path / "bad.pt")
