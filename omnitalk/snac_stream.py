"""Stateful SNAC decoding: a stream of frames decoded once, equal to a one-pass decode.

SNAC's decoder is a stack of non-causal convolutions, transposed convolutions and pointwise layers
(Snake, noise, tanh). A one-pass decode of frames [0, n) pads each convolution with zeros at both ends.
`IncrementalDecoder` computes the same thing chunk by chunk: every convolution keeps the last inputs it
still needs (its kernel span), every transposed convolution keeps the overlap it has not finished
summing, every residual unit keeps the inputs its branch has not yet caught up with. Each output sample
is computed once, from exactly the inputs a one-pass decode uses, so the concatenated output equals the
one-pass waveform up to float rounding, at the cost of decoding each frame once (decoding each chunk
again with a few frames of context on either side costs 2.5 x as much at a stride of 4).

An output sample is final once the inputs within the decoder's right reach have arrived:
`IncrementalDecoder.lag_samples` is that reach (an upper bound, from the layer shapes), so the stream
holds back ceil(lag / 2048) frames. Supported: the 24 kHz SNAC layout (no local attention, even
up-sampling rates); `supports(model)` says whether a model qualifies.
"""
from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

SAMPLES_PER_LATENT = 512  # SNAC's hop: one latent step


class _Conv:
    """Conv1d, stride 1, zero padding `pad` on both sides (the decoder's only kind)."""

    def __init__(self, conv: nn.Conv1d):
        self.conv = conv
        self.span = (conv.kernel_size[0] - 1) * conv.dilation[0]  # inputs an output needs beyond the first
        self.pad = conv.padding[0]
        self.buf: torch.Tensor | None = None  # (B, C_in, <= span) inputs still needed

    def __call__(self, x: torch.Tensor, final: bool) -> torch.Tensor:
        c = self.conv
        if self.span == 0:
            return F.conv1d(x, c.weight, c.bias) if x.shape[-1] else x.new_zeros(x.shape[0], c.out_channels, 0)
        if self.buf is None:  # the left zero padding
            self.buf = x.new_zeros(x.shape[0], x.shape[1], self.pad)
        x = torch.cat([self.buf, x], dim=-1)
        if final:
            x = F.pad(x, (0, self.pad))
        n = x.shape[-1] - self.span  # outputs computable now
        self.buf = x[..., max(n, 0):]
        if n <= 0:
            return x.new_zeros(x.shape[0], c.out_channels, 0)
        return F.conv1d(x, c.weight, c.bias, dilation=c.dilation, groups=c.groups)

    @property
    def reach(self) -> int:  # after N inputs, outputs [0, N - pad) are final
        return self.span - self.pad


class _ConvTranspose:
    """ConvTranspose1d with kernel 2 * stride (output_padding 0): overlap-add across chunks."""

    def __init__(self, conv: nn.ConvTranspose1d):
        self.conv = conv
        self.stride, self.crop = conv.stride[0], conv.padding[0]
        self.tail: torch.Tensor | None = None  # (B, C_out, kernel - stride) partial sums of later outputs
        self.to_crop = self.crop  # the one-pass output drops `padding` samples at the start

    def __call__(self, x: torch.Tensor, final: bool) -> torch.Tensor:
        c, s = self.conv, self.stride
        if x.shape[-1]:
            y = F.conv_transpose1d(x, c.weight, None, stride=s)  # (B, C_out, m * s + kernel - s)
            if self.tail is not None:
                y[..., :self.tail.shape[-1]] += self.tail
            ready, self.tail = y[..., :x.shape[-1] * s], y[..., x.shape[-1] * s:]
        else:
            ready = x.new_zeros(x.shape[0], c.out_channels, 0)
        if final and self.tail is not None:
            ready = torch.cat([ready, self.tail[..., :self.tail.shape[-1] - self.crop]], dim=-1)
            self.tail = None
        if self.to_crop:
            cut = min(self.to_crop, ready.shape[-1])
            ready, self.to_crop = ready[..., cut:], self.to_crop - cut
        return ready + c.bias[:, None] if c.bias is not None else ready

    @property
    def reach(self) -> int:  # after N inputs, outputs [0, N * stride - crop) are final
        return self.crop


class _Pointwise:
    def __init__(self, fn):
        self.fn = fn
        self.reach = 0

    def __call__(self, x: torch.Tensor, final: bool) -> torch.Tensor:
        return self.fn(x)


class _Noise:
    """SNAC's NoiseBlock (x + randn(B, 1, T) * linear(x)). With a seed, each block draws from a generator
    of its own (a stream is reproducible and leaves torch's global RNG alone); without, from the global RNG."""

    def __init__(self, block: nn.Module, seed: int | None):
        self.weight, self.reach = block.linear.weight, 0
        self.generator = None if seed is None else torch.Generator(device=self.weight.device).manual_seed(seed)

    def __call__(self, x: torch.Tensor, final: bool) -> torch.Tensor:
        if not x.shape[-1]:
            return x
        noise = torch.randn((x.shape[0], 1, x.shape[-1]), generator=self.generator, device=x.device, dtype=x.dtype)
        return x + noise * F.conv1d(x, self.weight)


class _Chain:
    def __init__(self, ops: list):
        self.ops = ops

    def __call__(self, x: torch.Tensor, final: bool) -> torch.Tensor:
        for op in self.ops:
            x = op(x, final)
        return x

    @property
    def upsampling(self) -> int:
        return math.prod(getattr(op, "stride", 1) * getattr(op, "upsampling", 1) for op in self.ops)

    @property
    def reach(self) -> int:
        """After N inputs, outputs [0, N * upsampling - reach) are final: each op's shortfall, scaled by
        the up-sampling of the ops after it."""
        total, up = 0, 1
        for op in reversed(self.ops):
            inner_up = getattr(op, "upsampling", 1)
            total += op.reach * up  # op.reach is in op's output samples
            up *= getattr(op, "stride", 1) * inner_up
        return total


class _Residual:
    """x + branch(x), the branch lagging behind x: x waits in a queue until the branch catches up."""

    def __init__(self, branch: _Chain):
        self.branch = branch
        self.queue: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor, final: bool) -> torch.Tensor:
        self.queue = x if self.queue is None else torch.cat([self.queue, x], dim=-1)
        y = self.branch(x, final)
        n = y.shape[-1]
        out, self.queue = self.queue[..., :n] + y, self.queue[..., n:]
        return out

    @property
    def reach(self) -> int:
        return self.branch.reach


def supports(model: nn.Module) -> bool:
    """Whether `model` (a snac.SNAC) can be decoded incrementally."""
    try:
        _build(model.decoder.model, noise=False, seeds=None)
    except NotImplementedError:
        return False
    return True


def _build(module: nn.Module, noise: bool, seeds):
    """The incremental form of a decoder module; `seeds` (an iterator, or None) seeds the noise blocks."""
    from snac.layers import DecoderBlock, NoiseBlock, ResidualUnit, Snake1d, snake

    if isinstance(module, nn.Sequential):
        return _Chain([_build(m, noise, seeds) for m in module])
    if isinstance(module, DecoderBlock):
        return _build(module.block, noise, seeds)
    if isinstance(module, ResidualUnit):
        return _Residual(_build(module.block, noise, seeds))
    if isinstance(module, Snake1d):
        return _Pointwise(lambda x, alpha=module.alpha: snake(x, alpha))
    if isinstance(module, nn.Tanh):
        return _Pointwise(torch.tanh)
    if isinstance(module, NoiseBlock):
        return _Noise(module, next(seeds) if seeds else None) if noise else _Pointwise(lambda x: x)
    if isinstance(module, nn.Conv1d) and module.stride[0] == 1 and 2 * module.padding[0] == \
            (module.kernel_size[0] - 1) * module.dilation[0]:
        return _Conv(module)
    if isinstance(module, nn.ConvTranspose1d) and module.kernel_size[0] == 2 * module.stride[0] \
            and module.output_padding[0] == 0 and module.groups == 1:
        return _ConvTranspose(module)
    raise NotImplementedError(f"no incremental form for {type(module).__name__} (SNAC decoders with local "
                              "attention or odd up-sampling rates decode chunks with context instead)")


class IncrementalDecoder:
    """Feed SNAC codes chunk by chunk, get the waveform samples that became final.

    `feed(codes, final)` takes codes [(1, n), (1, 2n), (1, 4n)] of the next n frames (frame-aligned, as
    `frames_to_codes` gives them) and returns the (newly final) samples as a (1, 1, T) tensor; the call
    with final=True returns everything left (the one-pass decode's zero padding at the end).
    """

    def __init__(self, model: nn.Module, noise: bool = True, seed: int | None = None):
        self.model = model
        self.device = next(model.parameters()).device
        seeds = None if seed is None else itertools.count(seed)
        self.net = _build(model.decoder.model, noise, seeds)
        self.lag_samples = self.net.reach  # after n frames, samples [0, n * 2048 - lag) are final
        assert self.net.upsampling == SAMPLES_PER_LATENT, self.net.upsampling

    @torch.inference_mode()
    def feed(self, codes: list[torch.Tensor] | None, final: bool = False) -> torch.Tensor:
        if codes is None or codes[0].shape[-1] == 0:
            proj = self.model.quantizer.quantizers[0].out_proj
            z = proj.weight.new_zeros(1, proj.out_channels, 0)
        else:  # (1, D, 4n): frame-local, no state
            z = self.model.quantizer.from_codes([c.to(self.device) for c in codes])
        return self.net(z, final)
