"""Checkpoint loading: official layout, our safetensors layout, and every way a file can be wrong."""
import shutil
from pathlib import Path

import pytest
import torch

from omnitalk import checkpoint as ck
from omnitalk.config import Config
from omnitalk.engine import OmniModel
from omnitalk.errors import CheckpointError

FIX = Path(__file__).resolve().parent / "fixtures" / "parity"
CKPT = FIX / "checkpoint"


@pytest.fixture
def copy(tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(CKPT, dst)
    for p in dst.rglob("*"):
        p.chmod(0o644 if p.is_file() else 0o755)
    return dst


def test_tied_head_uses_wte_and_reports_the_difference():
    cfg = Config.from_file(CKPT / "model_config.yaml")
    lm = ck.load_llm(CKPT, cfg)
    sd = torch.load(CKPT / "lit_model.pth", weights_only=True)
    assert torch.equal(lm.lm_head.weight, sd["transformer.wte.weight"])
    assert lm.tied_head_equal is False  # the fixture stores a different lm_head.weight on purpose


def test_missing_files_are_listed_with_the_fix(copy, monkeypatch):
    (copy / "small.pt").unlink()
    (copy / "tokenizer.json").unlink()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError) as e:
        OmniModel.from_pretrained(copy)
    msg = str(e.value)
    assert "small.pt" in msg and "tokenizer.json" in msg and "omnitalk download --checkpoint" in msg


def test_nonexistent_directory_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="lit_model.pth.*omnitalk download"):
        OmniModel.from_pretrained(tmp_path / "nowhere")


def test_truncated_and_garbage_weights(copy):
    data = (copy / "lit_model.pth").read_bytes()
    (copy / "lit_model.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        OmniModel.from_pretrained(copy, download=False)
    (copy / "lit_model.pth").write_bytes(b"\x00" * 1000)
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        OmniModel.from_pretrained(copy, download=False)


def test_state_dict_of_another_model(copy):
    shutil.copyfile(copy / "small.pt", copy / "lit_model.pth")
    with pytest.raises(CheckpointError, match="does not look like a Mini-Omni2"):
        OmniModel.from_pretrained(copy, download=False)


def test_wrong_shape_names_key_and_shapes(copy):
    sd = torch.load(copy / "lit_model.pth", weights_only=True)
    sd["transformer.h.1.mlp.fc_1.weight"] = torch.zeros(65, 32)
    torch.save(sd, copy / "lit_model.pth")
    with pytest.raises(CheckpointError, match=r"'transformer.h.1.mlp.fc_1.weight' has shape \(65, 32\), "
                                              r"expected \(64, 32\)"):
        OmniModel.from_pretrained(copy, download=False)


def test_config_of_another_size(copy):
    text = (copy / "model_config.yaml").read_text().replace("n_layer: 2", "n_layer: 3")
    (copy / "model_config.yaml").write_text(text)
    with pytest.raises(CheckpointError, match="transformer.h.2"):
        OmniModel.from_pretrained(copy, download=False)


def test_corrupt_tokenizer_and_snac(copy):
    (copy / "tokenizer.json").write_text("{")
    with pytest.raises(CheckpointError, match="tokenizer"):
        OmniModel.from_pretrained(copy, download=False)


def test_convert_round_trip(copy, tmp_path):
    out = tmp_path / "ours"
    ck.convert(copy, out)
    assert ck.missing_files(out) == []
    a = OmniModel.from_pretrained(copy, download=False)
    b = OmniModel.from_pretrained(out, download=False)
    for x, y in [(a.lm, b.lm), (a.whisper, b.whisper), (a.clip, b.clip)]:
        sx, sy = x.state_dict(), y.state_dict()
        assert sx.keys() == sy.keys() and all(torch.equal(sx[k], sy[k]) for k in sx)
    ra = a.generate(audio=FIX / "inputs" / "question.wav", image=FIX / "inputs" / "image.png", max_tokens=20,
                    decode_audio=False)
    rb = b.generate(audio=FIX / "inputs" / "question.wav", image=FIX / "inputs" / "image.png", max_tokens=20,
                    decode_audio=False)
    assert (ra.tokens == rb.tokens).all()


def test_corrupt_safetensors(copy, tmp_path):
    out = tmp_path / "ours"
    ck.convert(copy, out)
    data = (out / ck.OURS).read_bytes()
    (out / ck.OURS).write_bytes(data[:1000])
    with pytest.raises(CheckpointError, match="omnitalk convert"):
        OmniModel.from_pretrained(out, download=False)


def test_clip_from_transformers_layout_is_the_same_model():
    """The download path maps the hub's transformers CLIP weights onto OpenAI's names exactly."""
    from omnitalk.engine import _clip_from_state_dict
    from omnitalk.model.clip import load_clip_vision

    ours = load_clip_vision(CKPT / "ViT-B-32.pt").state_dict()
    hf = {"vision_model.embeddings.patch_embedding.weight": ours["conv1.weight"],
          "vision_model.embeddings.class_embedding": ours["class_embedding"],
          "vision_model.embeddings.position_embedding.weight": ours["positional_embedding"],
          "vision_model.pre_layrnorm.weight": ours["ln_pre.weight"], "vision_model.pre_layrnorm.bias": ours["ln_pre.bias"],
          "vision_model.post_layernorm.weight": ours["ln_post.weight"],
          "vision_model.post_layernorm.bias": ours["ln_post.bias"], "visual_projection.weight": ours["proj"].t()}
    for i in range(2):
        s, d = f"vision_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            for n, part in zip("qkv", ours[d + f"attn.in_proj_{kind}"].chunk(3)):
                hf[s + f"self_attn.{n}_proj.{kind}"] = part
            hf[s + f"self_attn.out_proj.{kind}"] = ours[d + f"attn.out_proj.{kind}"]
            for a, b in (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
                hf[s + f"{a}.{kind}"] = ours[d + f"{b}.{kind}"]
    back = {k.removeprefix("visual."): v for k, v in ck.clip_from_hf(hf).items()}
    assert back.keys() == ours.keys() and all(torch.equal(back[k], ours[k]) for k in ours)
    model = _clip_from_state_dict(back, "cpu")
    x = torch.randn(1, 3, 224, 224)
    assert torch.allclose(model(x), load_clip_vision(CKPT / "ViT-B-32.pt")(x))


def test_ctc_compressed_checkpoint_runs_and_converts(copy, tmp_path):
    """A checkpoint whose model_config.yaml says audio_compress: ctc and whose small.pt carries a CTC head
    (as the small recipe's stage 0 writes it): the speech prompt has one position per run of equal CTC
    labels, and the safetensors conversion keeps the head (verified tensor for tensor, same tokens)."""
    import yaml

    from omnitalk import audio as audio_io
    from omnitalk.model.whisper import ctc_compress, features, load_whisper_encoder
    from omnitalk.train.stage0 import CTCHead, save_audio_encoder

    wav = FIX / "inputs" / "question.wav"
    enc = load_whisper_encoder(copy / "small.pt")
    torch.manual_seed(0)
    head = CTCHead(enc.dims.n_audio_state, 3)
    with torch.no_grad():
        head.proj.weight.mul_(40)          # a random head with runs of a few frames, as a trained one has
    save_audio_encoder(copy / "small.pt", enc, head)
    cfg = yaml.safe_load((copy / "model_config.yaml").read_text())
    (copy / "model_config.yaml").write_text(yaml.safe_dump({**cfg, "audio_compress": "ctc"}))

    m = OmniModel.from_pretrained(copy, download=False)
    x = features(m.whisper, audio_io.load_audio(wav), m.whisper_window)       # (L, d) frames
    merged = ctc_compress(x, head(x).argmax(-1))
    assert 1 < merged.shape[0] < x.shape[0]
    torch.testing.assert_close(m.audio_features(wav), m.lm.whisper_adapter(merged))
    plain = OmniModel.from_pretrained(CKPT, download=False)
    plain.whisper_window = m.whisper_window                                   # "trimmed", from small.pt
    assert plain.request(audio=wav).prompts[0].length - m.request(audio=wav).prompts[0].length \
        == x.shape[0] - merged.shape[0]

    out = tmp_path / "ours"
    ck.convert(copy, out)
    assert ck.verify_conversion(copy, out) > 0
    b = OmniModel.from_pretrained(out, download=False)
    torch.testing.assert_close(b.whisper.ctc_head.weight, m.whisper.ctc_head.weight, rtol=0, atol=0)
    ra = m.generate(audio=wav, max_tokens=12, decode_audio=False)
    rb = b.generate(audio=wav, max_tokens=12, decode_audio=False)
    assert (ra.tokens == rb.tokens).all()
