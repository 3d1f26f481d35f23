"""The decode step's fast path on the CPU: the same blocks as `OmniLM.forward_hidden`, one new position
per batch row, computed with omnitalk's fused kernels (omnitalk/csrc/decode.cpp and gemv.cpp).

Per layer that is seven calls instead of ~45 PyTorch operators:

    n = rmsnorm(h)                      (the previous layer's add_rmsnorm already made it)
    qkv = gemv(n, W_attn, bias)         (B, (nh + 2 ng) hs)
    y = decode_attention(qkv, ...)      rotary, cache write, attention over the row's positions (B, nh hs)
    h, n = add_rmsnorm(h, gemv(y, W_proj), norm_2)
    h, n = add_rmsnorm(h, gemv(gemv_swiglu(n, W_fc1, W_fc2), W_mlp_proj), next norm_1 or ln_f)

Same arithmetic in fp32 as the module path (summation orders differ: float-rounding differences, as
for `gemv`). `hidden` returns None whenever the fast path does not apply — not on the CPU, activations
not fp32, gradients wanted, a linear layer of another kind, no cache, kernels not built — and the
caller runs the modules.
"""
from __future__ import annotations

import weakref

import torch

from omnitalk import kernels


def _linear_parts(mod) -> tuple | None:
    """(weight, scale or None, bias or None) of an omnitalk Linear / Int8Linear, else None."""
    from omnitalk.model.llm import Linear
    from omnitalk.quant import Int8Linear
    if type(mod) is Linear:
        w, s = mod.weight, None
    elif type(mod) is Int8Linear:
        w, s = mod.weight, mod.scales
    else:
        return None
    if w.dtype not in (torch.float32, torch.bfloat16, torch.int8) or not w.is_contiguous():
        return None
    b = mod.bias
    if b is not None and (b.dtype != torch.float32 or not b.is_contiguous()):
        return None
    return w, s, b


def _plan(lm, kv: list) -> list | None:
    """Per block (norm_1, norm_2, attn, proj, fc_1, fc_2, mlp proj parts), or None where a layer, the
    model's tables or the caches `kv` (one per layer) do not suit the kernels. Built once per set of
    caches (`setup_cache`, a scheduler's pool) and kept on the model with a weak reference to the first
    layer's cache: checking it is one comparison per step, and quantising or reloading the model before
    the next request's caches is picked up."""
    cached = lm.__dict__.get("_decode_plan")
    if cached is not None and cached[0]() is kv[0]:
        return cached[1]
    plan = []
    for blk in lm.transformer.h:
        parts = [_linear_parts(m) for m in (blk.attn.attn, blk.attn.proj, blk.mlp.fc_1, blk.mlp.fc_2, blk.mlp.proj)]
        norms = (blk.norm_1.weight, blk.norm_2.weight)
        if any(p is None for p in parts) or any(w.dtype != torch.float32 for w in norms) \
                or parts[2][0].dtype != parts[3][0].dtype or parts[2][0].shape != parts[3][0].shape:
            plan = None
            break
        plan.append((blk.norm_1, blk.norm_2, *parts))
    if any(t.dtype != torch.float32 for t in (lm.transformer.ln_f.weight, lm.rope_cos, lm.rope_sin)) \
            or any(c.k.dtype != torch.float32 or not c.k.is_contiguous() or not c.v.is_contiguous() for c in kv):
        plan = None
    lm.__dict__["_decode_plan"] = (weakref.ref(kv[0]), plan)
    return plan


def hidden(lm, x: torch.Tensor, pos, caches=None, rows=None) -> torch.Tensor | None:
    """x (B, 1, C) at pos (int, or (B,) per row) -> final hidden states (B, 1, C) after ln_f, or None."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or x.size(1) != 1 or lm.training:
        return None
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in lm.parameters())):
        return None
    if not kernels.available():
        return None
    B = x.size(0)
    if caches is None:
        kv = [blk.attn.kv_cache for blk in lm.transformer.h]
        if any(c is None for c in kv) or kv[0].k.size(0) < B:
            return None
        rows = torch.arange(B)
    else:
        kv = caches
        if rows is None:
            return None
        if isinstance(rows, slice):
            rows = torch.arange(rows.start, rows.stop)
    plan = _plan(lm, kv)
    if plan is None:
        return None
    pos = torch.full((B,), pos, dtype=torch.long) if isinstance(pos, int) else pos.to(torch.long)
    rows = rows.to(torch.long)
    cfg, ops = lm.cfg, torch.ops.omnitalk
    cos, sin = lm.rope_cos, lm.rope_sin
    h = x.reshape(B, x.size(-1)).contiguous()
    n = ops.rmsnorm(h, plan[0][0].weight, plan[0][0].eps)
    for i, (norm_1, norm_2, attn, proj, fc_1, fc_2, out) in enumerate(plan):
        qkv = ops.gemv(n, *attn)
        y = ops.decode_attention(qkv, cos, sin, kv[i].k, kv[i].v, rows, pos, cfg.n_head, cfg.n_query_groups)
        h, n = ops.add_rmsnorm(h, ops.gemv(y, *proj), norm_2.weight, norm_2.eps)
        nxt = plan[i + 1][0] if i + 1 < len(plan) else lm.transformer.ln_f
        m = ops.gemv(ops.gemv_swiglu(n, fc_1[0], fc_1[1], fc_2[0], fc_2[1]), *out)
        h, n = ops.add_rmsnorm(h, m, nxt.weight, nxt.eps)
    return n.view(B, 1, -1)
