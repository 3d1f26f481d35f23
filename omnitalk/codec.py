"""SNAC audio codec: the delay pattern, the 7-layer <-> 3-codebook layout, decoding and streaming.

Nothing here knows about the LLM; audio ids are *local* (0..4095 = SNAC codes, 4096.. = specials).

Layout (reference §7.2-7.3). The generation loop records 7 audio token lists, one column per step k.
Frame f (2048 samples at 24 kHz) takes layer j's token at step f+1+j (the delay pattern), and its
7 tokens map onto SNAC's codebooks c0 (1 code/frame), c1 (2) and c2 (4):

    layer:   0      1       2       3         4         5         6
    code:  c0[f]  c1[2f]  c2[4f]  c2[4f+1]  c1[2f+1]  c2[4f+2]  c2[4f+3]

Streaming. SNAC's decoder is non-causal: measured by perturbing one frame's codes (noise off, float64,
both the fixture SNAC and a random full-size 24 kHz SNAC) an output sample depends on frames up to
RECEPTIVE_FIELD_SAMPLES = 4757 samples (2.32 frames) away on either side, the structural bound of the
convolution stack (`omnitalk.snac_stream` derives the same number from the layer shapes). "Context"
streaming therefore holds back LOOKAHEAD_FRAMES = 3 frames (3 * 2048 = 6144 > 4757, 256 ms of audio) and
emits a chunk only once every sample in it is final. It decodes incrementally (`snac_stream`: each
convolution keeps the inputs it still needs, each frame is decoded once), so the concatenated stream
equals the one-pass waveform up to float32 rounding at the cost of the reference stream's decoding. A
codec the incremental decoder cannot take (local attention) decodes each chunk again with
CONTEXT_FRAMES = 3 frames of left context instead: the same samples at 2.5 x the cost at a stride of 4.
"""
from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext
from typing import Iterator, Sequence

import numpy as np
import torch

from omnitalk.errors import CheckpointError, InputError
from omnitalk.snac_stream import IncrementalDecoder, supports

N_AUDIO_LAYERS = 7
SAMPLES_PER_FRAME = 2048
SNAC_SAMPLE_RATE = 24000
CODEBOOK_SIZE = 4096
EOA = 4096  # local `_eoa`
PAD_A = 4097  # local `_pad_a`
DEFAULT_SNAC = "hubertsiuzdak/snac_24khz"

RECEPTIVE_FIELD_SAMPLES = 4757  # one-sided reach of a frame's codes in the decoder output (measured)
CONTEXT_FRAMES = 3  # ceil(4757 / 2048)
LOOKAHEAD_FRAMES = 3

# frame column order of [c0 | c1 pair | c2 quad] -> layer order, and back
_CODES_TO_LAYERS = [0, 1, 3, 4, 2, 5, 6]  # layer j = cat[:, _CODES_TO_LAYERS[j]]
_C1_LAYERS, _C2_LAYERS = [1, 4], [2, 3, 5, 6]


# ---------------------------------------------------------------------------------------------
# Delay pattern and code layout (pure functions)
# ---------------------------------------------------------------------------------------------

def frames_from_layers(layers, on_special: str = "raise") -> np.ndarray:
    """7 recorded audio token lists (7, S) -> SNAC frames (n, 7) int64, n = max(S - 7, 0).

    Frame f takes layer j's token at step f+1+j; the pre-delay tokens (steps 0..j of layer j) and the
    tail after the last complete frame are discarded. A frame holding an id outside 0..4095 (an audio
    special such as `_eoa`/`_pad_a`) must never reach SNAC: `on_special="raise"` raises InputError,
    `on_special="truncate"` returns the frames before the first such frame.
    """
    if on_special not in ("raise", "truncate"):
        raise ValueError(f"on_special must be 'raise' or 'truncate', got {on_special!r}")
    a = np.asarray(layers, dtype=np.int64)  # (7, S)
    if a.ndim != 2 or a.shape[0] != N_AUDIO_LAYERS:
        raise InputError(f"expected 7 audio token lists of equal length (shape (7, S)), got shape {a.shape}")
    n = max(a.shape[1] - N_AUDIO_LAYERS, 0)
    frames = np.stack([a[j, 1 + j: 1 + j + n] for j in range(N_AUDIO_LAYERS)], axis=1)  # (n, 7)
    bad = (frames < 0) | (frames >= CODEBOOK_SIZE)  # (n, 7)
    if bad.any():
        f, j = map(int, np.argwhere(bad)[0])
        if on_special == "truncate":
            return frames[:f]
        raise InputError(
            f"audio layer {j} has id {int(frames[f, j])} at step {f + 1 + j}, inside SNAC frame {f}; only "
            f"codes 0..{CODEBOOK_SIZE - 1} can be decoded (ids >= {CODEBOOK_SIZE} are audio specials, "
            f"e.g. _eoa={EOA}, _pad_a={PAD_A}). Use on_special='truncate' to keep the frames before it.")
    return frames


def frames_to_layers(frames, length: int | None = None, pad: int = PAD_A, eoa: int = EOA) -> np.ndarray:
    """SNAC frames (n, 7) -> delayed audio token lists (7, length), the inverse of frames_from_layers.

    Layer j holds `pad` at steps 0..j, frame f's token at step f+1+j (steps j+1..j+n), `eoa` at step
    n+j+1 and `pad` after it. The default length n+7 is what the generation loop records: layer 6's
    `_eoa` would fall at step n+7, the step that ends the loop and is not recorded. Pass length=n+8 (or
    more; extra steps are `pad`) to include it, e.g. for training targets.
    """
    fr = _as_frames(frames)  # (n, 7)
    n = fr.shape[0]
    length = n + N_AUDIO_LAYERS if length is None else length
    if length < n + N_AUDIO_LAYERS:
        raise ValueError(f"length must be >= n_frames + 7 = {n + N_AUDIO_LAYERS}, got {length}")
    out = np.full((N_AUDIO_LAYERS, length), pad, dtype=np.int64)  # (7, length)
    for j in range(N_AUDIO_LAYERS):
        out[j, j + 1: j + 1 + n] = fr[:, j]
        if n + j + 1 < length:
            out[j, n + j + 1] = eoa
    return out


def frames_to_codes(frames) -> list[torch.Tensor]:
    """SNAC frames (n, 7) -> [c0 (1, n), c1 (1, 2n), c2 (1, 4n)] int64 tensors, SNAC.decode's input."""
    fr = torch.as_tensor(_as_frames(frames))  # (n, 7)
    return [fr[:, [0]].reshape(1, -1), fr[:, _C1_LAYERS].reshape(1, -1), fr[:, _C2_LAYERS].reshape(1, -1)]


def codes_to_frames(codes: Sequence) -> np.ndarray:
    """[c0 (n,) or (1, n), c1 (1, 2n), c2 (1, 4n)] (e.g. SNAC.encode's output) -> frames (n, 7) int64."""
    if len(codes) != 3:
        raise ValueError(f"expected 3 codebooks (SNAC 24 kHz), got {len(codes)}")
    c0, c1, c2 = (np.asarray(torch.as_tensor(c).cpu(), dtype=np.int64).reshape(-1) for c in codes)
    n = c0.shape[0]
    if c1.shape[0] != 2 * n or c2.shape[0] != 4 * n:
        raise ValueError(f"codebook lengths must be n, 2n, 4n; got {c0.shape[0]}, {c1.shape[0]}, {c2.shape[0]}")
    cat = np.concatenate([c0.reshape(n, 1), c1.reshape(n, 2), c2.reshape(n, 4)], axis=1)  # (n, 7)
    return cat[:, _CODES_TO_LAYERS]


def _as_frames(frames) -> np.ndarray:
    """An array, tensor or list of rows -> frames (n, 7) int64."""
    if isinstance(frames, torch.Tensor):
        frames = frames.cpu().numpy()
    return np.asarray(frames, dtype=np.int64).reshape(-1, N_AUDIO_LAYERS)


# ---------------------------------------------------------------------------------------------
# PCM conversion
# ---------------------------------------------------------------------------------------------

def pcm_reference(x) -> np.ndarray:
    """The official stream conversion: float -> *32768 in float64 -> int16 by truncation, no clipping."""
    return (np.asarray(torch.as_tensor(x).cpu(), dtype=np.float64) * 32768).astype(np.int16)


def to_pcm16(x) -> np.ndarray:
    """Float waveform in [-1, 1] -> int16 PCM (rounded, clipped): the user-facing conversion."""
    y = np.rint(np.asarray(torch.as_tensor(x).cpu(), dtype=np.float64) * 32768)
    return np.clip(y, -32768, 32767).astype(np.int16)


# ---------------------------------------------------------------------------------------------
# SNAC wrapper
# ---------------------------------------------------------------------------------------------

def _identity(x):
    return x


@torch.no_grad()
def bake_weight_norm(model: torch.nn.Module) -> torch.nn.Module:
    """SNAC's convolutions are weight-normalised parametrisations, which recompute g * v / |v| from their
    parameters on every forward pass (a third of a decode's time on a CPU). For inference, store the
    weights they compute once: the same tensors, so every output is bit for bit what it was."""
    from torch.nn.utils import parametrize

    for module in model.modules():
        if parametrize.is_parametrized(module):
            for name in list(module.parametrizations.keys()):
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)
                if name in module._buffers:  # without autograd torch leaves a buffer: keep it a parameter
                    module.register_parameter(name, torch.nn.Parameter(module._buffers.pop(name),
                                                                       requires_grad=False))
    return model


def _snac_from_safetensors(folder: str):
    import json

    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from snac import SNAC

    try:
        with open(os.path.join(folder, "config.json")) as f:
            model = SNAC(**json.load(f))
        model.load_state_dict(load_file(os.path.join(folder, "model.safetensors")))
    except (OSError, ValueError, TypeError, RuntimeError, SafetensorError) as e:
        raise CheckpointError(f"cannot load the SNAC codec in {folder!r} (config.json + model.safetensors): {e}. "
                              "Re-export it with `omnitalk train-codec` or replace the folder") from e
    return model.eval()


class Codec:
    """A loaded SNAC model; decodes frames (n, 7) to 24 kHz float waveforms."""

    def __init__(self, model, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.model = bake_weight_norm(model.to(self.device).eval())
        self.incremental_ok = supports(self.model)  # StreamDecoder decodes each frame once (snac_stream)

    @classmethod
    def from_pretrained(cls, path_or_repo: str | os.PathLike = DEFAULT_SNAC, device="cpu", **hub_kwargs) -> "Codec":
        """A local folder with config.json + pytorch_model.bin, or a Hugging Face repo id (downloaded)."""
        from snac import SNAC

        src = os.path.expanduser(os.fspath(path_or_repo))
        looks_local = os.path.exists(src) or src.startswith((".", "/")) or src.count("/") != 1
        if looks_local and not os.path.isdir(src):
            raise CheckpointError(f"SNAC checkpoint {src!r} must be a folder with config.json and pytorch_model.bin "
                                  f"(or a Hugging Face repo id such as {DEFAULT_SNAC!r})")
        if looks_local:
            weights = [f for f in ("model.safetensors", "pytorch_model.bin") if os.path.isfile(os.path.join(src, f))]
            if not os.path.isfile(os.path.join(src, "config.json")) or not weights:
                raise CheckpointError(f"SNAC folder {src!r} needs config.json and model.safetensors or "
                                      f"pytorch_model.bin; it has {sorted(os.listdir(src))}")
            if weights[0] == "model.safetensors":  # omnitalk's own codecs (omnitalk train-codec)
                return cls(_snac_from_safetensors(src), device)
        try:
            model = SNAC.from_pretrained(src, **hub_kwargs)
        except Exception as e:  # hub/network/state-dict errors
            raise CheckpointError(f"cannot load SNAC from {src!r}: {e}") from e
        return cls(model, device)

    @property
    def sample_rate(self) -> int:
        return int(self.model.sampling_rate)

    @contextmanager
    def deterministic(self) -> Iterator[None]:
        """Disable the decoder's NoiseBlocks (which add randn-scaled noise) while inside the block."""
        from snac.layers import NoiseBlock

        blocks = [m for m in self.model.modules() if isinstance(m, NoiseBlock)]
        for b in blocks:
            b.forward = _identity  # instance attribute shadows the class method
        try:
            yield
        finally:
            for b in blocks:
                del b.forward

    def decode(self, frames, *, noise: bool = True, seed: int | None = None) -> torch.Tensor:
        """Frames (n, 7) of codes 0..4095 -> float32 waveform (n * 2048,) on the CPU.

        noise=False disables the NoiseBlocks (deterministic output); seed, when given, is passed to
        torch.manual_seed immediately before SNAC's decode (how the parity fixtures were made, seed 1234).
        """
        fr = _as_frames(frames)  # (n, 7)
        if fr.shape[0] == 0:
            return torch.zeros(0)
        if fr.min() < 0 or fr.max() >= CODEBOOK_SIZE:
            raise InputError(f"SNAC frames must hold codes 0..{CODEBOOK_SIZE - 1}; got ids {fr.min()}..{fr.max()}")
        codes = [c.to(self.device) for c in frames_to_codes(fr)]
        with torch.inference_mode(), (nullcontext() if noise else self.deterministic()):
            if seed is not None:
                torch.manual_seed(seed)
            wav = self.model.decode(codes)  # (1, 1, n * 2048)
        return wav.reshape(-1).float().cpu()

    def encode(self, wav) -> np.ndarray:
        """24 kHz mono float waveform (T,) -> frames (ceil(T / 2048), 7): audio as the 7 LLM layers."""
        dtype = next(self.model.parameters()).dtype
        x = torch.as_tensor(wav).reshape(1, 1, -1).to(self.device, dtype)  # (1, 1, T)
        with torch.inference_mode():
            codes = self.model.encode(x)  # [(1, n), (1, 2n), (1, 4n)]
        return codes_to_frames(codes)


# ---------------------------------------------------------------------------------------------
# Streaming
# ---------------------------------------------------------------------------------------------

class StreamDecoder:
    """Incremental decoder: push frames one at a time, get float32 waveform chunks back.

    mode="reference" reproduces the official streamer: each run of `stride` new frames is decoded on its
    own (audible seams) and flush() drops the partial last chunk (returns None).

    mode="context" (default) emits the same chunk sizes (stride * 2048 samples), each once
    `lookahead_frames` later frames have arrived, so the concatenated chunks equal a one-pass decode (noise
    off) to float rounding; flush() emits everything left, the partial last chunk included. Chunks arrive
    `lookahead_frames` frames later than in the reference mode. With `incremental` (the default where the
    codec allows it, `omnitalk.snac_stream`) each frame is decoded once; otherwise each chunk is decoded
    again with `context_frames` earlier frames and the look-ahead frames.
    """

    def __init__(self, codec: Codec, stride: int = 4, mode: str = "context",
                 context_frames: int = CONTEXT_FRAMES, lookahead_frames: int = LOOKAHEAD_FRAMES,
                 seed: int | None = None, noise: bool = True, incremental: bool | None = None):
        if mode not in ("reference", "context"):
            raise ValueError(f"mode must be 'reference' or 'context', got {mode!r}")
        if stride < 1 or context_frames < 0 or lookahead_frames < 0:
            raise ValueError("stride must be >= 1, context_frames and lookahead_frames >= 0")
        self.codec, self.stride, self.mode = codec, stride, mode
        self.context = context_frames if mode == "context" else 0
        self.lookahead = lookahead_frames if mode == "context" else 0
        self.seed, self.noise = seed, noise
        self.frames: list[np.ndarray] = []  # every frame pushed, each (7,)
        self.emitted = 0  # frames whose samples have been returned
        self.incremental = None
        if mode == "context" and (incremental or incremental is None and codec.incremental_ok):
            self.incremental = IncrementalDecoder(codec.model, noise=noise, seed=seed)
            need = -(-self.incremental.lag_samples // SAMPLES_PER_FRAME)
            if self.lookahead < need:
                raise ValueError(f"lookahead_frames={lookahead_frames} is too short for incremental decoding: "
                                 f"a sample is final {self.incremental.lag_samples} samples ({need} frames) "
                                 "later; raise it or pass incremental=False")
            self.fed = 0  # frames given to the incremental decoder
            self.ready = torch.zeros(0)  # final samples not yet returned, from frame `emitted` on

    def push(self, frame_row) -> list[torch.Tensor]:
        """Add one frame (7 codes); return the chunks (each (stride * 2048,)) that became ready."""
        row = np.asarray(frame_row, dtype=np.int64).reshape(N_AUDIO_LAYERS)
        if row.min() < 0 or row.max() >= CODEBOOK_SIZE:
            raise InputError(f"frame {len(self.frames)} holds ids {row.tolist()}; only codes 0..{CODEBOOK_SIZE - 1} reach SNAC")
        self.frames.append(row)
        chunks = []
        while len(self.frames) - self.lookahead - self.emitted >= self.stride:
            chunks.append(self._emit(self.emitted + self.stride))
        return chunks

    def extend(self, frames) -> list[torch.Tensor]:
        """push() every row of frames (n, 7)."""
        return [c for row in _as_frames(frames) for c in self.push(row)]

    def flush(self) -> torch.Tensor | None:
        """End of stream. context: the remaining samples (None if none); reference: None (tail dropped)."""
        if self.mode == "reference" or self.emitted == len(self.frames):
            return None
        if self.incremental is not None:
            self._feed(final=True)
        return self._emit(len(self.frames))

    def _feed(self, final: bool = False) -> None:
        """Incremental mode: decode the frames not yet decoded; keep the samples that became final."""
        codes = frames_to_codes(np.stack(self.frames[self.fed:])) if self.fed < len(self.frames) else None
        wav = self.incremental.feed(codes, final=final)  # (1, 1, T)
        self.fed = len(self.frames)
        self.ready = torch.cat([self.ready, wav.reshape(-1).float().cpu()])

    def _emit(self, end: int) -> torch.Tensor:
        """Decode and return the samples of frames [emitted, end)."""
        start = self.emitted
        n = (end - start) * SAMPLES_PER_FRAME
        if self.incremental is not None:
            if self.ready.numel() < n:
                self._feed()
            if self.ready.numel() < n:  # the look-ahead check above makes this unreachable
                raise RuntimeError(f"incremental SNAC decoding fell behind: {self.ready.numel()} of {n} samples final")
            wav, self.ready = self.ready[:n], self.ready[n:]
            self.emitted = end
            return wav
        lo = max(start - self.context, 0)
        hi = min(end + self.lookahead, len(self.frames))
        wav = self.codec.decode(np.stack(self.frames[lo:hi]), noise=self.noise, seed=self.seed)  # ((hi-lo)*2048,)
        self.emitted = end
        return wav[(start - lo) * SAMPLES_PER_FRAME:(end - lo) * SAMPLES_PER_FRAME]


def boundary_error(codec: Codec, frames, mode: str = "context", stride: int = 4, **stream_kwargs) -> float:
    """Max |streamed - one-pass| over the streamed samples, noise off (reference mode drops its tail)."""
    frames = _as_frames(frames)
    sd = StreamDecoder(codec, stride=stride, mode=mode, noise=False, **stream_kwargs)
    chunks = sd.extend(frames)
    tail = sd.flush()
    streamed = torch.cat(chunks + ([tail] if tail is not None else []) + [torch.zeros(0)])
    full = codec.decode(frames, noise=False)
    return float((streamed - full[:streamed.numel()]).abs().max()) if streamed.numel() else 0.0
