"""omnitalk.snac_stream: stateful SNAC decoding equals a one-pass decode, chunked any way."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from snac import SNAC

from omnitalk.codec import SAMPLES_PER_FRAME, Codec, StreamDecoder, frames_to_codes
from omnitalk.snac_stream import IncrementalDecoder, supports

PARITY = Path(__file__).resolve().parent / "fixtures" / "parity"
CONFIG = json.loads((PARITY / "checkpoint" / "snac" / "config.json").read_text())


def codec(dtype=torch.float32, **overrides) -> Codec:
    torch.manual_seed(0)
    return Codec(SNAC(**{**CONFIG, **overrides}).to(dtype))


def frames(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 4096, size=(n, 7))


def decode_in_chunks(c: Codec, fr: np.ndarray, sizes, **kwargs) -> tuple[torch.Tensor, list[int]]:
    inc = IncrementalDecoder(c.model, **kwargs)
    out, final_after = [], []
    i = 0
    for size in sizes:
        out.append(inc.feed(frames_to_codes(fr[i:i + size])))
        i += size
        final_after.append(sum(o.shape[-1] for o in out))
    out.append(inc.feed(None, final=True))
    return torch.cat(out, dim=-1).reshape(-1), final_after


def test_lag_is_exactly_where_samples_become_final():
    """The lag derived from the layer shapes is safe and tight to the frame (float64, noise off): changing
    any code of frame 6 leaves every sample before 6 * 2048 - lag alone, and moves samples within the
    frame before it (the last few dozen samples of the bound carry influences of ~1e-20, the products
    of a dozen edge taps of the 0.02-scale weights, lost in float64 rounding)."""
    c = codec(torch.float64)
    fr = frames(12)
    base = c.decode(fr, noise=False).double()
    first_moved = []
    for code in range(7):  # c0 reaches farthest back (its code spans the whole frame)
        other = fr.copy()
        other[6, code] = (other[6, code] + 1) % 4096
        first_moved.append(np.flatnonzero((c.decode(other, noise=False).double() != base).numpy())[0])
    lag = IncrementalDecoder(c.model).lag_samples
    assert 6 * SAMPLES_PER_FRAME - lag <= min(first_moved) < 6 * SAMPLES_PER_FRAME - lag + 64
    assert -(-lag // SAMPLES_PER_FRAME) == -(-(6 * SAMPLES_PER_FRAME - min(first_moved)) // SAMPLES_PER_FRAME) == 3
    assert lag == 4757  # the decoder's reach documented in omnitalk.codec (RECEPTIVE_FIELD_SAMPLES)


@pytest.mark.parametrize("sizes", [[1] * 15, [3, 3, 3, 3, 3], [7, 8], [4, 0, 11]])
def test_any_chunking_equals_one_pass(sizes):
    c, fr = codec(), frames(15)
    streamed, final_after = decode_in_chunks(c, fr, sizes, noise=False)
    one_pass = c.decode(fr, noise=False)
    assert streamed.shape == one_pass.shape == (15 * SAMPLES_PER_FRAME,)
    assert (streamed - one_pass).abs().max() < 2e-6
    lag = IncrementalDecoder(c.model).lag_samples
    # after n frames exactly the samples before n * 2048 - lag are final, never more, never fewer
    assert final_after == [max(sum(sizes[:k + 1]) * SAMPLES_PER_FRAME - lag, 0) for k in range(len(sizes))]


def test_full_size_decoder_in_float64():
    from omnitalk.codec import Codec as C
    torch.manual_seed(0)
    c = C(SNAC.from_config(PARITY / "manifests" / "snac_24khz" / "config.json").double())
    fr = frames(9, seed=1)
    streamed, _ = decode_in_chunks(c, fr, [4, 4, 1], noise=False)
    assert (streamed - c.decode(fr, noise=False)).abs().max() < 1e-6  # only the final float32 cast differs


def test_noise_is_seeded_per_stream():
    c, fr = codec(), frames(8)
    rng = torch.get_rng_state()
    a, _ = decode_in_chunks(c, fr, [4, 4], noise=True, seed=7)
    b, _ = decode_in_chunks(c, fr, [4, 4], noise=True, seed=7)
    assert torch.equal(torch.get_rng_state(), rng)  # seeded noise leaves the global RNG alone
    other, _ = decode_in_chunks(c, fr, [4, 4], noise=True, seed=8)
    quiet, _ = decode_in_chunks(c, fr, [4, 4], noise=False)
    assert torch.equal(a, b)
    assert (a - other).abs().max() > 1e-4 and (a - quiet).abs().max() > 1e-4


def test_attention_decoder_falls_back_to_context_decoding():
    c = codec(attn_window_size=4)  # windows of 4 latent steps: any whole number of frames
    assert not supports(c.model) and not c.incremental_ok
    with pytest.raises(NotImplementedError, match="LocalMHA"):
        IncrementalDecoder(c.model)
    fr = frames(9)
    sd = StreamDecoder(c, noise=False)
    assert sd.incremental is None
    streamed = torch.cat(sd.extend(fr) + [sd.flush()])
    assert (streamed - c.decode(fr, noise=False)).abs().max() < 1e-4
