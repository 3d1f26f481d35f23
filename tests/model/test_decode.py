"""The decode step's fused CPU path (omnitalk/model/decode.py, omnitalk/csrc/decode.cpp): the same hidden
states as the module path for fp32 and int8 weights, the pair's KVCache and the session's SlotCache
(slices and per-row positions), the ops against float64 formulas, and the cases where it steps aside."""
import math

import pytest
import torch

from omnitalk import kernels
from omnitalk.config import preset
from omnitalk.model import decode
from omnitalk.model.llm import OmniLM, apply_rope
from omnitalk.quant import quantize_lm

pytestmark = pytest.mark.skipif(not kernels.available(), reason="kernels not built: " + kernels.info())


def _lm(n_query_groups=2, bias=True, seed=0):
    cfg = preset("tiny", n_layer=3, n_embd=64, n_head=4, n_query_groups=n_query_groups, head_size=16,
                 intermediate_size=96, add_qkv_bias=bias, block_size=64)
    torch.manual_seed(seed)
    lm = OmniLM(cfg).eval()
    with torch.no_grad():
        for p in lm.parameters():
            p.normal_(0, 0.3)
        for blk in lm.transformer.h:  # norms away from 1, so a wrong weight would show
            blk.norm_1.weight.uniform_(0.5, 1.5)
            blk.norm_2.weight.uniform_(0.5, 1.5)
    return lm


def _steps(lm, fused: bool, B=2, prompt=5, n=6, seed=1):
    """Prefill `prompt` columns through the modules, then n decode steps; hidden states of the steps."""
    gen = torch.Generator().manual_seed(seed)
    C = lm.cfg.n_embd
    xs = torch.randn(B, prompt + n, C, generator=gen)
    lm.setup_cache(B, prompt + n)
    out = []
    with torch.inference_mode():
        lm.forward_hidden(xs[:, :prompt], 0)
        for t in range(prompt, prompt + n):
            if fused:
                h = decode.hidden(lm, xs[:, t:t + 1], t)
                assert h is not None, "the fused path stepped aside"
            else:
                h = _module_path(lm, xs[:, t:t + 1], t)
            out.append(h)
    lm.clear_cache()
    return torch.cat(out, 1)


def _module_path(lm, *args):
    """forward_hidden with the fast path turned off."""
    orig = decode.hidden
    decode.hidden = lambda *a, **k: None
    try:
        return lm.forward_hidden(*args)
    finally:
        decode.hidden = orig


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_fused_matches_modules_fp32(groups):
    lm = _lm(n_query_groups=groups, bias=groups != 4)
    ref, got = _steps(lm, fused=False), _steps(lm, fused=True)
    assert got.shape == ref.shape == (2, 6, 64)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_fused_matches_modules_int8():
    lm = _lm()
    quantize_lm(lm, "int8")
    ref, got = _steps(lm, fused=False), _steps(lm, fused=True)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_quantising_between_requests_is_picked_up():
    """The layer plan is kept per set of caches: after quantisation the next request's caches rebuild it."""
    lm = _lm()
    _steps(lm, fused=True)
    quantize_lm(lm, "int8")
    ref, got = _steps(lm, fused=False), _steps(lm, fused=True)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_forward_hidden_takes_the_fused_path_for_one_column(monkeypatch):
    lm = _lm()
    seen = []
    orig = decode.hidden
    monkeypatch.setattr(decode, "hidden", lambda lm_, x, *a: seen.append(x.size(1)) or orig(lm_, x, *a))
    lm.setup_cache(2, 8)
    with torch.inference_mode():
        lm.forward_hidden(torch.randn(2, 3, 64), 0)          # prefill: the modules
        h = lm.forward_hidden(torch.randn(2, 1, 64), 3)      # a decode step: the fused path
    assert seen == [1] and h.shape == (2, 1, 64)


def test_slot_cache_slices_and_per_row_positions():
    """Continuous batching: rows of a pool at their own positions, through SlotCache."""
    lm = _lm()
    gen = torch.Generator().manual_seed(3)
    C = lm.cfg.n_embd
    prompts = {0: torch.randn(1, 4, C, generator=gen), 3: torch.randn(1, 7, C, generator=gen)}
    steps = torch.randn(2, 1, C, generator=gen)
    results = []
    for fused in (False, True):
        caches = lm.slot_caches(5, 16)
        with torch.inference_mode():
            for r, p in prompts.items():
                lm.forward_hidden(p, 0, caches, torch.tensor([r]))
            rows, pos = torch.tensor([0, 3]), torch.tensor([4, 7])
            if fused:
                h = decode.hidden(lm, steps, pos, caches, rows)
                assert h is not None
            else:
                h = _module_path(lm, steps, pos, caches, rows)
        results.append((h, caches[1].k.clone(), caches[1].v.clone()))
    (h0, k0, v0), (h1, k1, v1) = results
    torch.testing.assert_close(h1, h0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k1, k0, rtol=1e-4, atol=1e-5)   # the new keys / values were written alike
    torch.testing.assert_close(v1, v0, rtol=1e-4, atol=1e-5)


def test_rmsnorm_ops_against_float64():
    gen = torch.Generator().manual_seed(0)
    x, r, w = torch.randn(3, 100, generator=gen), torch.randn(3, 100, generator=gen), torch.rand(100, generator=gen)
    ref = lambda h: (h.double() * torch.rsqrt(h.double().pow(2).mean(-1, keepdim=True) + 1e-6) * w.double())
    torch.testing.assert_close(torch.ops.omnitalk.rmsnorm(x, w, 1e-6).double(), ref(x), rtol=1e-5, atol=1e-6)
    h, n = torch.ops.omnitalk.add_rmsnorm(x, r, w, 1e-6)
    torch.testing.assert_close(h, x + r)
    torch.testing.assert_close(n.double(), ref(x + r), rtol=1e-5, atol=1e-6)


def test_gemv_bias_and_swiglu_against_float64():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 203, generator=gen)
    for dtype in (torch.float32, torch.bfloat16, torch.int8):
        mk = (lambda: torch.randint(-127, 128, (37, 203), dtype=torch.int8, generator=gen)) if dtype == torch.int8 \
            else (lambda: torch.randn(37, 203, generator=gen).to(dtype))
        w1, w2, s1, s2, b = mk(), mk(), torch.rand(37, generator=gen), torch.rand(37, generator=gen), torch.randn(37, generator=gen)
        a = x.double() @ (w1.double() * s1.double()[:, None]).T
        u = x.double() @ (w2.double() * s2.double()[:, None]).T
        got = torch.ops.omnitalk.gemv_swiglu(x, w1, s1, w2, s2)
        torch.testing.assert_close(got.double(), a * torch.sigmoid(a) * u, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(torch.ops.omnitalk.gemv(x, w1, s1, b).double(), a + b.double(), rtol=1e-4, atol=1e-4)


def test_decode_attention_against_the_formula():
    """Two rows at different positions, GQA: rotary, cache write, softmax attention — in float64."""
    gen = torch.Generator().manual_seed(0)
    nh, ng, hs, R, L = 4, 2, 16, 3, 10
    qpg = nh // ng
    k = torch.randn(R, ng, L, hs, generator=gen)
    v = torch.randn(R, ng, L, hs, generator=gen)
    k0, v0 = k.clone(), v.clone()
    theta = 1.0 / 10000 ** (torch.arange(0, hs, 2, dtype=torch.float32) / hs)
    ang = torch.outer(torch.arange(32, dtype=torch.float32), theta).repeat(1, 2)
    cos, sin = ang.cos(), ang.sin()
    qkv = torch.randn(2, (nh + 2 * ng) * hs, generator=gen)
    rows, pos = torch.tensor([2, 0]), torch.tensor([5, 8])
    y = torch.ops.omnitalk.decode_attention(qkv, cos, sin, k, v, rows, pos, nh, ng)
    assert y.shape == (2, nh * hs)
    g = qkv.view(2, ng, qpg + 2, hs)
    for b in range(2):
        r, p = int(rows[b]), int(pos[b])
        c, s = cos[p:p + 1], sin[p:p + 1]
        kn = apply_rope(g[b, :, qpg][:, None], c, s)[:, 0]            # (ng, hs)
        torch.testing.assert_close(k[r, :, p], kn, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(v[r, :, p], g[b, :, qpg + 1])
        for h in range(nh):
            q = apply_rope(g[b, h // qpg, h % qpg][None], c, s)[0].double()
            keys, vals = k[r, h // qpg, :p + 1].double(), v[r, h // qpg, :p + 1].double()
            att = torch.softmax(keys @ q / math.sqrt(hs), 0) @ vals
            torch.testing.assert_close(y[b, h * hs:(h + 1) * hs].double(), att, rtol=1e-5, atol=1e-6)
    other = torch.ones(R, dtype=torch.bool)
    other[rows] = False
    assert torch.equal(k[other], k0[other]) and torch.equal(v[other], v0[other])   # other rows untouched
    with pytest.raises(RuntimeError, match="outside the cache"):
        torch.ops.omnitalk.decode_attention(qkv, cos, sin, k, v, rows, torch.tensor([5, L]), nh, ng)


def test_steps_aside():
    lm = _lm()
    x = torch.randn(2, 1, 64)
    with torch.inference_mode():
        assert decode.hidden(lm, x, 0) is None                        # no cache set up
        lm.setup_cache(2, 8)
        assert decode.hidden(lm, x.bfloat16(), 0) is None             # bf16 activations: the modules
        assert decode.hidden(lm, torch.randn(2, 2, 64), 0) is None   # two columns: a prefill
        assert decode.hidden(lm, x, 0) is not None
    lm.train()
    assert decode.hidden(lm, x, 0) is None                            # training: autograd through modules


_CHILD = """
import sys, torch
sys.path.insert(0, {here!r})
import test_decode as t
from omnitalk import kernels
print(kernels.info())
lm = t._lm(n_query_groups=2)
torch.testing.assert_close(t._steps(lm, fused=True), t._steps(lm, fused=False), rtol=1e-5, atol=1e-5)
print("ok")
"""


def test_avx2_bodies():
    """The plain bodies (what an AVX2-only CPU runs: dot products, norms, attention) give the same states."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, OMNITALK_KERNELS_ISA="avx2")
    code = _CHILD.format(here=str(Path(__file__).parent))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["omnitalk", "kernels:", "gemv", "(avx2)", "ok"]
