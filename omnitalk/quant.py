"""Weight-only int8 quantisation (per output channel / per embedding row) and bf16 for the LLM.

int8 weights are read once per step by omnitalk's CPU kernel (`omnitalk.kernels.gemv`: int8 widened to
fp32 in registers, fp32 activations and sums, one scale per output row) or, where it is not built, by
`torch._weight_int8pack_mm` (bf16 activations), so a decode step moves ~1/4 of the fp32 bytes. Norms,
activations and the KV cache are fp32.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from omnitalk import kernels

MODES = ("fp32", "bf16", "int8")


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float -> int8 (N, K) and scales (N,) with w ~= q * scale[:, None] (symmetric, per row)."""
    w = w.float()
    scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


def int8_matmul(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x (..., K) @ (q * scales).T -> (..., N) in x's dtype."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.size(0) > kernels.MAX_ROWS:  # prefill: a GEMM's job. Where bf16 is native (AMX / AVX512-BF16)
        # dequantise to bf16 and let oneDNN multiply: ~4x the fp32 GEMM there; elsewhere fp32
        dt = torch.bfloat16 if x2.device.type == "cpu" and kernels.native_bf16() else x2.dtype
        w = kernels.dequant_bf16(q, scales) if dt == torch.bfloat16 else None
        w = q.to(dt) * scales.to(dt)[:, None] if w is None else w
        y = F.linear(x2.to(dt), w).to(x.dtype)
    elif torch.compiler.is_compiling() or x2.device.type == "cuda":
        # CUDA, and any device under torch.compile (omnitalk's kernel is not traceable): dequantise on the
        # fly, which inductor fuses into the matmul's reads
        y = F.linear(x2, q.to(x2.dtype)) * scales.to(x2.dtype)
    elif (y := kernels.gemv(x2, q, scales)) is not None:  # omnitalk's CPU kernel: fp32 sums
        y = y.to(x.dtype)
    else:  # CPU without omnitalk's kernel, MPS
        y = torch._weight_int8pack_mm(x2.to(torch.bfloat16), q, scales.to(torch.bfloat16)).to(x.dtype)
    return y.reshape(*shape[:-1], q.size(0))


class Int8Linear(nn.Module):
    def __init__(self, linear: nn.Linear | None = None, *, out_features=0, in_features=0, bias=False):
        super().__init__()
        if linear is not None:
            q, s = quantize_rows(linear.weight.detach())
            out_features, in_features = q.shape
            bias = linear.bias is not None
        else:
            q, s = torch.zeros(out_features, in_features, dtype=torch.int8), torch.ones(out_features)
        self.register_buffer("weight", q)
        self.register_buffer("scales", s.to(torch.bfloat16))
        self.register_buffer("bias", linear.bias.detach().float().clone()
                             if linear is not None and bias else (torch.zeros(out_features) if bias else None))
        self.in_features, self.out_features = in_features, out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = int8_matmul(x, self.weight, self.scales)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def logits(self, h: torch.Tensor, rows: slice) -> torch.Tensor:
        """An untied output head's rows `rows` only (OmniLM._head)."""
        return int8_matmul(h, self.weight[rows], self.scales[rows])


class Int8Embedding(nn.Module):
    """Embedding table in int8 with one scale per row; also serves as the tied output head."""

    def __init__(self, emb: nn.Embedding | None = None, *, num=0, dim=0):
        super().__init__()
        if emb is not None:
            q, s = quantize_rows(emb.weight.detach())
        else:
            q, s = torch.zeros(num, dim, dtype=torch.int8), torch.ones(num)
        self.register_buffer("weight", q)
        self.register_buffer("scales", s.to(torch.bfloat16))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight[ids].float() * self.scales[ids].float().unsqueeze(-1)

    def logits(self, h: torch.Tensor, rows: slice) -> torch.Tensor:
        return int8_matmul(h, self.weight[rows], self.scales[rows])


@torch.no_grad()
def quantize_lm(lm, mode: str):
    """Convert an OmniLM in place: 'bf16' casts weights, 'int8' swaps every Linear and the embedding."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; use one of {MODES}")
    if mode == "fp32":
        return lm
    if mode == "bf16":
        return lm.to(torch.bfloat16)
    tied = lm.cfg.tie_word_embeddings
    for name, module in list(lm.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and not (tied and child is lm.lm_head):
                setattr(module, child_name, Int8Linear(child))  # an untied head too
    lm.transformer.wte = Int8Embedding(lm.transformer.wte)
    if tied:
        del lm.lm_head  # the head is the (quantised) embedding table
        lm.lm_head = None
    return fp32_norms(lm)


def fp32_norms(lm):
    """int8 mode computes in fp32 (the kernel widens the weights): norms, hence activations and KV cache,
    are fp32. int8 files written before this rule carry bf16 norms; loading converts them."""
    for m in lm.modules():
        if hasattr(m, "eps"):
            m.weight.data = m.weight.data.float()
    return lm
