"""Our CPU kernels: a few activation rows times a weight matrix, streaming each weight row once, for
fp32, bf16 and int8 weights (omnitalk/csrc/gemv.cpp), and the small operations of a decode step fused
into one call each (omnitalk/csrc/decode.cpp; used by omnitalk.model.decode).

They are compiled on first use with PyTorch's C++ extension builder (g++ and ninja) into PyTorch's
extension cache (`$TORCH_EXTENSIONS_DIR`, default `~/.cache/torch_extensions`); later processes load the
built library in milliseconds. Where they cannot be built (no compiler, no AVX2) or are turned off with
`OMNITALK_KERNELS=0`, `gemv` returns None and callers use PyTorch's own operators: same results up to
float rounding, only slower.
"""
from __future__ import annotations

import logging
import os
import shutil
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

MAX_ROWS = 16  # above this many activation rows a real GEMM (MKL / oneDNN) is the better kernel
_SOURCES = [Path(__file__).parent / "csrc" / name for name in ("gemv.cpp", "decode.cpp")]
_lock = threading.Lock()
_state: dict = {}


def _build() -> bool:
    if os.environ.get("OMNITALK_KERNELS", "1").strip().lower() in ("0", "false", "off", "no"):
        _state["why"] = "turned off by OMNITALK_KERNELS=0"
        return False
    try:
        from torch.utils.cpp_extension import load
        if shutil.which("ninja") is None:  # the `ninja` wheel's binary, when its venv is not on PATH
            import ninja
            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        load(name="omnitalk_gemv", sources=[str(p) for p in _SOURCES], extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"],
             is_python_module=False,
             verbose=False)
        isa = torch.ops.omnitalk.isa()
        if isa == "none":
            _state["why"] = "this CPU has no AVX2/FMA"
            return False
        _state["isa"] = isa
        return True
    except Exception as e:  # no compiler, no ninja, a read-only cache: fall back, say why once
        _state["why"] = f"could not be built ({type(e).__name__}: {str(e).strip().splitlines()[-1][:200]})"
        log.warning("omnitalk's CPU kernels %s: decode steps use PyTorch's operators (2-3x slower). Install "
                    "a C++ compiler (Debian: apt-get install g++) to build them, or set OMNITALK_KERNELS=0 "
                    "to skip them", _state["why"])
        return False


def available() -> bool:
    """Build / load the kernels once per process; True when torch.ops.omnitalk.gemv can be used."""
    ok = _state.get("ok")
    if ok is None:
        with _lock:
            if "ok" not in _state:
                _state["ok"] = _build()
            ok = _state["ok"]
    return ok


def info() -> str:
    """One line for `omnitalk info` / the bench header."""
    if not available():
        return f"omnitalk kernels: off ({_state.get('why', '?')})"
    act = ", int8 x 8-bit activations (vnni)" if torch.ops.omnitalk.int8_activations() else ""
    return f"omnitalk kernels: gemv ({_state['isa']}{act})"


def int8_activations() -> bool:
    """Whether int8 weights meet 8-bit activations (blocks of 64, AVX-512 VNNI) in `gemv`: the default
    where the CPU has VNNI; OMNITALK_INT8_ACT=0 keeps fp32 activations (docs/performance.md has the cost)."""
    return available() and bool(torch.ops.omnitalk.int8_activations())


def set_int8_activations(on: bool) -> bool:
    """Turn 8-bit activations for int8 weights on or off for this process; returns the previous setting."""
    if not available():
        return False
    return bool(torch.ops.omnitalk.set_int8_activations(bool(on)))


def native_bf16(device: torch.device | str = "cpu") -> bool:
    """Whether bf16 matrix products are fast here: CUDA, or a CPU with AVX512-BF16 / AMX (Linux flags)."""
    device = torch.device(device)
    if device.type == "cuda":
        return True
    if device.type != "cpu":
        return False
    if "cpu_bf16" not in _state:
        try:
            with open("/proc/cpuinfo") as f:
                flags = next((line for line in f if line.startswith("flags")), "").split()
        except OSError:
            flags = []
        _state["cpu_bf16"] = "avx512_bf16" in flags or "amx_bf16" in flags
    return _state["cpu_bf16"]


_scratch = threading.local()


def dequant_bf16(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor | None:
    """int8 (N, K) * scale (N,) -> bf16 (N, K) in one pass (the weights of a prefill GEMM), or None.

    The result lives in a per-thread scratch buffer that the next call overwrites: use it at once."""
    if q.device.type != "cpu" or q.dtype != torch.int8 or not q.is_contiguous() or not available():
        return None
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.numel() < q.numel():
        buf = _scratch.buf = torch.empty(q.numel(), dtype=torch.bfloat16)
    return torch.ops.omnitalk.dequant_bf16(q, scale, buf)


def gemv(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor | None:
    """x (..., K) float, w (N, K) fp32 / bf16 / int8 -> (..., N) fp32 = x @ (w * scale[:, None]).T,
    or None where the kernel does not apply (not on the CPU, too many rows, gradients wanted, not built)."""
    if x.device.type != "cpu" or w.device.type != "cpu" or not w.is_contiguous() or w.dim() != 2:
        return None
    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad):  # inference-only kernel
        return None
    rows = x.numel() // x.shape[-1]
    if rows > MAX_ROWS or w.dtype not in (torch.float32, torch.bfloat16, torch.int8) or not available():
        return None
    x2 = x.reshape(rows, x.shape[-1])
    if x2.dtype != torch.float32 or not x2.is_contiguous():
        x2 = x2.float().contiguous()
    y = torch.ops.omnitalk.gemv(x2, w, scale)
    return y.reshape(*x.shape[:-1], w.shape[0])
