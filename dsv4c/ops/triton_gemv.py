"""Decode GEMVs on the tensor cores: the weight tile is the MMA's wide side ("swap AB").

At decode a linear layer sees 1-16 activation rows. The FMA GEMVs of :mod:`triton_kernels` spend several
ALU instructions per weight byte (decoding e2m1/e4m3, scaling, multiply-add) and cannot keep enough bytes
in flight; these kernels hand the arithmetic to the tensor cores instead and leave the SMs to stream weight
bytes:

    acc [BN, 16] = W tile [BN, 128] @ X^T [128, 16]

with the weight rows on the MMA's M side (BN >= 64 keeps Hopper's warpgroup MMA) and the few activation
rows padded to 16 on its N side. The activation block is quantized inside the kernel (no separate
quantization launch).

- :func:`fp8_gemv_tc`: e4m3 weight with 128x128 block scales; e4m3 x e4m3 (or bf16 x bf16) dot per
  128-wide K block, both scales applied to the fp32 block result.
- :func:`fp4_gemv_tc`: packed e2m1 experts (``dsv4c.fp4-tiled/1``), one row per program. The nibbles
  become e4m3 bit patterns (two masks and shifts, no conversion instructions); the per-32 ue8m0 scales
  differ inside a 128-wide block, so the activation goes in block-diagonally: column g of X holds the
  32 activations of scale group g and zeros elsewhere, so the dot yields the four per-group partial
  sums of each output at once and the scales are applied to them in fp32.
- :func:`w16_gemv_tc`: bf16 weight applied in fp32 (head, gate): bf16 x is exact in a bf16 dot, fp32 x
  is split into three bf16 terms (hi + mid + lo).

The products are exact (e4m3 x e4m3, e2m1 x e4m3 and bf16 x bf16 all fit the MMA's product precision) and
accumulate in fp32, as in the reference ops; only the order of the additions differs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .triton_kernels import HAVE_TRITON, INTERPRET, QBLOCK, TUNE, _pick_split, _split_buffers

ROWS = 16  # activation rows per program, padded (the MMA's smallest N side in Triton)

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from .triton_kernels import _e4m3_rne, _pow2_ceil, _quant_e4m3, _splitk_store

    @triton.jit
    def _quant_e4m3_vec(x, UE8M0: tl.constexpr):
        """One 128-wide activation block (1-D fp32) -> (e4m3 grid values as fp32, scale)."""
        amax = tl.max(tl.abs(x), axis=0)
        a = tl.math.div_rn(tl.maximum(amax, 1e-4), 448.0)
        if UE8M0:
            s, inv = _pow2_ceil(a)
            v = x * inv
        else:
            s = a
            v = tl.math.div_rn(x, s)
        return _e4m3_rne(tl.minimum(tl.maximum(v, -448.0), 448.0)), s

    @triton.jit
    def _fp8_gemv_tc_kernel(x_ptr, w_ptr, sw_ptr, o_ptr, part_ptr, cnt_ptr, M, N, K, KB, KB_PER_SPLIT, SW_STRIDE,
                            ACT_Q: tl.constexpr, UE8M0: tl.constexpr, FP8_DOT: tl.constexpr, UPCAST: tl.constexpr,
                            SPLIT: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr):
        """o [M, N] = x [M, K] @ w^T for M <= BR: BN weight rows (axis 0) x a K range (axis 1)."""
        pid_n = tl.program_id(0)
        ks = tl.program_id(1)
        rn = pid_n * BN + tl.arange(0, BN)
        rm = tl.arange(0, BR)
        rk = tl.arange(0, 128)
        n_mask = rn < N
        m_mask = rm < M
        x_rows = x_ptr + rm.to(tl.int64)[:, None] * K
        w_rows = w_ptr + rn.to(tl.int64)[:, None] * K
        acc = tl.zeros((BN, BR), dtype=tl.float32)
        for i in range(KB_PER_SPLIT):
            kb = ks * KB_PER_SPLIT + i
            k = kb * 128 + rk
            k_mask = (k < K) & (kb < KB)
            w = tl.load(w_rows + k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
            xa = tl.load(x_rows + k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
            if ACT_Q:
                q, sa = _quant_e4m3(xa, UE8M0)  # [BR, 128] e4m3 values (fp32), [BR]
            else:
                q = xa  # bf16 values: exact in the bf16 dot below
            if UPCAST:
                part = tl.dot(w.to(tl.float32), tl.trans(q), input_precision="ieee")
            elif FP8_DOT:
                part = tl.dot(w, tl.trans(q.to(tl.float8e4nv)))
            else:
                part = tl.dot(w.to(tl.bfloat16), tl.trans(q.to(tl.bfloat16)))
            if ACT_Q:
                part = part * sa[None, :]
            sw = tl.load(sw_ptr + (rn // 128) * SW_STRIDE + kb, mask=n_mask & (kb < KB), other=0.0)
            acc += part * sw[:, None]
        _splitk_store(tl.trans(acc), o_ptr, part_ptr, cnt_ptr, rm, m_mask, rn, n_mask, ks, pid_n, M, N, SPLIT)

    @triton.jit
    def _fp4_gemv_tc_kernel(x_ptr, e_ptr, order_ptr, w_ptr, sw_ptr, o_ptr, part_ptr, cnt_ptr, A, N, K, E, NBLK,
                            KTILES, NKB, KB_PER_SPLIT, PBN: tl.constexpr, PBK: tl.constexpr, ACT_Q: tl.constexpr,
                            UE8M0: tl.constexpr, FP8_DOT: tl.constexpr, UPCAST: tl.constexpr, SPLIT: tl.constexpr,
                            BN: tl.constexpr, ORDERED: tl.constexpr):
        """Row ``a`` (axis 0) times its expert's packed weight: BN outputs (axis 1), a K range (axis 2)."""
        pid_a = tl.program_id(0)
        pid_n = tl.program_id(1)
        ks = tl.program_id(2)
        if ORDERED:  # rows sorted by expert: programs that read the same expert run together (L2 hits)
            a = tl.load(order_ptr + pid_a).to(tl.int32)
        else:
            a = pid_a
        e = tl.load(e_ptr + a).to(tl.int32)
        valid = (e >= 0) & (e < E)
        nb = (pid_n * BN) // PBN
        r_in = (pid_n * BN) % PBN + tl.arange(0, BN)
        j = tl.arange(0, 64)  # byte columns of a 128-wide K block
        c = tl.arange(0, 16)  # dot columns: 0..3 = the block's four scale groups, the rest stay zero
        rk = tl.arange(0, 128)
        group = (rk[:, None] // 32) == c[None, :]  # [128, 16] block-diagonal selector
        TILE: tl.constexpr = PBN * (PBK // 2)
        ev = tl.maximum(e, 0).to(tl.int64)
        w_rows = w_ptr + ((ev * NBLK + nb) * KTILES) * TILE + r_in[:, None] * (PBK // 2)
        s_rows = sw_ptr + (ev * NBLK + nb) * (K // 32) * PBN + r_in[:, None]
        x_row = x_ptr + a.to(tl.int64) * K
        acc = tl.zeros((BN, 16), dtype=tl.float32)
        if valid:
            for i in range(KB_PER_SPLIT):
                kb = ks * KB_PER_SPLIT + i
                kb_ok = kb < NKB
                kk = kb * 128 + 2 * j  # elements 2c (low nibble) and 2c + 1 (high nibble) of byte c
                col = (kk // PBK) * TILE + (kk % PBK) // 2
                p = tl.load(w_rows + col[None, :], mask=kb_ok, other=0)
                lo = ((p & 7) << 2) | ((p & 8) << 4)  # e2m1 -> e4m3 bit pattern (value * 2^-6)
                hi = ((p >> 2) & 0x1C) | (p & 0x80)
                w8 = tl.reshape(tl.join(lo, hi), (BN, 128)).to(tl.float8e4nv, bitcast=True)
                xa = tl.load(x_row + kb * 128 + rk, mask=kb_ok, other=0.0).to(tl.float32)
                if ACT_Q:
                    q, sa = _quant_e4m3_vec(xa, UE8M0)
                else:
                    q = xa
                xd = tl.where(group, q[:, None], 0.0)
                if UPCAST:
                    part = tl.dot(w8.to(tl.float32), xd, input_precision="ieee")
                elif FP8_DOT:
                    part = tl.dot(w8, xd.to(tl.float8e4nv))
                else:
                    part = tl.dot(w8.to(tl.bfloat16), xd.to(tl.bfloat16))
                g_ok = c < 4
                sb = tl.load(s_rows + (kb * 4 + c)[None, :] * PBN, mask=kb_ok & g_ok[None, :], other=0).to(tl.int32)
                sf = tl.where(g_ok[None, :], ((sb + 6) << 23).to(tl.float32, bitcast=True), 0.0)  # 2^(b-127) * 2^6
                if ACT_Q:
                    sf = sf * sa
                acc += part * sf
        out = tl.sum(acc, axis=1)
        rows = a + tl.arange(0, 1)
        rn = pid_n * BN + tl.arange(0, BN)
        _splitk_store(out[None, :], o_ptr, part_ptr, cnt_ptr, rows, rows < A, rn, rn < N, ks,
                      a * tl.num_programs(1) + pid_n, A, N, SPLIT)

    @triton.jit
    def _w16_gemv_tc_kernel(x_ptr, w_ptr, o_ptr, part_ptr, cnt_ptr, M, N, K, NKB, KB_PER_SPLIT,
                            X_SPLIT3: tl.constexpr, UPCAST: tl.constexpr, SPLIT: tl.constexpr,
                            BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr):
        """fp32 o [M, N] = x [M, K] @ w^T with w bf16, M <= BR: BN weight rows (axis 0) x a K range (axis 1)."""
        pid_n = tl.program_id(0)
        ks = tl.program_id(1)
        rn = pid_n * BN + tl.arange(0, BN)
        rm = tl.arange(0, BR)
        rk = tl.arange(0, BK)
        n_mask = rn < N
        m_mask = rm < M
        x_rows = x_ptr + rm.to(tl.int64)[:, None] * K
        w_rows = w_ptr + rn.to(tl.int64)[:, None] * K
        acc = tl.zeros((BN, BR), dtype=tl.float32)
        for i in range(KB_PER_SPLIT):
            kb = ks * KB_PER_SPLIT + i
            k = kb * BK + rk
            k_mask = (k < K) & (kb < NKB)
            w = tl.load(w_rows + k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
            xa = tl.load(x_rows + k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            if UPCAST:
                acc += tl.dot(w.to(tl.float32), tl.trans(xa.to(tl.float32)), input_precision="ieee")
            elif X_SPLIT3:
                hi = xa.to(tl.bfloat16)
                r1 = xa - hi.to(tl.float32)
                mid = r1.to(tl.bfloat16)
                lo = (r1 - mid.to(tl.float32)).to(tl.bfloat16)
                acc = tl.dot(w, tl.trans(hi), acc)
                acc = tl.dot(w, tl.trans(mid), acc)
                acc = tl.dot(w, tl.trans(lo), acc)
            else:
                acc = tl.dot(w, tl.trans(xa), acc)
        _splitk_store(tl.trans(acc), o_ptr, part_ptr, cnt_ptr, rm, m_mask, rn, n_mask, ks, pid_n, M, N, SPLIT)


def fp8_gemv_tc(x2: Tensor, weight: Tensor, scale: Tensor, act_quant: bool, ue8m0: bool, *,
                block_n: int | None = None, split_k: int | None = None) -> Tensor:
    """fp8_linear for at most 16 rows (x2 [M, K] contiguous, K % 128 == 0, checked by the caller); x2 is
    bf16 or the activation is quantized here (both make the dot's inputs exact)."""
    M, K = x2.shape
    N = weight.shape[0]
    kb = K // QBLOCK
    bn = block_n or TUNE["tc_bn"]
    nt = triton.cdiv(N, bn)
    split, per = _pick_split(nt, kb, x2.device, split_k)
    out = torch.empty((M, N), dtype=x2.dtype, device=x2.device)
    part, cnt = _split_buffers(split, M, N, x2.device)
    _fp8_gemv_tc_kernel[(nt, split)](
        x2, weight, scale, out, part, cnt, M, N, K, kb, per, kb,
        ACT_Q=bool(act_quant), UE8M0=bool(ue8m0), FP8_DOT=bool(act_quant and TUNE["tc_fp8_dot"]), UPCAST=INTERPRET,
        SPLIT=split, BN=bn, BR=ROWS, num_warps=TUNE["tc_warps"], num_stages=TUNE["tc_stages"])
    return out


def fp4_gemv_tc(x: Tensor, expert: Tensor, weight: Tensor, scale: Tensor, act_quant: bool, ue8m0: bool, *,
                block_n: int | None = None, split_k: int | None = None) -> Tensor:
    """Packed FP4 experts, one row per program (x [A, K] contiguous bf16 or quantized here)."""
    A, K = x.shape
    E, NBLK, KT, PBN, PBK2 = weight.shape
    N = NBLK * PBN
    bn = min(block_n or TUNE["tc_fp4_bn"], PBN)
    nt = triton.cdiv(N, bn)
    nkb = K // QBLOCK
    split, per = _pick_split(A * nt, nkb, x.device, split_k)
    out = torch.empty((A, N), dtype=x.dtype, device=x.device)
    part, cnt = _split_buffers(split, A, N, x.device)
    ordered = A > TUNE["fp4_order_rows"]
    order = torch.sort(expert).indices if ordered else expert
    _fp4_gemv_tc_kernel[(A, nt, split)](
        x, expert, order, weight, scale, out, part, cnt, A, N, K, E, NBLK, KT, nkb, per, PBN=PBN, PBK=2 * PBK2,
        ACT_Q=bool(act_quant), UE8M0=bool(ue8m0), FP8_DOT=bool(act_quant and TUNE["tc_fp8_dot"]),
        UPCAST=INTERPRET, SPLIT=split, BN=bn, ORDERED=ordered, num_warps=TUNE["tc_warps"],
        num_stages=TUNE["tc_stages"])
    return out


def w16_gemv_tc(x2: Tensor, weight: Tensor, *, block_n: int | None = None, split_k: int | None = None) -> Tensor:
    """linear_w16 for at most 16 rows (x2 [M, K] contiguous bf16 or fp32, weight bf16); fp32 out."""
    M, K = x2.shape
    N = weight.shape[0]
    bk = 128
    nkb = triton.cdiv(K, bk)
    bn = block_n or TUNE["tc_bn"]
    nt = triton.cdiv(N, bn)
    split, per = _pick_split(nt, nkb, x2.device, split_k)
    out = torch.empty((M, N), dtype=torch.float32, device=x2.device)
    part, cnt = _split_buffers(split, M, N, x2.device)
    _w16_gemv_tc_kernel[(nt, split)](
        x2, weight, out, part, cnt, M, N, K, nkb, per, X_SPLIT3=x2.dtype == torch.float32, UPCAST=INTERPRET,
        SPLIT=split, BN=bn, BK=bk, BR=ROWS, num_warps=TUNE["tc_warps"], num_stages=TUNE["tc_stages"])
    return out


__all__ = ["fp8_gemv_tc", "fp4_gemv_tc", "w16_gemv_tc"]
