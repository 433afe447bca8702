"""Small helpers shared by the test suite and the benchmarks (fresh caches, relative error)."""

from __future__ import annotations

import torch

from .layout import cache_tensors
from .spec import ModelSpec


def new_cache(spec: ModelSpec, batch: int, max_seq_len: int, dtype: torch.dtype,
              storage: str = "dense") -> dict[str, torch.Tensor]:
    """A zeroed KV cache for ``batch`` sequences (the layout the step function and the runtime use);
    ``storage`` as in ``dsv4c.layout.cache_tensors`` (pass the StepContext's ``kv_storage``)."""
    return {k: torch.zeros(t.shape, dtype=t.dtype)
            for k, t in cache_tensors(spec, batch, max_seq_len, dtype, storage=storage).items()}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in fp32."""
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def one_ulp_moved(t: torch.Tensor, fraction: float, gen: torch.Generator) -> torch.Tensor:
    """A copy of bf16 ``t`` with about ``fraction`` of its entries moved by one bf16 ulp (x (1 +- 2^-8)), up or
    down at random: the input change against which a model's sensitivity to rounding is measured."""
    flip = torch.rand(t.shape, generator=gen, device=t.device) < fraction
    sign = torch.where(torch.rand(t.shape, generator=gen, device=t.device) < 0.5, -1.0, 1.0)
    out = t.clone()
    out[flip] = (t.float() * (1 + sign * 2.0 ** -8))[flip].to(t.dtype)
    return out
