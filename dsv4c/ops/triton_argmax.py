"""The greedy tail's argmax over the vocabulary in one Triton launch.

A decode step chained on the device (``CudaGraphDecode.greedy``) ends with the argmax of its logits
[B, vocab]: a single long row at batch 1 (129280 entries for the Flash vocabulary). Here ``(B, P)`` programs
each reduce a CHUNK-wide slice of a row to its (max, first index) pair, and the last program of the row to
arrive (an arrival counter, as in the split-K GEMVs) picks among the P pairs in slice order, so the result
does not depend on timing. Ties go to the smallest index, as ``torch.argmax``; a NaN counts as +inf.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .triton_kernels import HAVE_TRITON, INTERPRET, TUNE, _counters, pdl_kwargs

CHUNK = 4096  # entries per program

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from .triton_kernels import _pdl_begin

    @triton.jit
    def _argmax_kernel(x_ptr, pv_ptr, pi_ptr, cnt_ptr, o_ptr, V, SX, P: tl.constexpr, PP: tl.constexpr,
                       CHUNK: tl.constexpr, PDL: tl.constexpr = False):
        _pdl_begin(PDL)
        row = tl.program_id(0)
        p = tl.program_id(1)
        offs = p * CHUNK + tl.arange(0, CHUNK)
        v = tl.load(x_ptr + row.to(tl.int64) * SX + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        v = tl.where(v != v, float("inf"), v)
        m = tl.max(v, axis=0)
        i = tl.min(tl.where(v == m, offs, V), axis=0)  # the first index of the slice's max
        tl.store(pv_ptr + row * P + p, m)
        tl.store(pi_ptr + row * P + p, i)
        tl.debug_barrier()
        prev = tl.atomic_add(cnt_ptr + row, 1, sem="acq_rel", scope="gpu")
        if prev == P - 1:
            j = tl.arange(0, PP)
            pv = tl.load(pv_ptr + row * P + j, mask=j < P, other=float("-inf"), cache_modifier=".cg")
            pi = tl.load(pi_ptr + row * P + j, mask=j < P, other=V, cache_modifier=".cg")
            best = tl.max(pv, axis=0)
            tl.store(o_ptr + row, tl.min(tl.where(pv == best, pi, V), axis=0).to(tl.int64))
            tl.atomic_xchg(cnt_ptr + row, 0)


def use_triton_argmax(x: Tensor) -> bool:
    """Whether :func:`argmax_rows` runs the Triton kernel on ``x`` (TUNE ``triton_argmax``; CUDA or the
    interpreter) rather than ``torch.argmax``."""
    return HAVE_TRITON and TUNE["triton_argmax"] and (x.device.type == "cuda" or INTERPRET)


def argmax_rows(x: Tensor, out: Tensor | None = None) -> Tensor:
    """The index of each row's largest entry of ``x`` [B, V] as [B, 1] int64, written into ``out`` when
    given (a [B, 1] int64 tensor, e.g. the next step's input ids)."""
    if x.dim() != 2:
        raise ValueError(f"argmax_rows takes [rows, vocab] logits, got shape {tuple(x.shape)}")
    B, V = x.shape
    if out is None:
        out = torch.empty((B, 1), dtype=torch.long, device=x.device)
    elif out.shape != (B, 1) or out.dtype != torch.long or not out.is_contiguous():
        raise ValueError(f"argmax_rows writes [{B}, 1] contiguous int64, got {tuple(out.shape)} {out.dtype}")
    if B == 0:
        return out
    if not use_triton_argmax(x):
        return torch.argmax(x, dim=-1, keepdim=True, out=out)
    if x.stride(1) != 1:
        x = x.contiguous()
    P = triton.cdiv(V, CHUNK)
    pv = torch.empty((B, P), dtype=torch.float32, device=x.device)
    pi = torch.empty((B, P), dtype=torch.int32, device=x.device)
    _argmax_kernel[(B, P)](x, pv, pi, _counters(x.device), out, V, x.stride(0), P=P,
                           PP=triton.next_power_of_2(P), CHUNK=CHUNK, num_warps=4,
                           **pdl_kwargs(x.device))
    return out


__all__ = ["argmax_rows", "use_triton_argmax"]
