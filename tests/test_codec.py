"""omnitalk.codec against the parity fixture (sections 5-8 of tests/fixtures/parity/README.md)."""
import functools
import json
import wave
from pathlib import Path

import numpy as np
import pytest
import torch

from omnitalk.codec import (
    EOA, LOOKAHEAD_FRAMES, PAD_A, SAMPLES_PER_FRAME, Codec, StreamDecoder, boundary_error, codes_to_frames,
    frames_from_layers, frames_to_codes, frames_to_layers, pcm_reference, to_pcm16,
)
from omnitalk.errors import CheckpointError, InputError

PARITY = Path(__file__).resolve().parent / "fixtures" / "parity"
EXPECTED = PARITY / "expected"
STREAM_TASKS = {"AA_AT_batch": (41, 10), "ImageQA_batch": (29, 7)}  # task -> (frames, streamed chunks)
SEED = 1234


@functools.lru_cache(maxsize=None)
def fixture_codec() -> Codec:
    return Codec.from_pretrained(PARITY / "checkpoint" / "snac")


@functools.lru_cache(maxsize=None)
def full_size_codec() -> Codec:
    """A randomly initialised SNAC with the real 24 kHz architecture (decoder_dim 1024)."""
    from snac import SNAC
    torch.manual_seed(0)
    return Codec(SNAC.from_config(PARITY / "manifests" / "snac_24khz" / "config.json"))


def task_frames(task: str) -> np.ndarray:
    return frames_from_layers(np.load(EXPECTED / task / "tokens.npy")[:7])


def as_lists(codes):
    return [c.reshape(-1).tolist() for c in codes]


# ---- layout ---------------------------------------------------------------------------------

@pytest.mark.parametrize("task", STREAM_TASKS)
def test_frames_and_codes_match_official(task):
    frames = task_frames(task)
    assert frames.shape == (STREAM_TASKS[task][0], 7) and frames.dtype == np.int64
    codes = frames_to_codes(frames)
    assert [tuple(c.shape) for c in codes] == [(1, len(frames)), (1, 2 * len(frames)), (1, 4 * len(frames))]
    assert all(c.dtype == torch.int64 for c in codes)
    assert as_lists(codes) == json.loads((EXPECTED / task / "snac_codes.json").read_text())

    stream = json.loads((EXPECTED / task / "stream.json").read_text())
    assert stream["num_chunks"] == STREAM_TASKS[task][1]
    for i, chunk in enumerate(stream["chunks"]):
        assert chunk["frames"] == [4 * i, 4 * i + 3]
        assert as_lists(frames_to_codes(frames[4 * i:4 * i + 4])) == chunk["codes"]


def test_round_trips():
    frames = np.random.default_rng(0).integers(0, 4096, (13, 7))
    codes = frames_to_codes(frames)
    np.testing.assert_array_equal(codes_to_frames(codes), frames)
    np.testing.assert_array_equal(codes_to_frames([c.reshape(-1).numpy() for c in codes]), frames)  # 1-D ok
    layers = frames_to_layers(frames)
    assert layers.shape == (7, 13 + 7)
    np.testing.assert_array_equal(frames_from_layers(layers), frames)
    np.testing.assert_array_equal(frames_from_layers(layers.tolist()), frames)  # list of lists
    for task in STREAM_TASKS:
        f = task_frames(task)
        np.testing.assert_array_equal(codes_to_frames(frames_to_codes(f)), f)
        np.testing.assert_array_equal(frames_from_layers(frames_to_layers(f)), f)


def test_frames_to_layers_layout():
    frames = np.arange(14).reshape(2, 7)  # frame f, layer j -> 7f + j
    p, e = PAD_A, EOA
    expected = [
        [p, 0, 7, e, p, p, p, p, p],
        [p, p, 1, 8, e, p, p, p, p],
        [p, p, p, 2, 9, e, p, p, p],
        [p, p, p, p, 3, 10, e, p, p],
        [p, p, p, p, p, 4, 11, e, p],
        [p, p, p, p, p, p, 5, 12, e],
        [p, p, p, p, p, p, p, 6, 13],  # layer 6's _eoa (step n+7) ends the loop: not recorded
    ]
    np.testing.assert_array_equal(frames_to_layers(frames), expected)
    with_stop = frames_to_layers(frames, length=10)
    assert with_stop[6, 9] == EOA and (with_stop[:6, 9] == PAD_A).all()
    assert frames_to_layers(np.zeros((0, 7)), pad=0).shape == (7, 7)
    with pytest.raises(ValueError):
        frames_to_layers(frames, length=8)


def test_special_id_inside_frame():
    layers = frames_to_layers(np.random.default_rng(1).integers(0, 4096, (5, 7)))
    layers[3, 1 + 3 + 2] = EOA  # layer 3 of frame 2
    with pytest.raises(InputError, match=r"layer 3 has id 4096 at step 6, inside SNAC frame 2"):
        frames_from_layers(layers)
    assert frames_from_layers(layers, on_special="truncate").shape == (2, 7)
    with pytest.raises(ValueError):  # InputError is a ValueError
        frames_from_layers(layers)
    with pytest.raises(InputError):
        fixture_codec().decode(frames_from_layers(layers, on_special="truncate").tolist() + [[4097] * 7])
    with pytest.raises(InputError):
        StreamDecoder(fixture_codec()).push([0, 0, 0, 0, 0, 0, 4096])


def test_short_and_malformed_inputs():
    assert frames_from_layers(np.full((7, 7), 5)).shape == (0, 7)
    assert frames_from_layers(np.full((7, 3), 5)).shape == (0, 7)
    assert frames_from_layers(np.full((7, 8), 5)).shape == (1, 7)
    with pytest.raises(InputError, match="7 audio token lists"):
        frames_from_layers(np.zeros((8, 20)))
    assert fixture_codec().decode(np.zeros((0, 7), np.int64)).numel() == 0
    with pytest.raises(CheckpointError):
        Codec.from_pretrained(PARITY / "checkpoint")  # a folder without config.json
    with pytest.raises(CheckpointError, match="must be a folder"):
        Codec.from_pretrained(PARITY / "no_such_folder" / "snac")  # a missing path is not sent to the hub


# ---- decoding -------------------------------------------------------------------------------

@pytest.mark.parametrize("task", STREAM_TASKS)
def test_full_decode_matches_official(task):
    frames = task_frames(task)
    wav = fixture_codec().decode(frames, seed=SEED)
    expected = np.load(EXPECTED / task / "full_float.npy").reshape(-1)
    assert wav.dtype == torch.float32 and wav.shape == (len(frames) * SAMPLES_PER_FRAME,) == expected.shape
    assert np.abs(wav.numpy() - expected).max() < 1e-4

    with wave.open(str(EXPECTED / task / "full.wav")) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (24000, 1, 2)
        pcm = np.frombuffer(w.readframes(w.getnframes()), "<i2")
    assert np.abs(pcm.astype(int) - to_pcm16(wav).astype(int)).max() <= 1


def test_noise_switch():
    codec, frames = fixture_codec(), task_frames("ImageQA_batch")[:6]
    a, b = codec.decode(frames, noise=False), codec.decode(frames, noise=False)
    assert torch.equal(a, b)
    assert (codec.decode(frames) - a).abs().max() > 1e-3  # noise blocks are active by default
    assert torch.equal(codec.decode(frames, seed=3), codec.decode(frames, seed=3))
    with codec.deterministic():
        assert torch.equal(codec.decode(frames), a)
    assert not torch.equal(codec.decode(frames, seed=3), a)  # noise restored after the block


def test_encode_layout():
    codec = fixture_codec()
    wav = torch.from_numpy(np.load(EXPECTED / "AA_AT_batch" / "full_float.npy").reshape(-1))
    frames = codec.encode(wav[:10 * SAMPLES_PER_FRAME - 100])  # padded up to whole frames
    assert frames.shape == (10, 7) and frames.dtype == np.int64
    assert frames.min() >= 0 and frames.max() < 4096
    assert codec.decode(frames, noise=False).shape == (10 * SAMPLES_PER_FRAME,)


def test_pcm_conversions():
    x = np.array([0.5, -0.5, 0.99999, -1.0, 1.2, 3.4e-5, -3.4e-5])
    np.testing.assert_array_equal(pcm_reference(x[:4]), [16384, -16384, 32767, -32768])
    np.testing.assert_array_equal(pcm_reference(x[5:]), [1, -1])  # truncation toward zero
    np.testing.assert_array_equal(to_pcm16(x), [16384, -16384, 32767, -32768, 32767, 1, -1])


# ---- streaming ------------------------------------------------------------------------------

@pytest.mark.parametrize("task", STREAM_TASKS)
def test_reference_stream_matches_official(task):
    frames = task_frames(task)
    sd = StreamDecoder(fixture_codec(), stride=4, mode="reference", seed=SEED)
    chunks = []
    for k, row in enumerate(frames):
        out = sd.push(row)
        assert len(out) == (1 if (k + 1) % 4 == 0 else 0)  # a chunk per 4 complete frames, no delay
        chunks += out
    assert sd.flush() is None  # partial tail (41 % 4 = 1, 29 % 4 = 1 frames) is never streamed
    n_chunks = STREAM_TASKS[task][1]
    assert len(chunks) == n_chunks == len(list((EXPECTED / task / "stream").glob("chunk_*.npy")))
    for i, chunk in enumerate(chunks):
        expected = np.load(EXPECTED / task / "stream" / f"chunk_{i:02d}.npy")
        got = pcm_reference(chunk)
        assert got.dtype == np.int16 and got.shape == expected.shape == (8192,)
        assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1


# Context mode decodes each chunk with 3 frames of left context and 3 of look-ahead, more than the
# decoder's two-sided reach (4757 samples < 3 * 2048): the only difference to a one-pass decode is
# float32 rounding from different convolution lengths (measured ~4e-6 on the fixture SNAC, ~6e-7 on a
# full-size one). 1e-4 bounds that with margin and is >1000x below the seams of the reference mode
# (~0.19 fixture, ~0.17 full-size); one frame less of either (2/3 or 3/2) already gives 1e-2..1e-4.
CONTEXT_BOUND = 1e-4


@pytest.mark.parametrize("incremental", [True, False], ids=["incremental", "overlap"])
@pytest.mark.parametrize("task", STREAM_TASKS)
def test_context_stream_is_seamless(task, incremental):
    codec, frames = fixture_codec(), task_frames(task)
    sd = StreamDecoder(codec, stride=4, noise=False, incremental=incremental)  # mode="context" is the default
    assert (sd.incremental is not None) == incremental
    chunks, first = [], None
    for k, row in enumerate(frames):
        out = sd.push(row)
        if out and first is None:
            first = k + 1
        chunks += out
    assert first == 4 + LOOKAHEAD_FRAMES
    assert all(c.shape == (4 * SAMPLES_PER_FRAME,) for c in chunks)
    tail = sd.flush()
    assert tail is not None and sd.flush() is None
    streamed = torch.cat(chunks + [tail])
    one_pass = codec.decode(frames, noise=False)
    assert streamed.shape == one_pass.shape  # tail frames included
    err = (streamed - one_pass).abs().max().item()
    assert err < CONTEXT_BOUND
    assert err == pytest.approx(boundary_error(codec, frames, "context", incremental=incremental), abs=1e-6)
    ref_err = boundary_error(codec, frames, "reference")
    assert ref_err > 1e-2 and ref_err > 1000 * err


def test_context_stream_is_exact_in_float64():
    from snac import SNAC
    codec = Codec(SNAC.from_pretrained(str(PARITY / "checkpoint" / "snac")).double())
    frames = task_frames("ImageQA_batch")
    assert boundary_error(codec, frames, "context") < 1e-6  # only the final float32 cast differs
    assert boundary_error(codec, frames, "context", incremental=False) < 1e-6
    # re-decoding with context: 2 frames of look-ahead are too few; the incremental decoder refuses them
    assert boundary_error(codec, frames, "context", lookahead_frames=2, incremental=False) > 1e-3
    with pytest.raises(ValueError, match="lookahead_frames=2 is too short.*4757 samples"):
        StreamDecoder(codec, lookahead_frames=2)


def test_context_stream_decodes_each_frame_once(monkeypatch):
    """The incremental context stream passes every frame through SNAC once, as the reference stream
    does; re-decoding with context passes up to (3 + 4 + 3) / 4 = 2.5 x as many."""
    codec, frames = fixture_codec(), task_frames("AA_AT_batch")  # 41 frames
    decoded = []
    from_codes = codec.model.quantizer.from_codes
    monkeypatch.setattr(codec.model.quantizer, "from_codes", lambda codes: decoded.append(codes[0].shape[-1])
                        or from_codes(codes))
    for incremental in (True, False):
        decoded.clear()
        sd = StreamDecoder(codec, noise=False, incremental=incremental)
        sd.extend(frames)
        sd.flush()
        if incremental:
            assert sum(decoded) == 41 and decoded[0] == 4 + LOOKAHEAD_FRAMES
        else:
            assert sum(decoded) > 2.2 * 41 and decoded[1] == 3 + 4 + 3


def test_context_stream_full_size_snac():
    codec, frames = full_size_codec(), task_frames("AA_AT_batch")[:14]
    err = boundary_error(codec, frames, "context", stride=4)
    assert err < CONTEXT_BOUND
    assert boundary_error(codec, frames, "context", stride=4, incremental=False) < CONTEXT_BOUND
    assert boundary_error(codec, frames, "reference", stride=4) > 1000 * err


def test_context_stream_with_noise_and_other_strides():
    codec, frames = fixture_codec(), task_frames("ImageQA_batch")[:11]
    for stride in (1, 3, 5, 20):
        sd = StreamDecoder(codec, stride=stride, seed=SEED)
        chunks = sd.extend(frames)
        tail = sd.flush()
        total = sum(c.numel() for c in chunks) + (tail.numel() if tail is not None else 0)
        assert total == len(frames) * SAMPLES_PER_FRAME
        assert boundary_error(codec, frames, "context", stride=stride) < CONTEXT_BOUND


def test_weight_norm_is_baked_and_outputs_are_unchanged():
    """Codec stores the weights SNAC's weight-norm parametrisations compute, once: no parametrisation
    is left and a decode (same noise seed) is bit for bit the parametrised model's."""
    import json
    from pathlib import Path

    import torch
    from snac import SNAC
    from torch.nn.utils import parametrize

    from omnitalk.codec import Codec

    cfg = json.loads((Path(__file__).parent / "fixtures/parity/checkpoint/snac/config.json").read_text())
    torch.manual_seed(0)
    raw = SNAC(**cfg).eval()
    assert any(parametrize.is_parametrized(m) for m in raw.modules())
    codes = [torch.randint(0, 4096, (1, 4 * n)) for n in (1, 2, 4)]
    with torch.inference_mode():
        torch.manual_seed(1)
        before = raw.decode(codes)
    n_params = sum(p.numel() for p in raw.parameters())
    codec = Codec(raw)
    assert not any(parametrize.is_parametrized(m) for m in codec.model.modules())
    assert not dict(codec.model.named_buffers())                # the weights stay parameters:
    assert sum(p.numel() for p in codec.model.parameters()) < n_params   # one weight each, not g and v
    assert all(m.weight.shape for m in codec.model.modules() if isinstance(m, torch.nn.Conv1d))
    with torch.inference_mode():
        torch.manual_seed(1)
        after = codec.model.decode(codes)
    assert torch.equal(before, after)
