"""omnitalk's CPU gemv kernel (omnitalk/csrc/gemv.cpp): values against float64 products for every weight
dtype, row count and ISA body, the cases where it must step aside, and its argument checks."""
import os
import subprocess
import sys

import pytest
import torch

from omnitalk import kernels

pytestmark = pytest.mark.skipif(not kernels.available(), reason="kernels not built: " + kernels.info())


def _weights(dtype, n, k, gen):
    if dtype == torch.int8:
        return torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
    return torch.randn(n, k, generator=gen).to(dtype)


def _reference(x, w, scale=None):
    y = x.double() @ w.double().T
    return y if scale is None else y * scale.double()


@pytest.fixture
def fp32_activations():
    """int8 weights with fp32 activations (the 8-bit-activation path has its own tests below)."""
    prev = kernels.set_int8_activations(False)
    yield
    kernels.set_int8_activations(prev)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 9, 16])
def test_gemv_matches_float64(dtype, rows, fp32_activations):
    gen = torch.Generator().manual_seed(rows)
    # K not a multiple of 16 or 8 (the scalar tail), N not a multiple of the row block
    for n, k in [(1163, 896), (37, 203), (5, 8)]:
        x, w = torch.randn(rows, k, generator=gen), _weights(dtype, n, k, gen)
        scale = torch.rand(n, generator=gen) + 0.5
        for s in (None, scale, scale.bfloat16()):
            y = kernels.gemv(x, w, s)
            assert y.dtype == torch.float32 and y.shape == (rows, n)
            ref = _reference(x, w, None if s is None else s.float())
            err = (y.double() - ref).abs().max() / ref.abs().max()
            assert err < 2e-6, (dtype, rows, n, k, err.item())


def _q8_reference(x, q, scale):
    """The 8-bit-activation product in float64: x quantised per block of 64 (scale = amax / 127, round
    half to even, |q| <= 127), exact integer block dot products, block scale, then the row scale."""
    M, K = x.shape
    xb = x.double().view(M, K // 64, 64)
    amax = xb.abs().amax(-1, keepdim=True)
    xq = torch.where(amax > 0, torch.round(xb * (127 / amax)), torch.zeros_like(xb)).clamp(-127, 127)
    d = torch.einsum("mbk,nbk->mnb", xq, q.double().view(q.shape[0], K // 64, 64))
    return (d * (amax.squeeze(-1) / 127)[:, None, :]).sum(-1) * scale.double()[None]


vnni = pytest.mark.skipif(not kernels.int8_activations(), reason="no AVX-512 VNNI (or OMNITALK_INT8_ACT=0)")


@vnni
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 9, 16])
def test_int8_weights_with_8bit_activations(rows):
    """K a multiple of 64: the VNNI path equals its float64 definition to float rounding, stays within
    the activation quantisation's error of the fp32-activation product, and takes a zero block."""
    gen = torch.Generator().manual_seed(rows)
    for n, k in [(1163, 896), (37, 4864), (5, 64)]:
        x = torch.randn(rows, k, generator=gen) * (torch.rand(k, generator=gen) * 8)  # uneven channels
        x[:, k - 64:] = 0 if k > 64 else x[:, k - 64:]                                 # an all-zero block
        q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
        scale = (torch.rand(n, generator=gen) * 0.02).bfloat16()
        y = kernels.gemv(x, q, scale)
        ref = _q8_reference(x, q, scale.float())
        assert ((y.double() - ref).abs().max() / ref.abs().max()) < 2e-6, (rows, n, k)
        full = _reference(x, q, scale.float())
        assert ((y.double() - full).abs().max() / full.abs().max()) < 0.03, (rows, n, k)
    # K not a multiple of 64: fp32 activations, as before
    x, q = torch.randn(rows, 203, generator=gen), torch.randint(-127, 128, (9, 203), dtype=torch.int8, generator=gen)
    ref = _reference(x, q)
    assert ((kernels.gemv(x, q).double() - ref).abs().max() / ref.abs().max()) < 2e-6


@vnni
def test_8bit_activations_swiglu_and_switch():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 896, generator=gen)
    w1, w2 = (torch.randint(-127, 128, (300, 896), dtype=torch.int8, generator=gen) for _ in range(2))
    s1, s2 = (torch.rand(300, generator=gen) * 0.01 for _ in range(2))
    y = torch.ops.omnitalk.gemv_swiglu(x, w1, s1, w2, s2)
    g, u = _q8_reference(x, w1, s1), _q8_reference(x, w2, s2)
    ref = torch.nn.functional.silu(g) * u
    assert ((y.double() - ref).abs().max() / ref.abs().max()) < 2e-6
    assert kernels.set_int8_activations(False) is True and not kernels.int8_activations()
    try:
        full = _reference(x, w1, s1)
        assert ((kernels.gemv(x, w1, s1).double() - full).abs().max() / full.abs().max()) < 2e-6
    finally:
        assert kernels.set_int8_activations(True) is False
    assert "int8 x 8-bit activations (vnni)" in kernels.info()


def test_gemv_shapes_slices_and_other_input_dtypes():
    gen = torch.Generator().manual_seed(0)
    table = torch.randn(300, 64, generator=gen)
    h = torch.randn(2, 1, 64, generator=gen).bfloat16()      # (B, T, C) bf16 activations
    y = kernels.gemv(h, table[100:250])                        # a row slice of the tied head
    assert y.shape == (2, 1, 150)
    torch.testing.assert_close(y, (h.float() @ table[100:250].T), rtol=1e-5, atol=1e-5)


def test_gemv_steps_aside():
    w = torch.randn(16, 32)
    assert kernels.gemv(torch.randn(kernels.MAX_ROWS + 1, 32), w) is None      # a GEMM's job
    assert kernels.gemv(torch.randn(2, 32, requires_grad=True), w) is None      # training: autograd
    assert kernels.gemv(torch.randn(2, 32), w.T) is None                        # not contiguous
    assert kernels.gemv(torch.randn(2, 32), w.half()) is None                   # no fp16 body
    with torch.no_grad():
        assert kernels.gemv(torch.randn(2, 32, requires_grad=True), w) is not None


def test_gemv_argument_errors_name_the_problem():
    x = torch.randn(2, 32)
    with pytest.raises(RuntimeError, match="w must be a contiguous .N, K. tensor with K = x.size.1."):
        torch.ops.omnitalk.gemv(x, torch.randn(16, 31))
    with pytest.raises(RuntimeError, match="x must be a contiguous fp32"):
        torch.ops.omnitalk.gemv(x.double(), torch.randn(16, 32))
    with pytest.raises(RuntimeError, match="weights must be fp32, bf16 or int8"):
        torch.ops.omnitalk.gemv(x, torch.randn(16, 32).half())
    with pytest.raises(RuntimeError, match="scale must be a contiguous fp32 or bf16 .N,. tensor"):
        torch.ops.omnitalk.gemv(x, torch.randn(16, 32), torch.ones(15))


_CHILD = """
import torch
from omnitalk import kernels
print(kernels.info())
gen = torch.Generator().manual_seed(1)
for dtype in (torch.float32, torch.bfloat16, torch.int8):
    for rows in (1, 2, 3, 5, 8):
        x = torch.randn(rows, 203, generator=gen)
        w = (torch.randint(-127, 128, (77, 203), generator=gen, dtype=torch.int8) if dtype == torch.int8
             else torch.randn(77, 203, generator=gen).to(dtype))
        s = torch.rand(77, generator=gen)
        y = kernels.gemv(x, w, s)
        ref = (x.double() @ w.double().T) * s.double()
        assert ((y.double() - ref).abs().max() / ref.abs().max()) < 2e-6, (dtype, rows)
print("ok")
"""


def test_avx2_bodies_and_the_off_switch():
    """The AVX2 bodies (what an AVX2-only CPU runs) give the same values; OMNITALK_KERNELS=0 turns the
    kernels off and says so."""
    env = dict(os.environ, OMNITALK_KERNELS_ISA="avx2")
    out = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["omnitalk", "kernels:", "gemv", "(avx2)", "ok"]
    env = dict(os.environ, OMNITALK_KERNELS="0")
    code = "from omnitalk import kernels; import torch; print(kernels.info()); " \
           "print(kernels.gemv(torch.randn(2, 8), torch.randn(4, 8)))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.stdout.splitlines() == ["omnitalk kernels: off (turned off by OMNITALK_KERNELS=0)", "None"]


def test_dequant_bf16_rounds_like_torch_and_reuses_its_buffer():
    """int8 * scale -> bf16 in one pass equals torch's fp32 product rounded to bf16, bit for bit (odd K:
    the scalar tail), and successive calls write into one per-thread buffer."""
    gen = torch.Generator().manual_seed(3)
    for n, k in [(100, 903), (7, 16), (3, 5)]:
        q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
        s = torch.rand(n, generator=gen) + 0.01
        for scale in (s, s.bfloat16()):
            want = (q.float() * scale.float()[:, None]).bfloat16()
            got = kernels.dequant_bf16(q, scale)
            assert got.dtype == torch.bfloat16 and got.shape == (n, k) and torch.equal(got, want)
    a = kernels.dequant_bf16(torch.ones(4, 8, dtype=torch.int8), torch.ones(4))
    b = kernels.dequant_bf16(torch.ones(2, 8, dtype=torch.int8), torch.full((2,), 2.0))
    assert a.data_ptr() == b.data_ptr() and torch.equal(b, torch.full((2, 8), 2.0, dtype=torch.bfloat16))
    assert kernels.dequant_bf16(torch.ones(2, 8), torch.ones(2)) is None    # not int8: the caller's job
