"""The public engine API on the parity fixture's tiny checkpoint: tasks, streaming, bad inputs."""
import io
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from omnitalk.codec import to_pcm16
from omnitalk.engine import OmniModel, resolve_device
from omnitalk.errors import InputError
from omnitalk.generate import Sampling
from omnitalk.tokenizer import StreamingText, TextTokenizer

FIX = Path(__file__).resolve().parent / "fixtures" / "parity"
WAV, IMG = FIX / "inputs" / "question.wav", FIX / "inputs" / "image.png"


@pytest.fixture(scope="module")
def model():
    return OmniModel.from_pretrained(FIX / "checkpoint", device="cpu", download=False)


def test_every_task_runs(model):
    cases = [dict(text="hello", reply="text"), dict(text="hello"), dict(audio=WAV, reply="text"),
             dict(audio=WAV, task="asr"), dict(audio=WAV), dict(audio=WAV, strategy="single"),
             dict(image=IMG, audio=WAV), dict(image=IMG, text="what is this?", reply="text"),
             dict(image=IMG), dict(image=IMG, audio=WAV, text="and the colour?"), dict(audio=WAV, text="hi")]
    for inputs in cases:
        reply = model.generate(max_tokens=24, **inputs)
        speaks = inputs.get("reply", "speech") == "speech" and inputs.get("task") != "asr"
        assert reply.tokens.shape[0] == (8 if speaks else 1), inputs
        if speaks:
            assert reply.frames.shape[1] == 7 and (reply.frames < 4096).all()
            assert reply.waveform.shape == (len(reply.frames) * 2048,)


def test_default_sampling_records_the_release_tokens(model):
    """The fixture's speech tasks keep the delay pattern, so the audio grammar (on by default) changes no
    token: the default loop records exactly the official implementation's tokens."""
    from omnitalk.testing.parity import TASKS

    prompt = (FIX / "inputs" / "prompt.txt").read_text().strip()
    for name in ("T1A2", "A1A2", "AA_AT_batch", "ImageQA_batch"):
        how = TASKS[name]
        req = model.request(audio=WAV if how.get("audio") else None, image=IMG if how.get("image") else None,
                            text=prompt if how.get("text") else None, reply="speech", strategy=how["strategy"])
        steps = list(model.steps(req, 48))
        tokens = np.array([[s.audio[j] for s in steps] for j in range(7)] + [[s.text for s in steps]])
        np.testing.assert_array_equal(tokens, np.load(FIX / "expected" / name / "tokens.npy"), err_msg=name)


def test_batch_text_equals_text_only_answer(model):
    """The pair's text comes from the text-only branch: same words as the A1T2 task."""
    pair = model.generate(audio=WAV, max_tokens=48)
    alone = model.generate(audio=WAV, reply="text", max_tokens=48)
    assert pair.text == alone.text and pair.text


def test_context_stream_equals_one_pass_decode(model):
    chunks = list(model.stream(audio=WAV, image=IMG, max_tokens=40, snac_noise=False))
    audio = np.concatenate([c.audio for c in chunks])
    reply = model.generate(audio=WAV, image=IMG, max_tokens=40, snac_noise=False)
    assert len(audio) == len(reply.frames) * 2048  # the partial last chunk is flushed, not dropped
    assert np.abs(audio.astype(int) - to_pcm16(reply.waveform).astype(int)).max() <= 1
    assert "".join(c.text for c in chunks) == reply.text or "".join(c.text for c in chunks).strip() == reply.text


def test_reference_stream_drops_the_tail(model):
    ref = list(model.stream(audio=WAV, max_tokens=48, stream_mode="reference", snac_seed=1234))
    ctx = list(model.stream(audio=WAV, max_tokens=48, snac_seed=1234))
    n_ref = sum(len(c.audio) for c in ref)
    n_ctx = sum(len(c.audio) for c in ctx)
    assert n_ref == 10 * 8192 and n_ctx == 41 * 2048  # 41 frames: 10 full chunks + 1 dropped frame


def test_seeded_sampling_is_reproducible(model):
    s = Sampling(temperature=1.0, top_k=50, seed=3)
    a = model.generate(audio=WAV, reply="text", max_tokens=20, sampling=s)
    b = model.generate(audio=WAV, reply="text", max_tokens=20, sampling=s)
    assert np.array_equal(a.tokens, b.tokens)


def test_text_deltas_never_split_utf8():
    tok = TextTokenizer(FIX / "checkpoint" / "tokenizer.json")
    text = "naïve café — 日本"
    ids = tok.encode(text)
    st = StreamingText(tok)
    deltas = [st.push([i]) for i in ids] + [st.flush()]
    assert "".join(deltas) == tok.decode(ids)
    assert all("\ufffd" not in d for d in deltas)
    byte_level = TextTokenizer.byte_level()
    st = StreamingText(byte_level)
    deltas = [st.push([i]) for i in byte_level.encode("日本")]
    assert deltas == ["", "", "日", "", "", "本"]


def test_can_write_knows_a_closed_vocabulary(tmp_path):
    from omnitalk.train.world import build_tokenizer
    assert TextTokenizer(FIX / "checkpoint" / "tokenizer.json").can_write("Stop omni")   # byte-level BPE: anything
    build_tokenizer(["the", "red", "circle", "stop"], tmp_path / "tok.json")
    world = TextTokenizer(tmp_path / "tok.json")
    assert world.can_write("the red circle") and world.can_write("Stop")
    assert not world.can_write("stop omni")


# ---- bad inputs ----------------------------------------------------------------------------------
def wav_bytes(x, sr=16000):
    buf = io.BytesIO()
    sf.write(buf, x, sr, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def test_audio_longer_than_30s_is_refused(model):
    with pytest.raises(InputError, match="30"):
        model.request(audio=wav_bytes(np.zeros(16000 * 31, np.float32)))


def test_empty_and_non_audio_are_refused(model, tmp_path):
    with pytest.raises(InputError, match="empty|no samples"):
        model.request(audio=wav_bytes(np.zeros(0, np.float32)))
    (tmp_path / "x.wav").write_text("not audio")
    with pytest.raises(InputError):
        model.request(audio=tmp_path / "x.wav")


def test_silent_stereo_and_other_rates_work(model):
    for x, sr in [(np.zeros(16000, np.float32), 16000), (np.zeros((8000, 2), np.float32), 8000),
                  (np.random.default_rng(0).normal(0, 0.1, (44100, 2)).astype(np.float32), 44100),
                  (np.zeros(48000, np.float32), 48000)]:
        req = model.request(audio=wav_bytes(x, sr), reply="text")
        assert req.prompts[0].audio_len == 51  # 1 s -> int(1000 / 20) + 1 Whisper frames


def test_broken_image_is_refused(model, tmp_path):
    (tmp_path / "b.png").write_bytes(IMG.read_bytes()[:200])
    with pytest.raises(InputError):
        model.request(image=tmp_path / "b.png", text="hi")


def test_text_longer_than_context(model):
    with pytest.raises(InputError, match="context"):
        list(model.stream(text="word " * 3000, reply="text"))


def test_request_argument_errors(model):
    with pytest.raises(InputError, match="nothing to answer"):
        model.request()
    with pytest.raises(InputError, match="reply must be"):
        model.request(text="hi", reply="video")
    with pytest.raises(InputError, match="audio alone"):
        model.request(text="hi", task="asr")
    with pytest.raises(InputError, match="stream_mode"):
        list(model.stream(text="hi", stream_mode="fast"))


def test_unknown_device():
    with pytest.raises(InputError, match="unknown device"):
        resolve_device("tpu:0")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no CUDA"):
            resolve_device("cuda")


def test_random_tiny_model_runs_every_mode():
    m = OmniModel.from_random("tiny", seed=2)
    r = m.generate(audio=WAV, image=IMG, max_tokens=16)
    assert r.tokens.shape == (8, 16)


def test_audio_pool_shortens_the_speech_prompt():
    from omnitalk import audio as audio_io
    from omnitalk.config import Config, preset
    from omnitalk.model.whisper import features, pool_frames

    plain = OmniModel.from_random("tiny", seed=3)
    pooled = OmniModel.from_random(Config(**{**preset("tiny").to_dict(), "audio_pool": 4}), seed=3)
    a, b = plain.audio_features(WAV), pooled.audio_features(WAV)
    assert a.shape[0] == 149 and b.shape[0] == 38                 # ceil(149 / 4)
    x = features(pooled.whisper, audio_io.load_audio(WAV), pooled.whisper_window)  # (149, d) before pooling
    assert torch.allclose(b, pooled.lm.whisper_adapter(pool_frames(x, 4)), atol=1e-6)
    ra, rb = plain.request(audio=WAV), pooled.request(audio=WAV)
    assert ra.prompts[0].length - rb.prompts[0].length == 149 - 38
    assert pooled.generate(audio=WAV, max_tokens=12).tokens.shape == (8, 12)


def test_trimmed_whisper_window_is_opt_in(model):
    exact = model.audio_features(WAV)
    model.whisper_window = "trimmed"
    try:
        trimmed = model.audio_features(WAV)
    finally:
        model.whisper_window = "exact"
    assert trimmed.shape == exact.shape == (149, model.cfg.n_embd)
    assert torch.equal(model.audio_features(WAV), exact)  # the default stays the release's 30-s window


def test_listening_item_statuses(model):
    """OmniModel.listen: SNAC frames of user audio on the audio streams, one irq/n_irq status per frame
    read at the next column, computed without touching any KV cache the model holds."""
    from omnitalk.train.sequences import listen_ids

    layout = model.layout
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 4096, (12, 7))
    ids = torch.as_tensor(listen_ids(layout, frames))[None]
    model.lm.clear_cache()
    with torch.inference_mode():
        logits = model.lm.text_logits(model.lm.forward_hidden(model.lm.embed(ids), 0)[0]).float()
    expected = (logits[1:13, layout.irq] > logits[1:13, layout.n_irq]).int().tolist()
    model.lm.setup_cache(1, 64)
    held = [b.attn.kv_cache for b in model.lm.transformer.h]
    try:
        assert model.listen(frames=frames) == expected
        assert [b.attn.kv_cache for b in model.lm.transformer.h] == held  # put back, untouched
    finally:
        model.lm.clear_cache()
    assert model.listen(frames=np.zeros((0, 7), np.int64)) == []
    # from audio: 16 kHz speech -> 24 kHz -> one status per 2048-sample SNAC frame
    x = sf.read(WAV, dtype="float32")[0]
    out = model.listen(x, sr=16000)
    assert len(out) == int(np.ceil(len(x) * 1.5 / 2048)) and set(out) <= {0, 1}
    with pytest.raises(InputError, match="needs audio or SNAC frames"):
        model.listen()


def test_has_listening_head_follows_the_config(model):
    assert model.has_listening_head is False  # the release (and the fixture) were not trained on it
    model.cfg.extra["interrupt_trained"] = True
    try:
        assert model.has_listening_head is True
    finally:
        del model.cfg.extra["interrupt_trained"]


def test_encoder_dtype_follows_mode_and_hardware(model):
    """fp32 keeps every encoder in fp32 (parity); bf16 / int8 cast Whisper and CLIP to bf16 only where
    bf16 products are native, and their features stay close to fp32's."""
    from omnitalk.engine import encoder_dtype, native_bf16

    cpu = torch.device("cpu")
    assert encoder_dtype("fp32", cpu) == torch.float32
    want = torch.bfloat16 if native_bf16(cpu) else torch.float32
    assert encoder_dtype("int8", cpu) == encoder_dtype("bf16", cpu) == want
    assert encoder_dtype("int8", torch.device("mps")) == torch.float32
    assert model.whisper.conv1.weight.dtype == torch.float32
    int8 = OmniModel.from_pretrained(FIX / "checkpoint", device="cpu", mode="int8", download=False)
    assert int8.whisper.conv1.weight.dtype == want and int8.clip.conv1.weight.dtype == want
    a, b = model.audio_features(WAV), int8.audio_features(WAV)
    assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape
    assert (a - b).norm() / a.norm() < 0.05    # bf16 encoder + int8 adapter against fp32
    c, d = model.image_features(IMG), int8.image_features(IMG)
    assert (c - d).norm() / c.norm() < 0.05
