"""Discriminators for codec training: the adversarial terms of HiFi-GAN / DAC, sized for a CPU.

A codec trained on spectral losses alone keeps the formants and loses the harmonics (docs/codec.md):
its voicing is noise-like. A discriminator that looks at the waveform by periods (the multi-period
discriminator of HiFi-GAN) and at linear-frequency spectrograms (the multi-resolution STFT discriminator
of UnivNet / DAC) penalises exactly that. Both are narrow here (16-64 channels instead of 32-1024).

Losses (least squares, as HiFi-GAN and DAC):
    discriminator:  sum_d mean((D_d(x) - 1)^2) + mean(D_d(G(z))^2)
    generator:      sum_d mean((D_d(G(z)) - 1)^2)                              adversarial
                    sum over d and layers of L1(features_d(G(z)), features_d(x))    feature matching
(sums, as both recipes weigh them: with a mean over the 32 feature maps the feature term is 32x weaker
against the mel term and a fine-tuning run barely moves the decoder.)
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

Logits = list[torch.Tensor]
Features = list[list[torch.Tensor]]


def _conv_stack(h: torch.Tensor, convs: nn.ModuleList, out: nn.Module) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Leaky-ReLU convolutions, each activation kept for feature matching; then the logit map."""
    feats = []
    for conv in convs:
        h = F.leaky_relu(conv(h), 0.1)
        feats.append(h)
    return out(h), feats


class PeriodDiscriminator(nn.Module):
    """The waveform folded by `period` (B, 1, T / p, p), 2-D convolutions along time only."""

    def __init__(self, period: int, channels: Sequence[int] = (16, 32, 64, 64)):
        super().__init__()
        self.period = period
        chans = [1, *channels]
        self.convs = nn.ModuleList(
            nn.Conv2d(a, b, (5, 1), (3, 1) if i < len(channels) - 1 else 1, padding=(2, 0))
            for i, (a, b) in enumerate(zip(chans, chans[1:])))
        self.out = nn.Conv2d(chans[-1], 1, (3, 1), padding=(1, 0))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:  # x (B, 1, T)
        pad = (-x.shape[-1]) % self.period
        x = F.pad(x, (0, pad), mode="reflect")
        return _conv_stack(x.reshape(x.shape[0], 1, -1, self.period), self.convs, self.out)  # (B, 1, T / p, p)


class SpectrogramDiscriminator(nn.Module):
    """Log-magnitude STFT (B, 1, frames, n_fft / 2 + 1), 2-D convolutions striding over frequency."""

    def __init__(self, n_fft: int, channels: int = 16, layers: int = 4):
        super().__init__()
        self.n_fft = n_fft
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        self.convs = nn.ModuleList(
            nn.Conv2d(1 if i == 0 else channels, channels, (3, 9), (1, 1 if i == 0 else 2), padding=(1, 4))
            for i in range(layers))
        self.out = nn.Conv2d(channels, 1, (3, 3), padding=(1, 1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:  # x (B, 1, T)
        spec = torch.stft(x[:, 0], self.n_fft, self.n_fft // 4, window=self.window, return_complex=True).abs()
        return _conv_stack(torch.log(spec.clamp_min(1e-5)).transpose(1, 2)[:, None], self.convs, self.out)  # (B, 1, frames, bins)


class CodecDiscriminator(nn.Module):
    """Multi-period (periods 2, 3, 5, 7, 11) + multi-resolution STFT (n_fft 512, 1024, 2048)."""

    def __init__(self, periods: Sequence[int] = (2, 3, 5, 7, 11), n_ffts: Sequence[int] = (512, 1024, 2048)):
        super().__init__()
        self.discriminators = nn.ModuleList([*(PeriodDiscriminator(p) for p in periods),
                                             *(SpectrogramDiscriminator(n) for n in n_ffts)])

    def forward(self, x: torch.Tensor) -> tuple[Logits, Features]:
        outs = [d(x) for d in self.discriminators]
        return [o for o, _ in outs], [f for _, f in outs]


def discriminator_loss(real: Logits, fake: Logits) -> torch.Tensor:
    return sum(torch.mean((r - 1) ** 2) + torch.mean(f ** 2) for r, f in zip(real, fake))


def generator_losses(fake: Logits, fake_feats: Features, real_feats: Features) -> tuple[torch.Tensor, torch.Tensor]:
    """(adversarial, feature matching); real_feats are treated as constants."""
    adversarial = sum(torch.mean((f - 1) ** 2) for f in fake)
    feature = sum(F.l1_loss(a, b.detach()) for fa, fb in zip(fake_feats, real_feats) for a, b in zip(fa, fb))
    return adversarial, feature
