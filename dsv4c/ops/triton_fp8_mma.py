"""FP8 decode GEMV (up to 8 activation rows) on warp-level e4m3 MMAs fed from registers.

The same scheme as :mod:`dsv4c.ops.triton_fp4_mma` for the block-scaled e4m3 weights: the weight bytes
are already MMA operands, so each lane loads them with 16-byte loads straight into the A fragments of
``mma.sync.m16n8k32.e4m3`` and nothing passes through shared memory:

- per 128-wide K tile, lane (g = lane / 4, t = lane % 4) loads K 16t..16t+15 and 64+16t..64+16t+15 of its
  warp's rows g and g + 8 (two coalesced 64-byte halves of each row); 8 bytes feed one MMA (a0 / a1 the
  first 4, a2 / a3 the next), 4 MMAs per tile accumulate in fp32 (one 128 x 128 weight scale per tile);
- B column n carries activation row n (up to 8 rows, quantized per 128 by this program into a scratch
  copy in natural order: the lane's B bytes are the same K positions, two 16-byte loads);
- per tile, lane (g, t) adds its four sums (rows g, g + 8 x rows 2t, 2t + 1 of the activation) times the
  weight scale and the two activation scales; K is split across programs as in the other decode GEMVs.

The lane-level steps are inline PTX that reads the hardware lane itself, with the same one-element-per-
thread contract as triton_fp4_mma (checked on the compiled kernel). Needs the CUDA target and sm_89+, N a
multiple of the row block and K of 128; the interpreter cannot run PTX, so CI runs the PTX lane by lane
(tests/ops/test_ptx_mma_lanes.py) and compiles the kernel for sm_90; the GPU checks its numbers
(benchmarks/mma_probe.py, benchmarks/decode_gemv_gpu.py variant ``fp8_mma``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .triton_fp4_mma import lane_coords_ptx, mma_device
from .triton_kernels import (HAVE_TRITON, PDL_PREFETCH_BYTES, QBLOCK, TUNE, _pick_split, _split_buffers,
                             pdl_kwargs)

MAX_ROWS = 8  # activation rows: the MMA's N side


def _lane_offsets_asm() -> str:
    """The lane's byte offsets, computed once. In: $4 K (weight and scratch row stride), $5 M - 1, $6 the
    scratch scale row stride (bytes). Out: $0 weight (row g, K 16t), $1 activation (row min(g, M - 1), K 16t),
    $2 / $3 activation scale rows min(2t, M - 1) / min(2t + 1, M - 1)."""
    return "\n".join([
        "{", *lane_coords_ptx(), ".reg .b32 xr, c0, c1, ow, ox, o0, o1;",
        "shl.b32 ow, t, 4;", "mad.lo.u32 ow, row, $4, ow;",
        "min.u32 xr, g, $5;", "shl.b32 ox, t, 4;", "mad.lo.u32 ox, xr, $4, ox;",
        "shl.b32 c0, t, 1;", "add.u32 c1, c0, 1;", "min.u32 c0, c0, $5;", "min.u32 c1, c1, $5;",
        "mul.lo.u32 o0, c0, $6;", "mul.lo.u32 o1, c1, $6;",
        "mov.b32 $0, ow;", "mov.b32 $1, ox;", "mov.b32 $2, o0;", "mov.b32 $3, o1;", "}"])


def _w_load_asm() -> str:
    """The lane's 64 weight bytes of one K tile. In: $16 / $17 addresses of rows g / g + 8 at K 16t (u64).
    Out: $0-$3 row g K 16t.., $4-$7 row g K 64+16t.., $8-$15 the same of row g + 8."""
    lines = ["{", ".reg .b64 wg, wh;", "mov.b64 wg, $16;", "mov.b64 wh, $17;"]
    for h, base in enumerate(("wg", "wh")):
        for c in range(2):
            r = 8 * h + 4 * c
            lines.append(f"ld.global.nc.v4.b32 {{${r}, ${r + 1}, ${r + 2}, ${r + 3}}}, [{base}+{64 * c}];")
    lines.append("}")
    return "\n".join(lines)


def _w_prefetch_asm() -> str:
    """The program's weight rows over its K tiles into L2: lane t = 0 of each row pair asks for rows g and
    g + 8 (one bulk prefetch each). In: $1 / $2 addresses of rows g / g + 8 at K 16t of the first tile
    (u64), $3 bytes (u32). Out: $0 (zero)."""
    return "\n".join([
        "{", ".reg .b32 tid, t;", ".reg .pred p;", "mov.u32 tid, %tid.x;", "and.b32 t, tid, 3;",
        "setp.eq.u32 p, t, 0;", "@p cp.async.bulk.prefetch.L2.global [$1], $3;",
        "@p cp.async.bulk.prefetch.L2.global [$2], $3;", "mov.u32 $0, 0;", "}"])


def _x_load_asm() -> str:
    """The lane's activation bytes of one K tile (row min(g, M - 1) of the scratch copy this kernel wrote:
    plain loads) and the scales of activation rows 2t, 2t + 1. In: $10 bytes, $11 / $12 scales (u64).
    Out: $0-$7 bytes (K 16t.., 64+16t..), $8 / $9 scales."""
    return "\n".join([
        "{", ".reg .b64 xa, s0, s1;", "mov.b64 xa, $10;", "mov.b64 s0, $11;", "mov.b64 s1, $12;",
        "ld.global.v4.b32 {$0, $1, $2, $3}, [xa+0];", "ld.global.v4.b32 {$4, $5, $6, $7}, [xa+64];",
        "ld.global.f32 $8, [s0];", "ld.global.f32 $9, [s1];", "}"])


def _mma_step_asm() -> str:
    """One K tile: 4 chained MMAs, then the sums times the weight scale and the activation scales.
    In: $4-$19 weight words, $20-$27 activation words, $28 / $29 activation scales (columns 2t, 2t + 1),
    $30 weight scale, $31-$34 running sums. Out: $0-$3 the new sums (d0..d3: rows g, g + 8 x columns)."""
    lines = ["{", ".reg .f32 d0, d1, d2, d3, f0, f1, r0, r1, r2, r3;",
             "mov.f32 d0, 0f00000000;", "mov.f32 d1, 0f00000000;", "mov.f32 d2, 0f00000000;",
             "mov.f32 d3, 0f00000000;"]
    for m in range(4):
        c, h = divmod(m, 2)
        a0, a2 = 4 + 4 * c + 2 * h, 4 + 4 * c + 2 * h + 1  # row g
        a1, a3 = a0 + 8, a2 + 8  # row g + 8
        b0, b1 = 20 + 4 * c + 2 * h, 20 + 4 * c + 2 * h + 1
        lines.append(f"mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {{d0, d1, d2, d3}}, "
                     f"{{${a0}, ${a1}, ${a2}, ${a3}}}, {{${b0}, ${b1}}}, {{d0, d1, d2, d3}};")
    lines += ["mul.f32 f0, $28, $30;", "mul.f32 f1, $29, $30;",
              "fma.rn.f32 r0, d0, f0, $31;", "fma.rn.f32 r1, d1, f1, $32;", "fma.rn.f32 r2, d2, f0, $33;",
              "fma.rn.f32 r3, d3, f1, $34;",
              "mov.f32 $0, r0;", "mov.f32 $1, r1;", "mov.f32 $2, r2;", "mov.f32 $3, r3;", "}"]
    return "\n".join(lines)


def _lane_rows_asm() -> str:
    """The lane's output coordinates. In: $2 (zero; gives the shape). Out: $0 row g of the program's rows
    (warp x 16 + g), $1 t."""
    return "\n".join(["{", *lane_coords_ptx(), "add.u32 row, row, $2;", "mov.b32 $0, row;", "mov.b32 $1, t;", "}"])


if HAVE_TRITON:
    import triton
    import triton.language as tl

    from .triton_kernels import _pdl_begin, _quant_e4m3, _splitk_store

    _LANE_OFFS = tl.constexpr(_lane_offsets_asm())
    _W_LOAD = tl.constexpr(_w_load_asm())
    _X_LOAD = tl.constexpr(_x_load_asm())
    _W_PREFETCH = tl.constexpr(_w_prefetch_asm())
    _MMA_STEP = tl.constexpr(_mma_step_asm())
    _LANE_ROWS = tl.constexpr(_lane_rows_asm())

    @triton.jit
    def _w_load(wg, wh, kt):
        return tl.inline_asm_elementwise(
            asm=_W_LOAD, constraints="=r," * 16 + "l,l", args=[wg + kt * 128, wh + kt * 128],
            dtype=(tl.int32,) * 16, is_pure=False, pack=1)

    @triton.jit
    def _w_prefetch(wg, wh, t0, t1, PF_TILES: tl.constexpr):
        nbytes = tl.minimum(t1 - t0, PF_TILES) * 128 + tl.zeros(wg.shape, dtype=tl.int32)
        return tl.inline_asm_elementwise(
            asm=_W_PREFETCH, constraints="=r,l,l,r", args=[wg + t0 * 128, wh + t0 * 128, nbytes],
            dtype=tl.int32, is_pure=False, pack=1)

    @triton.jit
    def _x_load(xa, s0, s1, kt):
        return tl.inline_asm_elementwise(
            asm=_X_LOAD, constraints="=r," * 8 + "=f,=f,l,l,l", args=[xa + kt * 128, s0 + kt * 4, s1 + kt * 4],
            dtype=(tl.int32,) * 8 + (tl.float32, tl.float32), is_pure=False, pack=1)

    @triton.jit
    def _mma_step(w, x, sw, acc):
        return tl.inline_asm_elementwise(
            asm=_MMA_STEP, constraints="=f,=f,=f,=f," + "r," * 24 + "f,f,f,f,f,f,f",
            args=[w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7], w[8], w[9], w[10], w[11], w[12], w[13], w[14],
                  w[15], x[0], x[1], x[2], x[3], x[4], x[5], x[6], x[7], x[8], x[9], sw, acc[0], acc[1], acc[2],
                  acc[3]],
            dtype=(tl.float32,) * 4, is_pure=True, pack=1)

    @triton.jit
    def _mma_step_if(w, x, sw, acc, keep):
        """:func:`_mma_step` where ``keep`` (a scalar), else the sums unchanged."""
        new = _mma_step(w, x, sw, acc)
        return (tl.where(keep, new[0], acc[0]), tl.where(keep, new[1], acc[1]), tl.where(keep, new[2], acc[2]),
                tl.where(keep, new[3], acc[3]))

    @triton.jit
    def _fp8_gemv_mma_kernel(x_ptr, w_ptr, sw_ptr, q_ptr, qs_ptr, o_ptr, part_ptr, cnt_ptr, M, N, K, KB,
                             T_PER_SPLIT, SW_STRIDE, UE8M0: tl.constexpr, SPLIT: tl.constexpr, NT: tl.constexpr,
                             MP: tl.constexpr, QC: tl.constexpr, PDL: tl.constexpr = False,
                             PREFETCH: tl.constexpr = False, PF_TILES: tl.constexpr = 8,
                             UNROLL: tl.constexpr = 1):
        """o [M, N] = x [M, K] @ w^T for M <= 8: NT / 2 weight rows (axis 0, 16 per warp), K tiles
        ``ks * T_PER_SPLIT ...`` (axis 1). Tensors of NT elements are per-thread registers. PDL: launched as
        a programmatic dependent, the first weight tile loaded before the wait for the previous kernel, the
        next kernel released after it (and, with PREFETCH, up to PF_TILES K tiles of each of the program's
        weight rows asked into L2 first). UNROLL: 1, or 2 register sets of K tiles in flight taking turns."""
        pid_n = tl.program_id(0)
        ks = tl.program_id(1)
        BN: tl.constexpr = NT // 2
        n0 = pid_n * BN
        t0 = ks * T_PER_SPLIT
        t1 = tl.minimum(t0 + T_PER_SPLIT, KB)
        zero = tl.zeros((NT,), dtype=tl.int32)
        ow, ox, os0, os1 = tl.inline_asm_elementwise(
            asm=_LANE_OFFS, constraints="=r,=r,=r,=r,r,r,r", args=[zero + K, zero + (M - 1), zero + KB * 4],
            dtype=(tl.int32,) * 4, is_pure=True, pack=1)
        w0 = (w_ptr + n0.to(tl.int64) * K).to(tl.int64)
        wg = w0 + ow.to(tl.int64)
        wh = wg + 8 * K
        if PREFETCH:
            _w_prefetch(wg, wh, t0, t1, PF_TILES)
        # in flight while the activation is quantized
        w_cur = _w_load(wg, wh, t0)
        if UNROLL > 1:
            w_b = _w_load(wg, wh, tl.minimum(t0 + 1, t1 - 1))
        _pdl_begin(PDL)  # everything below reads the activation or writes
        # the activation rows' K tiles t0..t1 -> e4m3 codes (natural order) + one scale per row and tile
        r = tl.arange(0, MP)
        c = tl.arange(0, QC * 128)
        for tq in range(t0, t1, QC):
            k = tq * 128 + c
            ok = (r < M)[:, None] & (k < t1 * 128)[None, :]
            xv = tl.load(x_ptr + r[:, None] * K + k[None, :], mask=ok, other=0.0).to(tl.float32)
            qv, s = _quant_e4m3(tl.reshape(xv, (MP * QC, 128)), UE8M0)
            tl.store(q_ptr + r[:, None] * K + k[None, :],
                     tl.reshape(qv, (MP, QC * 128)).to(tl.float8e4nv).to(tl.uint8, bitcast=True), mask=ok)
            s2 = tl.reshape(s, (MP, QC))
            kq = tq + tl.arange(0, QC)
            tl.store(qs_ptr + r[:, None] * KB + kq[None, :], s2, mask=(r < M)[:, None] & (kq < t1)[None, :])
        tl.debug_barrier()  # the stores above are what this program's lanes load next
        xa = q_ptr.to(tl.int64) + ox.to(tl.int64)
        s0 = qs_ptr.to(tl.int64) + os0.to(tl.int64)
        s1 = qs_ptr.to(tl.int64) + os1.to(tl.int64)
        x_cur = _x_load(xa, s0, s1, t0)
        acc0 = tl.zeros((NT,), dtype=tl.float32)
        acc = (acc0, acc0, acc0, acc0)
        sw_row = sw_ptr + (n0 // 128) * SW_STRIDE
        if UNROLL == 1:
            for kt in range(t0, t1):
                k_next = tl.minimum(kt + 1, t1 - 1)  # the last tile loads itself again: no masks in the PTX
                w_next = _w_load(wg, wh, k_next)
                x_next = _x_load(xa, s0, s1, k_next)
                sw = tl.load(sw_row + kt) + tl.zeros((NT,), dtype=tl.float32)
                acc = _mma_step(w_cur, x_cur, sw, acc)
                w_cur = w_next
                x_cur = x_next
        else:
            # two register sets take turns, each reloaded right after its MMA: no set is copied at the back
            # edge, where the loop above waits for the next tile's loads (see triton_fp4_mma's UNROLL); a
            # tile past t1 - 1 loads the last one again and its sum is not kept
            kb = tl.minimum(t0 + 1, t1 - 1)
            x_b = _x_load(xa, s0, s1, kb)
            sw_a = tl.load(sw_row + t0) + tl.zeros((NT,), dtype=tl.float32)
            sw_b = tl.load(sw_row + kb) + tl.zeros((NT,), dtype=tl.float32)
            for kt in range(t0, t1, 2):
                acc = _mma_step(w_cur, x_cur, sw_a, acc)
                k = tl.minimum(kt + 2, t1 - 1)
                w_cur = _w_load(wg, wh, k)
                x_cur = _x_load(xa, s0, s1, k)
                sw_a = tl.load(sw_row + k) + tl.zeros((NT,), dtype=tl.float32)
                acc = _mma_step_if(w_b, x_b, sw_b, acc, kt + 1 < t1)
                k = tl.minimum(kt + 3, t1 - 1)
                w_b = _w_load(wg, wh, k)
                x_b = _x_load(xa, s0, s1, k)
                sw_b = tl.load(sw_row + k) + tl.zeros((NT,), dtype=tl.float32)
        row, t = tl.inline_asm_elementwise(
            asm=_LANE_ROWS, constraints="=r,=r,r", args=[zero], dtype=(tl.int32, tl.int32), is_pure=True, pack=1)
        # d0..d3 = (row g, col 2t), (g, 2t + 1), (g + 8, 2t), (g + 8, 2t + 1)
        vals = tl.reshape(tl.join(tl.join(acc[0], acc[1]), tl.join(acc[2], acc[3])), (4 * NT,))
        rows = tl.reshape(tl.join(tl.join(row, row), tl.join(row + 8, row + 8)), (4 * NT,)) + n0
        cols = tl.reshape(tl.join(tl.join(2 * t, 2 * t + 1), tl.join(2 * t, 2 * t + 1)), (4 * NT,))
        flat = cols * N + rows  # offset in [M, N]; _splitk_store sees one row of M x N columns
        one = tl.arange(0, 1)
        _splitk_store(vals[None, :], o_ptr, part_ptr, cnt_ptr, one, one < 1, flat, (cols < M) & (rows < N), ks,
                      pid_n, 1, M * N, SPLIT)


def mma_supported(x2: Tensor, weight: Tensor) -> bool:
    """Whether :func:`fp8_gemv_mma` can run these operands: the CUDA target (not the interpreter), sm_89+, at
    most 8 rows, N a multiple of the row block (16 per warp) and K of 128."""
    return mma_device(x2) and _shape_ok(x2, weight)


def _shape_ok(x2: Tensor, weight: Tensor) -> bool:
    M, K = x2.shape
    return M <= MAX_ROWS and K % QBLOCK == 0 and weight.shape[0] % (16 * TUNE["fp8_mma_warps"]) == 0


def fp8_gemv_mma(x2: Tensor, weight: Tensor, scale: Tensor, ue8m0: bool, *, split_k: int | None = None) -> Tensor:
    """fp8_linear for at most 8 rows with the activation quantized (x2 [M, K] contiguous; see
    :func:`mma_supported`)."""
    M, K = x2.shape
    N = weight.shape[0]
    if not _shape_ok(x2, weight):
        raise ValueError(f"fp8_gemv_mma needs <= 8 rows, K % 128 == 0 and N a multiple of the row block, "
                         f"got x {tuple(x2.shape)}, weight {tuple(weight.shape)}")
    warps = TUNE["fp8_mma_warps"]
    bn = 16 * warps
    nt = N // bn
    kb = K // QBLOCK
    split, per = _pick_split(nt, kb, x2.device, split_k if split_k is not None else TUNE["fp8_mma_split"])
    out = torch.empty((M, N), dtype=x2.dtype, device=x2.device)
    part, cnt = _split_buffers(split, M, N, x2.device)
    q = torch.empty((M, K), dtype=torch.uint8, device=x2.device)
    qs = torch.empty((M, kb), dtype=torch.float32, device=x2.device)
    mp = triton.next_power_of_2(M)
    qc = max(1, min(triton.next_power_of_2(per), 32 // mp))  # tiles quantized per prologue step
    _fp8_gemv_mma_kernel[(nt, split)](
        x2, weight, scale, q, qs, out, part, cnt, M, N, K, kb, per, scale.stride(0), UE8M0=bool(ue8m0),
        SPLIT=split, NT=32 * warps, MP=mp, QC=qc, PF_TILES=max(1, PDL_PREFETCH_BYTES // (bn * 128)), num_warps=warps,
        num_stages=1, UNROLL=TUNE["fp8_mma_unroll"], **pdl_kwargs(x2.device, prefetch=True))
    return out


__all__ = ["fp8_gemv_mma", "mma_supported"]
