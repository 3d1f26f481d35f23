"""The official shapes (541 M-parameter LLM, Whisper small, CLIP ViT-B/32, SNAC 24 kHz) with random
weights run every task on the CPU, in fp32 and int8."""
from pathlib import Path

import numpy as np
import pytest

from omnitalk.engine import OmniModel

FIX = Path(__file__).resolve().parent / "fixtures" / "parity" / "inputs"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model():
    return OmniModel.from_random("mini-omni2", seed=0)


def test_shapes_are_official(model):
    assert sum(p.numel() for p in model.lm.parameters()) == 541_349_760
    assert model.whisper.dims.n_audio_state == 768 and model.clip.dims.width == 768
    # SNAC 24 kHz holds 19,842,914 parameters (each weight-normalised conv as g and v); the engine's
    # codec stores each such weight once, baked (omnitalk.codec.bake_weight_norm)
    import json

    from snac import SNAC
    official = SNAC(**json.loads((Path(__file__).parent / "fixtures/parity/manifests/snac_24khz/config.json")
                                 .read_text()))
    assert sum(p.numel() for p in official.parameters()) == 19_842_914
    g = sum(p.numel() for n, p in official.named_parameters() if n.endswith("original0"))
    assert sum(p.numel() for p in model.codec.model.parameters()) == 19_842_914 - g


@pytest.mark.parametrize("inputs", [
    dict(text="hello", reply="text"), dict(text="hello"), dict(audio=FIX / "question.wav", reply="text"),
    dict(audio=FIX / "question.wav", task="asr"), dict(audio=FIX / "question.wav"),
    dict(audio=FIX / "question.wav", strategy="single"), dict(audio=FIX / "question.wav", image=FIX / "image.png"),
    dict(image=FIX / "image.png", text="what is this?", reply="text"), dict(image=FIX / "image.png"),
    dict(image=FIX / "image.png", audio=FIX / "question.wav", text="and the colour?"),
], ids=["T1T2", "T1A2", "A1T2", "ASR", "A1A2-pair", "A1A2", "ImageQA", "ImageQA_T", "ImageCAP", "image+speech+text"])
def test_every_task(model, inputs):
    reply = model.generate(max_tokens=12, **inputs)
    speaks = inputs.get("reply", "speech") == "speech" and inputs.get("task") != "asr"
    assert reply.tokens.shape[0] == (8 if speaks else 1) and 1 <= reply.tokens.shape[1] <= 12
    if speaks:
        assert reply.waveform.shape == (len(reply.frames) * 2048,) and np.isfinite(reply.waveform).all()


def test_int8_agrees_with_fp32_on_prefill(model):
    req = model.request(audio=FIX / "question.wav", image=FIX / "image.png")
    t32, _ = model.prefill_logits(req)
    q = OmniModel.from_random("mini-omni2", seed=0, mode="int8")  # same seed: the same weights, quantised
    t8, _ = q.prefill_logits(q.request(audio=FIX / "question.wav", image=FIX / "image.png"))
    rel = ((t8 - t32).abs().max() / t32.abs().max()).item()
    assert rel < 0.05, rel
    chunks = list(q.stream(audio=FIX / "question.wav", max_tokens=16, snac_noise=False))
    whole = q.generate(audio=FIX / "question.wav", max_tokens=16, snac_noise=False)
    assert sum(len(c.audio) for c in chunks) == len(whole.frames) * 2048
