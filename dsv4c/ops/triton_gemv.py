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
- :func:`w16_gemv_tc`: bf16 weight applied in fp32 (head, gate): bf16 x is exact in a bf16 dot, fp32 x
  is split into three bf16 terms (hi + mid + lo); the ``SWAP_AB`` form of ``_w16_linear_kernel``.

The products are exact (e4m3 x e4m3 and bf16 x bf16 fit the MMA's product precision). The bf16 dots
accumulate in fp32, as the reference ops do. The e4m3 dot (``TUNE["tc_fp8_dot"]``, on by default: 1.35x
faster on the H100) keeps Hopper's FP8 accumulator, whose additions inside one 128-wide block are less
precise than fp32; the block result is promoted to fp32 before the scales, as DeepSeek's own FP8 GEMMs do.
Measured at Flash shapes: max error 6e-3 of the largest output with it, 6e-4 with bf16 dots.

- :func:`fp4_gemv_tc`: packed e2m1 expert rows, one row per program; the nibbles decoded to e4m3 tiles
  and the activation laid out block-diagonally so the per-32 weight scales apply after the dot (session 5;
  session 3's first tensor-core attempts ran 2-3x slower than the FMA GEMV,
  benchmarks/results/s3-decode-gemv-h100-*.json). :mod:`dsv4c.ops.triton_fp4_mma` is the same product
  on warp-level MMAs fed from registers (``TUNE["fp4_mma"]``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .triton_kernels import (HAVE_TRITON, INTERPRET, PDL_PREFETCH_BYTES, QBLOCK, TUNE, _pick_split,
                             _split_buffers, pdl_kwargs)

ROWS = 16  # activation rows per program, padded (the MMA's smallest N side in Triton)

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from .triton_kernels import (_decode_row_expert, _e4m3_rne, _pow2_ceil, _quant_e4m3, _quant_e4m3_vec,
                                 _splitk_store, _w16_linear_kernel)

    @triton.jit
    def _e2m1_to_e4m3(p, ASM: tl.constexpr):
        """Packed e2m1 bytes -> e4m3 bit patterns of their low and high nibbles (value * 2^-6, exact).

        ASM: four bytes per 32-bit instruction (inline PTX on the CUDA target; each output byte depends on
        its input byte only, so how Triton packs the four does not matter); otherwise per element (the
        interpreter cannot run PTX)."""
        if ASM:
            lo, hi = tl.inline_asm_elementwise(
                asm="""{
                .reg .b32 t0, t1;
                and.b32 t0, $2, 0x07070707;
                shl.b32 t0, t0, 2;
                and.b32 t1, $2, 0x08080808;
                shl.b32 t1, t1, 4;
                or.b32 $0, t0, t1;
                shr.b32 t0, $2, 2;
                and.b32 t0, t0, 0x1C1C1C1C;
                and.b32 t1, $2, 0x80808080;
                or.b32 $1, t0, t1;
                }""",
                constraints="=r,=r,r", args=[p], dtype=(tl.uint8, tl.uint8), is_pure=True, pack=4)
        else:
            lo = ((p & 7) << 2) | ((p & 8) << 4)
            hi = ((p >> 2) & 0x1C) | (p & 0x80)
        return lo.to(tl.float8e4nv, bitcast=True), hi.to(tl.float8e4nv, bitcast=True)

    @triton.jit
    def _fp4_gemv_tc_kernel(x_ptr, e_ptr, order_ptr, w_ptr, sw_ptr, o_ptr, part_ptr, cnt_ptr, A, N, K, E, NBLK,
                            KTILES, NSB, SB_PER_SPLIT, PBN: tl.constexpr, PBK: tl.constexpr, UE8M0: tl.constexpr,
                            ASM: tl.constexpr, UPCAST: tl.constexpr, SPLIT: tl.constexpr, BN: tl.constexpr,
                            NB: tl.constexpr, ORDERED: tl.constexpr):
        """Row ``a`` (axis 0) times its expert's packed e2m1 weight: BN outputs (axis 1), a K range (axis 2).

        Per step of NB 128-wide K blocks (NB <= 4): the [BN, 64 NB] bytes become two e4m3 tiles (low
        nibbles = even K, high = odd K) without reordering; the quantized activation's even and odd halves
        are laid out block-diagonally, column g holding scale group g (its 16 bytes), so
        ``lo @ XE + hi @ XO`` [BN, 16] has each group's partial sum in its own column and the per-32 scales
        apply after the dot. Larger NB: fewer dots and barriers per weight byte."""
        a, e, valid = _decode_row_expert(e_ptr, order_ptr, E, ORDERED)
        pid_n = tl.program_id(1)
        ks = tl.program_id(2)
        nb = (pid_n * BN) // PBN
        r_in = (pid_n * BN) % PBN + tl.arange(0, BN)
        j = tl.arange(0, 64 * NB)  # byte columns of the step's NB K blocks
        c = tl.arange(0, 16)  # dot columns: 0..4NB-1 = the step's scale groups, the rest stay zero
        diag = (j[None, :] // 16) == c[:, None]  # [16, 64 NB]: group c owns bytes 16c..16c+15
        g_ok = c < 4 * NB
        col_blk = (c[:, None] // 4) == tl.arange(0, NB)[None, :]  # [16, NB]: the K block of column c
        TILE: tl.constexpr = PBN * (PBK // 2)
        ev = tl.maximum(e, 0).to(tl.int64)
        w_rows = w_ptr + ((ev * NBLK + nb) * KTILES) * TILE + r_in[:, None] * (PBK // 2)
        s_rows = sw_ptr + (ev * NBLK + nb) * (K // 32) * PBN + r_in[:, None]
        x_row = x_ptr + a.to(tl.int64) * K
        acc = tl.zeros((BN, 16), dtype=tl.float32)
        if valid:
            # the next step's bytes are loaded while this one is decoded and multiplied: the loads feed
            # register code rather than the dot, so Triton's pipeliner does not overlap them by itself
            sb0 = ks * SB_PER_SPLIT
            ok0 = sb0 < NSB
            p_next = tl.load(w_rows + _fp4_step_cols(sb0 * NB, j, PBK, TILE)[None, :], mask=ok0, other=0)
            xe_next = tl.load(x_row + sb0 * NB * 128 + 2 * j, mask=ok0, other=0.0)
            xo_next = tl.load(x_row + sb0 * NB * 128 + 2 * j + 1, mask=ok0, other=0.0)
            for i in range(SB_PER_SPLIT):
                kb = (sb0 + i) * NB
                kb_ok = sb0 + i < NSB
                p = p_next
                xe = xe_next.to(tl.float32)
                xo = xo_next.to(tl.float32)
                ok_n = (i + 1 < SB_PER_SPLIT) & (sb0 + i + 1 < NSB)
                p_next = tl.load(w_rows + _fp4_step_cols(kb + NB, j, PBK, TILE)[None, :], mask=ok_n, other=0)
                xe_next = tl.load(x_row + (kb + NB) * 128 + 2 * j, mask=ok_n, other=0.0)
                xo_next = tl.load(x_row + (kb + NB) * 128 + 2 * j + 1, mask=ok_n, other=0.0)
                lo, hi = _e2m1_to_e4m3(p, ASM)
                qe, qo, s_blk = _quant_e4m3_pairs(xe, xo, NB, UE8M0)
                xde = tl.where(diag, qe[None, :], 0.0)  # [16, 64 NB]
                xdo = tl.where(diag, qo[None, :], 0.0)
                if UPCAST:
                    part = tl.dot(lo.to(tl.float32), tl.trans(xde), input_precision="ieee")
                    part = tl.dot(hi.to(tl.float32), tl.trans(xdo), part, input_precision="ieee")
                else:
                    part = tl.dot(lo, tl.trans(xde.to(tl.float8e4nv)))
                    part = tl.dot(hi, tl.trans(xdo.to(tl.float8e4nv)), part)
                sa = tl.sum(tl.where(col_blk, s_blk[None, :], 0.0), axis=1)  # [16]: activation scale per column
                sb = tl.load(s_rows + (kb * 4 + c)[None, :] * PBN, mask=kb_ok & g_ok[None, :], other=0).to(tl.int32)
                sf = tl.where(g_ok[None, :], ((sb + 6) << 23).to(tl.float32, bitcast=True), 0.0)  # 2^(b-127) 2^6
                acc += part * (sf * sa[None, :])
        out = tl.sum(acc, axis=1)
        rows = a + tl.arange(0, 1)
        rn = pid_n * BN + tl.arange(0, BN)
        _splitk_store(out[None, :], o_ptr, part_ptr, cnt_ptr, rows, rows < A, rn, rn < N, ks,
                      a * tl.num_programs(1) + pid_n, A, N, SPLIT)

    @triton.jit
    def _fp4_step_cols(kb, j, PBK: tl.constexpr, TILE: tl.constexpr):
        """Byte offsets (inside one expert's N-block row of packed tiles) of bytes ``j`` of the step that
        starts at 128-wide K block ``kb``: byte j holds K elements kb * 128 + 2j and 2j + 1."""
        return _fp4_tile_col(kb + j // 64, PBK, TILE) + j % 64

    @triton.jit
    def _fp4_tile_col(kb, PBK: tl.constexpr, TILE: tl.constexpr):
        """Byte offset of 128-wide K block ``kb`` inside one expert's N-block row of packed tiles."""
        return ((kb * 128) // PBK) * TILE + ((kb * 128) % PBK) // 2

    @triton.jit
    def _quant_e4m3_pairs(xe, xo, NB: tl.constexpr, UE8M0: tl.constexpr):
        """:func:`_quant_e4m3_vec` of NB 128-wide blocks held as their even and odd halves ([64 NB] each,
        block b = elements 64b..64b+63): (e4m3 values of both halves, the NB block scales)."""
        e2 = tl.reshape(xe, (NB, 64))
        o2 = tl.reshape(xo, (NB, 64))
        amax = tl.maximum(tl.max(tl.abs(e2), axis=1), tl.max(tl.abs(o2), axis=1))
        a = tl.math.div_rn(tl.maximum(amax, 1e-4), 448.0)
        if UE8M0:
            s, inv = _pow2_ceil(a)
            ve = e2 * inv[:, None]
            vo = o2 * inv[:, None]
        else:
            s = a
            ve = tl.math.div_rn(e2, s[:, None])
            vo = tl.math.div_rn(o2, s[:, None])
        qe = _e4m3_rne(tl.minimum(tl.maximum(ve, -448.0), 448.0))
        qo = _e4m3_rne(tl.minimum(tl.maximum(vo, -448.0), 448.0))
        return tl.reshape(qe, (64 * NB,)), tl.reshape(qo, (64 * NB,)), s

    @triton.jit
    def _fp8_gemv_tc_kernel(x_ptr, w_ptr, sw_ptr, o_ptr, part_ptr, cnt_ptr, M, N, K, KB, KB_PER_SPLIT, SW_STRIDE,
                            GROUP_ROWS, XS,
                            ACT_Q: tl.constexpr, UE8M0: tl.constexpr, FP8_DOT: tl.constexpr, UPCAST: tl.constexpr,
                            SPLIT: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr, ONE_ROW: tl.constexpr):
        """o [M, N] = x [M, K] @ w^T for M <= BR: BN weight rows (axis 0) x a K range (axis 1).

        Grouped (a block-diagonal weight stored without its zeros): weight rows [g GROUP_ROWS, (g + 1)
        GROUP_ROWS) read x's columns [g K, (g + 1) K); x's rows are XS apart (K for one group, whose
        GROUP_ROWS is N). BN divides GROUP_ROWS."""
        pid_n = tl.program_id(0)
        ks = tl.program_id(1)
        rn = pid_n * BN + tl.arange(0, BN)
        rm = tl.arange(0, BR)
        rk = tl.arange(0, 128)
        n_mask = rn < N
        m_mask = rm < M
        x_ptr = x_ptr + ((pid_n * BN) // GROUP_ROWS).to(tl.int64) * K  # this program's group of columns
        x_rows = x_ptr + rm.to(tl.int64)[:, None] * XS
        w_rows = w_ptr + rn.to(tl.int64)[:, None] * K
        acc = tl.zeros((BN, BR), dtype=tl.float32)
        for i in range(KB_PER_SPLIT):
            kb = ks * KB_PER_SPLIT + i
            k = kb * 128 + rk
            k_mask = (k < K) & (kb < KB)
            w = tl.load(w_rows + k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
            if ONE_ROW:  # quantize the one real row, not the 15 rows of padding
                xv = tl.load(x_ptr + k, mask=k_mask, other=0.0).to(tl.float32)
                if ACT_Q:
                    qv, s1 = _quant_e4m3_vec(xv, UE8M0)
                    sa = tl.where(rm == 0, s1, 0.0)
                else:
                    qv = xv
                q = tl.where(rm[:, None] == 0, qv[None, :], 0.0)
            else:
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


def fp8_gemv_tc(x2: Tensor, weight: Tensor, scale: Tensor, act_quant: bool, ue8m0: bool, *,
                block_n: int | None = None, split_k: int | None = None) -> Tensor:
    """fp8_linear for at most 16 rows (x2 [M, K] contiguous, K % 128 == 0, checked by the caller); x2 is
    bf16 or the activation is quantized here (both make the dot's inputs exact)."""
    K, N = x2.shape[1], weight.shape[0]
    return _fp8_tc_launch(x2, weight, scale, K, N, K, act_quant, ue8m0, block_n or TUNE["tc_bn"], split_k)


def _fp8_tc_launch(x2: Tensor, weight: Tensor, scale: Tensor, K: int, group_rows: int, xs: int, act_quant: bool,
                   ue8m0: bool, bn: int, split_k: int | None) -> Tensor:
    """``_fp8_gemv_tc_kernel`` over the N rows of ``weight`` [N, K] (groups of ``group_rows`` rows, x's rows
    ``xs`` apart), split-K as :func:`_pick_split` picks; out [M, N] in x2's dtype."""
    M, N = x2.shape[0], weight.shape[0]
    kb = K // QBLOCK
    nt = triton.cdiv(N, bn)
    split, per = _pick_split(nt, kb, x2.device, split_k)
    out = torch.empty((M, N), dtype=x2.dtype, device=x2.device)
    part, cnt = _split_buffers(split, M, N, x2.device)
    _fp8_gemv_tc_kernel[(nt, split)](
        x2, weight, scale, out, part, cnt, M, N, K, kb, per, kb, group_rows, xs,
        ACT_Q=bool(act_quant), UE8M0=bool(ue8m0), FP8_DOT=bool(act_quant and TUNE["tc_fp8_dot"]), UPCAST=INTERPRET,
        SPLIT=split, BN=bn, BR=ROWS, ONE_ROW=M == 1, num_warps=TUNE["tc_warps"], num_stages=TUNE["tc_stages"])
    return out


def fp8_grouped_gemv_tc(x2: Tensor, weight: Tensor, scale: Tensor, groups: int, *, block_n: int | None = None,
                        split_k: int | None = None) -> Tensor:
    """A grouped projection with block-scaled e4m3 weights and bf16 activations (no activation
    quantization): out[:, g R:(g + 1) R] = x2[:, g K:(g + 1) K] @ (weight[g R:(g + 1) R] * scale)^T for
    x2 [M, groups K] bf16 (M <= ROWS), weight [groups R, K] e4m3, scale [groups R / 128, K / 128] fp32.
    Each e4m3 weight times its (power-of-two) block scale is exact in bf16, so this is the bf16 grouped
    matmul of the dequantized weight, summed in fp32 (another order than cuBLAS's); out [M, groups R] in
    x2's dtype. R must be a multiple of the row block (TUNE ``tc_bn``) and K of 128."""
    M, GK = x2.shape
    N, K = weight.shape
    bn = block_n or TUNE["tc_bn"]
    if (M > ROWS or x2.dtype != torch.bfloat16 or weight.dtype != torch.float8_e4m3fn or groups < 1
            or GK != groups * K or N % groups or (N // groups) % bn or K % QBLOCK
            or tuple(scale.shape) != (N // QBLOCK, K // QBLOCK)):
        raise ValueError(f"fp8_grouped_gemv_tc: x {tuple(x2.shape)} {x2.dtype}, weight {tuple(weight.shape)} "
                         f"{weight.dtype}, scale {tuple(scale.shape)}, {groups} groups do not fit (at most {ROWS} "
                         f"bf16 rows, e4m3 weight rows a multiple of {bn} per group, K a multiple of {QBLOCK})")
    return _fp8_tc_launch(x2.contiguous(), weight, scale.contiguous(), K, N // groups, GK, False, True, bn, split_k)


def fp4_gemv_tc(x: Tensor, expert: Tensor, weight: Tensor, scale: Tensor, ue8m0: bool, *,
                block_n: int | None = None, split_k: int | None = None) -> Tensor:
    """fp4_grouped_linear_packed for decode rows with the activation quantized (x [A, K] contiguous, K a
    multiple of 128 and of the packed tile, checked by the caller): one row per program."""
    A, K = x.shape
    E, NBLK, KT, PBN, PBK2 = weight.shape
    N = NBLK * PBN
    bn = min(block_n or TUNE["fp4_tc_bn"], PBN)
    nt = triton.cdiv(N, bn)
    nkb = K // QBLOCK
    nb = TUNE["fp4_tc_kblocks"]
    while nkb % nb:  # steps of whole 128-wide blocks
        nb //= 2
    nsb = nkb // nb
    split, per = _pick_split(A * nt, nsb, x.device, split_k)
    out = torch.empty((A, N), dtype=x.dtype, device=x.device)
    part, cnt = _split_buffers(split, A, N, x.device)
    ordered = A > TUNE["fp4_order_rows"]
    order = torch.sort(expert).indices if ordered else expert
    _fp4_gemv_tc_kernel[(A, nt, split)](
        x, expert, order, weight, scale, out, part, cnt, A, N, K, E, NBLK, KT, nsb, per, PBN=PBN, PBK=2 * PBK2,
        UE8M0=bool(ue8m0), ASM=bool(TUNE["fp4_tc_asm"]) and not INTERPRET, UPCAST=INTERPRET, SPLIT=split, BN=bn,
        NB=nb, ORDERED=ordered, num_warps=TUNE["fp4_tc_warps"], num_stages=TUNE["fp4_tc_stages"])
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
    _w16_linear_kernel[(1, nt, split)](
        x2, weight, out, part, cnt, M, N, K, nkb, per, X_SPLIT3=x2.dtype == torch.float32, UPCAST=INTERPRET,
        SPLIT=split, SWAP_AB=True, BM=ROWS, BN=bn, BK=bk, num_warps=TUNE["tc_warps"],
        num_stages=TUNE["tc_stages"], PF_ROW_BYTES=PDL_PREFETCH_BYTES // bn, **pdl_kwargs(x2.device, prefetch=True))
    return out


__all__ = ["fp8_gemv_tc", "fp8_grouped_gemv_tc", "fp4_gemv_tc", "w16_gemv_tc"]
