"""Packed FP4 expert GEMV on warp-level e4m3 MMAs, the e2m1 nibbles decoded straight into MMA fragments.

:func:`dsv4c.ops.triton_gemv.fp4_gemv_tc` hands Triton a decoded [BN, 64] e4m3 tile for ``tl.dot``; most
of its instructions go to re-packing bytes for the shared-memory copy the dot reads from. Here each lane
decodes the 32-bit words it loaded into the registers ``mma.sync.m16n8k32.e4m3`` takes as its A operand,
so no byte is moved between lanes or through shared memory:

- one MMA = 16 weight rows x one 32-wide scale group. Lane (g = lane / 4, t = lane % 4) loads word t of
  the group (K 8t..8t+7: four bytes, low nibble = even K, high = odd K) of rows g and g + 8; the low
  nibbles become its a0 / a1 registers and the high nibbles a2 / a3 (e2m1 -> e4m3 is a bit shuffle, value
  x 2^-6, exact). The MMA pairs register slots of A and B, not K indices, so B carries the activation's
  e4m3 codes in the same order: K 8t + {0, 2, 4, 6} in b0 and {1, 3, 5, 7} in b1, one 8-byte load from a
  scratch copy of the quantized row written in that order;
- all 8 B columns carry the same activation row, so every lane of a quad holds its rows' group sums;
  lane t keeps group t of each 128-wide K tile (4 MMAs), scaled by that group's ue8m0 weight scale and
  the tile's activation scale, and the quad sums its lanes at the end;
- each program first quantizes its K range of its activation row into the scratch row (programs of the
  same row write identical bytes), then streams its weight tiles, the next tile's loads in flight while
  the current one is multiplied; K is split across programs as in the other decode GEMVs.

Every lane-specific step (lane offsets, loads, fragment registers, the quad sums) is inline PTX that reads
the hardware lane itself; between those steps the per-thread values travel as Triton tensors of one
element per thread, which must stay in the thread that made them (element i in thread i, no layout
conversion: tests/ops/test_hopper_compile.py checks the compiled kernel for it). Triton launches the
kernel, keeps the loop and does the split-K bookkeeping. The packed tile must be 128 rows x 128 K
(``dsv4c.fp4-tiled/1``'s default). Needs sm_89+ (e4m3 MMA) and the CUDA target: the interpreter cannot run
PTX, so CI runs the PTX on a lane-by-lane interpreter (tests/ops/test_ptx_mma_lanes.py) and compiles the
kernel for sm_90; the GPU checks its numbers (benchmarks/mma_probe.py, benchmarks/decode_gemv_gpu.py
variant ``fp4_mma``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .triton_kernels import HAVE_TRITON, INTERPRET, TUNE, _pick_split, _split_buffers, pdl_kwargs

TILE_ROWS = 128  # packed tile rows (PBN)
TILE_K = 128  # packed tile K (PBK): 64 bytes per row


def lane_coords_ptx() -> list[str]:
    """PTX lines (inside a block) that define the lane's coordinates from the hardware thread id: ``lane``,
    ``warp``, ``g`` = lane / 4, ``t`` = lane % 4 and ``row`` = warp x 16 + g (its first MMA row in the
    program). Shared by the register-fed MMA GEMVs (this module and triton_fp8_mma)."""
    return [".reg .b32 tid, lane, warp, g, t, row;", "mov.u32 tid, %tid.x;", "and.b32 lane, tid, 31;",
            "shr.u32 warp, tid, 5;", "shr.u32 g, lane, 2;", "and.b32 t, lane, 3;", "mad.lo.u32 row, warp, 16, g;"]


def _lane_offsets_asm() -> str:
    """The lane's byte offsets, computed once: its weight word (row g of its warp's 16 rows, word t), its
    scale byte (group t, row g) and its activation fragment (8 t). In: $3 (zero; gives the shape).
    Out: $0 weight, $1 scale, $2 activation offset."""
    return "\n".join([
        "{", *lane_coords_ptx(), ".reg .b32 ow, os, ox;", "add.u32 row, row, $3;",
        "shl.b32 ow, row, 6;", "mad.lo.u32 ow, t, 4, ow;", f"mad.lo.u32 os, t, {TILE_ROWS}, row;", "shl.b32 ox, t, 3;",
        "mov.b32 $0, ow;", "mov.b32 $1, os;", "mov.b32 $2, ox;", "}"])


def _w_load_asm() -> str:
    """Lane's weight words of one K tile: rows g and g + 8, words t, 4 + t, 8 + t, 12 + t (groups 0..3), and
    the ue8m0 scale bytes of group t for both rows. In: $10 the lane's word address, $11 its scale byte
    address (u64). Out: $0-$3 row g, $4-$7 row g + 8, $8 / $9 scale bytes."""
    lines = ["{", ".reg .b64 wa, sa;", "mov.b64 wa, $10;", "mov.b64 sa, $11;"]
    for h in range(2):  # rows g, g + 8 (64 bytes a row)
        for q in range(4):
            lines.append(f"ld.global.nc.b32 ${4 * h + q}, [wa+{512 * h + 16 * q}];")
    lines += ["ld.global.nc.u8 $8, [sa+0];", "ld.global.nc.u8 $9, [sa+8];", "}"]
    return "\n".join(lines)


def _x_load_asm() -> str:
    """Lane's activation fragments of one K tile from the scratch row (fragment order, written by this
    kernel: plain loads, not the read-only path) and the tile's activation scale. In: $9 the lane's fragment
    address, $10 the scale's (u64). Out: $0-$7 (b0, b1) of groups 0..3, $8 the scale."""
    lines = ["{", ".reg .b64 xa, xs;", "mov.b64 xa, $9;", "mov.b64 xs, $10;"]
    for q in range(4):
        lines.append(f"ld.global.v2.b32 {{${2 * q}, ${2 * q + 1}}}, [xa+{32 * q}];")
    lines += ["ld.global.f32 $8, [xs];", "}"]
    return "\n".join(lines)


def _mma_step_asm() -> str:
    """One K tile: 4 MMAs (one per scale group), lane t keeps group t's sums of rows g and g + 8 times the
    weight scale 2^(byte - 127) (x 2^6 for the decode's 2^-6) and the activation scale.
    In: $2-$9 weight words, $10-$17 activation fragments, $18 / $19 scale bytes, $20 activation scale,
    $21 / $22 the running sums. Out: $0 / $1 the new sums."""
    lines = ["{", ".reg .b32 t, a0, a1, a2, a3, u0, u1;", ".reg .f32 z, sg, sh, fg, fh, rg, rh;",
             ".reg .f32 dg<4>, dh<4>, dj<8>;", ".reg .pred p<4>;",
             "mov.u32 t, %laneid;", "and.b32 t, t, 3;", "setp.eq.u32 p1, t, 1;", "setp.eq.u32 p2, t, 2;",
             "setp.eq.u32 p3, t, 3;", "mov.f32 z, 0f00000000;"]

    def decode(word: str, lo: str, hi: str) -> list[str]:
        # e2m1 nibble s|e1 e0|m -> e4m3 byte s|0 0 e1 e0|m 0 0 (value x 2^-6), four bytes at once
        return [f"and.b32 u0, {word}, 0x07070707;", "shl.b32 u0, u0, 2;", f"and.b32 u1, {word}, 0x08080808;",
                "shl.b32 u1, u1, 4;", f"or.b32 {lo}, u0, u1;",
                f"shr.b32 u0, {word}, 2;", "and.b32 u0, u0, 0x1C1C1C1C;", f"and.b32 u1, {word}, 0x80808080;",
                f"or.b32 {hi}, u0, u1;"]

    for q in range(4):
        lines += decode(f"${2 + q}", "a0", "a2") + decode(f"${6 + q}", "a1", "a3")
        lines.append(f"mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {{dg{q}, dj{2 * q}, dh{q}, "
                     f"dj{2 * q + 1}}}, {{a0, a1, a2, a3}}, {{${10 + 2 * q}, ${11 + 2 * q}}}, {{z, z, z, z}};")
    for r in ("g", "h"):
        lines += [f"mov.f32 s{r}, d{r}0;", f"selp.f32 s{r}, d{r}1, s{r}, p1;", f"selp.f32 s{r}, d{r}2, s{r}, p2;",
                  f"selp.f32 s{r}, d{r}3, s{r}, p3;"]
    lines += ["add.u32 u0, $18, 6;", "shl.b32 u0, u0, 23;", "mov.b32 fg, u0;", "mul.f32 fg, fg, $20;",
              "add.u32 u1, $19, 6;", "shl.b32 u1, u1, 23;", "mov.b32 fh, u1;", "mul.f32 fh, fh, $20;",
              "fma.rn.f32 rg, sg, fg, $21;", "fma.rn.f32 rh, sh, fh, $22;", "mov.f32 $0, rg;", "mov.f32 $1, rh;",
              "}"]
    return "\n".join(lines)


def _quad_sum_asm() -> str:
    """The quad's four group sums added (every lane gets the total) and the lane's rows.
    In: $4 / $5 sums of rows g / g + 8. Out: $0 / $1 totals, $2 row g in the program (warp x 16 + g), $3 t."""
    lines = ["{", ".reg .f32 vg, vh, u;", "mov.f32 vg, $4;", "mov.f32 vh, $5;"]
    for m in (1, 2):
        for v in ("vg", "vh"):
            lines += [f"shfl.sync.bfly.b32 u, {v}, {m}, 0x1f, 0xffffffff;", f"add.f32 {v}, {v}, u;"]
    lines += [*lane_coords_ptx(), "mov.f32 $0, vg;", "mov.f32 $1, vh;", "mov.b32 $2, row;", "mov.b32 $3, t;", "}"]
    return "\n".join(lines)


if HAVE_TRITON:
    import triton
    import triton.language as tl

    from .triton_kernels import _decode_row_expert, _l2_prefetch_if, _pdl_begin, _quant_e4m3, _splitk_store

    _LANE_OFFS = tl.constexpr(_lane_offsets_asm())
    _W_LOAD = tl.constexpr(_w_load_asm())
    _X_LOAD = tl.constexpr(_x_load_asm())
    _MMA_STEP = tl.constexpr(_mma_step_asm())
    _QUAD_SUM = tl.constexpr(_quad_sum_asm())

    @triton.jit
    def _lane_offsets(zero):
        """(weight word, scale byte, activation fragment) byte offsets of each lane, as int64 tensors."""
        ow, os, ox = tl.inline_asm_elementwise(
            asm=_LANE_OFFS, constraints="=r,=r,=r,r", args=[zero], dtype=(tl.int32,) * 3, is_pure=True, pack=1)
        return ow.to(tl.int64), os.to(tl.int64), ox.to(tl.int64)

    @triton.jit
    def _w_load(w_blk, s_blk, kt, ow, os):
        """The lane's weight words and scale bytes of K tile ``kt``."""
        wa = (w_blk + kt * (128 * 64)).to(tl.int64) + ow
        sa = (s_blk + kt * (4 * 128)).to(tl.int64) + os
        return tl.inline_asm_elementwise(
            asm=_W_LOAD, constraints="=r,=r,=r,=r,=r,=r,=r,=r,=r,=r,l,l", args=[wa, sa],
            dtype=(tl.int32,) * 10, is_pure=False, pack=1)

    @triton.jit
    def _x_load(q_row, s_row, kt, ox, zero):
        """The lane's activation fragments and scale of K tile ``kt`` (written by this program's prologue)."""
        xa = (q_row + kt * 128).to(tl.int64) + ox
        xs = (s_row + kt).to(tl.int64) + zero
        return tl.inline_asm_elementwise(
            asm=_X_LOAD, constraints="=r,=r,=r,=r,=r,=r,=r,=r,=f,l,l", args=[xa, xs],
            dtype=(tl.int32,) * 8 + (tl.float32,), is_pure=False, pack=1)

    @triton.jit
    def _mma_step(w, x, acc_g, acc_h):
        """One K tile's 4 MMAs added to the lane's running sums (rows g, g + 8)."""
        return tl.inline_asm_elementwise(
            asm=_MMA_STEP, constraints="=f,=f," + "r," * 18 + "f,f,f",
            args=[w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7], x[0], x[1], x[2], x[3], x[4], x[5], x[6], x[7],
                  w[8], w[9], x[8], acc_g, acc_h],
            dtype=(tl.float32, tl.float32), is_pure=True, pack=1)

    @triton.jit
    def _tile_regs(kt, at):
        """The lane's weight and activation registers of K tile ``kt``; ``at``: (w_blk, s_blk, q_row, s_row, ow,
        os, ox, zero) of the kernel."""
        return _w_load(at[0], at[1], kt, at[4], at[5]), _x_load(at[2], at[3], kt, at[6], at[7])

    @triton.jit
    def _turn(w, x, acc_g, acc_h, keep, k_next, at):
        """One register set's turn: its tile's MMA (the sums kept where ``keep``, a scalar), then tile
        ``k_next``'s loads into the set."""
        g, h = _mma_step(w, x, acc_g, acc_h)
        w_next, x_next = _tile_regs(k_next, at)
        return tl.where(keep, g, acc_g), tl.where(keep, h, acc_h), w_next, x_next

    @triton.jit
    def _fp4_gemv_mma_kernel(x_ptr, e_ptr, order_ptr, w_ptr, sw_ptr, q_ptr, qs_ptr, o_ptr, part_ptr, cnt_ptr,
                             A, N, K, E, NBLK, KTILES, T_PER_SPLIT, UE8M0: tl.constexpr, SPLIT: tl.constexpr,
                             ORDERED: tl.constexpr, NT: tl.constexpr, TQ: tl.constexpr, PDL: tl.constexpr = False,
                             L2_PREFETCH: tl.constexpr = False, UNROLL: tl.constexpr = 1):
        """Row ``a`` (axis 0) times its expert's packed e2m1 weight: NT / 2 output rows (axis 1, 16 per warp),
        K tiles ``ks * T_PER_SPLIT ...`` (axis 2). Tensors of NT elements are per-thread registers. PDL:
        launched as a programmatic dependent (the expert ids come from the previous kernels: it waits first).
        L2_PREFETCH: thread i asks K tile t0 + i of the program's rows into L2 (its BN x 64 bytes are
        contiguous), the last thread the K range's scale bytes, before the first register load. UNROLL: register
        sets of K tiles in flight that take turns (1: the next tile's loads while one is multiplied; 2 or 4)."""
        _pdl_begin(PDL)
        a, e, valid = _decode_row_expert(e_ptr, order_ptr, E, ORDERED)
        pid_n = tl.program_id(1)
        ks = tl.program_id(2)
        BN: tl.constexpr = NT // 2
        nb = (pid_n * BN) // 128
        r0 = (pid_n * BN) % 128
        t0 = ks * T_PER_SPLIT
        t1 = tl.minimum(t0 + T_PER_SPLIT, KTILES)
        zero = tl.zeros((NT,), dtype=tl.int64)
        acc_g = tl.zeros((NT,), dtype=tl.float32)
        acc_h = tl.zeros((NT,), dtype=tl.float32)
        if valid:
            ev = tl.maximum(e, 0).to(tl.int64)
            w_blk = w_ptr + (ev * NBLK + nb) * KTILES * (128 * 64) + r0 * 64
            s_blk = sw_ptr + (ev * NBLK + nb) * (K // 32) * 128 + r0
            if L2_PREFETCH:
                i_pf = tl.arange(0, NT)
                kt_pf = t0 + tl.minimum(i_pf, t1 - t0 - 1)
                w_pf = (w_blk + kt_pf * (128 * 64)).to(tl.int64)
                s_pf = (s_blk - r0 + t0 * (4 * 128)).to(tl.int64) + tl.zeros_like(w_pf)
                last = i_pf == NT - 1
                _l2_prefetch_if(tl.where(last, s_pf, w_pf), tl.where(last, (t1 - t0) * (4 * 128), BN * 64),
                                ((i_pf < t1 - t0) | last).to(tl.int32))
            q_row = q_ptr + a.to(tl.int64) * K
            s_row = qs_ptr + a.to(tl.int64) * KTILES
            ow, os, ox = _lane_offsets(zero.to(tl.int32))
            if UNROLL == 1:
                w_cur = _w_load(w_blk, s_blk, t0, ow, os)  # in flight while the activation is quantized
            # the activation's K tiles t0..t1 -> e4m3 codes in fragment order (K 8c + {0, 2, 4, 6} then
            # {1, 3, 5, 7} per 8) + one scale per tile
            i = tl.arange(0, TQ)
            j = tl.arange(0, 128)
            kt_q = t0 + i
            ok = kt_q < t1
            xv = tl.load(x_ptr + a.to(tl.int64) * K + kt_q[:, None] * 128 + j[None, :], mask=ok[:, None],
                         other=0.0).to(tl.float32)
            qv, s = _quant_e4m3(xv, UE8M0)
            perm = (j // 8) * 8 + (j % 2) * 4 + (j % 8) // 2
            tl.store(q_row + kt_q[:, None] * 128 + perm[None, :], qv.to(tl.float8e4nv).to(tl.uint8, bitcast=True),
                     mask=ok[:, None])
            tl.store(s_row + kt_q, s, mask=ok)
            tl.debug_barrier()  # the stores above are what this program's lanes load next
            if UNROLL == 1:
                x_cur = _x_load(q_row, s_row, t0, ox, zero)
                for kt in range(t0, t1):
                    k_next = tl.minimum(kt + 1, t1 - 1)  # the last tile loads itself again: no masks in the PTX
                    w_next = _w_load(w_blk, s_blk, k_next, ow, os)
                    x_next = _x_load(q_row, s_row, k_next, ox, zero)
                    acc_g, acc_h = _mma_step(w_cur, x_cur, acc_g, acc_h)
                    w_cur = w_next
                    x_cur = x_next
            else:
                # UNROLL register sets take turns: each set gets its next tile's loads right after its MMA,
                # so those loads have the other sets' MMAs and the back edge to land, and no set is copied at
                # the back edge. (The loop above carries the next tile's registers across its back edge, where
                # ptxas copies them, and a copy of a register that a load is still filling waits for the
                # load: one whole load latency per tile, seen in its SASS.) Tiles past t1 - 1 load the last
                # one again and their sums are not kept.
                at = (w_blk, s_blk, q_row, s_row, ow, os, ox, zero)
                wa, xa = _tile_regs(t0, at)
                wb, xb = _tile_regs(tl.minimum(t0 + 1, t1 - 1), at)
                if UNROLL == 4:
                    wc, xc = _tile_regs(tl.minimum(t0 + 2, t1 - 1), at)
                    wd, xd = _tile_regs(tl.minimum(t0 + 3, t1 - 1), at)
                    for kt in range(t0, t1, 4):
                        acc_g, acc_h, wa, xa = _turn(wa, xa, acc_g, acc_h, kt < t1, tl.minimum(kt + 4, t1 - 1), at)
                        acc_g, acc_h, wb, xb = _turn(wb, xb, acc_g, acc_h, kt + 1 < t1, tl.minimum(kt + 5, t1 - 1), at)
                        acc_g, acc_h, wc, xc = _turn(wc, xc, acc_g, acc_h, kt + 2 < t1, tl.minimum(kt + 6, t1 - 1), at)
                        acc_g, acc_h, wd, xd = _turn(wd, xd, acc_g, acc_h, kt + 3 < t1, tl.minimum(kt + 7, t1 - 1), at)
                else:
                    for kt in range(t0, t1, 2):
                        acc_g, acc_h, wa, xa = _turn(wa, xa, acc_g, acc_h, kt < t1, tl.minimum(kt + 2, t1 - 1), at)
                        acc_g, acc_h, wb, xb = _turn(wb, xb, acc_g, acc_h, kt + 1 < t1, tl.minimum(kt + 3, t1 - 1), at)
        tot_g, tot_h, row, t = tl.inline_asm_elementwise(
            asm=_QUAD_SUM, constraints="=f,=f,=r,=r,f,f", args=[acc_g, acc_h],
            dtype=(tl.float32, tl.float32, tl.int32, tl.int32), is_pure=True, pack=1)
        vals = tl.reshape(tl.join(tot_g, tot_h), (2 * NT,))
        rn = tl.reshape(tl.join(row, row + 8), (2 * NT,)) + pid_n * BN
        lead = tl.reshape(tl.join(t, t), (2 * NT,)) == 0  # one lane of each quad stores
        rows = a + tl.arange(0, 1)
        _splitk_store(vals[None, :], o_ptr, part_ptr, cnt_ptr, rows, rows < A, rn, lead & (rn < N), ks,
                      a * tl.num_programs(1) + pid_n, A, N, SPLIT)


def mma_device(t: Tensor) -> bool:
    """Whether the register-fed MMA GEMVs can run on ``t``'s device: the CUDA target (not the interpreter)
    and sm_89+ (e4m3 ``mma.sync``)."""
    return (HAVE_TRITON and not INTERPRET and t.device.type == "cuda"
            and torch.cuda.get_device_capability(t.device) >= (8, 9))


def _tiles_ok(x: Tensor, weight: Tensor) -> bool:
    """128 x 128 packed tiles that cover x's K."""
    return tuple(weight.shape[-2:]) == (TILE_ROWS, TILE_K // 2) and weight.shape[2] * TILE_K == x.shape[-1]


def mma_supported(weight: Tensor, x: Tensor) -> bool:
    """Whether :func:`fp4_gemv_mma` can run these operands: :func:`mma_device` and the default 128 x 128
    packed tile."""
    return mma_device(x) and _tiles_ok(x, weight)


def fp4_gemv_mma(x: Tensor, expert: Tensor, weight: Tensor, scale: Tensor, ue8m0: bool, *,
                 split_k: int | None = None) -> Tensor:
    """fp4_grouped_linear_packed for decode rows with the activation quantized (x [A, K] contiguous, K a
    multiple of 128, the packed tile 128 x 128: see :func:`mma_supported`): one row per program."""
    A, K = x.shape
    E, NBLK, KT, PBN, _ = weight.shape
    if not _tiles_ok(x, weight):
        raise ValueError(f"fp4_gemv_mma needs 128 x 128 packed tiles covering K = {K}, got {tuple(weight.shape)}")
    N = NBLK * PBN
    warps = TUNE["fp4_mma_warps"]
    bn = 16 * warps
    nt = triton.cdiv(N, bn)
    want = TUNE["fp4_mma_split"]
    split, per = _pick_split(A * nt, KT, x.device, split_k if split_k is not None else want)
    out = torch.empty((A, N), dtype=x.dtype, device=x.device)
    part, cnt = _split_buffers(split, A, N, x.device)
    q = torch.empty((A, K), dtype=torch.uint8, device=x.device)
    qs = torch.empty((A, KT), dtype=torch.float32, device=x.device)
    ordered = A > TUNE["fp4_order_rows"]
    order = torch.sort(expert).indices if ordered else expert
    _fp4_gemv_mma_kernel[(A, nt, split)](
        x, expert, order, weight, scale, q, qs, out, part, cnt, A, N, K, E, NBLK, KT, per, UE8M0=bool(ue8m0),
        SPLIT=split, ORDERED=ordered, NT=32 * warps, TQ=triton.next_power_of_2(per), num_warps=warps,
        num_stages=1, L2_PREFETCH=bool(TUNE["fp4_mma_l2_prefetch"]), UNROLL=TUNE["fp4_mma_unroll"],
        **pdl_kwargs(x.device))
    return out


__all__ = ["fp4_gemv_mma", "mma_supported"]
