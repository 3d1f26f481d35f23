import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from omnitalk.errors import CheckpointError
from omnitalk.model.clip import VisionDims, VisionTransformer, clip_vit_b32_dims, load_clip_vision

PARITY = Path(__file__).resolve().parents[1] / "fixtures" / "parity"
ARCHIVE = PARITY / "checkpoint" / "ViT-B-32.pt"


def _features(model):
    x = torch.from_numpy(np.load(PARITY / "expected" / "clip_input.npy"))[None]
    with torch.no_grad():
        return model(x)


def _rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def archive_sd():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.load is deprecated in torch 2.x
        return torch.jit.load(str(ARCHIVE), map_location="cpu").state_dict()


def test_archive_features_match_fixture():
    model = load_clip_vision(ARCHIVE)
    assert model.dims == VisionDims(224, 32, 128, 2, 2, 24)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    y = _features(model)
    expected = np.load(PARITY / "expected" / "clip_features.npy")
    assert y.shape == (1, 50, 24)
    assert _rel(y[0].numpy(), expected) < 1e-4


def test_plain_state_dict_loads_identically(tmp_path, archive_sd):
    ref = _features(load_clip_vision(ARCHIVE))
    full = tmp_path / "clip_full.pt"
    torch.save(dict(archive_sd), full)
    assert torch.equal(_features(load_clip_vision(full)), ref)
    stripped = tmp_path / "clip_visual.pt"
    torch.save({k[7:]: v for k, v in archive_sd.items() if k.startswith("visual.")}, stripped)
    assert torch.equal(_features(load_clip_vision(stripped)), ref)


def test_batch_and_half_precision():
    model = load_clip_vision(ARCHIVE)
    x = torch.from_numpy(np.load(PARITY / "expected" / "clip_input.npy"))
    with torch.no_grad():
        y1 = model(x[None])
        y2 = model(torch.stack([x, x.flip(-1)]))
    torch.testing.assert_close(y2[:1], y1, rtol=1e-5, atol=1e-5)
    half = load_clip_vision(ARCHIVE, dtype=torch.bfloat16)
    assert half.conv1.weight.dtype == torch.bfloat16 and half.ln_post.weight.dtype == torch.float32
    with torch.no_grad():
        yh = half(x[None])
    assert yh.dtype == torch.bfloat16 and _rel(yh.float().numpy(), y1.numpy()) < 0.1


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_clip_vision(tmp_path / "ViT-B-32.pt")
    with pytest.raises(CheckpointError, match="not a file"):
        load_clip_vision(tmp_path)


def test_truncated_and_garbage_files(tmp_path):
    data = ARCHIVE.read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_clip_vision(cut)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"hello" * 100)
    with pytest.raises(CheckpointError, match="junk.pt"):
        load_clip_vision(junk)


def test_no_visual_keys(tmp_path, archive_sd):
    p = tmp_path / "text_only.pt"
    torch.save({k: v for k, v in archive_sd.items() if not k.startswith("visual.")}, p)
    with pytest.raises(CheckpointError, match="visual"):
        load_clip_vision(p)
    p2 = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), p2)
    with pytest.raises(CheckpointError, match="state dict"):
        load_clip_vision(p2)


def test_wrong_shape_names_key_and_shapes(tmp_path, archive_sd):
    sd = dict(archive_sd)
    key = "visual.transformer.resblocks.1.mlp.c_fc.weight"
    sd[key] = torch.zeros(256, 128, dtype=torch.float16)
    p = tmp_path / "bad.pt"
    torch.save(sd, p)
    with pytest.raises(CheckpointError) as e:
        load_clip_vision(p)
    msg = str(e.value)
    assert key in msg and "(256, 128)" in msg and "(512, 128)" in msg


def test_missing_key(tmp_path, archive_sd):
    sd = dict(archive_sd)
    del sd["visual.ln_post.bias"]
    p = tmp_path / "missing.pt"
    torch.save(sd, p)
    with pytest.raises(CheckpointError, match="visual.ln_post.bias"):
        load_clip_vision(p)


def test_full_size_keys_match_manifest():
    manifest = json.loads((PARITY / "manifests" / "clip_vit_b_32.json").read_text())
    expected = [(t["name"][7:], tuple(t["shape"])) for t in manifest["tensors"] if t["name"].startswith("visual.")]
    dims = clip_vit_b32_dims()
    assert dims == VisionDims(224, 32, 768, 12, 12, 512) and dims.num_tokens == 50
    with torch.device("meta"):
        model = VisionTransformer(dims)
    got = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert got == expected
    with torch.device("meta"):
        assert model(torch.empty(2, 3, 224, 224)).shape == (2, 50, 512)


def test_legacy_torch_save_format(tmp_path, archive_sd):
    p = tmp_path / "legacy.pt"
    torch.save(dict(archive_sd), p, _use_new_zipfile_serialization=False)
    torch.testing.assert_close(_features(load_clip_vision(p)), _features(load_clip_vision(ARCHIVE)), rtol=0, atol=0)
