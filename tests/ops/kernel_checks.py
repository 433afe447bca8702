"""Comparison helpers shared by the Triton interpreter tests of this folder (kernel output vs reference op)."""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest
import torch

BF16_REL = 2.0**-7  # one bf16 ulp, relative (interpreter stores truncate; the math differs in the fp32 ulps)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Max abs error relative to the largest reference magnitude."""
    out, ref = out.float(), ref.float()
    return ((out - ref).abs().max() / ref.abs().max().clamp(min=1e-30)).item()


def check(out: torch.Tensor, ref: torch.Tensor, tol: float = 1e-5) -> None:
    """Same shape and dtype, non-finite values at the same places (and equal there); bf16 outputs within
    one bf16 ulp of each element, others within ``tol`` of the largest reference magnitude."""
    assert out.shape == ref.shape and out.dtype == ref.dtype, (out.shape, out.dtype, ref.shape, ref.dtype)
    assert bool((torch.isfinite(out.float()) == torch.isfinite(ref.float())).all())
    if ref.dtype == torch.bfloat16:
        err = (out.float() - ref.float()).abs()
        bound = BF16_REL * ref.float().abs() + 1e-6 * ref.float().abs().max()
        assert bool((err <= bound).all()), f"max bf16 excess {(err - bound).max().item()}"
    else:
        fin = torch.isfinite(ref)
        assert bool((out[~fin] == ref[~fin]).all())
        assert rel(out[fin], ref[fin]) <= tol, rel(out[fin], ref[fin])


def interpreted_triton_kernels() -> ModuleType:
    """``dsv4c.ops.triton_kernels`` with its kernels under Triton's interpreter (TRITON_INTERPRET=1 is set
    here when no GPU is present), or a skip of the calling test module. Call it before anything in the
    module imports triton."""
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    pytest.importorskip("triton")
    from dsv4c.ops import library  # noqa: F401,PLC0415  (registers torch.ops.dsv4.*)
    from dsv4c.ops import triton_kernels as tk  # noqa: PLC0415

    if not tk.INTERPRET and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        tk = importlib.reload(tk)  # imported earlier without the interpreter: rebuild the kernels interpreted
    if not tk.INTERPRET:
        pytest.skip("set TRITON_INTERPRET=1 to check the Triton kernels on CPU (GPU: benchmarks/gpu_suite.py)",
                    allow_module_level=True)
    return tk
