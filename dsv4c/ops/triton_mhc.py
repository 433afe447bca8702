"""The mHC sub-layer input in one Triton launch: mix, Sinkhorn split, pre-collapse and the sub-layer's RMSNorm.

For a decode step the mHC math in front of each sub-layer (MODEL-SEMANTICS section 3, steps 1-3, plus the
``attn_norm`` / ``ffn_norm`` that follows) is a 24 x 16384 fp32 GEMV, a 4 x 4 Sinkhorn projection and two
D-wide reductions: a few microseconds of work that Inductor and cuBLAS spread over ~8 kernels (~20 us on an
H100). Here it is one launch of ``(rows, K / CK)`` programs:

1. program ``(r, c)`` multiplies its ``CK``-wide chunk of the flattened streams ``x[r]`` (n * D) with the
   matching columns of ``fn`` and parks the (2 + n) n partial dot products plus the chunk's sum of squares
   in ``part[r, c]``;
2. the last program of row ``r`` to arrive (an arrival counter, as in the split-K GEMVs) sums the partials in
   chunk order (so the result does not depend on timing), scales the mix by the row's RMS, runs the split
   (``_hc_split_rows``, the kernel of ``dsv4::hc_split``), collapses the streams with ``pre`` (rounded to the
   activation dtype, as the reference does) and applies the RMSNorm with its weight; the streams are walked
   twice in ``BD``-wide steps, or, when ``BD`` covers the row (``TUNE["hc_pre_bd"]``), loaded once into
   registers before the split so their load overlaps it.

Numerics: the reference's products and roundings in another fp32 summation order. :func:`hc_pre_reference`
(``dsv4c.ops.library``) is the plain-torch contract (the model's ``hc_pre`` followed by ``rms_norm``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .library import hc_pre_reference
from .triton_kernels import HAVE_TRITON, TUNE, _counters, _np2, _require, pdl_kwargs

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from .triton_kernels import _cast_out, _hc_split_rows, _pdl_begin


if HAVE_TRITON:

    @triton.jit
    def _collapse(xr, j, d, sx_i, sx_d, pre1, N: tl.constexpr, D, UDT: tl.constexpr):
        """u[d] = sum_i pre_i x_i[d] for columns ``d`` of the streams at ``xr``, rounded to UDT (as the
        reference casts it) and back to fp32."""
        xs = tl.load(xr + j[:, None] * sx_i + d[None, :] * sx_d, mask=(j < N)[:, None] & (d < D)[None, :],
                     other=0.0).to(tl.float32)
        return _cast_out(tl.sum(pre1[:, None] * xs, axis=0), UDT).to(tl.float32)

    @triton.jit
    def _hc_pre_kernel(x_ptr, fn_ptr, base_ptr, scale_ptr, w_ptr, u_ptr, post_ptr, comb_ptr, part_ptr, mix_ptr,
                       cnt_ptr, D, sx_r, sx_i, sx_d, NCH, ITERS, hc_eps, mix_eps, norm_eps,
                       N: tl.constexpr, NP: tl.constexpr, MP: tl.constexpr, CK: tl.constexpr, NCHP: tl.constexpr,
                       BD: tl.constexpr, ONE_PASS: tl.constexpr, PDL: tl.constexpr = False):
        _pdl_begin(PDL)
        M: tl.constexpr = (2 + N) * N
        r = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1)
        K = N * D
        xr = x_ptr + r * sx_r
        # 1. this chunk's partial mix and sum of squares
        k = c * CK + tl.arange(0, CK)
        k_mask = k < K
        xk = tl.load(xr + (k // D) * sx_i + (k % D) * sx_d, mask=k_mask, other=0.0).to(tl.float32)
        m = tl.arange(0, MP)
        f = tl.load(fn_ptr + m[:, None].to(tl.int64) * K + k[None, :], mask=(m < M)[:, None] & k_mask[None, :],
                    other=0.0)
        part = tl.sum(f * xk[None, :], axis=1)
        part = tl.where(m == M, tl.sum(xk * xk, axis=0), part)  # slot M: the sum of squares
        tl.store(part_ptr + (r * NCH + c) * MP + m, part)
        tl.debug_barrier()
        prev = tl.atomic_add(cnt_ptr + r, 1, sem="acq_rel", scope="gpu")
        if prev == NCH - 1:
            j = tl.arange(0, NP)
            if ONE_PASS:  # the whole row of streams in registers, its load issued before the split's work
                d1 = tl.arange(0, BD)
                xs1 = tl.load(xr + j[:, None] * sx_i + d1[None, :] * sx_d, mask=(j < N)[:, None] & (d1 < D)[None, :],
                              other=0.0).to(tl.float32)
            # 2. the row's last program: the mix, then the split
            ch = tl.arange(0, NCHP)
            parts = tl.load(part_ptr + (r * NCH + ch[:, None]) * MP + m[None, :], mask=(ch < NCH)[:, None],
                            other=0.0, cache_modifier=".cg")
            tot = tl.sum(parts, axis=0)
            ss = tl.sum(tl.where(m == M, tot, 0.0), axis=0)
            mix = tot * (1.0 / tl.sqrt_rn(ss / K + mix_eps))
            tl.store(mix_ptr + r * M + m, mix, mask=m < M)
            tl.debug_barrier()  # the split reads the mix back in its own layout
            rows = tl.zeros([1], tl.int64) + r
            pre, post, comb = _hc_split_rows(mix_ptr, rows, rows >= 0, base_ptr, scale_ptr, ITERS, hc_eps, N, NP)
            tl.store(post_ptr + r * N + j, tl.sum(post, axis=0), mask=j < N)
            i3 = j[:, None]
            j3 = j[None, :]
            tl.store(comb_ptr + r * (N * N) + i3 * N + j3, tl.sum(comb, axis=0), mask=(i3 < N) & (j3 < N))
            pre1 = tl.sum(pre, axis=0)  # [NP]
            # 3. u = sum_i pre_i x_i rounded to the activation dtype; its RMS; then the normed, weighted u
            UDT: tl.constexpr = u_ptr.dtype.element_ty
            if ONE_PASS:
                u = _cast_out(tl.sum(pre1[:, None] * xs1, axis=0), UDT).to(tl.float32)
                rinv = 1.0 / tl.sqrt_rn(tl.sum(u * u, axis=0) / D + norm_eps)
                wv = tl.load(w_ptr + d1, mask=d1 < D, other=0.0).to(tl.float32)
                tl.store(u_ptr + r * D + d1, _cast_out(u * rinv * wv, UDT), mask=d1 < D)
            else:
                usq = tl.zeros([BD], tl.float32)
                for d0 in range(0, D, BD):
                    u = _collapse(xr, j, d0 + tl.arange(0, BD), sx_i, sx_d, pre1, N, D, UDT)
                    usq += u * u
                rinv = 1.0 / tl.sqrt_rn(tl.sum(usq, axis=0) / D + norm_eps)
                for d0 in range(0, D, BD):
                    d = d0 + tl.arange(0, BD)
                    u = _collapse(xr, j, d, sx_i, sx_d, pre1, N, D, UDT)
                    wv = tl.load(w_ptr + d, mask=d < D, other=0.0).to(tl.float32)
                    tl.store(u_ptr + r * D + d, _cast_out(u * rinv * wv, UDT), mask=d < D)
            tl.atomic_xchg(cnt_ptr + r, 0)


def hc_pre(x: Tensor, fn: Tensor, base: Tensor, scale: Tensor, norm_w: Tensor, n: int, iters: int,
           hc_eps: float, mix_eps: float, norm_eps: float, *, chunk: int | None = None,
           num_warps: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`hc_pre_reference` in one launch (see the module docstring). ``x`` [..., n, D] (any strides, e.g.
    the embedding expanded to n streams), fp32 ``fn`` [(2 + n) n, n D]; outputs as the reference's.
    Meant for a few rows (decode): every row's programs read all of ``fn``. ``chunk`` (columns of the
    flattened streams per program) and ``num_warps`` default to ``TUNE["hc_pre_chunk"]`` / ``["hc_pre_warps"]``."""
    _require(x, fn, base, scale, norm_w)
    lead, D = x.shape[:-2], x.shape[-1]
    if x.shape[-2] != n:
        raise ValueError(f"x has {x.shape[-2]} streams, expected n = {n}")
    M = (2 + n) * n
    if tuple(fn.shape) != (M, n * D):
        raise ValueError(f"fn shape {tuple(fn.shape)} != ({M}, {n * D}) for n = {n}, D = {D}")
    x3 = x.reshape(-1, n, D)  # a view where the strides allow (expanded streams keep stride 0)
    R = x3.shape[0]
    u = torch.empty((R, D), dtype=x.dtype, device=x.device)
    post = torch.empty((R, n), dtype=torch.float32, device=x.device)
    comb = torch.empty((R, n, n), dtype=torch.float32, device=x.device)
    if R:
        nw = num_warps or TUNE["hc_pre_warps"]
        bd = min(_np2(D), TUNE["hc_pre_bd"] or 256 * nw)
        ck = _np2(min(chunk or TUNE["hc_pre_chunk"], n * D))
        nch = triton.cdiv(n * D, ck)
        mp = _np2(M + 1)  # one spare slot for the sum of squares
        part = torch.empty((R, nch, mp), dtype=torch.float32, device=x.device)
        mix = torch.empty((R, M), dtype=torch.float32, device=x.device)
        cnt = _counters(x.device)
        if R > cnt.numel():
            raise ValueError(f"{R} rows exceed the {cnt.numel()} arrival counters")
        _hc_pre_kernel[(R, nch)](x3, fn.float().contiguous(), base.float().contiguous(), scale.float().contiguous(),
                                 norm_w.contiguous(), u, post, comb, part, mix, cnt, D,
                                 x3.stride(0), x3.stride(1), x3.stride(2), nch, int(iters), float(hc_eps),
                                 float(mix_eps), float(norm_eps),
                                 N=n, NP=_np2(n), MP=mp, CK=ck, NCHP=_np2(nch), BD=bd, ONE_PASS=bd >= D, num_warps=nw,
                                 **pdl_kwargs(x3.device))
    return u.view(*lead, D), post.view(*lead, n), comb.view(*lead, n, n)


__all__ = ["hc_pre", "hc_pre_reference"]
