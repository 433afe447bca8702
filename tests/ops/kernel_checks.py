"""Comparison helpers shared by the Triton interpreter tests of this folder (kernel output vs reference op)."""

from __future__ import annotations

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
