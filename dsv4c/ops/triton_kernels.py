"""Triton (GPU) implementations of the ``dsv4`` ops.

:func:`register_cuda_kernels` registers each launcher below as the CUDA implementation of the op of
the same name in :mod:`dsv4c.ops.library`; the CPU reference impls there stay the numerical contract.
The launchers are also usable directly. On CPU tensors they run under Triton's interpreter, which
must be switched on (``TRITON_INTERPRET=1``) before triton is first imported; that is how the tests
check them on machines without a GPU.

Numerics (all match the CPU reference up to fp32 summation order unless noted):

- Activation quantization (``act_quant``) is a separate kernel producing e4m3 codes plus one fp32
  scale per 1x128 block. The e4m3 rounding (nearest, ties to even) and the ue8m0 scale
  ``2^ceil(log2(max(amax, 1e-4) / 448))`` are computed with integer bit arithmetic, so they are exact
  and independent of the device's fp8 conversion instructions. (``torch.log2`` in the reference can
  round ``log2`` of a value a few ulps above a power of two down to the integer, giving a scale one
  power of two smaller in that case; the bit form is what DeepSeek's kernels compute.)
- ``fp8_linear`` multiplies e4m3 x e4m3 on the tensor cores per 128-wide K block and applies both
  scales to the fp32 partial product. ``fp4_grouped_linear`` dequantizes packed e2m1 weights times
  their ue8m0 scale to bf16 in the kernel (exact) and multiplies with the e4m3 activation codes
  (exact in bf16), fp32 accumulate. On sm_90 Triton's e4m3 dots accumulate inside the tensor cores
  at reduced precision (its default ``max_num_imprecise_acc``); partials are promoted to fp32 every
  128-wide K block, as in DeepGEMM, so expect ~1e-4 relative differences there, not fp32 ulps.
- With ``ue8m0=False`` and bf16 activations the reference rounds the dequantized activation
  ``q * s`` to bf16 before the GEMM (non-power-of-two scales make that visible); the launchers do the
  same (quant-dequant kernel, then a bf16 GEMM). Published checkpoints use ue8m0.
- bf16 outputs are rounded to nearest-even explicitly before the store (bit arithmetic), so the
  interpreter (whose own fp32 -> bf16 cast truncates) rounds like the GPU and the reference.
- ``sparse_attn``: bf16 Q.K products, fp32 online softmax; P.V uses P split into two bf16 terms
  (hi + lo, ~16 significant bits), so its error stays well below the bf16 output rounding.
- ``sparse_attn_packed`` / ``indexer_score_packed`` / ``indexer_topk_packed`` read the KV cache in its storage
  format (``dsv4c.ops.kv_storage``) and dequantize in registers; the dequantized values (e4m3 or e2m1 times
  a power of two) are exact in bf16, so they compute what the dense kernels compute on ``kv_unpack`` /
  ``fp4_unpack`` of the cache (the indexer bit for bit on H100; the attention to the same error against an
  fp32 reference, with different bf16 output roundings in ~0.1% of elements).
- fp32 inputs (no activation quantization) use IEEE fp32 dots (slow; meant for fp32 test models).
- Under the interpreter every dot runs in fp32 (the interpreter cannot multiply bf16), which is exact
  for the bf16/e4m3 operands used here.
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch
from torch import Tensor

try:  # triton is an optional (GPU) dependency
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on machines without triton
    triton = None
    tl = None

HAVE_TRITON = triton is not None


def _interpreting() -> bool:
    if not HAVE_TRITON:
        return False
    try:
        from triton import knobs

        return bool(knobs.runtime.interpret)
    except (ImportError, AttributeError):  # older triton
        import os

        return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Decided when this module is imported, like ``triton.jit`` itself decides interpreted vs compiled.
INTERPRET = _interpreting()


def _fix_interpreter_for_numpy_2_4() -> None:
    """triton <= 3.6's interpreter turns a runtime scalar into an index with ``int(ndarray of shape (1,))``,
    which numpy >= 2.4 rejects (``range(n)`` over a kernel argument fails). Upstream fix:
    triton-lang/triton#9172 (issue #9171); this re-patches ``__index__`` the same way."""
    try:
        from triton.runtime import interpreter as _interp
    except ImportError:  # pragma: no cover
        return
    orig = getattr(_interp, "_patch_lang_tensor", None)
    if orig is None or getattr(orig, "_dsv4c_index_fix", False):
        return

    def _patch_lang_tensor(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    _patch_lang_tensor._dsv4c_index_fix = True
    _interp._patch_lang_tensor = _patch_lang_tensor


if INTERPRET:
    _fix_interpreter_for_numpy_2_4()

FP8_MAX = 448.0
FP4_MAX = 6.0
QBLOCK = 128  # activation quantization block along K; also the FP8 weight block


# =================================================================================================
# kernels
# =================================================================================================

if HAVE_TRITON:
    try:  # grid dependency control (programmatic dependent launch, sm_90+)
        from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    except ImportError:  # pragma: no cover - older triton: pdl_launch() is then always False
        gdc_launch_dependents = gdc_wait = None

    # ---- shared device helpers ------------------------------------------------------------------

    @triton.jit
    def _pdl_release(PDL: tl.constexpr):
        """Programmatic dependent launch: the next kernel on the stream may launch once every program of
        this one has passed here. Only after :func:`_pdl_wait`: a kernel launched early may then count on
        everything before this kernel being finished (Inductor's generated kernels do, and skip their wait
        when they read nothing this kernel writes); released before the wait, the next kernel could start
        while the one before this still ran (session 12: greedy chains that diverged from the step loop)."""
        if PDL:
            gdc_launch_dependents()

    @triton.jit
    def _l2_prefetch(addr, nbytes):
        """Ask for ``nbytes`` (a multiple of 16) from each 16-byte aligned global address of ``addr`` (int64)
        to be brought into L2 (sm_90 bulk prefetch; nothing waits for it). Under programmatic dependent
        launch a GEMV prefetches its weight slice this way before it waits for the previous kernel."""
        return tl.inline_asm_elementwise(
            asm="cp.async.bulk.prefetch.L2.global [$1], $2;\nmov.u32 $0, 0;", constraints="=r,l,r",
            args=[addr, nbytes], dtype=tl.int32, is_pure=False, pack=1)

    @triton.jit
    def _l2_prefetch_if(addr, nbytes, on):
        """:func:`_l2_prefetch` in the threads whose ``on`` (int32) is non-zero, nothing in the others."""
        return tl.inline_asm_elementwise(
            asm="{\n.reg .pred p;\nsetp.ne.u32 p, $3, 0;\n@p cp.async.bulk.prefetch.L2.global [$1], $2;\n"
                "mov.u32 $0, 0;\n}", constraints="=r,l,r,r", args=[addr, nbytes, on], dtype=tl.int32,
            is_pure=False, pack=1)

    @triton.jit
    def _pdl_wait(PDL: tl.constexpr):
        """Wait until the previous kernel on the stream has finished and its writes are visible. Under
        programmatic dependent launch nothing before this may read what an earlier kernel wrote, or write
        anything: only immutable data (weights) may be loaded ahead of it."""
        if PDL:
            gdc_wait()

    @triton.jit
    def _pdl_begin(PDL: tl.constexpr):
        """The opening of a kernel whose every access depends on the previous kernel: wait
        (:func:`_pdl_wait`), then release the next kernel (:func:`_pdl_release`)."""
        _pdl_wait(PDL)
        _pdl_release(PDL)

    @triton.jit
    def _pow2_ceil(a):
        """(2^ceil(log2 a), 2^-ceil(log2 a)) for positive normal fp32 ``a``, exact (from the bits)."""
        bits = a.to(tl.int32, bitcast=True)
        e = ((bits >> 23) & 0xFF) - 127 + ((bits & 0x7FFFFF) != 0).to(tl.int32)
        s = ((e + 127) << 23).to(tl.float32, bitcast=True)
        inv = ((127 - e) << 23).to(tl.float32, bitcast=True)
        return s, inv

    @triton.jit
    def _cast_out(x, DT: tl.constexpr):
        """fp32 -> DT for a store. bf16 is rounded to nearest-even on the bits first, so the conversion itself
        is exact (the interpreter's own fp32 -> bf16 cast truncates; on the GPU this changes nothing)."""
        if DT == tl.bfloat16:
            bits = x.to(tl.int32, bitcast=True)
            r = ((bits + 0x7FFF + ((bits >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
            x = tl.where(x != x, x, r)
        return x.to(DT)

    @triton.jit
    def _e4m3_rne(v):
        """Nearest e4m3 value (ties to even) of fp32 ``v`` inside [-448, 448], as fp32."""
        a = tl.abs(v)
        # normal range (>= 2^-6): keep 3 mantissa bits, integer round-half-even on the fp32 bits
        bits = a.to(tl.int32, bitcast=True)
        lsb = (bits >> 20) & 1
        nrm = ((bits + 0x7FFFF + lsb) & -1048576).to(tl.float32, bitcast=True)
        # subnormal range: multiples of 2^-9
        n = a * 512.0
        fi = n.to(tl.int32)
        fr = n - fi.to(tl.float32)
        up = (fr > 0.5) | ((fr == 0.5) & ((fi & 1) == 1))
        sub = (fi + up.to(tl.int32)).to(tl.float32) * 0.001953125
        r = tl.where(a < 0.015625, sub, nrm)
        return tl.where(v < 0, -r, r)

    @triton.jit
    def _e2m1_rne(v):
        """Nearest e2m1 value (ties to even) of fp32 ``v`` inside [-6, 6], as fp32."""
        a = tl.abs(v)
        m = (a > 0.25).to(tl.float32) * 0.5
        m += (a >= 0.75).to(tl.float32) * 0.5
        m += (a > 1.25).to(tl.float32) * 0.5
        m += (a >= 1.75).to(tl.float32) * 0.5
        m += (a > 2.5).to(tl.float32)
        m += (a >= 3.5).to(tl.float32)
        m += (a > 5.0).to(tl.float32) * 2.0
        return tl.where(v < 0, -m, m)

    @triton.jit
    def _e2m1_decode(c):
        """fp32 value of e2m1 codes ``c`` (int32, 0..15, sign in bit 3)."""
        e = (c >> 1) & 3
        m = c & 1
        num = tl.where(e == 0, m << 1, (2 + m) << e)
        mag = num.to(tl.float32) * 0.25
        return tl.where((c & 8) != 0, -mag, mag)

    @triton.jit
    def _quant_e4m3(x, UE8M0: tl.constexpr):
        """Per-row quantization of fp32 ``x`` [R, B]: (e4m3 grid values as fp32 [R, B], scale [R])."""
        amax = tl.max(tl.abs(x), axis=1)
        a = tl.math.div_rn(tl.maximum(amax, 1e-4), 448.0)
        if UE8M0:
            s, inv = _pow2_ceil(a)
            v = x * inv[:, None]
        else:
            s = a
            v = tl.math.div_rn(x, s[:, None])
        v = tl.minimum(tl.maximum(v, -448.0), 448.0)
        return _e4m3_rne(v), s

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

    # ---- quantization ---------------------------------------------------------------------------

    @triton.jit
    def _act_quant_kernel(x_ptr, q_ptr, s_ptr, M, K, NB,
                          BLOCK_M: tl.constexpr, QB: tl.constexpr, UE8M0: tl.constexpr,
                          DEQUANT: tl.constexpr, PDL: tl.constexpr = False):
        """x [M, K] -> e4m3 codes q [M, K] + fp32 scales s [M, NB] (or, with DEQUANT, q * s in q's dtype)."""
        _pdl_begin(PDL)
        pid_m = tl.program_id(0)
        kb = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rk = kb * QB + tl.arange(0, QB)
        m_mask = rm < M
        mask = m_mask[:, None] & (rk < K)[None, :]
        offs = rm.to(tl.int64)[:, None] * K + rk[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        q, s = _quant_e4m3(x, UE8M0)
        if DEQUANT:
            tl.store(q_ptr + offs, _cast_out(q * s[:, None], q_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(q_ptr + offs, q.to(tl.float8e4nv), mask=mask)
            tl.store(s_ptr + rm.to(tl.int64) * NB + kb, s, mask=m_mask)

    @triton.jit
    def _fp4_qdq_kernel(x_ptr, o_ptr, M, K, BLOCK_M: tl.constexpr, QB: tl.constexpr):
        pid_m = tl.program_id(0)
        kb = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rk = kb * QB + tl.arange(0, QB)
        mask = (rm < M)[:, None] & (rk < K)[None, :]
        offs = rm.to(tl.int64)[:, None] * K + rk[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        amax = tl.max(tl.abs(x), axis=1)
        # floor 6 * 2^-126 keeps amax / 6 a normal number
        a = tl.math.div_rn(tl.maximum(amax, 7.052966104933725e-38), 6.0)
        s, inv = _pow2_ceil(a)
        v = tl.minimum(tl.maximum(x * inv[:, None], -6.0), 6.0)
        tl.store(o_ptr + offs, _cast_out(_e2m1_rne(v) * s[:, None], o_ptr.dtype.element_ty), mask=mask)

    # ---- FP8 block-scaled GEMM ------------------------------------------------------------------

    @triton.jit
    def _fp8_gemm_kernel(a_ptr, sa_ptr, w_ptr, sw_ptr, o_ptr, M, N, K, KB, KB_PER_SPLIT, SW_STRIDE,
                         ACT_Q: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                         BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        """o[split] = sum over this split's K blocks of (a @ w^T) * sa[m, kb] * sw[n // 128, kb]."""
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        m_mask = rm < M
        n_mask = rn < N
        a_rows = a_ptr + rm.to(tl.int64)[:, None] * K
        w_rows = w_ptr + rn.to(tl.int64)[:, None] * K
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for i in range(KB_PER_SPLIT):
            kb = pid_k * KB_PER_SPLIT + i  # the last split may run past KB: fully masked there
            k = kb * BK + rk
            k_mask = (k < K) & (kb < KB)
            a = tl.load(a_rows + k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            w = tl.load(w_rows + k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
            if UPCAST or IEEE:
                part = tl.dot(a.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
            elif ACT_Q:
                part = tl.dot(a, tl.trans(w))  # e4m3 x e4m3 -> fp32
            else:
                part = tl.dot(a, tl.trans(w.to(a.dtype)))  # e4m3 -> bf16/fp16 is exact
            if ACT_Q:
                sa = tl.load(sa_ptr + rm.to(tl.int64) * KB + kb, mask=m_mask & (kb < KB), other=0.0)
                part = part * sa[:, None]
            sw = tl.load(sw_ptr + (rn // 128) * SW_STRIDE + (kb * BK) // 128, mask=n_mask & (kb < KB), other=0.0)
            acc += part * sw[None, :]
        o_offs = (pid_k * M + rm.to(tl.int64))[:, None] * N + rn[None, :]
        tl.store(o_ptr + o_offs, _cast_out(acc, o_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])

    # ---- FP4 (MXFP4-style) grouped GEMM ---------------------------------------------------------

    @triton.jit
    def _fp4_grouped_kernel(a_ptr, sa_ptr, order_ptr, t_exp_ptr, t_row0_ptr, t_row1_ptr, w_ptr, sw_ptr, o_ptr,
                            N, K, KB,
                            ACT_Q: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                            BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        """One tile of rows of one expert (rows given through ``order``) times that expert's packed weight."""
        t = tl.program_id(0)
        pid_n = tl.program_id(1)
        e = tl.load(t_exp_ptr + t)
        if e >= 0:
            row0 = tl.load(t_row0_ptr + t)
            row1 = tl.load(t_row1_ptr + t)
            rows = row0 + tl.arange(0, BM)
            r_mask = rows < row1
            src = tl.load(order_ptr + rows, mask=r_mask, other=0).to(tl.int64)
            rn = pid_n * BN + tl.arange(0, BN)
            n_mask = rn < N
            rk = tl.arange(0, BK)
            rk2 = tl.arange(0, BK // 2)
            K2 = K // 2
            K32 = K // 32
            w_rows = w_ptr + e.to(tl.int64) * N * K2 + rn.to(tl.int64)[:, None] * K2
            s_rows = sw_ptr + e.to(tl.int64) * N * K32 + rn.to(tl.int64)[:, None] * K32
            a_rows = a_ptr + src[:, None] * K
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            for kb in range(KB):
                k = kb * BK + rk
                a = tl.load(a_rows + k[None, :], mask=r_mask[:, None] & (k < K)[None, :], other=0.0)
                kk = kb * (BK // 2) + rk2  # byte column; element 2*kk (low nibble) and 2*kk + 1 (high)
                wm = n_mask[:, None] & (kk < K2)[None, :]
                p = tl.load(w_rows + kk[None, :], mask=wm, other=0).to(tl.int32)
                sc = tl.load(s_rows + (kk // 16)[None, :], mask=wm, other=0.0)
                lo = _e2m1_decode(p & 0xF) * sc
                hi = _e2m1_decode((p >> 4) & 0xF) * sc
                w = tl.reshape(tl.join(lo, hi), (BN, BK))  # interleave: [.., j, 0/1] -> element 2j / 2j+1
                if UPCAST or IEEE:
                    part = tl.dot(a.to(tl.float32), tl.trans(w), input_precision="ieee")
                elif ACT_Q:
                    part = tl.dot(a.to(tl.bfloat16), tl.trans(w.to(tl.bfloat16)))
                else:
                    part = tl.dot(a, tl.trans(w.to(a.dtype)))
                if ACT_Q:
                    sa = tl.load(sa_ptr + src * KB + kb, mask=r_mask, other=0.0)
                    part = part * sa[:, None]
                acc += part
            tl.store(o_ptr + src[:, None] * N + rn[None, :], _cast_out(acc, o_ptr.dtype.element_ty),
                     mask=r_mask[:, None] & n_mask[None, :])

    # ---- split-K with a semaphore: one launch, deterministic --------------------------------------

    @triton.jit
    def _splitk_store(acc, o_ptr, part_ptr, cnt_ptr, rows, r_mask, rn, n_mask, ks, cnt_idx, MROWS, N,
                      SPLIT: tl.constexpr):
        """Store ``acc``, this program's share of output rows ``rows`` x columns ``rn``.

        SPLIT == 1: store it. Otherwise park it in ``part`` [SPLIT, MROWS, N] (fp32), count the arrival on
        ``cnt[cnt_idx]``, and let the last of the SPLIT programs of the tile sum the partials in split order
        (so the result does not depend on timing) and reset the counter to 0 for the next launch."""
        m2 = r_mask[:, None] & n_mask[None, :]
        offs = rows.to(tl.int64)[:, None] * N + rn[None, :]
        if SPLIT == 1:
            tl.store(o_ptr + offs, _cast_out(acc, o_ptr.dtype.element_ty), mask=m2)
        else:
            stride = (ks * 0).to(tl.int64) + MROWS * N  # int64 (MROWS may arrive as a constexpr 1)
            tl.store(part_ptr + ks * stride + offs, acc, mask=m2)
            tl.debug_barrier()
            prev = tl.atomic_add(cnt_ptr + cnt_idx, 1, sem="acq_rel", scope="gpu")
            if prev == SPLIT - 1:
                tot = tl.zeros(acc.shape, dtype=tl.float32)
                for j in tl.static_range(SPLIT):  # unrolled: all partial loads in flight at once
                    tot += tl.load(part_ptr + j * stride + offs, mask=m2, other=0.0, cache_modifier=".cg")
                tl.store(o_ptr + offs, _cast_out(tot, o_ptr.dtype.element_ty), mask=m2)
                tl.atomic_xchg(cnt_ptr + cnt_idx, 0)

    # ---- FP8 GEMM for few rows (decode): activation quantized in the kernel, split-K ----------------

    @triton.jit
    def _fp8_skinny_kernel(x_ptr, w_ptr, sw_ptr, o_ptr, part_ptr, cnt_ptr, M, N, K, KB, KB_PER_SPLIT, SW_STRIDE,
                           ACT_Q: tl.constexpr, UE8M0: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                           FP8_DOT: tl.constexpr, SPLIT: tl.constexpr,
                           BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        """o = x @ w^T for M <= 64 rows: each program quantizes its own [BM, 128] activation blocks (no
        separate quantization launch), multiplies with the e4m3 weight tile and applies both scales per
        128-wide K block; K is split across programs (axis 2) and merged by :func:`_splitk_store`."""
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        ks = tl.program_id(2)
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        m_mask = rm < M
        n_mask = rn < N
        x_rows = x_ptr + rm.to(tl.int64)[:, None] * K
        w_rows = w_ptr + rn.to(tl.int64)[:, None] * K
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for i in range(KB_PER_SPLIT):
            kb = ks * KB_PER_SPLIT + i
            k = kb * BK + rk
            k_mask = (k < K) & (kb < KB)
            xa = tl.load(x_rows + k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            w = tl.load(w_rows + k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
            if ACT_Q:
                q, sa = _quant_e4m3(xa.to(tl.float32), UE8M0)
                if UPCAST or IEEE:
                    part = tl.dot(q, tl.trans(w.to(tl.float32)), input_precision="ieee")
                elif FP8_DOT:
                    part = tl.dot(q.to(tl.float8e4nv), tl.trans(w))
                else:
                    part = tl.dot(q.to(tl.bfloat16), tl.trans(w.to(tl.bfloat16)))  # both exact in bf16
                part = part * sa[:, None]
            else:
                if UPCAST or IEEE:
                    part = tl.dot(xa.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
                else:
                    part = tl.dot(xa, tl.trans(w.to(xa.dtype)))
            sw = tl.load(sw_ptr + (rn // 128) * SW_STRIDE + (kb * BK) // 128, mask=n_mask & (kb < KB), other=0.0)
            acc += part * sw[None, :]
        _splitk_store(acc, o_ptr, part_ptr, cnt_ptr, rm, m_mask, rn, n_mask, ks,
                      pid_m * tl.num_programs(1) + pid_n, M, N, SPLIT)

    # ---- FP4 experts on the packed (tiled) layout -------------------------------------------------

    @triton.jit
    def _fp4_packed_kernel(x_ptr, sa_ptr, order_ptr, t_exp_ptr, t_row0_ptr, t_row1_ptr, w_ptr, sw_ptr, o_ptr,
                           part_ptr, cnt_ptr, A, N, K, E, NBLK, KTILES, NKB, KB_PER_SPLIT,
                           PBN: tl.constexpr, PBK: tl.constexpr, ACT_MODE: tl.constexpr, UE8M0: tl.constexpr,
                           IEEE: tl.constexpr, UPCAST: tl.constexpr, ROWS_DIRECT: tl.constexpr,
                           SPLIT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, SWAP: tl.constexpr,
                           DEQ_F32: tl.constexpr = False):
        """Rows of one expert times that expert's packed e2m1 weight (``dsv4c.fp4-tiled/1``).

        The tile's nibbles become e4m3 bit patterns with two masks and shifts (an e2m1 value is its e4m3
        pattern times 2^6, subnormal 0.5 included), the per-32 ue8m0 scale times 2^6 is applied in bf16
        (exact), and the bf16 dot accumulates in fp32. ACT_MODE: 0 plain activations, 1 e4m3 codes with
        per-128 scales (``sa``), 2 quantize here (decode). ROWS_DIRECT: tile t is row t (decode, no sort);
        otherwise tiles come from the expert schedule (``order``, tile tables). K is split over axis 2.

        SWAP (prefill, ACT_MODE 0: bf16 activations): the transposed product, acc [BN, BM] = w @ a^T, so the
        decoded weight is the MMA's register operand and the activations its shared-memory operand. The
        weight then never goes through shared memory and the accumulator chains through the dots, which
        lets the MMAs of one K block run while the next block is decoded (sm_90: wgmma waits with 7 groups
        in flight instead of 0)."""
        tl.static_assert(not SWAP or ACT_MODE == 0, "SWAP takes bf16 (quant-dequantized) activations")
        t = tl.program_id(0)
        pid_n = tl.program_id(1)
        ks = tl.program_id(2)
        e = tl.load(t_exp_ptr + t).to(tl.int32)
        valid = (e >= 0) & (e < E)
        used = e >= 0  # a tile of rows: an expert's, or (e == E) rows of no expert, whose zeros it writes
        ar = tl.arange(0, BM)
        if ROWS_DIRECT:
            rows = t + ar
            r_mask = ar == 0
            src = rows.to(tl.int64)
        else:
            row0 = tl.load(t_row0_ptr + t)
            row1 = tl.load(t_row1_ptr + t)
            rows = row0 + ar
            r_mask = (rows < row1) & used
            src = tl.load(order_ptr + rows, mask=r_mask, other=0).to(tl.int64)
        rn = pid_n * BN + tl.arange(0, BN)
        n_mask = rn < N
        nb = (pid_n * BN) // PBN
        r_in = (pid_n * BN) % PBN + tl.arange(0, BN)
        j = tl.arange(0, 64)  # byte columns of a 128-wide K block
        g = tl.arange(0, 4)  # its four 32-element scale groups
        rk = tl.arange(0, 128)
        K32 = K // 32
        ev = tl.maximum(e, 0).to(tl.int64)
        w_base = w_ptr + ((ev * NBLK + nb) * KTILES) * (PBN * (PBK // 2))
        s_base = sw_ptr + (ev * NBLK + nb) * K32 * PBN
        x_rows = x_ptr + src[:, None] * K
        if SWAP:
            acc = tl.zeros((BN, BM), dtype=tl.float32)
        else:
            acc = tl.zeros((BM, BN), dtype=tl.float32)
        if valid:
            for i in range(KB_PER_SPLIT):
                kb = ks * KB_PER_SPLIT + i
                kb_ok = kb < NKB
                # activation block [BM, 128]
                k = kb * 128 + rk
                am = r_mask[:, None] & kb_ok
                if ACT_MODE == 1:
                    a = tl.load(x_rows + k[None, :], mask=am, other=0.0)
                    sa = tl.load(sa_ptr + src * NKB + kb, mask=r_mask & kb_ok, other=0.0)
                    if UPCAST or IEEE:
                        a = a.to(tl.float32)
                    else:
                        a = a.to(tl.bfloat16)
                elif ACT_MODE == 2:
                    a, sa = _quant_e4m3(tl.load(x_rows + k[None, :], mask=am, other=0.0).to(tl.float32), UE8M0)
                    if not (UPCAST or IEEE):
                        a = a.to(tl.bfloat16)
                else:
                    a = tl.load(x_rows + k[None, :], mask=am, other=0.0)
                    if UPCAST or IEEE:
                        a = a.to(tl.float32)
                # weight block [BN, 128]: bytes of element pairs (2c, 2c+1), c = kb * 64 + j
                if PBK % 128 == 0:  # the block lies in one packed tile: a scalar offset + j (16-byte loads)
                    col = (kb // (PBK // 128)) * (PBN * (PBK // 2)) + (kb % (PBK // 128)) * 64 + j
                else:
                    kk = kb * 128 + 2 * j
                    col = (kk // PBK) * (PBN * (PBK // 2)) + (kk % PBK) // 2
                p = tl.load(w_base + r_in[:, None] * (PBK // 2) + col[None, :], mask=kb_ok, other=0)
                lo = ((p & 7) << 2) | ((p & 8) << 4)
                hi = ((p >> 2) & 0x1C) | (p & 0x80)
                w8 = tl.reshape(tl.join(lo, hi), (BN, 128)).to(tl.float8e4nv, bitcast=True)
                sb = tl.load(s_base + (kb * 4 + g)[None, :] * PBN + r_in[:, None], mask=kb_ok, other=0).to(tl.int32)
                sf = ((sb + 6) << 23).to(tl.float32, bitcast=True)  # 2^(b - 127) * 2^6
                # DEQ_F32: the bf16 dots' weight through fp32 too (one bf16 pack per pair instead of one
                # e4m3 -> f16 -> bf16 F2F per element, a 1/8-rate unit; the same values)
                if UPCAST or IEEE or DEQ_F32:
                    w = tl.reshape(tl.reshape(w8.to(tl.float32), (BN, 4, 32)) * sf[:, :, None], (BN, 128))
                else:
                    w = tl.reshape(tl.reshape(w8.to(tl.bfloat16), (BN, 4, 32)) * sf.to(tl.bfloat16)[:, :, None],
                                   (BN, 128))
                if UPCAST or IEEE:
                    if SWAP:
                        acc = tl.dot(w, tl.trans(a), acc, input_precision="ieee")
                    else:
                        part = tl.dot(a, tl.trans(w), input_precision="ieee")
                else:
                    if SWAP:
                        acc = tl.dot(w.to(a.dtype), tl.trans(a), acc)
                    else:
                        part = tl.dot(a, tl.trans(w.to(a.dtype)))
                if not SWAP:
                    if ACT_MODE != 0:
                        part = part * sa[:, None]
                    acc += part
        if ROWS_DIRECT or used:
            if SWAP:
                res = tl.trans(acc)
            else:
                res = acc
            _splitk_store(res, o_ptr, part_ptr, cnt_ptr, src, r_mask, rn, n_mask, ks,
                          t * tl.num_programs(1) + pid_n, A, N, SPLIT)


    # ---- GEMV (decode, one activation row per program): plain FMAs, no tensor cores ---------------

    @triton.jit
    def _decode_row_expert(e_ptr, order_ptr, E, ORDERED: tl.constexpr):
        """The activation row of a one-row-per-program decode GEMV (axis 0), its expert id and whether the id
        is in [0, E). ORDERED: rows taken in expert order (``order``), so programs that read the same expert
        run together (L2 hits)."""
        a = tl.program_id(0)
        if ORDERED:
            a = tl.load(order_ptr + a).to(tl.int32)
        e = tl.load(e_ptr + a).to(tl.int32)
        return a, e, (e >= 0) & (e < E)

    @triton.jit
    def _fp4_gemv_kernel(x_ptr, e_ptr, order_ptr, w_ptr, sw_ptr, o_ptr, part_ptr, cnt_ptr, A, N, K, E, NBLK, KTILES,
                         NKB, KB_PER_SPLIT, PBN: tl.constexpr, PBK: tl.constexpr, ACT_Q: tl.constexpr,
                         UE8M0: tl.constexpr, SPLIT: tl.constexpr, BN: tl.constexpr, ORDERED: tl.constexpr):
        """Row ``a`` (axis 0) times its expert's packed e2m1 weight, BN outputs (axis 1), a K range (axis 2).

        Works in the byte domain as [BN, 4, 16] (a 128-wide K block: 4 scale groups of 16 bytes), so no
        register reshuffles: low nibbles meet the even activations, high nibbles the odd ones; e2m1 -> e4m3
        bit pattern -> fp32, FMAs; each scale group's 16 byte products are summed inside the thread and
        then scaled by 2^(b - 121) (the ue8m0 scale and the 2^6 of the pattern), so the accumulator is
        [BN, 4] (few registers, more programs per SM) and the scale costs one multiply per 16 bytes."""
        a, e, valid = _decode_row_expert(e_ptr, order_ptr, E, ORDERED)
        pid_n = tl.program_id(1)
        ks = tl.program_id(2)
        nb = (pid_n * BN) // PBN
        r_in = (pid_n * BN) % PBN + tl.arange(0, BN)
        g = tl.arange(0, 4)
        t = tl.arange(0, 16)
        c = g[:, None] * 16 + t[None, :]  # byte column inside the 128-wide block [4, 16]
        TILE: tl.constexpr = PBN * (PBK // 2)
        ev = tl.maximum(e, 0).to(tl.int64)
        w_rows = w_ptr + ((ev * NBLK + nb) * KTILES) * TILE + r_in[:, None, None] * (PBK // 2)
        s_rows = sw_ptr + (ev * NBLK + nb) * (K // 32) * PBN + r_in[:, None]
        x_row = x_ptr + a.to(tl.int64) * K
        acc = tl.zeros((BN, 4), dtype=tl.float32)  # per scale group: the 16 byte products are summed first
        if valid:
            kb0 = ks * KB_PER_SPLIT
            if PBK % 128 == 0:
                off0 = ((kb0 * 128) // PBK) * TILE + ((kb0 * 128) % PBK) // 2 + c
            else:
                kk0 = kb0 * 128 + 2 * c
                off0 = (kk0 // PBK) * TILE + (kk0 % PBK) // 2
            p_next = tl.load(w_rows + off0[None, :, :], mask=kb0 < NKB, other=0)
            for i in range(KB_PER_SPLIT):
                kb = ks * KB_PER_SPLIT + i
                kb_ok = kb < NKB
                p = p_next
                kbn = kb + 1  # prefetch the next block's bytes while this one is decoded
                if PBK % 128 == 0:
                    offn = ((kbn * 128) // PBK) * TILE + ((kbn * 128) % PBK) // 2 + c
                else:
                    kkn = kbn * 128 + 2 * c
                    offn = (kkn // PBK) * TILE + (kkn % PBK) // 2
                p_next = tl.load(w_rows + offn[None, :, :], mask=(i + 1 < KB_PER_SPLIT) & (kbn < NKB), other=0)
                xe = tl.load(x_row + kb * 128 + 2 * c, mask=kb_ok, other=0.0).to(tl.float32)
                xo = tl.load(x_row + kb * 128 + 2 * c + 1, mask=kb_ok, other=0.0).to(tl.float32)
                if ACT_Q:
                    amax = tl.maximum(tl.max(tl.abs(xe)), tl.max(tl.abs(xo)))
                    sc = tl.math.div_rn(tl.maximum(amax, 1e-4), 448.0)
                    if UE8M0:
                        s_a, inv = _pow2_ceil(sc)
                        ve = xe * inv
                        vo = xo * inv
                    else:
                        s_a = sc
                        ve = tl.math.div_rn(xe, sc)
                        vo = tl.math.div_rn(xo, sc)
                    xe = _e4m3_rne(tl.minimum(tl.maximum(ve, -448.0), 448.0)) * s_a
                    xo = _e4m3_rne(tl.minimum(tl.maximum(vo, -448.0), 448.0)) * s_a
                sb = tl.load(s_rows + (kb * 4 + g)[None, :] * PBN, mask=kb_ok, other=0).to(tl.int32)
                sf = ((sb + 6) << 23).to(tl.float32, bitcast=True)  # 2^(b - 127) * 2^6
                lo = (((p & 7) << 2) | ((p & 8) << 4)).to(tl.float8e4nv, bitcast=True).to(tl.float32)
                hi = (((p >> 2) & 0x1C) | (p & 0x80)).to(tl.float8e4nv, bitcast=True).to(tl.float32)
                acc += tl.sum(lo * xe[None, :, :] + hi * xo[None, :, :], axis=2) * sf
        out = tl.sum(acc, axis=1)
        rows = a + tl.arange(0, 1)
        rn = pid_n * BN + tl.arange(0, BN)
        _splitk_store(out[None, :], o_ptr, part_ptr, cnt_ptr, rows, rows < A, rn, rn < N, ks,
                      a * tl.num_programs(1) + pid_n, A, N, SPLIT)

    @triton.jit
    def _fp8_gemv_kernel(x_ptr, w_ptr, sw_ptr, o_ptr, part_ptr, cnt_ptr, M, N, K, KB, KB_PER_SPLIT, SW_STRIDE,
                         ACT_Q: tl.constexpr, UE8M0: tl.constexpr, SPLIT: tl.constexpr, BN: tl.constexpr):
        """Row ``m`` (axis 0) of x times the e4m3 weight, BN <= 128 outputs inside one 128-row scale block
        (axis 1), a K range (axis 2); the activation block quantized here, both scales folded into it."""
        m = tl.program_id(0)
        pid_n = tl.program_id(1)
        ks = tl.program_id(2)
        rn = pid_n * BN + tl.arange(0, BN)
        n_mask = rn < N
        rk = tl.arange(0, 128)
        x_row = x_ptr + m.to(tl.int64) * K
        w_rows = w_ptr + rn.to(tl.int64)[:, None] * K
        acc = tl.zeros((BN, 128), dtype=tl.float32)
        k0 = ks * KB_PER_SPLIT * 128 + rk
        w_next = tl.load(w_rows + k0[None, :], mask=n_mask[:, None] & ((k0 < K) & (ks * KB_PER_SPLIT < KB))[None, :],
                         other=0.0)
        for i in range(KB_PER_SPLIT):
            kb = ks * KB_PER_SPLIT + i
            k = kb * 128 + rk
            k_mask = (k < K) & (kb < KB)
            w = w_next
            kn = k + 128  # prefetch the next block of weights
            w_next = tl.load(w_rows + kn[None, :], mask=n_mask[:, None] & ((kn < K) & (i + 1 < KB_PER_SPLIT)
                                                                           & (kb + 1 < KB))[None, :], other=0.0)
            xa = tl.load(x_row + k, mask=k_mask, other=0.0).to(tl.float32)
            if ACT_Q:
                q, s_a = _quant_e4m3_vec(xa, UE8M0)
                xa = q * s_a  # exact
            sw = tl.load(sw_ptr + ((pid_n * BN) // 128) * SW_STRIDE + kb, mask=kb < KB, other=0.0)
            acc += w.to(tl.float32) * (xa * sw)[None, :]
        out = tl.sum(acc, axis=1)
        rows = m + tl.arange(0, 1)
        _splitk_store(out[None, :], o_ptr, part_ptr, cnt_ptr, rows, rows < M, rn, n_mask, ks,
                      m * tl.num_programs(1) + pid_n, M, N, SPLIT)

    @triton.jit
    def _w16_gemv_kernel(x_ptr, w_ptr, o_ptr, part_ptr, cnt_ptr, M, N, K, NKB, KB_PER_SPLIT,
                         SPLIT: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        """fp32 row ``m`` of x (bf16 or fp32) times a bf16 weight, fp32 FMAs (exact fp32 math)."""
        m = tl.program_id(0)
        pid_n = tl.program_id(1)
        ks = tl.program_id(2)
        rn = pid_n * BN + tl.arange(0, BN)
        n_mask = rn < N
        rk = tl.arange(0, BK)
        x_row = x_ptr + m.to(tl.int64) * K
        w_rows = w_ptr + rn.to(tl.int64)[:, None] * K
        acc = tl.zeros((BN, BK), dtype=tl.float32)
        k0 = ks * KB_PER_SPLIT * BK + rk
        w_next = tl.load(w_rows + k0[None, :], mask=n_mask[:, None] & ((k0 < K) & (ks * KB_PER_SPLIT < NKB))[None, :],
                         other=0.0)
        for i in range(KB_PER_SPLIT):
            kb = ks * KB_PER_SPLIT + i
            k = kb * BK + rk
            k_mask = (k < K) & (kb < NKB)
            w = w_next
            kn = k + BK  # prefetch the next block of weights
            w_next = tl.load(w_rows + kn[None, :], mask=n_mask[:, None] & ((kn < K) & (i + 1 < KB_PER_SPLIT)
                                                                           & (kb + 1 < NKB))[None, :], other=0.0)
            xa = tl.load(x_row + k, mask=k_mask, other=0.0).to(tl.float32)
            acc += w.to(tl.float32) * xa[None, :]
        out = tl.sum(acc, axis=1)
        rows = m + tl.arange(0, 1)
        _splitk_store(out[None, :], o_ptr, part_ptr, cnt_ptr, rows, rows < M, rn, n_mask, ks,
                      m * tl.num_programs(1) + pid_n, M, N, SPLIT)

    @triton.jit
    def _fp4_dequant_kernel(w_ptr, sw_ptr, o_ptr, N, K, NBLK, KTILES, PBN: tl.constexpr, PBK: tl.constexpr,
                            BR: tl.constexpr):
        """Packed e2m1 tile (e, nb, kt), BR of its rows -> bf16 [E, N, K] (exact: e2m1 times a power of two)."""
        pid = tl.program_id(0).to(tl.int64)
        rb = tl.program_id(1)
        e = pid // (NBLK * KTILES)
        nb = (pid // KTILES) % NBLK
        kt = pid % KTILES
        G: tl.constexpr = PBK // 32
        r = rb * BR + tl.arange(0, BR)
        g = tl.arange(0, G)
        t = tl.arange(0, 16)
        p = tl.load(w_ptr + pid * (PBN * (PBK // 2)) + r[:, None, None] * (PBK // 2) + g[None, :, None] * 16
                    + t[None, None, :])
        sb = tl.load(sw_ptr + ((e * NBLK + nb) * (K // 32) + kt * G + g[None, :]) * PBN + r[:, None]).to(tl.int32)
        sf = ((sb + 6) << 23).to(tl.float32, bitcast=True)
        lo = (((p & 7) << 2) | ((p & 8) << 4)).to(tl.float8e4nv, bitcast=True).to(tl.float32) * sf[:, :, None]
        hi = (((p >> 2) & 0x1C) | (p & 0x80)).to(tl.float8e4nv, bitcast=True).to(tl.float32) * sf[:, :, None]
        row = (e * N + nb * PBN + r).to(tl.int64)
        col = kt * PBK + g[None, :, None] * 32 + 2 * t[None, None, :]
        ptrs = (o_ptr + row[:, None, None] * K + col)[:, :, :, None] + tl.arange(0, 2)[None, None, None, :]
        tl.store(ptrs, _cast_out(tl.join(lo, hi), tl.bfloat16))

    # ---- bf16-stored weights applied in fp32 (head, gate, compressor projections) ------------------

    @triton.jit
    def _dot_xwT(x, w, acc, SWAP_AB: tl.constexpr, IEEE: tl.constexpr):
        """acc + x @ w^T ([BM, BN]); with SWAP_AB acc + w @ x^T ([BN, BM]): the weight rows on the MMA's
        wide side when x has only a few rows (decode)."""
        # one return at the end: the Triton frontend rejects returns inside branches (the interpreter does not)
        if SWAP_AB:
            a = w
            b = tl.trans(x)
        else:
            a = x
            b = tl.trans(w)
        if IEEE:
            out = tl.dot(a, b, acc, input_precision="ieee")
        else:
            out = tl.dot(a, b, acc)
        return out

    @triton.jit
    def _w16_linear_kernel(x_ptr, w_ptr, o_ptr, part_ptr, cnt_ptr, M, N, K, NKB, KB_PER_SPLIT,
                           X_SPLIT3: tl.constexpr, UPCAST: tl.constexpr, SPLIT: tl.constexpr, SWAP_AB: tl.constexpr,
                           BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PDL: tl.constexpr = False,
                           PREFETCH: tl.constexpr = False, PF_ROW_BYTES: tl.constexpr = 512):
        """o (fp32) = x @ w^T with w bf16 and fp32 arithmetic: bf16 x is exact in a bf16 dot (fp32
        accumulate); fp32 x is split into three bf16 terms (hi + mid + lo = x to ~2^-24), three dots.
        SWAP_AB (few rows, see :mod:`triton_gemv`): the accumulator is [BN, BM] and stored transposed.
        PDL: launched as a programmatic dependent (see :func:`_pdl_wait`); PREFETCH: up to PF_ROW_BYTES of
        each of its rows' K range of the weight asked into L2 before the wait."""
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        ks = tl.program_id(2)
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        if PREFETCH:
            k0 = ks * KB_PER_SPLIT * BK
            k1 = tl.minimum(k0 + KB_PER_SPLIT * BK, K)
            if (K % 8 == 0) & (k1 > k0):  # 16-byte aligned bf16 rows
                rows = tl.where(rn < N, rn, 0).to(tl.int64)
                nb = tl.minimum(k1 - k0, PF_ROW_BYTES // 2) * 2
                _l2_prefetch((w_ptr + rows * K + k0).to(tl.int64), nb + tl.zeros_like(rn))
        _pdl_begin(PDL)
        rk = tl.arange(0, BK)
        m_mask = rm < M
        n_mask = rn < N
        x_rows = x_ptr + rm.to(tl.int64)[:, None] * K
        w_rows = w_ptr + rn.to(tl.int64)[:, None] * K
        if SWAP_AB:
            acc = tl.zeros((BN, BM), dtype=tl.float32)
        else:
            acc = tl.zeros((BM, BN), dtype=tl.float32)
        for i in range(KB_PER_SPLIT):
            kb = ks * KB_PER_SPLIT + i
            k = kb * BK + rk
            k_mask = (k < K) & (kb < NKB)
            xa = tl.load(x_rows + k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            w = tl.load(w_rows + k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
            if UPCAST:
                acc = _dot_xwT(xa.to(tl.float32), w.to(tl.float32), acc, SWAP_AB, True)
            elif X_SPLIT3:
                hi = xa.to(tl.bfloat16)
                r1 = xa - hi.to(tl.float32)
                mid = r1.to(tl.bfloat16)
                lo = (r1 - mid.to(tl.float32)).to(tl.bfloat16)
                acc = _dot_xwT(hi, w, acc, SWAP_AB, False)
                acc = _dot_xwT(mid, w, acc, SWAP_AB, False)
                acc = _dot_xwT(lo, w, acc, SWAP_AB, False)
            else:
                acc = _dot_xwT(xa, w, acc, SWAP_AB, False)
        if SWAP_AB:
            acc = tl.trans(acc)
        _splitk_store(acc, o_ptr, part_ptr, cnt_ptr, rm, m_mask, rn, n_mask, ks,
                      pid_m * tl.num_programs(1) + pid_n, M, N, SPLIT)

    # ---- sparse attention with sink -------------------------------------------------------------

    @triton.jit
    def _attn_update(q, kv, vis, m_i, l_i, acc, scale,
                     IEEE: tl.constexpr, UPCAST: tl.constexpr, PV_SPLIT: tl.constexpr):
        if UPCAST or IEEE:
            kvf = kv.to(tl.float32)
            s = tl.dot(q, tl.trans(kvf), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(kv))
        s = s * scale
        s = tl.where(vis[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None]
        if UPCAST or IEEE:
            acc += tl.dot(p, kvf, input_precision="ieee")
        elif PV_SPLIT:
            p_hi = p.to(kv.dtype)
            p_lo = (p - p_hi.to(tl.float32)).to(kv.dtype)
            acc = tl.dot(p_hi, kv, acc)
            acc = tl.dot(p_lo, kv, acc)
        else:
            acc = tl.dot(p.to(kv.dtype), kv, acc)
        return m_new, l_i, acc

    @triton.jit
    def _sparse_attn_kernel(q_ptr, wkv_ptr, wmask_ptr, ckv_ptr, cidx_ptr, sink_ptr, o_ptr,
                            pm_ptr, pl_ptr, pacc_ptr, cnt_ptr,
                            S, H, C, NW, NE, KC, scale, W_CHUNK, C_CHUNK, BSH,
                            cn_ptr, cs_ptr, cr_ptr, NOPE, CN_SB, CN_SE, CS_SB, CS_SE, CR_SB, CR_SE,
                            BH: tl.constexpr, BN: tl.constexpr, BC: tl.constexpr,
                            IEEE: tl.constexpr, UPCAST: tl.constexpr, PV_SPLIT: tl.constexpr,
                            SPLIT: tl.constexpr, PACKED: tl.constexpr = False, MERGE_LAST: tl.constexpr = True,
                            WIN_SCAN: tl.constexpr = False, SCAN_KEYS: tl.constexpr = 1024,
                            PDL: tl.constexpr = False):
        """One query token (b, s) and BH heads; keys = values; online softmax with a sink.

        WIN_SCAN (prefill: the window keys are the ring plus every token of the call, NW = window + S, and
        a token sees at most 2 x window of them): the token's mask row is scanned first and the key loop
        runs over the BN blocks from its first to its last visible key only. A block with no visible key
        leaves (max, sum, output) bit for bit as they were, so the result is the same as without the scan.

        With SPLIT > 1 (decode: few query tokens) program ``k`` of axis 2 takes the ``k``-th chunk of the
        window keys and of the selected entries, parks its (max, sum, unnormalized output) in the
        workspace, and the last of the SPLIT programs of this (token, head block) merges them (split-KV
        "flash decoding", one launch: the merge is done by whoever finishes last, counted on ``cnt``; with
        MERGE_LAST off the partials are left for ``_attn_merge_kernel``).

        PACKED: the compressed entries are read in their storage format instead of ``ckv``: e4m3 bytes of
        the first NOPE dims (``cn`` [B, E, NOPE] as uint8), one ue8m0 byte per 64 of them (``cs``
        [B, E, S8]) and the bf16 rope dims (``cr`` [B, E, C - NOPE]); batch / entry strides in elements.
        A selected entry is dequantized in registers (e4m3 * 2^(byte - 127), exact in bf16 and fp32)
        into the same [BN, BC] tile the dense path loads."""
        _pdl_begin(PDL)
        bs = tl.program_id(0).to(tl.int64)
        hb = tl.program_id(1)
        ks = tl.program_id(2)
        b = bs // S
        rh = hb * BH + tl.arange(0, BH)
        h_mask = rh < H
        rc = tl.arange(0, BC)
        c_mask = rc < C
        q = tl.load(q_ptr + (bs * H + rh)[:, None] * C + rc[None, :],
                    mask=h_mask[:, None] & c_mask[None, :], other=0.0)
        if UPCAST or IEEE:
            q = q.to(tl.float32)
        m_i = tl.full((BH,), -1e30, dtype=tl.float32)  # finite: no visible key leaves only the sink
        l_i = tl.zeros((BH,), dtype=tl.float32)
        acc = tl.zeros((BH, BC), dtype=tl.float32)
        # window part
        w_base = wkv_ptr + b * NW * C
        m_base = wmask_ptr + bs * NW
        w_lo = ks * W_CHUNK
        w_hi = tl.minimum(w_lo + W_CHUNK, NW)
        if WIN_SCAN:
            first = w_hi * 0 + NW  # int32 scalars carried through the loop
            last = w_hi * 0 - 1
            for n0 in range(w_lo, w_hi, SCAN_KEYS):
                rs = n0 + tl.arange(0, SCAN_KEYS)
                v = tl.load(m_base + rs, mask=rs < w_hi, other=0) != 0
                first = tl.minimum(first, tl.min(tl.where(v, rs, NW), axis=0))
                last = tl.maximum(last, tl.max(tl.where(v, rs, -1), axis=0))
            w_lo = w_lo + ((first - w_lo) // BN) * BN  # the same block boundaries as the full loop
            w_hi = tl.minimum(w_hi, last + 1)  # none visible: an empty loop
        for n0 in range(w_lo, w_hi, BN):
            rn = n0 + tl.arange(0, BN)
            vis = tl.load(m_base + rn, mask=rn < w_hi, other=0) != 0
            kv = tl.load(w_base + rn[:, None] * C + rc[None, :], mask=vis[:, None] & c_mask[None, :], other=0.0)
            m_i, l_i, acc = _attn_update(q, kv, vis, m_i, l_i, acc, scale, IEEE, UPCAST, PV_SPLIT)
        # selected compressed entries
        c_base = ckv_ptr + b * NE * C
        i_base = cidx_ptr + bs * KC
        c_lo = ks * C_CHUNK
        c_hi = tl.minimum(c_lo + C_CHUNK, KC)
        if PACKED:
            # the tile as [BN, BC / 64, 64]: one scale byte per (entry, 64-block), loaded once and broadcast
            NB: tl.constexpr = BC // 64
            blk = tl.arange(0, NB)
            col3 = blk[:, None] * 64 + tl.arange(0, 64)[None, :]  # [NB, 64] column of the entry
            nope3 = (col3 < NOPE)[None, :, :]
            rope3 = ((col3 >= NOPE) & (col3 < C))[None, :, :]
            n_base = cn_ptr + b * CN_SB
            s_base = cs_ptr + b * CS_SB
            r_base = cr_ptr + b * CR_SB
        for k0 in range(c_lo, c_hi, BN):
            rk = k0 + tl.arange(0, BN)
            idx = tl.load(i_base + rk, mask=rk < c_hi, other=-1)
            vis = (idx >= 0) & (idx < NE)
            if PACKED:
                ent = tl.where(vis, idx, 0)
                v3 = vis[:, None, None]
                nb = tl.load(n_base + ent[:, None, None] * CN_SE + col3[None, :, :], mask=v3 & nope3, other=0)
                sb = tl.load(s_base + ent[:, None] * CS_SE + blk[None, :], mask=vis[:, None] & (blk * 64 < NOPE)[None, :],
                             other=127)
                rp = tl.load(r_base + ent[:, None, None] * CR_SE + (col3 - NOPE)[None, :, :], mask=v3 & rope3,
                             other=0.0)
                sf = (sb.to(tl.int32) << 23).to(tl.float32, bitcast=True)  # 2^(byte - 127)
                nv = nb.to(tl.float8e4nv, bitcast=True).to(tl.float32) * sf[:, :, None]
                kv3 = tl.where(nope3, nv, rp.to(tl.float32)).to(q_ptr.dtype.element_ty)
                kv = tl.reshape(kv3, (BN, BC))
            else:
                kv = tl.load(c_base + idx[:, None] * C + rc[None, :], mask=vis[:, None] & c_mask[None, :],
                             other=0.0)
            m_i, l_i, acc = _attn_update(q, kv, vis, m_i, l_i, acc, scale, IEEE, UPCAST, PV_SPLIT)
        sk = tl.load(sink_ptr + rh, mask=h_mask, other=0.0)
        o_offs = (bs * H + rh)[:, None] * C + rc[None, :]
        o_mask = h_mask[:, None] & c_mask[None, :]
        if SPLIT == 1:
            l_i = l_i + tl.exp(sk - m_i)
            out = acc / l_i[:, None]
            tl.store(o_ptr + o_offs, _cast_out(out, o_ptr.dtype.element_ty), mask=o_mask)
        else:
            ml_offs = ks.to(tl.int64) * BSH + bs * H + rh
            tl.store(pm_ptr + ml_offs, m_i, mask=h_mask)
            tl.store(pl_ptr + ml_offs, l_i, mask=h_mask)
            tl.store(pacc_ptr + ks.to(tl.int64) * BSH * C + o_offs, acc, mask=o_mask)
            if MERGE_LAST:
                tl.debug_barrier()
                prev = tl.atomic_add(cnt_ptr + bs * tl.num_programs(1) + hb, 1, sem="acq_rel", scope="gpu")
                if prev == SPLIT - 1:
                    _attn_merge(sk, o_ptr, pm_ptr, pl_ptr, pacc_ptr, bs * H + rh, h_mask, o_offs, o_mask, BSH, C,
                                SPLIT, BH, BC)
                    tl.atomic_xchg(cnt_ptr + bs * tl.num_programs(1) + hb, 0)

    @triton.jit
    def _attn_merge(sk, o_ptr, pm_ptr, pl_ptr, pacc_ptr, row, h_mask, o_offs, o_mask, BSH, C,
                    SPLIT: tl.constexpr, BH: tl.constexpr, BCW: tl.constexpr):
        """Merge the SPLIT partial (max, sum, unnormalized output) of heads ``row`` (= token * H + head) with the
        sink and store the normalized output at ``o_offs`` ([BH, BCW] of the output's columns)."""
        mx = tl.full((BH,), -1e30, dtype=tl.float32)
        for j in tl.static_range(SPLIT):
            mx = tl.maximum(mx, tl.load(pm_ptr + j * BSH + row, mask=h_mask, other=-1e30, cache_modifier=".cg"))
        tot_l = tl.exp(sk - mx)
        tot = tl.zeros((BH, BCW), dtype=tl.float32)
        for j in tl.static_range(SPLIT):
            mj = tl.load(pm_ptr + j * BSH + row, mask=h_mask, other=-1e30, cache_modifier=".cg")
            lj = tl.load(pl_ptr + j * BSH + row, mask=h_mask, other=0.0, cache_modifier=".cg")
            aj = tl.load(pacc_ptr + j * BSH * C + o_offs, mask=o_mask, other=0.0, cache_modifier=".cg")
            f = tl.exp(mj - mx)
            tot_l += lj * f
            tot += aj * f[:, None]
        out = tot / tot_l[:, None]
        tl.store(o_ptr + o_offs, _cast_out(out, o_ptr.dtype.element_ty), mask=o_mask)

    @triton.jit
    def _attn_merge_kernel(sink_ptr, o_ptr, pm_ptr, pl_ptr, pacc_ptr, H, C, BSH,
                           SPLIT: tl.constexpr, BH: tl.constexpr, BCW: tl.constexpr, PDL: tl.constexpr = False):
        """The split merge of ``_sparse_attn_kernel`` as a launch of its own: program (token, head block, column
        block) merges a [BH, BCW] slice, so the merge is spread over many programs instead of one per head
        block (TUNE ``attn_merge_launch``)."""
        _pdl_begin(PDL)
        bs = tl.program_id(0).to(tl.int64)
        rh = tl.program_id(1) * BH + tl.arange(0, BH)
        rc = tl.program_id(2) * BCW + tl.arange(0, BCW)
        h_mask = rh < H
        sk = tl.load(sink_ptr + rh, mask=h_mask, other=0.0)
        o_offs = (bs * H + rh)[:, None] * C + rc[None, :]
        _attn_merge(sk, o_ptr, pm_ptr, pl_ptr, pacc_ptr, bs * H + rh, h_mask, o_offs,
                    h_mask[:, None] & (rc < C)[None, :], BSH, C, SPLIT, BH, BCW)

    # ---- mHC split + Sinkhorn -------------------------------------------------------------------

    @triton.jit
    def _hc_split_rows(mix_ptr, rows, r_mask, base_ptr, scale_ptr, ITERS, eps, N: tl.constexpr, NP: tl.constexpr):
        """pre [BR, NP], post [BR, NP] and the Sinkhorn-projected comb [BR, NP, NP] (fp32, zero past N) of the
        mix rows ``mix_ptr + rows * (2 + N) N`` (``rows`` int64 [BR])."""
        W: tl.constexpr = (2 + N) * N
        j = tl.arange(0, NP)
        j_mask = j < N
        s0 = tl.load(scale_ptr)
        s1 = tl.load(scale_ptr + 1)
        s2 = tl.load(scale_ptr + 2)
        m2 = r_mask[:, None] & j_mask[None, :]
        row_ptr = mix_ptr + rows[:, None] * W
        pre = tl.load(row_ptr + j[None, :], mask=m2, other=0.0) * s0 + tl.load(base_ptr + j, mask=j_mask, other=0.0)[None, :]
        pre = 1.0 / (1.0 + tl.exp(-pre)) + eps
        post = tl.load(row_ptr + N + j[None, :], mask=m2, other=0.0) * s1 + tl.load(base_ptr + N + j, mask=j_mask, other=0.0)[None, :]
        post = 2.0 / (1.0 + tl.exp(-post))
        # comb[r, i, j]
        i3 = j[None, :, None]
        j3 = j[None, None, :]
        ij_mask = (i3 < N) & (j3 < N)
        ij = 2 * N + i3 * N + j3
        lg = tl.load(mix_ptr + rows[:, None, None] * W + ij, mask=r_mask[:, None, None] & ij_mask, other=0.0) * s2
        lg = lg + tl.load(base_ptr + ij, mask=ij_mask, other=0.0)
        lg = tl.where(j3 < N, lg, float("-inf"))
        ex = tl.exp(lg - tl.max(lg, axis=2)[:, :, None])
        comb = ex / tl.sum(ex, axis=2)[:, :, None] + eps
        comb = tl.where(ij_mask, comb, 0.0)
        comb = comb / (tl.sum(comb, axis=1)[:, None, :] + eps)
        for _ in range(ITERS - 1):
            comb = comb / (tl.sum(comb, axis=2)[:, :, None] + eps)
            comb = comb / (tl.sum(comb, axis=1)[:, None, :] + eps)
        return tl.where(m2, pre, 0.0), tl.where(m2, post, 0.0), comb

    @triton.jit
    def _hc_split_kernel(mix_ptr, base_ptr, scale_ptr, pre_ptr, post_ptr, comb_ptr, R, ITERS, eps,
                         N: tl.constexpr, NP: tl.constexpr, BR: tl.constexpr, PDL: tl.constexpr = False):
        _pdl_begin(PDL)
        rr = tl.program_id(0) * BR + tl.arange(0, BR)
        r_mask = rr < R
        rows = rr.to(tl.int64)
        pre, post, comb = _hc_split_rows(mix_ptr, rows, r_mask, base_ptr, scale_ptr, ITERS, eps, N, NP)
        j = tl.arange(0, NP)
        m2 = r_mask[:, None] & (j < N)[None, :]
        tl.store(pre_ptr + rows[:, None] * N + j[None, :], pre, mask=m2)
        tl.store(post_ptr + rows[:, None] * N + j[None, :], post, mask=m2)
        i3 = j[None, :, None]
        j3 = j[None, None, :]
        tl.store(comb_ptr + rows[:, None, None] * (N * N) + i3 * N + j3, comb,
                 mask=r_mask[:, None, None] & (i3 < N) & (j3 < N))

    # ---- SwiGLU with clamps ---------------------------------------------------------------------

    @triton.jit
    def _swiglu_kernel(g_ptr, v_ptr, w_ptr, o_ptr, R, N, SG, SV, limit,
                       HAS_W: tl.constexpr, BR: tl.constexpr, BN: tl.constexpr, PDL: tl.constexpr = False):
        """SG / SV: row strides of g and v (column views of one stacked w1+w3 output need no copy)."""
        _pdl_begin(PDL)
        rr = tl.program_id(0) * BR + tl.arange(0, BR)
        rn = tl.program_id(1) * BN + tl.arange(0, BN)
        r_mask = rr < R
        mask = r_mask[:, None] & (rn < N)[None, :]
        rows = rr.to(tl.int64)[:, None]
        offs = rows * N + rn[None, :]
        g = tl.load(g_ptr + rows * SG + rn[None, :], mask=mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + rows * SV + rn[None, :], mask=mask, other=0.0).to(tl.float32)
        g = tl.minimum(g, limit)
        v = tl.minimum(tl.maximum(v, -limit), limit)
        h = g / (1.0 + tl.exp(-g)) * v
        if HAS_W:
            h = h * tl.load(w_ptr + rr, mask=r_mask, other=0.0).to(tl.float32)[:, None]
        tl.store(o_ptr + offs, _cast_out(h, o_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _add_kernel(a_ptr, b_ptr, o_ptr, n, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
        """o = a + b in fp32 (either input of any float dtype, promoted exactly)."""
        _pdl_begin(PDL)
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(o_ptr + offs, a + b, mask=mask)

    @triton.jit
    def _gather_rows_kernel(x_ptr, r_ptr, o_ptr, D, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
        """o[i] = x[rows[i]] for rows of D contiguous elements: program (i, d block)."""
        _pdl_begin(PDL)
        i = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < D
        r = tl.load(r_ptr + i).to(tl.int64)
        tl.store(o_ptr + i.to(tl.int64) * D + offs, tl.load(x_ptr + r * D + offs, mask=mask), mask=mask)

    # ---- lightning indexer scores ---------------------------------------------------------------

    @triton.jit
    def _indexer_score_kernel(q_ptr, k_ptr, w_ptr, o_ptr, S, NH, D, NE,
                              BS: tl.constexpr, BHI: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr,
                              IEEE: tl.constexpr, UPCAST: tl.constexpr):
        """BS query tokens x BE key entries; the key tile is loaded once and reused for every token."""
        nsb = tl.cdiv(S, BS)
        pid = tl.program_id(0)
        b = (pid // nsb).to(tl.int64)
        s0 = (pid % nsb) * BS
        re = tl.program_id(1) * BE + tl.arange(0, BE)
        e_mask = re < NE
        rd = tl.arange(0, BD)
        d_mask = rd < D
        rh = tl.arange(0, BHI)
        h_mask = rh < NH
        kt = tl.load(k_ptr + (b * NE + re)[:, None] * D + rd[None, :], mask=e_mask[:, None] & d_mask[None, :],
                     other=0.0)
        if UPCAST or IEEE:
            kt = kt.to(tl.float32)
        for i in range(BS):
            s = s0 + i
            s_ok = s < S
            tok = b * S + s
            q = tl.load(q_ptr + (tok * NH + rh)[:, None] * D + rd[None, :],
                        mask=(h_mask[:, None] & d_mask[None, :]) & s_ok, other=0.0)
            if UPCAST or IEEE:
                dots = tl.dot(q.to(tl.float32), tl.trans(kt), input_precision="ieee")
            else:
                dots = tl.dot(q, tl.trans(kt))
            w = tl.load(w_ptr + tok * NH + rh, mask=h_mask & s_ok, other=0.0).to(tl.float32)
            sc = tl.sum(tl.maximum(dots, 0.0) * w[:, None], axis=0)
            tl.store(o_ptr + tok * NE + re, sc, mask=e_mask & s_ok)

    @triton.jit
    def _fp4_key_tile(kc_ptr, ks_ptr, b, re, e_mask, KC_SB, KC_SE, KS_SB, KS_SE, D: tl.constexpr, BE: tl.constexpr):
        """Keys ``re`` of batch ``b`` stored as FP4 (``kc`` [B, E, D/2] bytes, two e2m1 codes, low nibble = even
        element; ``ks`` [B, E, D/32] ue8m0 bytes; batch / entry strides in bytes) as fp32 [BE, D]: each nibble
        becomes an e4m3 bit pattern (value * 2^-6, exact) times 2^(byte - 127 + 6), so every value is exact in
        bf16."""
        j = tl.arange(0, D // 2)  # byte columns: elements 2j (low nibble) and 2j + 1 (high nibble)
        p = tl.load(kc_ptr + b * KC_SB + re.to(tl.int64)[:, None] * KC_SE + j[None, :], mask=e_mask[:, None], other=0)
        g = tl.arange(0, D // 32)
        sb = tl.load(ks_ptr + b * KS_SB + re.to(tl.int64)[:, None] * KS_SE + g[None, :], mask=e_mask[:, None],
                     other=127).to(tl.int32)
        lo = ((p & 7) << 2) | ((p & 8) << 4)
        hi = ((p >> 2) & 0x1C) | (p & 0x80)
        k8 = tl.reshape(tl.join(lo, hi), (BE, D)).to(tl.float8e4nv, bitcast=True)
        sf = ((sb + 6) << 23).to(tl.float32, bitcast=True)  # 2^(byte - 127) * 2^6
        return tl.reshape(tl.reshape(k8.to(tl.float32), (BE, D // 32, 32)) * sf[:, :, None], (BE, D))

    @triton.jit
    def _indexer_score_packed_kernel(q_ptr, kc_ptr, ks_ptr, w_ptr, vis_ptr, o_ptr, S, NH, NE,
                                     KC_SB, KC_SE, KS_SB, KS_SE,
                                     D: tl.constexpr, BS: tl.constexpr, BHI: tl.constexpr, BE: tl.constexpr,
                                     HAS_VIS: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                                     PDL: tl.constexpr = False):
        """BS query tokens x BE keys stored as FP4 (see :func:`_fp4_key_tile`). The tile is decoded once in
        registers and reused for every token of the block, one token's heads per dot (decode's shape).

        HAS_VIS: entry j is visible to token (b, s) when j < vis[b, s]; others score -inf, and a tile that no
        token of the block can see is not read at all (decode reads only the live part of the cache)."""
        _pdl_begin(PDL)
        nsb = tl.cdiv(S, BS)
        pid = tl.program_id(0)
        b = (pid // nsb).to(tl.int64)
        s0 = (pid % nsb) * BS
        e0 = tl.program_id(1) * BE
        re = e0 + tl.arange(0, BE)
        e_mask = re < NE
        rh = tl.arange(0, BHI)
        h_mask = rh < NH
        if HAS_VIS:
            rs = s0 + tl.arange(0, BS)
            vis_blk = tl.load(vis_ptr + b * S + rs, mask=rs < S, other=0)
            live = e0 < tl.max(vis_blk)
        else:
            live = e0 < NE
        if live:
            kf = _fp4_key_tile(kc_ptr, ks_ptr, b, re, e_mask, KC_SB, KC_SE, KS_SB, KS_SE, D, BE)
            if UPCAST or IEEE:
                kt = tl.trans(kf)
            else:
                kt = tl.trans(kf.to(tl.bfloat16))  # exact: e2m1 * 2^k
            rd = tl.arange(0, D)
            for i in range(BS):
                s = s0 + i
                s_ok = s < S
                tok = b * S + s
                q = tl.load(q_ptr + (tok * NH + rh)[:, None] * D + rd[None, :], mask=h_mask[:, None] & s_ok, other=0.0)
                if UPCAST or IEEE:
                    dots = tl.dot(q.to(tl.float32), kt, input_precision="ieee")
                else:
                    dots = tl.dot(q, kt)
                w = tl.load(w_ptr + tok * NH + rh, mask=h_mask & s_ok, other=0.0).to(tl.float32)
                sc = tl.sum(tl.maximum(dots, 0.0) * w[:, None], axis=0)
                if HAS_VIS:
                    v = tl.load(vis_ptr + tok, mask=s_ok, other=0)
                    sc = tl.where(re < v, sc, float("-inf"))
                tl.store(o_ptr + tok * NE + re, sc, mask=e_mask & s_ok)
        else:
            ninf = tl.full((BE,), float("-inf"), dtype=tl.float32)
            for i in range(BS):
                s = s0 + i
                tl.store(o_ptr + (b * S + s) * NE + re, ninf, mask=e_mask & (s < S))

    @triton.jit
    def _indexer_score_packed_tokens_kernel(q_ptr, kc_ptr, ks_ptr, w_ptr, vis_ptr, o_ptr, S, NH, NE,
                                            KC_SB, KC_SE, KS_SB, KS_SE,
                                            D: tl.constexpr, BT: tl.constexpr, BHI: tl.constexpr, BE: tl.constexpr,
                                            HAS_VIS: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                                            PDL: tl.constexpr = False):
        """Prefill's shape: BT query tokens (all their heads: BT x BHI rows of one dot) against every key,
        BE keys (decoded by :func:`_fp4_key_tile`) per step. Each step is one [BT BHI, D] x [D, BE] product;
        its rows' ReLU times the head weights are summed per token. The query rows are loaded once.

        HAS_VIS: as :func:`_indexer_score_packed_kernel`; key blocks past the block's last visible entry are
        written as -inf without being read."""
        _pdl_begin(PDL)
        nsb = tl.cdiv(S, BT)
        pid = tl.program_id(0)
        b = (pid // nsb).to(tl.int64)
        s0 = (pid % nsb) * BT
        rt = tl.arange(0, BT)
        rh = tl.arange(0, BHI)
        rd = tl.arange(0, D)
        s_ok = (s0 + rt) < S
        tok = b * S + s0 + rt  # [BT]
        rows = (tok[:, None] * NH + rh[None, :]).to(tl.int64)  # [BT, BHI]: query rows (token, head)
        r_ok = s_ok[:, None] & (rh < NH)[None, :]
        q = tl.load(q_ptr + tl.reshape(rows, (BT * BHI,))[:, None] * D + rd[None, :],
                    mask=tl.reshape(r_ok, (BT * BHI,))[:, None], other=0.0)
        if UPCAST or IEEE:
            q = q.to(tl.float32)
        w = tl.reshape(tl.load(w_ptr + rows, mask=r_ok, other=0.0).to(tl.float32), (BT * BHI,))
        if HAS_VIS:
            v = tl.load(vis_ptr + tok, mask=s_ok, other=0)  # [BT]
            e_end = tl.minimum(tl.max(v), NE)
        else:
            e_end = NE
        for e0 in range(0, e_end, BE):
            re = e0 + tl.arange(0, BE)
            e_mask = re < NE
            kf = _fp4_key_tile(kc_ptr, ks_ptr, b, re, e_mask, KC_SB, KC_SE, KS_SB, KS_SE, D, BE)
            if UPCAST or IEEE:
                dots = tl.dot(q, tl.trans(kf), input_precision="ieee")
            else:
                dots = tl.dot(q, tl.trans(kf.to(tl.bfloat16)))  # exact keys: e2m1 * 2^k
            sc = tl.sum(tl.reshape(tl.maximum(dots, 0.0) * w[:, None], (BT, BHI, BE)), axis=1)  # [BT, BE]
            if HAS_VIS:
                sc = tl.where(re[None, :] < v[:, None], sc, float("-inf"))
            tl.store(o_ptr + tok[:, None] * NE + re[None, :], sc, mask=s_ok[:, None] & e_mask[None, :])
        ninf = tl.full((BT, BE), float("-inf"), dtype=tl.float32)
        for e0 in range(tl.cdiv(e_end, BE) * BE, NE, BE):
            re = e0 + tl.arange(0, BE)
            tl.store(o_ptr + tok[:, None] * NE + re[None, :], ninf, mask=s_ok[:, None] & (re < NE)[None, :])

    # ---- compressor softmax pooling -------------------------------------------------------------

    @triton.jit
    def _compress_pool_kernel(a_ptr, z_ptr, ap_ptr, zp_ptr, o_ptr, M, D, KD,
                              BM: tl.constexpr, BD: tl.constexpr, OVERLAP: tl.constexpr, PDL: tl.constexpr = False):
        """One window (b, w) and BD features: softmax over the m (or 2m) slots, per feature."""
        _pdl_begin(PDL)
        win = tl.program_id(0).to(tl.int64)
        rd = tl.program_id(1) * BD + tl.arange(0, BD)
        rt = tl.arange(0, BM)
        m2 = (rt < M)[:, None] & (rd < D)[None, :]
        if OVERLAP:
            col = D + rd  # this window contributes its second halves
        else:
            col = rd
        offs = win * M * KD + rt[:, None] * KD + col[None, :]
        a = tl.load(a_ptr + offs, mask=m2, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + offs, mask=m2, other=float("-inf")).to(tl.float32)
        mx = tl.where(rd < D, tl.max(z, axis=0), 0.0)  # padded features: keep them finite
        if OVERLAP:
            p_offs = win * M * D + rt[:, None] * D + rd[None, :]
            ap = tl.load(ap_ptr + p_offs, mask=m2, other=0.0).to(tl.float32)
            zp = tl.load(zp_ptr + p_offs, mask=m2, other=float("-inf")).to(tl.float32)
            mx = tl.maximum(mx, tl.max(zp, axis=0))
            ep = tl.exp(zp - mx[None, :])
            ep = tl.where(m2, ep, 0.0)
            num_p = tl.sum(ep * ap, axis=0)
            den_p = tl.sum(ep, axis=0)
        else:
            num_p = 0.0
            den_p = 0.0
        ez = tl.exp(z - mx[None, :])
        ez = tl.where(m2, ez, 0.0)
        num = tl.sum(ez * a, axis=0) + num_p
        den = tl.sum(ez, axis=0) + den_p
        den = tl.where(rd < D, den, 1.0)
        tl.store(o_ptr + win * D + rd, num / den, mask=rd < D)


# =================================================================================================
# launchers
# =================================================================================================

def _require(*tensors: Tensor) -> None:
    if not HAVE_TRITON:
        raise RuntimeError("triton is not installed")
    for t in tensors:
        if t.device.type == "cpu" and not INTERPRET:
            raise RuntimeError("Triton kernels on CPU tensors need TRITON_INTERPRET=1 set before triton is imported")


def _np2(n: int, lo: int = 1) -> int:
    return max(lo, triton.next_power_of_2(max(int(n), 1)))


def _is_fp32(t: Tensor) -> bool:
    return t.dtype in (torch.float32, torch.float64)


@functools.lru_cache(maxsize=None)
def _num_sms_of(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return _num_sms_of(device.index if device.index is not None else torch.cuda.current_device())


def act_quant_fp8(x: Tensor, ue8m0: bool, block: int = QBLOCK) -> tuple[Tensor, Tensor]:
    """x [M, K] -> (e4m3 codes [M, K] float8_e4m3fn, fp32 scales [M, K/block]); K % block == 0."""
    _require(x)
    M, K = x.shape
    if K % block:
        raise ValueError(f"last dim {K} is not a multiple of the quantization block {block}")
    x = x.contiguous()
    nb = K // block
    q = torch.empty((M, K), dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty((M, nb), dtype=torch.float32, device=x.device)
    if M and K:
        bm = min(16, _np2(M))
        _act_quant_kernel[(triton.cdiv(M, bm), nb)](x, q, s, M, K, nb, BLOCK_M=bm, QB=block, UE8M0=bool(ue8m0),
                                                    DEQUANT=False, num_warps=4, **pdl_kwargs(x.device))
    return q, s


def fp8_qdq(x: Tensor, block: int, ue8m0: bool) -> Tensor:
    """FP8 quant-dequant (``dsv4::fp8_qdq``), one scale per ``block`` elements of the last dim."""
    _require(x)
    K = x.shape[-1]
    if K % block:
        raise ValueError(f"last dim {K} is not a multiple of the quantization block {block}")
    if block & (block - 1):
        raise ValueError(f"block {block} must be a power of two")
    x2 = x.reshape(-1, K).contiguous()
    M = x2.shape[0]
    out = torch.empty_like(x2)
    if M and K:
        bm = min(16, _np2(M))
        _act_quant_kernel[(triton.cdiv(M, bm), K // block)](x2, out, out, M, K, K // block, BLOCK_M=bm, QB=block,
                                                            UE8M0=bool(ue8m0), DEQUANT=True, num_warps=4,
                                                            **pdl_kwargs(x2.device))
    return out.view(x.shape)


def fp4_qdq(x: Tensor, block: int) -> Tensor:
    """FP4 quant-dequant (``dsv4::fp4_qdq``), one ue8m0 scale per ``block`` elements of the last dim."""
    _require(x)
    K = x.shape[-1]
    if K % block:
        raise ValueError(f"last dim {K} is not a multiple of the quantization block {block}")
    if block & (block - 1):
        raise ValueError(f"block {block} must be a power of two")
    x2 = x.reshape(-1, K).contiguous()
    M = x2.shape[0]
    out = torch.empty_like(x2)
    if M and K:
        bm = min(16, _np2(M))
        _fp4_qdq_kernel[(triton.cdiv(M, bm), K // block)](x2, out, M, K, BLOCK_M=bm, QB=block, num_warps=4)
    return out.view(x.shape)


def fp8_linear(x: Tensor, weight: Tensor, scale: Tensor, act_quant: bool, ue8m0: bool, *,
               block_m: int | None = None, block_n: int | None = None, split_k: int | None = None) -> Tensor:
    """``dsv4::fp8_linear``: x [..., K] @ W^T, W e4m3 [N, K] with fp32 scales [ceil(N/128), ceil(K/128)]."""
    _require(x, weight, scale)
    K = x.shape[-1]
    N = weight.shape[0]
    if weight.shape[1] != K:
        raise ValueError(f"weight {tuple(weight.shape)} does not match x's last dim {K}")
    if weight.dtype != torch.float8_e4m3fn:
        raise TypeError(f"fp8_linear expects a float8_e4m3fn weight, got {weight.dtype}")
    x2 = x.reshape(-1, K).contiguous()
    M = x2.shape[0]
    lead = x.shape[:-1]
    if M == 0 or N == 0:
        return x.new_zeros((*lead, N))
    weight = weight.contiguous()
    scale = scale.float().contiguous()
    kb = triton.cdiv(K, QBLOCK)
    if tuple(scale.shape) != (triton.cdiv(N, QBLOCK), kb):
        raise ValueError(f"scale {tuple(scale.shape)} does not match weight {tuple(weight.shape)}")
    if act_quant and not ue8m0 and x2.dtype != torch.float32:
        # The reference rounds the dequantized activation q * s to x.dtype before the GEMM; with non-power-
        # of-two scales that rounding is visible, so run it that way (published checkpoints use ue8m0).
        x2, act_quant = fp8_qdq(x2, QBLOCK, False), False
    if act_quant and TUNE["fp8_mma"] and block_m is None and block_n is None:
        from .triton_fp8_mma import fp8_gemv_mma, mma_supported  # noqa: PLC0415  (that module imports this one)

        if mma_supported(x2, weight):
            return fp8_gemv_mma(x2, weight, scale, ue8m0, split_k=split_k).view(*lead, N)
    if (M <= TC_MAX_ROWS and TUNE["gemv_tc"] and block_m is None and K % QBLOCK == 0
            and (x2.dtype == torch.bfloat16 or (act_quant and x2.dtype == torch.float32))):
        from .triton_gemv import fp8_gemv_tc  # noqa: PLC0415  (that module imports this one)

        return fp8_gemv_tc(x2, weight, scale, act_quant, ue8m0, block_n=block_n, split_k=split_k).view(*lead, N)
    if (M <= GEMV_MAX_ROWS and block_m is None and K % QBLOCK == 0 and (block_n or TUNE["gemv_bn"]) <= QBLOCK
            and QBLOCK % (block_n or TUNE["gemv_bn"]) == 0):
        return _fp8_gemv(x2, weight, scale, act_quant, ue8m0, block_n=block_n, split_k=split_k).view(*lead, N)
    if M <= SKINNY_MAX_ROWS and block_m is None and (K % QBLOCK == 0 or not act_quant):
        return _fp8_linear_skinny(x2, weight, scale, act_quant, ue8m0, block_n=block_n, split_k=split_k).view(*lead, N)
    if act_quant:
        a, sa = act_quant_fp8(x2, ue8m0)
    else:
        a, sa = x2, scale  # sa unused
    bm = block_m or (16 if M <= 16 else 32 if M <= 32 else 64 if M <= 64 else 128)
    bn = block_n or (64 if M <= 64 else 128)
    mt, nt = triton.cdiv(M, bm), triton.cdiv(N, bn)
    if split_k is None:
        sms = _num_sms(x.device)
        split_k = 1 if mt * nt >= sms else min(kb, max(1, (2 * sms) // (mt * nt)))
    per = triton.cdiv(kb, max(1, int(split_k)))
    split_k = triton.cdiv(kb, per)
    if split_k == 1:
        out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    else:
        out = torch.empty((split_k, M, N), dtype=torch.float32, device=x.device)
    nw = 8 if bm * bn >= 128 * 128 else 4
    _fp8_gemm_kernel[(mt, nt, split_k)](
        a, sa, weight, scale, out, M, N, K, kb, per, kb,
        ACT_Q=bool(act_quant), IEEE=(not act_quant and _is_fp32(x2)), UPCAST=INTERPRET,
        BM=bm, BN=bn, BK=QBLOCK, num_warps=nw, num_stages=3)
    if split_k > 1:
        out = out.sum(0).to(x.dtype)
    return out.view(*lead, N)


def _expert_schedule(expert: Tensor, num_experts: int, bm: int,
                     zero_tiles: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
    """Sort rows by expert and cut each expert's rows into tiles of ``bm``, on the device (no host sync).

    Returns (order [A] row ids sorted by expert, tile_expert [T] (-1 = unused tile), tile_row0 [T],
    tile_row1 [T] (bounds into ``order``), T) with T a static upper bound on the number of tiles.
    ``zero_tiles``: the rows whose expert id is outside [0, num_experts) get tiles too, with tile_expert =
    num_experts, so a kernel can write their zeros into an uninitialized output."""
    A = expert.shape[0]
    dev = expert.device
    e = expert.to(torch.int64)
    key = torch.where((e >= 0) & (e < num_experts), e, torch.full_like(e, num_experts))
    order = torch.sort(key, stable=True).indices
    groups = num_experts + 1 if zero_tiles else num_experts
    # scatter_add instead of bincount: bincount syncs with the host (it sizes its output from the max)
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=dev).scatter_add_(0, key, torch.ones_like(key))
    counts = counts[:groups]
    row_start = torch.cumsum(counts, 0) - counts
    tiles = (counts + bm - 1) // bm
    tile_end = torch.cumsum(tiles, 0)
    tile_start = tile_end - tiles
    T = triton.cdiv(A, bm) + min(groups, A)
    t = torch.arange(T, device=dev, dtype=torch.int64)
    te = torch.searchsorted(tile_end, t, right=True)
    used = te < groups
    ec = te.clamp(max=groups - 1)
    row0 = row_start[ec] + (t - tile_start[ec]) * bm
    row1 = row_start[ec] + counts[ec]
    te = torch.where(used, te, torch.full_like(te, -1))
    return order, te, row0, row1, T



# ---- split-K bookkeeping ---------------------------------------------------------------------------

GEMV_MAX_ROWS = 4  # up to this many rows: one row per program, FMAs (decode at small batch)
SKINNY_MAX_ROWS = 64  # fp8_linear with at most this many rows takes the fused-quantization split-K kernel
GROUPED_MM_MIN_ROWS = 4096  # FP4 expert rows from which prefill dequantizes to bf16 and calls torch._grouped_mm
DIRECT_MAX_ROWS = 256  # fp4 expert rows up to this count run one row per tile (no sort; decode)
COUNTER_SLOTS = 1 << 20
_COUNTERS: dict[tuple[str, int | None, str], Tensor] = {}
# Tuning knobs of the decode kernels (the GPU suite may override them after a sweep).
# (values from the H100 sweep of benchmarks/gpu_suite.py; split_target = programs per SM for split-K, 2 from
# benchmarks/decode_gemv_gpu.py: the flash-4 step's weight-streaming launches 1152 vs 1232 us at 4;
# attn_decode_bh/bn: sparse attention of fewer than 8 decode tokens in 16-head x 16-key programs, 88 vs 130 us;
# fp4_gemv_bn 32 from benchmarks/decode_gemv_gpu.py: the flash-4 step's 12 FP4 launches 482 us vs 553 at 64)
TUNE = {"gemv_bn": 128, "gemv_warps": 4, "fp4_gemv_bn": 32, "fp4_gemv_warps": 2, "grouped_mm": False,
        "gemv_prequant": True, "fp4_order_rows": 16, "max_split": 16,
        "skinny_bn": 64, "skinny_warps": 4, "skinny_stages": 3, "skinny_fp8_dot": False, "split_target": 2,
        "fp4_bn": 64, "fp4_warps": 4, "fp4_stages": 3, "w16_bn": 64, "w16_warps": 4, "w16_stages": 3,
        "attn_split_target": 2, "attn_decode_bh": 16, "attn_decode_bn": 16,
        # tensor-core decode GEMVs (dsv4c.ops.triton_gemv) for up to TC_MAX_ROWS rows; H100, flash-4 decode
        # step at batch 1: FP8 linears 335 us (FMA GEMV + quantization launches: 625), head 353 us (389)
        "gemv_tc": True, "w16_gemv_tc": True, "tc_bn": 128, "tc_warps": 4, "tc_stages": 3, "tc_fp8_dot": True,
        # packed FP4 experts on the tensor cores (decode rows, activation quantized in the kernel)
        # (H100, session 5, decode_gemv_gpu.py: the step's 8 FP4 launches 296 us at 128 x 1 block per step,
        # 273 us at 64 x 2 blocks; 4 blocks per step spill: 802 us)
        "fp4_tc": True, "fp4_tc_asm": True, "fp4_tc_bn": 64, "fp4_tc_warps": 4, "fp4_tc_stages": 3,
        "fp4_tc_kblocks": 2,
        # the same rows on warp-level e4m3 MMAs fed straight from the decoded nibbles (dsv4c.ops.triton_fp4_mma;
        # CUDA sm_89+ only); split: K split across this many programs (None: split_target programs per SM)
        # (H100, session 9: exact on mma_probe; the step's 8 FP4 launches 200 us = 53 % of HBM at 8 warps with
        # K split in 4, 271 us on the tensor-core GEMV; 462 us unsplit: 32 K tiles a program are latency-bound)
        "fp4_mma": True, "fp4_mma_warps": 8, "fp4_mma_split": 4,
        # each FP4 MMA program asks its whole weight range (and its scale bytes) into L2 as soon as it knows its
        # expert, so that the bytes in flight are not bounded by the one tile of registers a lane double-buffers
        # (session 14: the step's FP4 launches at 41-53 % of the copy rate); off until measured
        "fp4_mma_l2_prefetch": False,
        # register sets of K tiles each FP4 MMA lane keeps in flight, taking turns (1: the next tile's loads
        # while one is multiplied, which waits out a load latency per tile, see the kernel; 2 or 4)
        # (H100, session 15: a lane that keeps two tiles in flight through copied registers, 216 vs 199 us)
        "fp4_mma_unroll": 1,
        # FP8 decode rows (<= 8) on the same register-fed MMAs (dsv4c.ops.triton_fp8_mma)
        # (H100, session 9: exact on mma_probe; the step's 20 FP8 launches 261 vs 271 us, max error 9e-4 vs
        # 6e-3 of the e4m3 tensor-core dot)
        "fp8_mma": True, "fp8_mma_warps": 4, "fp8_mma_split": None,
        # register sets of K tiles each FP8 MMA lane keeps in flight, taking turns (1 or 2; see fp4_mma_unroll)
        "fp8_mma_unroll": 1,
        # dsv4::topk_ids (the indexer's selection) on the Triton radix-select kernel instead of torch.topk
        # (H100: exact on every case, 15 vs 36 us for 2048 entries, 66 vs 90 us for 16384)
        "triton_topk": True,
        # decode: the mHC sub-layer inputs as one dsv4c.ops.triton_mhc launch each, the post-mix einsum as an
        # Inductor reduction (load-time rewrites in dsv4c.runtime.load_rewrites)
        # (H100, session 7, decode_gemv_gpu.py: the step's 8 launches 93 us with two passes over the streams
        # at 4 warps, 66 us with the row loaded once at 8 warps, 72 us at 16 warps)
        "hc_pre_fused": True, "hc_pre_warps": 8, "hc_pre_chunk": 128,
        # columns of the streams per collapse step (None: 256 per warp); >= D keeps the row in registers and
        # loads it once, before the split
        "hc_pre_bd": 4096,
        # top-k program width and chunk (None: 4 warps up to 1024 entries, else 8; chunk 4096); chunk 2048 from
        # decode_gemv_gpu.py on an H200 (session 6): the indexer's top-512 of 2048 visible of 16512 entries
        # 17 vs 25 us, exact
        "topk_warps": None, "topk_chunk": 2048,
        # a long row of a few (decode) rows split over programs of topk_split_seg entries each, the last one
        # selecting among their candidates (at most topk_split_max of them); None: one CTA per row
        # (H100, session 9, the indexer's top-512 of 16384 visible of 16512 entries: 45 us at 4096, 57 at
        # 2048, 79 in one CTA; exact)
        "topk_split_seg": 4096, "topk_split_max": 8192,
        # decode attention: merge the key splits in a launch of their own (many programs) instead of in the
        # last program of each head block (H100, session 7: the step's 4 attention calls 81 -> 56 us)
        "attn_merge_launch": True,
        # prefill attention: scan each token's window mask and skip the key blocks it cannot see (session 7's
        # 8k prefill spent 519 of 733 ms in attention, every token looping over all 8320 window keys)
        "attn_win_scan": True,
        # prefill attention tiles (more than 64 bf16 / fp16 query tokens, no key split): heads per program (at
        # most the heads there are), keys per step, warps (None: the launcher's own choice) and whether P @ V
        # runs as two bf16 halves of the fp32 probabilities (False: one bf16 rounding of P, as flash attention
        # does). H100, session 13, 8k tokens x 64 heads x 512 (benchmarks/prefill_probe.py --attn-sweep): a
        # CSA block's 128 window + 512 packed selected keys 20.4 -> 7.4 ms (all 64 heads in one program, so
        # each selected entry is gathered and dequantized once per token; max error 4.4e-3 of the largest
        # output, one bf16 ulp); with P split the same tiles need more shared memory than the SM has
        "attn_prefill_bh": 64, "attn_prefill_bn": 64, "attn_prefill_warps": 8, "attn_prefill_pv_split": False,
        # prefill FP4 experts: the transposed product (decoded weight as the register operand, MMAs in flight
        # across K blocks) on quant-dequantized bf16 activations, on tiles of at most 64 rows (H100, session 9,
        # 8192 tokens x top-6 of 256 experts: w1+w3 9.6 ms on 64-row tiles, 10.1 on 128, 11.5 unswapped)
        "fp4_prefill_swap": True,
        # the prefill FP4 product's warps (None: 8 for 128 x 128 tiles, else 4) and pipeline stages
        # (benchmarks/prefill_probe.py --cases fp4_sweep times a few; the 8k prefill spends ~40 % here)
        "fp4_prefill_warps": None, "fp4_prefill_stages": 3,
        # the prefill FP4 product dequantizes its weight tile through fp32 (e4m3 -> f16 -> f32, the scale in
        # fp32, one bf16 pack per pair) instead of e4m3 -> f16 -> bf16 and a bf16 scale: the same bf16 values,
        # without one F2F conversion per weight element (a 1/8-rate unit; the sm_90 SASS of the loop: 128 F2F
        # and 1292 instructions per 128-wide K block before, none and 1348 after); off until timed
        "fp4_prefill_deq_f32": False,
        # prefill: the mHC mixes (bf16 streams x narrow fp32 weight) through linear_w16's three-term bf16 dots
        # instead of a cuBLAS fp32 GEMM (runtime/load_rewrites.py: rewrite_prefill_mixes); H100, session 10:
        # the 8k prefill's mixes no longer among its top kernels
        "prefill_narrow_mix": True,
        # decode: each MoE layer's shared expert on a second stream beside the routed experts
        # (runtime/shared_expert_stream.py)
        "shared_expert_stream": True,
        # every entry: the compressed-cache row writes as index_put_ (written in place) instead of scatter_
        # (a copy of the whole cache tensor each way; runtime/cache_row_writes.py)
        "cache_index_put": True,
        # every entry: apply_rope's stack + cat as one element-wise expression (runtime/rope_rewrite.py;
        # session 10's decode ran each q / kv norm + RoPE as four kernels)
        "rope_one_expression": True,
        # the decode Triton kernels launched with programmatic dependent launch (sm_90+): each waits for the
        # previous kernel before its first dependent access, then lets the next kernel launch; the FP8 GEMV
        # loads its first weight tile before that wait (see :func:`pdl_launch`, :func:`_pdl_release`)
        # (H100, session 11, decode b=1 8k: 1.507 -> 1.497 ms with the release before the wait, which
        # session 12 found racy against Inductor's kernels; the fixed order is not measured yet)
        "pdl": True,
        # under pdl, the FP8 and W16 decode GEMVs first ask the start of their weight slice into L2 (one bulk
        # prefetch per row, PDL_PREFETCH_BYTES a program) while the previous kernel still runs
        # (H100, session 12 run b: 1.389 ms against controls of 1.393 / 1.407, logits bitwise the same)
        "pdl_prefetch": False,
        # Inductor's own kernels with programmatic dependent launch (its ``triton.enable_pdl``, where this
        # torch has it and runtime/inductor_pdl.py can make each wait before its first access;
        # runtime/inductor_executor.py compile_program) (H100, session 11, with Inductor's own wait placement:
        # 1.507 -> 1.486 ms, logits bitwise the same)
        "inductor_pdl": True,
        # the greedy chain's argmax over the logits as one Triton launch (dsv4c.ops.triton_argmax) instead
        # of torch.argmax, written straight into the next step's input ids (H100, session 11: 3.4 vs 26.6 us
        # for 129280 logits; the chained step 1.507 -> 1.497 ms)
        "triton_argmax": True,
        # the shared-expert fork's SwiGLU writes the w2 GEMV's input dtype itself (no cast launch) and the
        # join's add (routed fp32 + shared bf16) is a Triton launch under pdl instead of torch's add
        # (runtime/shared_expert_stream.py) (H100, session 12 run b: 1.382 ms against controls of 1.393 /
        # 1.407; run a, with router_topk_triton: 1.402 against its main bench's 1.379; session 13: 1.421 ms
        # against a control of 1.432; bits the same each time)
        "fork_join_triton": True,
        # decode: the MoE routers' top-k expert choice on dsv4c's top-k kernel (runtime/load_rewrites.py
        # rewrite_router_topk) instead of torch.topk (a gather and a sort kernel) (H100, session 12 run b:
        # 1.386 ms against controls of 1.393 / 1.407, logits bitwise the same)
        "router_topk_triton": False,
        # the indexer's Hadamard rotations (x @ H, H the 128 x 128 constant) as reductions Inductor generates
        # instead of cuBLAS fp32 SIMT GEMMs: the queries' at decode (runtime/load_rewrites.py
        # rewrite_const_mms), the keys' in the compressor's decomposition (runtime/inductor_executor.py
        # _rotate, every entry; part of the compile cache key). H100, session 13's no-PDL profile: 7.5 us of
        # GEMM + 2.9 us of split-K reduce per rotation; off until measured (fp32 sums in another order)
        "const_mm_reduction": False,
        # decode: equal pure ATen calls of different blocks (window masks, expert rows, RoPE angles) merged
        # into one graph node before Inductor compiles (runtime/pure_cse.py); the flash-4 step ran e.g. its
        # window-mask and zeros kernels once per block; off until measured (same bits: no value changes)
        "cse_pure": False,
        # decode: the shared-expert fork's gather of the routed experts' input rows (x[rows]) as a Triton
        # launch under pdl instead of torch's gather kernel (session 13's no-PDL profile: 4 x 2.3 us, and a
        # launch outside the PDL chain); off until measured (a copy: same bits)
        "gather_rows_triton": False,
        # decode: the attention output's grouped projection reads wo_a as e4m3 codes + block scales found at
        # load (exact: the bf16 weight was dequantized from them) in a bf16-dot GEMV instead of cuBLAS's bf16
        # batched GEMM (runtime/wo_a_fp8.py): half the bytes (H100 session 14: 103 us of the 1.36 ms step for
        # 268 MB); off until measured (fp32 sums in another order)
        "wo_a_fp8": False,
        # prefill: the indexer's scores over FP4 keys with BT query tokens (all their heads) per program as
        # one [BT H, dI] x [dI, BE] product per key step (``_indexer_score_packed_tokens_kernel``) instead of
        # one token's heads per dot (H100, session 14, 8192 queries x 64 heads x 2048 keys
        # (benchmarks/prefill_probe.py --cases indexer): 1.525 -> 1.060 ms at 4 tokens, 64 keys, 8 warps;
        # 1.17-1.30 ms at the other tiles tried; bitwise the same scores)
        "indexer_prefill_tokens": True, "indexer_prefill_bt": 4, "indexer_prefill_be": 64,
        "indexer_prefill_warps": 8}
TC_MAX_ROWS = 16
# L2 prefetch per GEMV program under TUNE pdl_prefetch: enough to cover a few microseconds of the previous
# kernel at the HBM rate over ~2 programs per SM (264 x 64 KB = 17 MB, a third of an H100's L2) without
# evicting the lines before they are used
PDL_PREFETCH_BYTES = 64 * 1024
INDEXER_TOKENS_MIN = 64  # query tokens (batch x sequence) from which the prefill indexer's token kernel runs
WIN_SCAN_KEYS = 1024  # mask bytes per step of the prefill attention's window scan (TUNE attn_win_scan)


def pdl_launch(device: torch.device) -> bool:
    """Whether the decode GEMVs launch on ``device`` with programmatic dependent launch (TUNE ``pdl``):
    compiled CUDA on sm_90+ only; the interpreter and older GPUs launch them plainly."""
    return (bool(TUNE["pdl"]) and HAVE_TRITON and not INTERPRET and gdc_wait is not None
            and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9)


def pdl_kwargs(device: torch.device, prefetch: bool = False) -> dict:
    """The launch arguments of a kernel with a ``PDL`` constexpr (default False) on ``device``: the
    constexpr and the launch option under :func:`pdl_launch`, nothing for a plain launch (which the
    interpreter's launcher also accepts). ``prefetch``: the kernel also has a ``PREFETCH`` constexpr (its
    weight slice prefetched into L2 before the wait, TUNE ``pdl_prefetch``)."""
    if not pdl_launch(device):
        return {}
    extra = {"PREFETCH": True} if prefetch and TUNE["pdl_prefetch"] else {}
    return {"PDL": True, "launch_pdl": True, **extra}


COUNTER_SETS = ("main", "side")
_counter_set = "main"


@contextlib.contextmanager
def counter_set(name: str):
    """Launches inside use the arrival counters of set ``name``: kernels that may run at the same time on
    two streams (the decode step's shared expert on its side stream, runtime/shared_expert_stream.py) must
    not count arrivals in the same slots."""
    global _counter_set
    if name not in COUNTER_SETS:
        raise ValueError(f"counter set {name!r} is not one of {COUNTER_SETS}")
    prev, _counter_set = _counter_set, name
    try:
        yield
    finally:
        _counter_set = prev


def _counters(device: torch.device) -> Tensor:
    """Per-device int32 arrival counters of the split-K kernels (one buffer per :func:`counter_set`); every
    launch leaves them at 0.

    Allocated (zeroed) on first use; call :func:`prepare_device` before capturing CUDA graphs so that the
    first use is not inside a capture."""
    key = (device.type, device.index if device.index is not None else
           (torch.cuda.current_device() if device.type == "cuda" else None), _counter_set)
    c = _COUNTERS.get(key)
    if c is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("dsv4c split-K counters must be allocated before CUDA graph capture "
                               "(call dsv4c.ops.triton_kernels.prepare_device first)")
        c = torch.zeros(COUNTER_SLOTS, dtype=torch.int32, device=device)
        _COUNTERS[key] = c
    return c


def prepare_device(device: torch.device | str) -> None:
    """Allocate the per-device state of the kernels (split-K counters) outside any CUDA graph capture."""
    for name in COUNTER_SETS:
        with counter_set(name):
            _counters(torch.device(device))


def _pick_split(tiles: int, kb: int, device: torch.device, split_k: int | None, min_per: int = 1) -> tuple[int, int]:
    """(split, K blocks per split) so that about TUNE['split_target'] programs per SM run."""
    if split_k is None:
        want = triton.cdiv(TUNE["split_target"] * _num_sms(device), max(1, tiles))
        split_k = max(1, min(want, kb // max(1, min_per), TUNE["max_split"]))
        if tiles * split_k > COUNTER_SLOTS:
            split_k = 1
    per = triton.cdiv(kb, max(1, int(split_k)))
    return triton.cdiv(kb, per), per


def _split_buffers(split: int, rows: int, n: int, device: torch.device) -> tuple[Tensor, Tensor]:
    if split == 1:
        dummy = torch.empty(1, dtype=torch.float32, device=device)
        return dummy, _counters(device)
    return torch.empty((split, rows, n), dtype=torch.float32, device=device), _counters(device)


def _fp8_linear_skinny(x2: Tensor, weight: Tensor, scale: Tensor, act_quant: bool, ue8m0: bool, *,
                       block_n: int | None = None, split_k: int | None = None) -> Tensor:
    """fp8_linear for M <= 64 rows (x2 [M, K] contiguous, already checked by :func:`fp8_linear`)."""
    M, K = x2.shape
    N = weight.shape[0]
    kb = triton.cdiv(K, QBLOCK)
    bm = 16 if M <= 16 else 32 if M <= 32 else 64
    bn = block_n or TUNE["skinny_bn"]
    mt, nt = triton.cdiv(M, bm), triton.cdiv(N, bn)
    split, per = _pick_split(mt * nt, kb, x2.device, split_k)
    out = torch.empty((M, N), dtype=x2.dtype, device=x2.device)
    part, cnt = _split_buffers(split, M, N, x2.device)
    _fp8_skinny_kernel[(mt, nt, split)](
        x2, weight, scale, out, part, cnt, M, N, K, kb, per, kb,
        ACT_Q=bool(act_quant), UE8M0=bool(ue8m0), IEEE=_is_fp32(x2) and not act_quant, UPCAST=INTERPRET,
        FP8_DOT=bool(TUNE["skinny_fp8_dot"]), SPLIT=split, BM=bm, BN=bn, BK=QBLOCK,
        num_warps=TUNE["skinny_warps"], num_stages=TUNE["skinny_stages"])
    return out



def _fp8_gemv(x2: Tensor, weight: Tensor, scale: Tensor, act_quant: bool, ue8m0: bool, *,
              block_n: int | None = None, split_k: int | None = None) -> Tensor:
    """fp8_linear for a few rows (x2 [M, K] contiguous, K % 128 == 0): :func:`_fp8_gemv_kernel`."""
    M, K = x2.shape
    N = weight.shape[0]
    kb = K // QBLOCK
    bn = block_n or TUNE["gemv_bn"]
    nt = triton.cdiv(N, bn)
    split, per = _pick_split(M * nt, kb, x2.device, split_k)
    out = torch.empty((M, N), dtype=x2.dtype, device=x2.device)
    part, cnt = _split_buffers(split, M, N, x2.device)
    if act_quant and TUNE["gemv_prequant"]:  # q * s once (exact in x's dtype), not once per program
        x2, act_quant = fp8_qdq(x2, QBLOCK, ue8m0), False
    _fp8_gemv_kernel[(M, nt, split)](x2, weight, scale, out, part, cnt, M, N, K, kb, per, kb,
                                     ACT_Q=bool(act_quant), UE8M0=bool(ue8m0), SPLIT=split, BN=bn,
                                     num_warps=TUNE["gemv_warps"], num_stages=1)
    return out


def _fp4_gemv(x: Tensor, expert: Tensor, weight: Tensor, scale: Tensor, act_quant: bool, ue8m0: bool,
              block_n: int | None, split_k: int | None) -> Tensor:
    A, K = x.shape
    E, NBLK, KT, PBN, PBK2 = weight.shape
    N = NBLK * PBN
    bn = min(block_n or TUNE["fp4_gemv_bn"], PBN)
    nt = triton.cdiv(N, bn)
    nkb = K // QBLOCK
    split, per = _pick_split(A * nt, nkb, x.device, split_k)
    out = torch.empty((A, N), dtype=x.dtype, device=x.device)
    part, cnt = _split_buffers(split, A, N, x.device)
    if act_quant and TUNE["gemv_prequant"]:
        x, act_quant = fp8_qdq(x, QBLOCK, ue8m0), False
    ordered = A > TUNE["fp4_order_rows"]
    order = torch.sort(expert).indices if ordered else expert
    _fp4_gemv_kernel[(A, nt, split)](x, expert, order, weight, scale, out, part, cnt, A, N, K, E, NBLK, KT, nkb, per,
                                     PBN=PBN, PBK=2 * PBK2, ACT_Q=bool(act_quant), UE8M0=bool(ue8m0), SPLIT=split,
                                     BN=bn, ORDERED=ordered, num_warps=TUNE["fp4_gemv_warps"], num_stages=1)
    return out


def fp4_dequant_packed(weight: Tensor, scale: Tensor) -> Tensor:
    """Packed experts -> bf16 [E, N, K] (exact)."""
    _require(weight, scale)
    E, NBLK, KT, PBN, PBK2 = weight.shape
    PBK = 2 * PBK2
    N, K = NBLK * PBN, KT * PBK
    out = torch.empty((E, N, K), dtype=torch.bfloat16, device=weight.device)
    br = min(PBN, 32)
    _fp4_dequant_kernel[(E * NBLK * KT, triton.cdiv(PBN, br))](weight, scale, out, N, K, NBLK, KT, PBN=PBN, PBK=PBK,
                                                              BR=br, num_warps=4)
    return out


def _fp4_grouped_mm(x: Tensor, expert: Tensor, weight: Tensor, scale: Tensor, act_quant: bool, ue8m0: bool
                    ) -> Tensor:
    """Many rows (prefill): the activation quant-dequantized (exact in bf16), rows sorted by expert, the
    experts dequantized to a transient bf16 copy (exact), and one ``torch._grouped_mm`` (bf16 tensor cores,
    fp32 accumulation): the reference's x_qdq @ W^T rounded once to bf16."""
    A, K = x.shape
    E = weight.shape[0]
    xq = fp8_qdq(x, QBLOCK, ue8m0) if act_quant else x
    e = expert.to(torch.int64)
    ok = (e >= 0) & (e < E)
    key = torch.where(ok, e, torch.full_like(e, E))
    order = torch.sort(key, stable=True).indices
    counts = torch.zeros(E + 1, dtype=torch.int64, device=x.device).scatter_add_(0, key, torch.ones_like(key))
    offs = torch.cumsum(counts[:E], 0).to(torch.int32)
    w = fp4_dequant_packed(weight, scale)
    ys = torch._grouped_mm(xq[order], w.transpose(-2, -1), offs=offs)
    out = torch.empty((A, ys.shape[1]), dtype=x.dtype, device=x.device)
    out[order] = ys
    return torch.where(ok[:, None], out, torch.zeros((), dtype=out.dtype, device=out.device))


def _w16_gemv(x2: Tensor, weight: Tensor, block_n: int | None, split_k: int | None) -> Tensor:
    M, K = x2.shape
    N = weight.shape[0]
    bk = 128
    nkb = triton.cdiv(K, bk)
    bn = block_n or TUNE["gemv_bn"]
    nt = triton.cdiv(N, bn)
    split, per = _pick_split(M * nt, nkb, x2.device, split_k)
    out = torch.empty((M, N), dtype=torch.float32, device=x2.device)
    part, cnt = _split_buffers(split, M, N, x2.device)
    _w16_gemv_kernel[(M, nt, split)](x2, weight, out, part, cnt, M, N, K, nkb, per, SPLIT=split, BN=bn, BK=bk,
                                     num_warps=TUNE["gemv_warps"], num_stages=1)
    return out

def fp4_grouped_linear_packed(x: Tensor, expert: Tensor, weight: Tensor, scale: Tensor, act_quant: bool, ue8m0: bool,
                              *, block_m: int | None = None, block_n: int | None = None, split_k: int | None = None,
                              direct: bool | None = None) -> Tensor:
    """``dsv4::fp4_grouped_linear_packed``: out[a] = x[a] @ W[expert[a]]^T on the packed layout
    (weight uint8 [E, N/bn, K/bk, bn, bk/2], scale ue8m0 bytes [E, N/bn, K/32, bn]); rows with an expert id
    outside [0, E) give zeros.

    Few rows (decode, ``direct``): one row per tile, the activation quantized inside the kernel, K split
    across programs; no sort, no extra launch. Many rows (prefill): rows sorted by expert on the device
    and cut into tiles of ``block_m`` (see :func:`_expert_schedule`), activations quantized once."""
    _require(x, expert, weight, scale)
    A, K = x.shape
    E, NBLK, KT, PBN, PBK2 = weight.shape
    PBK = 2 * PBK2
    N = NBLK * PBN
    if KT * PBK != K or tuple(scale.shape) != (E, NBLK, K // 32, PBN) or weight.dtype != torch.uint8:
        raise ValueError(f"packed weight {tuple(weight.shape)} {weight.dtype} / scale {tuple(scale.shape)} do not "
                         f"match K = {K}")
    if K % QBLOCK or PBN & (PBN - 1):
        from .fused import unpack_fp4_tiled  # noqa: PLC0415  (odd shapes: unpack and use the generic kernel)

        w, s = unpack_fp4_tiled(weight, scale)
        return fp4_grouped_linear(x, expert, w, s, act_quant, ue8m0, block_m=block_m, block_n=block_n)
    if A == 0 or N == 0:
        return x.new_zeros((A, N))
    x = x.contiguous()
    weight = weight.contiguous()
    scale = scale.contiguous()
    expert = expert.contiguous()
    if act_quant and not ue8m0 and x.dtype != torch.float32:
        x, act_quant = fp8_qdq(x, QBLOCK, False), False  # as in fp8_linear: match the reference's rounding
    nkb = K // QBLOCK
    ieee = _is_fp32(x) and not act_quant
    if direct is None:
        direct = A <= DIRECT_MAX_ROWS
    if direct and block_m is None and act_quant and TUNE["fp4_mma"]:
        from .triton_fp4_mma import fp4_gemv_mma, mma_supported  # noqa: PLC0415  (that module imports this one)

        if mma_supported(weight, x):
            return fp4_gemv_mma(x, expert, weight, scale, ue8m0, split_k=split_k)
    if direct and block_m is None and act_quant and TUNE["fp4_tc"]:
        from .triton_gemv import fp4_gemv_tc  # noqa: PLC0415  (that module imports this one)

        return fp4_gemv_tc(x, expert, weight, scale, ue8m0, block_n=block_n, split_k=split_k)
    if direct and (block_m is None or block_m == 1):
        return _fp4_gemv(x, expert, weight, scale, act_quant, ue8m0, block_n, split_k)
    if (not direct and A >= GROUPED_MM_MIN_ROWS and TUNE["grouped_mm"] and x.dtype == torch.bfloat16
            and x.device.type == "cuda" and hasattr(torch, "_grouped_mm") and not INTERPRET):
        return _fp4_grouped_mm(x, expert, weight, scale, act_quant, ue8m0)
    if direct:
        bn = min(block_n or TUNE["fp4_bn"], PBN)
        nt = triton.cdiv(N, bn)
        split, per = _pick_split(A * nt, nkb, x.device, split_k)
        out = torch.empty((A, N), dtype=x.dtype, device=x.device)
        part, cnt = _split_buffers(split, A, N, x.device)
        _fp4_packed_kernel[(A, nt, split)](
            x, x, expert, expert, expert, expert, weight, scale, out, part, cnt, A, N, K, E, NBLK, KT, nkb, per,
            PBN=PBN, PBK=PBK, ACT_MODE=2 if act_quant else 0, UE8M0=bool(ue8m0), IEEE=ieee, UPCAST=INTERPRET,
            ROWS_DIRECT=True, SPLIT=split, BM=16, BN=bn, SWAP=False,
            num_warps=TUNE["fp4_warps"], num_stages=TUNE["fp4_stages"])
        return out
    # swapped product on bf16 activations: exact for ue8m0 scales (code x 2^k is a bf16 value), and for
    # activations that are not quantized
    swap = bool(TUNE["fp4_prefill_swap"]) and not ieee and (ue8m0 or not act_quant) and x.dtype == torch.bfloat16
    rows_per_expert = A / min(E, A)
    bm = block_m or (16 if rows_per_expert <= 16 else 32 if rows_per_expert <= 32 else
                     64 if rows_per_expert <= 96 or swap else 128)
    bn = min(block_n or 128, PBN)
    act_mode = 1 if act_quant else 0
    if swap and act_quant:
        a, sa, act_mode = fp8_qdq(x, QBLOCK, True), x, 0  # sa unused
    elif act_quant:
        a, sa = act_quant_fp8(x, ue8m0)
    else:
        a, sa = x, x  # sa unused
    # rows of no expert get tiles that write their zeros, so the output needs no zero fill (1.9 ms of an 8k
    # prefill on flash-4)
    order, te, row0, row1, T = _expert_schedule(expert, E, bm, zero_tiles=True)
    out = torch.empty((A, N), dtype=x.dtype, device=x.device)
    cnt = _counters(x.device)
    nw = TUNE["fp4_prefill_warps"] or (8 if bm * bn >= 128 * 128 else 4)
    _fp4_packed_kernel[(T, triton.cdiv(N, bn), 1)](
        a, sa, order, te, row0, row1, weight, scale, out, out, cnt, A, N, K, E, NBLK, KT, nkb, nkb,
        PBN=PBN, PBK=PBK, ACT_MODE=act_mode, UE8M0=bool(ue8m0), IEEE=ieee, UPCAST=INTERPRET,
        ROWS_DIRECT=False, SPLIT=1, BM=bm, BN=bn, SWAP=swap, DEQ_F32=bool(TUNE["fp4_prefill_deq_f32"]),
        num_warps=nw, num_stages=TUNE["fp4_prefill_stages"])
    return out


def linear_w16(x: Tensor, weight: Tensor, *, block_m: int | None = None, block_n: int | None = None,
               split_k: int | None = None) -> Tensor:
    """fp32 ``x.float() @ weight.float().t()`` for a bf16 ``weight`` [N, K] without materializing the fp32
    weight: x [..., K] bf16 (one exact bf16 dot) or fp32 (split into three bf16 terms). Returns fp32."""
    _require(x, weight)
    K = x.shape[-1]
    N = weight.shape[0]
    if weight.dim() != 2 or weight.shape[1] != K:
        raise ValueError(f"weight {tuple(weight.shape)} does not match x's last dim {K}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    if x2.dtype not in (torch.bfloat16, torch.float32) or weight.dtype != torch.bfloat16:
        return (x2.float() @ weight.float().t()).view(*lead, N)
    x2 = x2.contiguous()
    weight = weight.contiguous()
    M = x2.shape[0]
    if M == 0 or N == 0:
        return x.new_zeros((*lead, N), dtype=torch.float32)
    if M <= TC_MAX_ROWS and TUNE["w16_gemv_tc"] and block_m is None:
        from .triton_gemv import w16_gemv_tc  # noqa: PLC0415  (that module imports this one)

        return w16_gemv_tc(x2, weight, block_n=block_n, split_k=split_k).view(*lead, N)
    if M <= GEMV_MAX_ROWS and block_m is None:
        return _w16_gemv(x2, weight, block_n, split_k).view(*lead, N)
    bk = 64
    nkb = triton.cdiv(K, bk)
    bm = block_m or (16 if M <= 16 else 32 if M <= 32 else 64 if M <= 64 else 128)
    bn = block_n or (TUNE["w16_bn"] if M <= 64 else 128)
    mt, nt = triton.cdiv(M, bm), triton.cdiv(N, bn)
    split, per = _pick_split(mt * nt, nkb, x.device, split_k, min_per=2)
    out = torch.empty((M, N), dtype=torch.float32, device=x.device)
    part, cnt = _split_buffers(split, M, N, x.device)
    nw = 8 if bm * bn >= 128 * 128 else TUNE["w16_warps"]
    _w16_linear_kernel[(mt, nt, split)](
        x2, weight, out, part, cnt, M, N, K, nkb, per, X_SPLIT3=x2.dtype == torch.float32, UPCAST=INTERPRET,
        SPLIT=split, SWAP_AB=False, BM=bm, BN=bn, BK=bk, num_warps=nw, num_stages=TUNE["w16_stages"])
    return out.view(*lead, N)


def fp4_grouped_linear(x: Tensor, expert: Tensor, weight: Tensor, scale: Tensor, act_quant: bool, ue8m0: bool, *,
                       block_m: int | None = None, block_n: int | None = None) -> Tensor:
    """``dsv4::fp4_grouped_linear``: out[a] = x[a] @ W[expert[a]]^T; W packed e2m1 [E, N, K/2] + scales
    [E, N, K/32]; rows with an expert id outside [0, E) give zeros."""
    _require(x, expert, weight, scale)
    A, K = x.shape
    E, N, K2 = weight.shape
    if K2 * 2 != K or K % 32:
        raise ValueError(f"packed weight {tuple(weight.shape)} does not match K = {K}")
    if tuple(scale.shape) != (E, N, K // 32):
        raise ValueError(f"scale {tuple(scale.shape)} does not match weight {tuple(weight.shape)}")
    out = torch.zeros((A, N), dtype=x.dtype, device=x.device)
    if A == 0 or N == 0 or E == 0:
        return out
    if weight.dtype == torch.int8:
        weight = weight.view(torch.uint8)
    weight = weight.contiguous()
    scale = scale.float().contiguous()
    x = x.contiguous()
    if act_quant and not ue8m0 and x.dtype != torch.float32:
        x, act_quant = fp8_qdq(x, QBLOCK, False), False  # as in fp8_linear: match the reference's rounding
    if act_quant:
        a, sa = act_quant_fp8(x, ue8m0)
    else:
        a, sa = x, scale  # sa unused
    rows_per_expert = A / min(E, A)
    bm = block_m or (16 if rows_per_expert <= 16 else 32 if rows_per_expert <= 32 else 64)
    bn = block_n or (64 if bm <= 32 else 128)
    order, te, row0, row1, T = _expert_schedule(expert, E, bm)
    _fp4_grouped_kernel[(T, triton.cdiv(N, bn))](
        a, sa, order, te, row0, row1, weight, scale, out, N, K, triton.cdiv(K, QBLOCK),
        ACT_Q=bool(act_quant), IEEE=(not act_quant and _is_fp32(x)), UPCAST=INTERPRET,
        BM=bm, BN=bn, BK=QBLOCK, num_warps=4, num_stages=3)
    return out


def sparse_attn(q: Tensor, win_kv: Tensor, win_mask: Tensor, comp_kv: Tensor, comp_idx: Tensor, sink: Tensor,
                scale: float, *, block_h: int | None = None, block_n: int | None = None,
                num_warps: int | None = None, pv_split: bool | None = None, kv_split: int | None = None) -> Tensor:
    """``dsv4::sparse_attn``: window + selected compressed entries, keys = values, sink in the denominator.
    Tiles left None (and ``pv_split``) come from the launcher's choice and, for prefill, TUNE attn_prefill_*."""
    _require(q, win_kv, win_mask, comp_kv, comp_idx, sink)
    return _sparse_attn_launch(q, win_kv, win_mask, comp_idx, sink, scale, comp_kv, None, block_h=block_h,
                               block_n=block_n, num_warps=num_warps, pv_split=pv_split, kv_split=kv_split)


def _rows_view(t: Tensor) -> Tensor:
    """``t`` [B, E, X] with a unit last-dim stride (a copy only when the last dim itself is strided), so the
    cache can be passed as a slice of a larger buffer without copying it."""
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def sparse_attn_packed(q: Tensor, win_kv: Tensor, win_mask: Tensor, comp_nope: Tensor, comp_scale: Tensor,
                       comp_rope: Tensor, comp_idx: Tensor, sink: Tensor, scale: float, *,
                       block_h: int | None = None, block_n: int | None = None, num_warps: int | None = None,
                       pv_split: bool | None = None, kv_split: int | None = None) -> Tensor:
    """``dsv4::sparse_attn_packed``: :func:`sparse_attn` with the compressed entries in their storage format
    (``comp_nope`` [B, E, c - r] float8_e4m3fn, ``comp_scale`` [B, E, S8] ue8m0 bytes, one per 64 nope dims,
    ``comp_rope`` [B, E, r] bf16), dequantized in registers: only the selected entries' bytes are read.
    The three cache tensors may be slices of larger buffers (any batch / entry strides, unit last stride)."""
    _require(q, win_kv, win_mask, comp_nope, comp_scale, comp_rope, comp_idx, sink)
    C = q.shape[-1]
    nope_d, rope_d = comp_nope.shape[-1], comp_rope.shape[-1]
    if nope_d + rope_d != C:
        raise ValueError(f"comp_nope {tuple(comp_nope.shape)} + comp_rope {tuple(comp_rope.shape)} do not make c = {C}")
    if comp_scale.shape[-1] * 64 < nope_d:
        raise ValueError(f"comp_scale {tuple(comp_scale.shape)} has fewer than one byte per 64 of {nope_d} nope dims")
    if not (comp_nope.shape[:2] == comp_scale.shape[:2] == comp_rope.shape[:2]):
        raise ValueError(f"cache parts disagree on [B, E]: {tuple(comp_nope.shape)}, {tuple(comp_scale.shape)}, "
                         f"{tuple(comp_rope.shape)}")
    if comp_nope.element_size() != 1 or comp_scale.element_size() != 1:
        raise TypeError(f"comp_nope / comp_scale must be 1-byte tensors, got {comp_nope.dtype} / {comp_scale.dtype}")
    return _sparse_attn_launch(q, win_kv, win_mask, comp_idx, sink, scale, None, (comp_nope, comp_scale, comp_rope),
                               block_h=block_h, block_n=block_n, num_warps=num_warps, pv_split=pv_split,
                               kv_split=kv_split)


def _sparse_attn_launch(q: Tensor, win_kv: Tensor, win_mask: Tensor, comp_idx: Tensor, sink: Tensor, scale: float,
                        comp_kv: Tensor | None, packed: tuple[Tensor, Tensor, Tensor] | None, *,
                        block_h: int | None, block_n: int | None, num_warps: int | None, pv_split: bool | None,
                        kv_split: int | None) -> Tensor:
    B, S, H, C = q.shape
    if B * S > 64 and (kv_split is None or kv_split == 1) and not _is_fp32(q):  # prefill: its measured tiles
        block_h = block_h or (TUNE["attn_prefill_bh"] and min(TUNE["attn_prefill_bh"], _np2(H, 16)))
        block_n = block_n or TUNE["attn_prefill_bn"]
        num_warps = num_warps or TUNE["attn_prefill_warps"]
        pv_split = TUNE["attn_prefill_pv_split"] if pv_split is None else pv_split
    pv_split = True if pv_split is None else pv_split
    NW = win_kv.shape[1]
    NE = (comp_kv if packed is None else packed[0]).shape[1]
    KC = comp_idx.shape[2]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    kv_dtype = q.dtype
    q = q.contiguous()
    win_kv = win_kv.to(kv_dtype).contiguous()
    # absent parts get a valid pointer to an unfilled buffer: their loops do not run, so nothing reads it (and
    # a decode graph records no fill kernel for it)
    if NW == 0:
        win_kv = q.new_empty((B, 1, C))
    if packed is None:
        comp_kv = comp_kv.to(kv_dtype).contiguous()
        if NE == 0:  # selected ids all fail ``idx < NE``: masked loads only
            comp_kv = q.new_empty((B, 1, C))
        pk_args = (q, q, q, 0, 0, 0, 0, 0, 0, 0)
    else:
        nope, sc, rope = (_rows_view(t) for t in packed)
        if NE == 0:
            nope, sc, rope = (t.new_empty((B, 1, t.shape[-1])) for t in (nope, sc, rope))
        nope = nope.view(torch.uint8)
        sc = sc.view(torch.uint8)
        comp_kv = q  # unused
        pk_args = (nope, sc, rope, nope.shape[-1], nope.stride(0), nope.stride(1), sc.stride(0), sc.stride(1),
                   rope.stride(0), rope.stride(1))
    wm = win_mask.contiguous()
    wm = wm.view(torch.uint8) if wm.dtype == torch.bool else (wm != 0).view(torch.uint8)
    if NW == 0:
        wm = torch.empty((B, S, 1), dtype=torch.uint8, device=q.device)
    idx = comp_idx.to(torch.int64).contiguous()
    if KC == 0:
        idx = torch.empty((B, S, 1), dtype=torch.int64, device=q.device)
    sink = sink.float().contiguous()
    bc = _np2(C, 64 if packed is not None else 16)  # packed tiles are [BN, BC / 64, 64]
    # the fp32 accumulator is BH x C: with C = 512 keep BH at 16-32 heads per program (the programs of one
    # token share its keys through L2)
    bh = block_h or min(32 if bc >= 256 else 64, _np2(H, 16))
    if packed is not None and block_h is None and 8 <= B * S <= 64:
        bh = 16  # decode batches: the in-register dequantization favours smaller head blocks (H100, B = 32)
    if B * S < 8 and block_h is None and TUNE["attn_decode_bh"]:
        bh = min(TUNE["attn_decode_bh"], bh)  # a few decode tokens: more, smaller programs
    bn = block_n or (TUNE["attn_decode_bn"] if B * S < 8 and TUNE["attn_decode_bn"] else 32)
    nw = num_warps or (8 if bh * bc >= 32 * 512 else 4)
    hbk = triton.cdiv(H, bh)
    nw_keys, nc_keys = max(NW, 1), max(KC, 1)
    if kv_split is None:  # decode: few (token, head block) programs; split the keys (flash decoding)
        want = triton.cdiv(TUNE["attn_split_target"] * _num_sms(q.device), B * S * hbk)
        kv_split = max(1, min(want, triton.cdiv(nw_keys + nc_keys, 2 * bn), TUNE["max_split"]))
        if B * S * hbk > COUNTER_SLOTS:
            kv_split = 1
    kv_split = max(1, int(kv_split))
    w_chunk = triton.cdiv(triton.cdiv(nw_keys, kv_split), bn) * bn
    c_chunk = triton.cdiv(triton.cdiv(nc_keys, kv_split), bn) * bn
    grid = (B * S, hbk, kv_split)
    if kv_split > 1:
        pm = torch.empty((kv_split, B * S, H), dtype=torch.float32, device=q.device)
        pl = torch.empty_like(pm)
        pacc = torch.empty((kv_split, B * S, H, C), dtype=torch.float32, device=q.device)
        cnt = _counters(q.device)
    else:
        pm = pl = pacc = cnt = sink
    merge_launch = kv_split > 1 and bool(TUNE["attn_merge_launch"])
    # prefill: most of the NW window keys are outside each token's window; loop over its visible span only
    win_scan = kv_split == 1 and NW > 4 * bn and bool(TUNE["attn_win_scan"])
    _sparse_attn_kernel[grid](q, win_kv, wm, comp_kv, idx, sink, out, pm, pl, pacc, cnt,
                              S, H, C, NW, NE, KC, float(scale), w_chunk, c_chunk, B * S * H, *pk_args,
                              BH=bh, BN=bn, BC=bc, IEEE=_is_fp32(q), UPCAST=INTERPRET, PV_SPLIT=bool(pv_split),
                              SPLIT=kv_split, PACKED=packed is not None, MERGE_LAST=not merge_launch,
                              WIN_SCAN=win_scan, SCAN_KEYS=WIN_SCAN_KEYS, num_warps=nw, num_stages=2,
                              **pdl_kwargs(q.device))
    if merge_launch:
        bcw = min(128, bc)
        _attn_merge_kernel[(B * S, hbk, triton.cdiv(C, bcw))](sink, out, pm, pl, pacc, H, C, B * S * H,
                                                               SPLIT=kv_split, BH=bh, BCW=bcw, num_warps=4,
                                                               **pdl_kwargs(q.device))
    return out


def hc_split(mix: Tensor, base: Tensor, scale: Tensor, n: int, iters: int, eps: float
             ) -> tuple[Tensor, Tensor, Tensor]:
    """``dsv4::hc_split``: pre, post and the Sinkhorn-projected comb (all fp32)."""
    _require(mix, base, scale)
    lead = mix.shape[:-1]
    if mix.shape[-1] != (2 + n) * n:
        raise ValueError(f"mix last dim {mix.shape[-1]} != (2 + n) * n for n = {n}")
    m2 = mix.reshape(-1, mix.shape[-1]).float().contiguous()
    R = m2.shape[0]
    pre = torch.empty((R, n), dtype=torch.float32, device=mix.device)
    post = torch.empty((R, n), dtype=torch.float32, device=mix.device)
    comb = torch.empty((R, n, n), dtype=torch.float32, device=mix.device)
    if R:
        br = min(64, _np2(R))
        np2 = _np2(n)
        # decode (a few rows): one warp, so the Sinkhorn iterations' reductions stay inside it (no barriers)
        nw = 1 if br * np2 * np2 <= 256 else 4
        _hc_split_kernel[(triton.cdiv(R, br),)](m2, base.float().contiguous(), scale.float().contiguous(),
                                                pre, post, comb, R, int(iters), float(eps),
                                                N=n, NP=np2, BR=br, num_warps=nw, **pdl_kwargs(m2.device))
    return pre.view(*lead, n), post.view(*lead, n), comb.view(*lead, n, n)


def swiglu_clamp(g: Tensor, v: Tensor, weight: Tensor, limit: float, has_weight: bool,
                 out_dtype: torch.dtype = torch.float32) -> Tensor:
    """``dsv4::swiglu_clamp``: silu(min(g, L)) * clamp(v, -L, L) (* weight[..., None]) in fp32. ``out_dtype``
    (a direct call, not the op): the fp32 result rounded to nearest-even in that dtype by the same launch,
    the values of ``swiglu_clamp(...).to(out_dtype)``."""
    _require(g, v, weight)
    N = g.shape[-1]
    g2, v2 = (t.reshape(-1, N) for t in (g, v))  # views where the strides allow
    g2, v2 = (t if t.stride(-1) == 1 or t.numel() == 0 else t.contiguous() for t in (g2, v2))
    R = g2.shape[0]
    out = torch.empty((R, N), dtype=out_dtype, device=g.device)
    if R and N:
        w = weight.reshape(-1).contiguous() if has_weight else g2
        if has_weight and w.numel() != R:
            raise ValueError(f"weight has {w.numel()} elements, expected {R}")
        br, bn = 16, min(256, _np2(N))
        _swiglu_kernel[(triton.cdiv(R, br), triton.cdiv(N, bn))](g2, v2, w, out, R, N, g2.stride(0), v2.stride(0),
                                                               float(limit),
                                                               HAS_W=bool(has_weight), BR=br, BN=bn, num_warps=4,
                                                               **pdl_kwargs(g2.device))
    return out.view(g.shape)


def add_f32(a: Tensor, b: Tensor) -> Tensor:
    """``a + b`` in fp32 for two float tensors of one shape (the MoE join: the routed experts' fp32 sum plus
    the shared expert's bf16 output) as one launch, a programmatic dependent under TUNE ``pdl``; the values
    of torch's ``a + b`` with fp32 promotion. Other shapes or strides: torch's add."""
    _require(a, b)
    if a.shape != b.shape or not (a.is_contiguous() and b.is_contiguous()):
        return a.float() + b.float()
    out = torch.empty(a.shape, dtype=torch.float32, device=a.device)
    n = a.numel()
    if n:
        block = 1024
        _add_kernel[(triton.cdiv(n, block),)](a, b, out, n, BLOCK=block, num_warps=4, **pdl_kwargs(a.device))
    return out


def gather_rows(x: Tensor, rows: Tensor) -> Tensor:
    """``x[rows]`` for a contiguous ``x`` [N, ...] and int ``rows`` [R] (the MoE's routed-expert input rows)
    as one launch, a programmatic dependent under TUNE ``pdl``; other layouts: torch's indexing. Row ids
    are not checked against N (the router makes them)."""
    _require(x, rows)
    if not x.is_contiguous() or rows.dim() != 1 or x.dim() < 1:
        return x[rows]
    out = torch.empty((rows.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    D = math.prod(x.shape[1:])
    if out.numel():
        block = min(4096, _np2(D))
        _gather_rows_kernel[(rows.shape[0], triton.cdiv(D, block))](x, rows.contiguous(), out, D, BLOCK=block,
                                                                    num_warps=4, **pdl_kwargs(x.device))
    return out


def indexer_score(q: Tensor, k: Tensor, w: Tensor, *, block_s: int | None = None, block_e: int | None = None
                  ) -> Tensor:
    """``dsv4::indexer_score``: score[b, s, j] = sum_h w[b, s, h] * relu(q[b, s, h] . k[b, j]) (fp32)."""
    _require(q, k, w)
    B, S, NH, D = q.shape
    NE = k.shape[1]
    out = torch.empty((B, S, NE), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out
    dt = torch.promote_types(q.dtype, k.dtype)
    q = q.to(dt).contiguous()
    k = k.to(dt).contiguous()
    w = w.contiguous()
    bs = block_s or (1 if S == 1 else 4 if INTERPRET else 16)
    be = block_e or 64
    grid = (B * triton.cdiv(S, bs), triton.cdiv(NE, be))
    _indexer_score_kernel[grid](q, k, w, out, S, NH, D, NE, BS=bs, BHI=_np2(NH, 16), BD=_np2(D, 16), BE=be,
                                IEEE=_is_fp32(q), UPCAST=INTERPRET, num_warps=4, num_stages=2)
    return out


def _indexer_score_packed_launch(q: Tensor, k_codes: Tensor, k_scale: Tensor, w: Tensor, visible: Tensor | None,
                                 block_s: int | None, block_e: int | None, num_warps: int | None) -> Tensor:
    B, S, NH, D = q.shape
    NE = k_codes.shape[1]
    if k_codes.shape[-1] * 2 != D or D % 32 or D & (D - 1):
        raise ValueError(f"k_codes {tuple(k_codes.shape)} do not pack dI = {D} (a power of two >= 32)")
    if tuple(k_scale.shape[:2]) != tuple(k_codes.shape[:2]) or k_scale.shape[-1] != D // 32:
        raise ValueError(f"k_scale {tuple(k_scale.shape)} does not match k_codes {tuple(k_codes.shape)} (block 32)")
    if k_codes.element_size() != 1 or k_scale.element_size() != 1:
        raise TypeError(f"k_codes / k_scale must be 1-byte tensors, got {k_codes.dtype} / {k_scale.dtype}")
    out = torch.empty((B, S, NE), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out
    if q.dtype not in (torch.bfloat16, torch.float32):
        q = q.float()  # e.g. fp16: keep the reference's fp32 products
    q = q.contiguous()
    w = w.contiguous()
    kc = _rows_view(k_codes).view(torch.uint8)
    ks = _rows_view(k_scale).view(torch.uint8)
    vis = visible.to(torch.int64).expand(B, S).contiguous() if visible is not None else q
    if S > 1 and TUNE["indexer_prefill_tokens"] and (INTERPRET or B * S >= INDEXER_TOKENS_MIN):
        bt = block_s or TUNE["indexer_prefill_bt"]
        be = block_e or (32 if INTERPRET else TUNE["indexer_prefill_be"])
        _indexer_score_packed_tokens_kernel[(B * triton.cdiv(S, bt),)](
            q, kc, ks, w, vis, out, S, NH, NE, kc.stride(0), kc.stride(1), ks.stride(0), ks.stride(1), D=D, BT=bt,
            BHI=_np2(NH, 16), BE=be, HAS_VIS=visible is not None, IEEE=_is_fp32(q), UPCAST=INTERPRET,
            num_warps=num_warps or TUNE["indexer_prefill_warps"], num_stages=2, **pdl_kwargs(q.device))
        return out
    if S == 1:  # decode: bigger key tiles amortize the query rows (re-read by every tile) when there are enough
        bs = 1
        be = block_e or (32 if INTERPRET else 128 if B * NE >= 256 * _num_sms(q.device) else 64)
    else:
        bs, be = block_s or (4 if INTERPRET else 16), block_e or (32 if INTERPRET else 64)
    bs = block_s or bs
    grid = (B * triton.cdiv(S, bs), triton.cdiv(NE, be))
    _indexer_score_packed_kernel[grid](q, kc, ks, w, vis, out, S, NH, NE, kc.stride(0), kc.stride(1), ks.stride(0),
                                       ks.stride(1), D=D, BS=bs, BHI=_np2(NH, 16), BE=be,
                                       HAS_VIS=visible is not None, IEEE=_is_fp32(q), UPCAST=INTERPRET,
                                       num_warps=num_warps or (8 if be >= 256 else 4), num_stages=2,
                                       **pdl_kwargs(q.device))
    return out


def indexer_score_packed(q: Tensor, k_codes: Tensor, k_scale: Tensor, w: Tensor, visible: Tensor | None = None, *,
                         block_s: int | None = None,
                         block_e: int | None = None, num_warps: int | None = None) -> Tensor:
    """``dsv4::indexer_score_packed``: :func:`indexer_score` with the keys in their storage format (``k_codes``
    [B, E, dI/2] uint8, two e2m1 codes per byte, ``k_scale`` [B, E, dI/32] ue8m0 bytes), decoded in registers.
    Both may be slices of larger buffers (any batch / entry strides, unit last stride). fp32 [B, S, E]."""
    _require(q, k_codes, k_scale, w)
    if visible is not None:
        _require(visible)
    return _indexer_score_packed_launch(q, k_codes, k_scale, w, visible, block_s, block_e, num_warps)


def indexer_topk_packed(q: Tensor, k_codes: Tensor, k_scale: Tensor, w: Tensor, visible: Tensor, topk: int, *,
                        block_s: int | None = None, block_e: int | None = None,
                        num_warps: int | None = None) -> Tensor:
    """``dsv4::indexer_topk_packed``: ids [B, S, topk] of the best visible entries (j < visible[b, s]), -1 where
    fewer are visible. The packed score kernel writes -inf for invisible entries and skips key tiles no
    token of its block can see; the selection is ``torch.topk``."""
    _require(q, k_codes, k_scale, w, visible)
    scores = _indexer_score_packed_launch(q, k_codes, k_scale, w, visible, block_s, block_e, num_warps)
    NE = scores.shape[-1]
    kk = min(int(topk), NE)
    if kk > 0:
        vals, idx = torch.topk(scores, kk, dim=-1)
        idx = torch.where(torch.isinf(vals), torch.full_like(idx, -1), idx)
    else:
        idx = scores.new_empty((*scores.shape[:2], 0), dtype=torch.int64)
    if kk < topk:
        idx = torch.cat((idx, idx.new_full((*idx.shape[:2], topk - kk), -1)), dim=-1)
    return idx


def compress_pool(a: Tensor, z: Tensor, a_prev: Tensor, z_prev: Tensor, overlap: bool) -> Tensor:
    """``dsv4::compress_pool``: softmax pooling over each window's m (overlap: 2m) slots, fp32 [B, W, d]."""
    _require(a, z, a_prev, z_prev)
    B, W, M, KD = a.shape
    D = KD // 2 if overlap else KD
    out = torch.empty((B, W, D), dtype=torch.float32, device=a.device)
    if out.numel() == 0:
        return out
    a = a.contiguous()
    z = z.contiguous()
    if overlap:
        ap = a_prev.contiguous()
        zp = z_prev.contiguous()
    else:
        ap, zp = a, z  # unused
    bd = min(128 if M <= 16 else 32, _np2(D))
    _compress_pool_kernel[(B * W, triton.cdiv(D, bd))](a, z, ap, zp, out, M, D, KD, BM=_np2(M), BD=bd,
                                                       OVERLAP=bool(overlap), num_warps=4, **pdl_kwargs(a.device))
    return out


# =================================================================================================
# registration as the CUDA impls of the dsv4 ops
# =================================================================================================

def _cuda_impls() -> dict:
    return {
        "fp8_qdq": lambda x, block, ue8m0: fp8_qdq(x, block, ue8m0),
        "fp4_qdq": lambda x, block: fp4_qdq(x, block),
        "fp8_linear": lambda x, weight, scale, act_quant, ue8m0: fp8_linear(x, weight, scale, act_quant, ue8m0),
        "fp4_grouped_linear": lambda x, expert, weight, scale, act_quant, ue8m0: fp4_grouped_linear(
            x, expert, weight, scale, act_quant, ue8m0),
        "sparse_attn": lambda q, win_kv, win_mask, comp_kv, comp_idx, sink, scale: sparse_attn(
            q, win_kv, win_mask, comp_kv, comp_idx, sink, scale),
        "hc_split": lambda mix, base, scale, n, iters, eps: hc_split(mix, base, scale, n, iters, eps),
        "swiglu_clamp": lambda g, v, weight, limit, has_weight: swiglu_clamp(g, v, weight, limit, has_weight),
        "indexer_score": lambda q, k, w: indexer_score(q, k, w),
        "compress_pool": lambda a, z, a_prev, z_prev, overlap: compress_pool(a, z, a_prev, z_prev, overlap),
        "fp4_grouped_linear_packed": lambda x, expert, weight, scale, act_quant, ue8m0: fp4_grouped_linear_packed(
            x, expert, weight, scale, act_quant, ue8m0),
        # ops of dsv4c.ops.kv_storage (the KV cache in its storage format); registered only where defined
        "sparse_attn_packed": lambda q, win_kv, win_mask, comp_nope, comp_scale, comp_rope, comp_idx, sink, scale:
            sparse_attn_packed(q, win_kv, win_mask, comp_nope, comp_scale, comp_rope, comp_idx, sink, scale),
        "indexer_score_packed": lambda q, k_codes, k_scale, w, visible=None: indexer_score_packed(
            q, k_codes, k_scale, w, visible),
        "indexer_topk_packed": lambda q, k_codes, k_scale, w, visible, topk: indexer_topk_packed(
            q, k_codes, k_scale, w, visible, topk),
        "topk_ids": _topk_ids,
    }


def _topk_ids(scores: Tensor, topk: int, lengths: Tensor | None = None) -> Tensor:
    from .triton_topk import topk_ids  # noqa: PLC0415  (that module imports this one)

    return topk_ids(scores, topk, lengths=lengths)


_OPTIONAL_OPS = ("sparse_attn_packed", "indexer_score_packed", "indexer_topk_packed")


def _op_defined(name: str) -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(f"dsv4::{name}", "")
    except RuntimeError:
        return False
    return True


_REGISTERED = False


def register_cuda_kernels() -> bool:
    """Register the Triton launchers as the CUDA impls of the ``dsv4`` ops. Idempotent; returns False
    (and registers nothing) when triton is not importable."""
    global _REGISTERED
    if not HAVE_TRITON:
        return False
    if _REGISTERED:
        return True
    from . import library  # noqa: F401  (defines the ops)

    try:  # the storage-format KV ops (optional until that module exists)
        from . import kv_storage  # noqa: F401
    except ModuleNotFoundError as e:
        if e.name != f"{__package__}.kv_storage":
            raise
    for name, fn in _cuda_impls().items():
        if name in _OPTIONAL_OPS and not _op_defined(name):
            continue
        torch.library.register_kernel(f"dsv4::{name}", "cuda", fn)
    _REGISTERED = True
    return True


__all__ = [
    "HAVE_TRITON", "INTERPRET", "register_cuda_kernels", "add_f32", "act_quant_fp8", "fp8_qdq", "fp4_qdq", "fp8_linear",
    "fp4_grouped_linear", "sparse_attn", "hc_split", "swiglu_clamp", "indexer_score", "compress_pool",
    "fp4_grouped_linear_packed", "linear_w16", "prepare_device", "TUNE", "fp4_dequant_packed",
    "sparse_attn_packed", "indexer_score_packed", "indexer_topk_packed",
]
