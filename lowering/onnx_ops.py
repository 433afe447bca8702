"""ONNX translations of the ``dsv4`` custom ops, for ``torch.onnx.export(..., custom_translation_table=...)``.

Each function is a *traced* onnxscript translation: the exporter calls it with ``ir.Value`` tensors and
Python attributes (block sizes, flags) and records the standard ONNX ops it emits, so the model holds
nothing but the default ONNX domain. The math follows the CPU reference impls in
``dsv4c/ops/library.py`` op for op (same fp32 intermediates, same order of casts), so exact numerics
agree to float rounding and the quant-dequant simulations agree bit for bit on the same inputs, with
one known exception: when a block's amax/qmax lies a few ulps above a power of two, ``torch.log2``
rounds down to the integer and the reference picks the smaller scale (the block's largest element then
clips); this translation computes the exact ``2^ceil(log2(a))``.

How each op is expressed (opset 18 ops, converted to the model's opset afterwards):

- ``fp8_qdq``: per-block ``ReduceMax(Abs)``, the ue8m0 scale ``2^ceil(log2(amax/448))`` from
  ``Log``/``Ceil``/``Pow`` corrected by one step either way (exact powers of two even where ``Log``
  rounds), ``Clip`` to +-448, then ``Cast(FLOAT8E4M3FN)`` + ``Cast(FLOAT)``: round to nearest even,
  which onnxruntime's CPU provider implements (this is why the model opset is >= 19).
- ``fp4_qdq``: the same scale rule (max 6); e2m1 rounding is seven comparisons against the rounding
  boundaries with ties to the even code, summed as in ``dsv4c.quant.e2m1_round``.
- ``fp8_linear``: ``Cast`` of the e4m3 weight times its 128x128 block scales (``Reshape`` when the weight
  is whole blocks, else ``Gather`` of scale rows/columns), optional 1x128 activation quant-dequant,
  ``MatMul`` in fp32, ``Cast`` back.
- ``fp4_grouped_linear`` / ``fp4_grouped_linear_packed``: every expert is dequantized (nibbles via
  integer ``Mod``/``Div``, a 16-entry ``Gather`` table, times the 1x32 scales; the packed tiled layout
  is untiled with ``Transpose``/``Reshape`` and its ue8m0 bytes decoded as ``2^(b-127)``), all rows are
  multiplied by all experts (``[E, T, N]``) and each row picks its own with ``GatherND``; rows whose
  expert id is outside [0, E) give zeros. Correct and cheap at tiny/mini sizes; big models want a
  grouped kernel instead.
- ``hc_split``: ``Slice``, ``Sigmoid``, ``Softmax`` and the Sinkhorn iterations unrolled
  (``ReduceSum``/``Div``).
- ``compress_pool``: ``Softmax`` over the window axis times the projections, ``ReduceSum``; the overlap
  variant ``Concat``s the previous window's first halves (-inf where absent).
- ``compress_finish`` / ``compress_finish_pair``: the pooling, RMSNorm, interleaved RoPE
  (``Reshape`` to pairs, ``Cos``/``Sin``), Hadamard ``MatMul`` and the FP8/FP4 quant-dequant above.
- ``indexer_score`` / ``indexer_topk``: broadcast ``MatMul``, ``Relu``, weighted ``ReduceSum``;
  ``Where`` masks the invisible entries, ``TopK``, -1 where the score is -inf. (ONNX ``TopK`` breaks
  ties by the lower index, as the reference's stable sort does.)
- ``topk_ids``: NaN -> -inf, ``TopK`` (its lower-index-first tie order is the op's), -1 for -inf picks and
  for the slots past the row.
- ``sparse_attn``: window logits by broadcast ``MatMul`` masked with ``Where``; the chosen compressed
  entries gathered with ``GatherND`` (batch_dims=1); one max-subtracted softmax whose denominator also
  holds ``exp(sink - max)``; two ``MatMul``s for the output.
- ``swiglu_clamp``: ``Min``, ``x * Sigmoid(x)``, ``Clip``, optional routing weight.
- aten ops that torch.onnx only handles by decomposing them (the fast path translates the traced graph
  as is): ``to.dtype`` -> ``Cast``; ``__and__`` -> ``And``/``BitwiseAnd``; ``index_add`` ->
  ``ScatterND(reduction="add")``; ``argsort`` (stable) -> ``TopK`` over the whole axis, which breaks ties
  by index, i.e. stably.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir
import torch
from onnxscript import opset18 as op

F32 = ir.DataType.FLOAT
I64 = ir.DataType.INT64
F8 = ir.DataType.FLOAT8E4M3FN
BF16 = ir.DataType.BFLOAT16

FP8_MAX = 448.0
FP4_MAX = 6.0
FP8_AMAX_FLOOR = 1e-4
FP4_AMAX_FLOOR = 6.0 * 2.0**-126
_E2M1_BOUNDS = ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False), (3.5, True), (5.0, False))
_E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
_INV_LN2 = 1.0 / math.log(2.0)
_DTYPE_CODES = {0: F32, 1: BF16}  # dsv4c.ops.library._DTYPE_CODES
UE8M0_BIAS = 127  # dsv4c.ops.fused


# ---- small helpers -------------------------------------------------------------------------------

def _f(v: float):
    return op.Constant(value_float=float(v))


def _ints(vals):
    return op.Constant(value_ints=[int(v) for v in vals])


def _int(v: int):
    return op.Constant(value_int=int(v))


def _rank(x) -> int:
    if x.shape is None:
        raise ValueError(f"ONNX lowering needs the rank of {x.name}")
    return len(x.shape)


def _static(x, dim: int) -> int:
    d = x.shape[dim]
    if not isinstance(d, int):
        raise ValueError(f"ONNX lowering needs a static size for dim {dim} of {x.name} (got {d})")
    return d


def _float(x):
    return x if x.dtype == F32 else op.Cast(x, to=F32)


def _cast(x, dtype):
    return x if dtype is None or x.dtype == dtype else op.Cast(x, to=int(dtype))


def _blocked(x, block: int, n: int, rank: int):
    """fp32 view [..., n/block, block] of x [..., n] (rank ``rank``; intermediate values carry no shapes,
    so callers pass the sizes they know from the op's inputs)."""
    if n % block:
        raise ValueError(f"last dim {n} is not a multiple of the quantization block {block}")
    return op.Reshape(_float(x), _ints([0] * (rank - 1) + [n // block, block]))


def _unblocked(xb, like):
    return op.Reshape(xb, op.Shape(like))


def _pow2_ceil_log2(a):
    """2^ceil(log2(a)) for a > 0, exact: Log may round, so step the exponent once either way."""
    e = op.Ceil(op.Mul(op.Log(a), _f(_INV_LN2)))
    p = op.Pow(_f(2.0), e)
    too_big = op.Cast(op.GreaterOrEqual(op.Mul(p, _f(0.5)), a), to=F32)
    too_small = op.Cast(op.Less(p, a), to=F32)
    return op.Pow(_f(2.0), op.Add(op.Sub(e, too_big), too_small))


def _block_scale(amax, qmax: float, floor: float, ue8m0: bool):
    a = op.Div(op.Max(amax, _f(floor)), _f(qmax))
    return _pow2_ceil_log2(a) if ue8m0 else a


def _amax(xb):
    return op.ReduceMax(op.Abs(xb), _ints([-1]), keepdims=1)


def e4m3_round(x):
    """Round fp32 values inside [-448, 448] to e4m3 (nearest even) and back to fp32."""
    return op.Cast(op.Cast(x, to=int(F8)), to=int(F32))


def e2m1_round(x):
    """Round fp32 values inside [-6, 6] to e2m1, ties to even (dsv4c.quant.e2m1_round)."""
    a = op.Abs(x)
    mag = None
    prev = 0.0
    for (bound, tie_up), value in zip(_E2M1_BOUNDS, _E2M1_VALUES[1:]):
        up = op.GreaterOrEqual(a, _f(bound)) if tie_up else op.Greater(a, _f(bound))
        step = op.Mul(op.Cast(up, to=int(F32)), _f(value - prev))
        mag = step if mag is None else op.Add(mag, step)
        prev = value
    return op.Where(op.Less(x, _f(0.0)), op.Neg(mag), mag)


def _fp8_qdq_f32(x, block: int, ue8m0: bool, n: int, rank: int):
    xb = _blocked(x, block, n, rank)
    s = _block_scale(_amax(xb), FP8_MAX, FP8_AMAX_FLOOR, ue8m0)
    q = op.Mul(e4m3_round(op.Clip(op.Div(xb, s), _f(-FP8_MAX), _f(FP8_MAX))), s)
    return _unblocked(q, x)


def _fp4_qdq_f32(x, block: int, n: int, rank: int):
    xb = _blocked(x, block, n, rank)
    s = _block_scale(_amax(xb), FP4_MAX, FP4_AMAX_FLOOR, True)
    q = op.Mul(e2m1_round(op.Clip(op.Div(xb, s), _f(-FP4_MAX), _f(FP4_MAX))), s)
    return _unblocked(q, x)


def _act_quant(x, act_quant: bool, ue8m0: bool):
    """library._act_quant: quant-dequant per 1x128 block in x.dtype, then fp32."""
    if not act_quant:
        return _float(x)
    return _float(_cast(_fp8_qdq_f32(x, 128, ue8m0, _static(x, -1), _rank(x)), x.dtype))


def _dequant_fp8_weight(w, scale, block: int = 128):
    n, k = _static(w, 0), _static(w, 1)
    nb, kb = _static(scale, 0), _static(scale, 1)
    wf = op.Cast(w, to=int(F32))
    sf = _float(scale)
    if n == nb * block and k == kb * block:
        tiles = op.Mul(op.Reshape(wf, _ints([nb, block, kb, block])), op.Reshape(sf, _ints([nb, 1, kb, 1])))
        return op.Reshape(tiles, _ints([n, k]))
    rows = op.Constant(value=ir.tensor(np.arange(n, dtype=np.int64) // block))
    cols = op.Constant(value=ir.tensor(np.arange(k, dtype=np.int64) // block))
    full = op.Gather(op.Gather(sf, rows, axis=0), cols, axis=1)
    return op.Mul(wf, full)


def _dequant_fp4_weight(w, scale, block: int = 32, n_exp: int | None = None, n: int | None = None,
                        kh: int | None = None):
    """packed uint8 [E, N, K/2] + scales [E, N, K/block] -> fp32 [E, N, K]."""
    e = n_exp if n_exp is not None else _static(w, 0)
    n = n if n is not None else _static(w, 1)
    kh = kh if kh is not None else _static(w, 2)
    k = 2 * kh
    wi = op.Cast(w, to=int(I64))
    lo = op.Mod(wi, op.Constant(value_int=16))
    hi = op.Div(wi, op.Constant(value_int=16))
    codes = op.Reshape(op.Concat(op.Unsqueeze(lo, _ints([-1])), op.Unsqueeze(hi, _ints([-1])), axis=-1),
                       _ints([e, n, k]))
    table = np.array(list(_E2M1_VALUES) + [-v for v in _E2M1_VALUES], dtype=np.float32)  # code 8 = -0.0
    vals = op.Gather(op.Constant(value=ir.tensor(table)), codes, axis=0)
    scaled = op.Mul(op.Reshape(vals, _ints([e, n, k // block, block])), op.Unsqueeze(_float(scale), _ints([-1])))
    return op.Reshape(scaled, _ints([e, n, k]))


def _rope(x, pos, freqs, rank: int, c: int, dtype, inverse: bool = False):
    """dsv4c.rope.apply_rope: rotate interleaved pairs of the last r dims of x [..., c] (rank ``rank``,
    dtype ``dtype``) by pos * freqs."""
    r = 2 * _static(freqs, 0)
    ang = op.Mul(op.Unsqueeze(op.Cast(pos, to=int(F32)), _ints([-1])), _float(freqs))
    extra = rank - (_rank(pos) + 1)
    if extra > 0:
        ang = op.Unsqueeze(ang, _ints(list(range(-2, -2 - extra, -1))))
    cos, sin = op.Cos(ang), op.Sin(ang)
    if inverse:
        sin = op.Neg(sin)
    nope = op.Slice(x, _ints([0]), _ints([c - r]), _ints([-1]))
    rot = op.Reshape(_float(op.Slice(x, _ints([c - r]), _ints([c]), _ints([-1]))), _ints([0] * (rank - 1) + [r // 2, 2]))
    xr = op.Gather(rot, _int(0), axis=-1)
    xi = op.Gather(rot, _int(1), axis=-1)
    out_r = op.Sub(op.Mul(xr, cos), op.Mul(xi, sin))
    out_i = op.Add(op.Mul(xr, sin), op.Mul(xi, cos))
    out = op.Reshape(op.Concat(op.Unsqueeze(out_r, _ints([-1])), op.Unsqueeze(out_i, _ints([-1])), axis=-1),
                     _ints([0] * (rank - 1) + [r]))
    return op.Concat(nope, _cast(out, dtype), axis=-1)


def _pool(a, z, a_prev, z_prev, overlap: bool):
    af, zf = _float(a), _float(z)
    if overlap:
        kd = _static(a, -1)
        d = kd // 2
        second = (_ints([d]), _ints([kd]), _ints([-1]))
        af = op.Concat(_float(a_prev), op.Slice(af, *second), axis=2)
        zf = op.Concat(_float(z_prev), op.Slice(zf, *second), axis=2)
    return op.ReduceSum(op.Mul(op.Softmax(zf, axis=2), af), _ints([2]), keepdims=0)


def _index_scores(q, k, w):
    """sum_h w[b,s,h] * relu(q[b,s,h] . k[b,j]) -> [B, S, E] fp32."""
    kt = op.Unsqueeze(op.Transpose(_float(k), perm=[0, 2, 1]), _ints([1]))  # [B, 1, dI, E]
    dots = op.MatMul(_float(q), kt)  # [B, S, nI, E]
    return op.ReduceSum(op.Mul(op.Relu(dots), op.Unsqueeze(_float(w), _ints([-1]))), _ints([2]), keepdims=0)


# ---- the dsv4 ops ---------------------------------------------------------------------------------

def fp8_qdq(x, block: int, ue8m0: bool):
    return _cast(_fp8_qdq_f32(x, block, ue8m0, _static(x, -1), _rank(x)), x.dtype)


def fp4_qdq(x, block: int):
    return _cast(_fp4_qdq_f32(x, block, _static(x, -1), _rank(x)), x.dtype)


def fp8_linear(x, weight, scale, act_quant: bool, ue8m0: bool):
    w = _dequant_fp8_weight(weight, scale)
    y = op.MatMul(_act_quant(x, act_quant, ue8m0), op.Transpose(w, perm=[1, 0]))
    return _cast(y, x.dtype)


def fp4_grouped_linear(x, expert, weight, scale, act_quant: bool, ue8m0: bool):
    return _grouped(x, expert, _dequant_fp4_weight(weight, scale), _static(weight, 0), act_quant, ue8m0)


def _grouped(x, expert, w, n_exp: int, act_quant: bool, ue8m0: bool):
    """Row t: x[t] @ w[expert[t]]^T; w fp32 [E, N, K]; zeros where expert[t] is outside [0, E)."""
    xa = _act_quant(x, act_quant, ue8m0)  # [T, K]
    y_all = op.MatMul(op.Unsqueeze(xa, _ints([0])), op.Transpose(w, perm=[0, 2, 1]))  # [E, T, N]
    y_all = op.Transpose(y_all, perm=[1, 0, 2])  # [T, E, N]
    ex = op.Cast(expert, to=int(I64))
    safe = op.Clip(ex, op.Constant(value_int=0), op.Constant(value_int=n_exp - 1))
    y = op.GatherND(y_all, op.Unsqueeze(safe, _ints([-1])), batch_dims=1)  # [T, N]
    valid = op.And(op.GreaterOrEqual(ex, op.Constant(value_int=0)), op.Less(ex, op.Constant(value_int=n_exp)))
    y = op.Where(op.Unsqueeze(valid, _ints([-1])), y, _f(0.0))
    return _cast(y, x.dtype)


def fp4_grouped_linear_packed(x, expert, weight, scale, act_quant: bool, ue8m0: bool):
    """The tiled layout of dsv4c.ops.fused (weight [E, N/bn, K/bk, bn, bk/2], scale [E, N/bn, K/32, bn]
    ue8m0 bytes): untile with Transpose/Reshape, decode the scales as 2^(byte - 127), then as above."""
    e, n_blk, k_blk, bn, bk2 = (_static(weight, i) for i in range(5))
    kb = _static(scale, 2)
    w = op.Reshape(op.Transpose(weight, perm=[0, 1, 3, 2, 4]), _ints([e, n_blk * bn, k_blk * bk2]))
    codes = op.Reshape(op.Transpose(scale, perm=[0, 1, 3, 2]), _ints([e, n_blk * bn, kb]))
    s = op.Pow(_f(2.0), op.Sub(op.Cast(codes, to=int(F32)), _f(UE8M0_BIAS)))
    return _grouped(x, expert, _dequant_fp4_weight(w, s, n_exp=e, n=n_blk * bn, kh=k_blk * bk2), e,
                    act_quant, ue8m0)


def hc_split(mix, base, scale, n: int, iters: int, eps: float):
    m, b, sc = _float(mix), _float(base), _float(scale)
    rank = _rank(mix)

    def part(t, lo, hi):
        return op.Slice(t, _ints([lo]), _ints([hi]), _ints([-1]))

    def s(i):
        return op.Gather(sc, _int(i), axis=0)

    pre = op.Add(op.Sigmoid(op.Add(op.Mul(part(m, 0, n), s(0)), part(b, 0, n))), _f(eps))
    post = op.Mul(op.Sigmoid(op.Add(op.Mul(part(m, n, 2 * n), s(1)), part(b, n, 2 * n))), _f(2.0))
    logits = op.Add(op.Mul(part(m, 2 * n, 2 * n + n * n), s(2)), part(b, 2 * n, 2 * n + n * n))
    comb = op.Add(op.Softmax(op.Reshape(logits, _ints([0] * (rank - 1) + [n, n])), axis=-1), _f(eps))

    def norm(t, axis):
        return op.Div(t, op.Add(op.ReduceSum(t, _ints([axis]), keepdims=1), _f(eps)))

    comb = norm(comb, -2)
    for _ in range(iters - 1):
        comb = norm(norm(comb, -1), -2)
    return pre, post, comb


def compress_pool(a, z, a_prev, z_prev, overlap: bool):
    return _pool(a, z, a_prev, z_prev, overlap)


def indexer_score(q, k, w):
    return _index_scores(q, k, w)


def sparse_attn(q, win_kv, win_mask, comp_kv, comp_idx, sink, scale: float):
    qf = _float(q)
    h = _static(q, 2)
    wf = _float(win_kv)
    ninf = _f(float("-inf"))
    lw = op.Mul(op.MatMul(qf, op.Unsqueeze(op.Transpose(wf, perm=[0, 2, 1]), _ints([1]))), _f(scale))  # [B,S,H,Nw]
    lw = op.Where(op.Unsqueeze(win_mask, _ints([2])), lw, ninf)
    n_comp = _static(comp_idx, -1) if _static(comp_kv, 1) > 0 else 0
    if n_comp:
        idx = op.Cast(comp_idx, to=int(I64))
        valid = op.GreaterOrEqual(idx, op.Constant(value_int=0))
        safe = op.Max(idx, op.Constant(value_int=0))
        ck = op.GatherND(_float(comp_kv), op.Unsqueeze(safe, _ints([-1])), batch_dims=1)  # [B, S, K, c]
        lc = op.Mul(op.MatMul(qf, op.Transpose(ck, perm=[0, 1, 3, 2])), _f(scale))  # [B, S, H, K]
        lc = op.Where(op.Unsqueeze(valid, _ints([2])), lc, ninf)
        logits = op.Concat(lw, lc, axis=-1)
    else:
        logits = lw
    m = op.Max(op.ReduceMax(logits, _ints([-1]), keepdims=1), _f(-1e30))
    p = op.Exp(op.Sub(logits, m))
    sinks = op.Reshape(_float(sink), _ints([h, 1]))
    p = op.Div(p, op.Add(op.ReduceSum(p, _ints([-1]), keepdims=1), op.Exp(op.Sub(sinks, m))))
    big = 1 << 62
    if n_comp:
        pw = op.Slice(p, _ints([0]), _ints([-n_comp]), _ints([-1]))
        pc = op.Slice(p, _ints([-n_comp]), _ints([big]), _ints([-1]))
        out = op.Add(op.MatMul(pw, op.Unsqueeze(wf, _ints([1]))), op.MatMul(pc, ck))
    else:
        out = op.MatMul(p, op.Unsqueeze(wf, _ints([1])))
    return _cast(out, q.dtype)


def swiglu_clamp(g, v, weight, limit: float, has_weight: bool):
    gf = op.Min(_float(g), _f(limit))
    h = op.Mul(op.Mul(gf, op.Sigmoid(gf)), op.Clip(_float(v), _f(-limit), _f(limit)))
    return op.Mul(h, op.Unsqueeze(_float(weight), _ints([-1]))) if has_weight else h


def indexer_topk(q, k, w, visible, topk: int):
    scores = _index_scores(q, k, w)
    n_ent = _static(k, 1)
    ent = op.Constant(value=ir.tensor(np.arange(n_ent, dtype=np.int64)))
    hidden = op.GreaterOrEqual(ent, op.Unsqueeze(op.Cast(visible, to=int(I64)), _ints([-1])))
    scores = op.Where(hidden, _f(float("-inf")), scores)
    vals, idx = op.TopK(scores, _ints([topk]), axis=-1, largest=1, sorted=1)
    return op.Where(op.IsInf(vals), op.Constant(value_int=-1), idx)


def topk_ids(scores, topk: int, lengths=None):
    """NaN (and entries at or past a row's length) count as -inf; ``TopK`` (ties: lower index first, the
    op's contract); -1 where the score is -inf and in the slots past the row."""
    s = _float(scores)
    s = op.Where(op.IsNaN(s), _f(float("-inf")), s)
    n_ent = _static(scores, -1)
    if lengths is not None:
        ent = op.Constant(value=ir.tensor(np.arange(n_ent, dtype=np.int64)))
        s = op.Where(op.GreaterOrEqual(ent, op.Unsqueeze(op.Cast(lengths, to=int(I64)), _ints([-1]))),
                     _f(float("-inf")), s)
    kk = min(int(topk), n_ent)
    vals, idx = op.TopK(s, _ints([kk]), axis=-1, largest=1, sorted=1)
    idx = op.Where(op.IsInf(vals, detect_positive=0), op.Constant(value_int=-1), idx)
    if kk < topk:
        pad_shape = op.Concat(op.Slice(op.Shape(idx), _ints([0]), _ints([-1])), _ints([topk - kk]), axis=0)
        idx = op.Concat(idx, op.Expand(op.Constant(value_int=-1), pad_shape), axis=-1)
    return idx


def compress_finish(a, z, a_prev, z_prev, norm_w, pos, freqs, hadamard, overlap: bool, eps: float,
                    act_dtype_code: int, quant_mode: int, ue8m0: bool):
    dtype = _DTYPE_CODES[act_dtype_code]
    d = _static(a, -1) // 2 if overlap else _static(a, -1)
    rank = _rank(a) - 1  # [B, W, d]
    e = _cast(_pool(a, z, a_prev, z_prev, overlap), dtype)
    ef = _float(e)
    rms = op.Reciprocal(op.Sqrt(op.Add(op.ReduceMean(op.Mul(ef, ef), _ints([-1]), keepdims=1), _f(eps))))
    e = _cast(op.Mul(op.Mul(ef, rms), _float(norm_w)), dtype)
    e = _rope(e, pos, freqs, rank, d, dtype)
    r = 2 * _static(freqs, 0)
    if quant_mode == 1:
        nope = op.Slice(e, _ints([0]), _ints([d - r]), _ints([-1]))
        rot = op.Slice(e, _ints([d - r]), _ints([d]), _ints([-1]))
        e = op.Concat(_cast(_fp8_qdq_f32(nope, 64, ue8m0, d - r, rank), dtype), rot, axis=-1)
    elif quant_mode in (2, 3):
        e = _cast(op.MatMul(_float(e), _float(hadamard)), dtype)
        if quant_mode == 2:
            e = _cast(_fp4_qdq_f32(e, 32, d, rank), dtype)
    return e


def compress_finish_pair(a, z, a_prev, z_prev, norm_w, pos, ia, iz, ia_prev, iz_prev, inorm_w, ipos, freqs, hadamard,
                         overlap: bool, eps: float, act_dtype_code: int, quant_mode: int, iquant_mode: int,
                         ue8m0: bool):
    kv = compress_finish(a, z, a_prev, z_prev, norm_w, pos, freqs, hadamard, overlap, eps, act_dtype_code,
                         quant_mode, ue8m0)
    keys = compress_finish(ia, iz, ia_prev, iz_prev, inorm_w, ipos, freqs, hadamard, overlap, eps, act_dtype_code,
                           iquant_mode, ue8m0)
    return kv, keys


# ---- aten ops torch.onnx's library lacks (the fast path translates the traced graph as is) ---------

def aten_to_dtype(self, dtype: int, non_blocking: bool = False, copy: bool = False, memory_format: str = ""):
    return op.Cast(self, to=int(dtype)) if int(dtype) != int(self.dtype) else op.Identity(self)


def aten_and(self, other):
    if self.dtype == ir.DataType.BOOL and other.dtype == ir.DataType.BOOL:
        return op.And(self, other)
    return op.BitwiseAnd(self, other)


def aten_index_add(self, dim: int, index, source, alpha: float = 1.0):
    """self.index_add(dim, index, source): ScatterND with add reduction along ``dim``."""
    rank = _rank(self)
    d = dim % rank
    src = source if alpha == 1 else op.Mul(source, op.CastLike(_f(alpha), source))
    if d:
        perm = [d] + [i for i in range(rank) if i != d]
        inv = [perm.index(i) for i in range(rank)]
        out = op.ScatterND(op.Transpose(self, perm=perm), op.Unsqueeze(op.Cast(index, to=int(I64)), _ints([-1])),
                           op.Transpose(src, perm=perm), reduction="add")
        return op.Transpose(out, perm=inv)
    return op.ScatterND(self, op.Unsqueeze(op.Cast(index, to=int(I64)), _ints([-1])), src, reduction="add")


def aten_argsort_stable(self, stable: bool = True, dim: int = -1, descending: bool = False):
    """Stable argsort: ``TopK`` over the whole axis (ONNX breaks ties by the lower index first)."""
    rank = _rank(self)
    d = dim % rank
    x = self
    if x.dtype not in (F32, I64, ir.DataType.DOUBLE, ir.DataType.INT32):
        x = op.Cast(x, to=int(F32) if x.dtype in (ir.DataType.BOOL, ir.DataType.UINT8, ir.DataType.INT8,
                                                  ir.DataType.INT16, BF16, ir.DataType.FLOAT16) else int(I64))
    n = op.Shape(x, start=d, end=d + 1)
    _, idx = op.TopK(x, n, axis=d, largest=1 if descending else 0, sorted=1)
    return idx


def aten_argsort(self, dim: int = -1, descending: bool = False):
    return aten_argsort_stable(self, True, dim, descending)


def translation_table(aten: bool = False) -> dict:
    """{torch.ops.dsv4.<op>.default: translation} for every op of the dsv4 library; with ``aten`` also
    the few aten ops that torch.onnx only handles after decomposing them."""
    import dsv4c.ops  # noqa: F401  (registers torch.ops.dsv4)

    funcs = {
        "fp8_qdq": fp8_qdq, "fp4_qdq": fp4_qdq, "fp8_linear": fp8_linear, "fp4_grouped_linear": fp4_grouped_linear,
        "hc_split": hc_split, "compress_pool": compress_pool, "indexer_score": indexer_score,
        "sparse_attn": sparse_attn, "swiglu_clamp": swiglu_clamp, "indexer_topk": indexer_topk,
        "compress_finish": compress_finish, "fp4_grouped_linear_packed": fp4_grouped_linear_packed,
        "compress_finish_pair": compress_finish_pair, "topk_ids": topk_ids,
    }
    table = {}
    for name, fn in funcs.items():
        packet = getattr(torch.ops.dsv4, name, None)
        if packet is not None:
            table[packet.default] = fn
    if aten:
        a = torch.ops.aten
        table.update({a.to.dtype: aten_to_dtype, a.__and__.Tensor: aten_and, a.index_add.default: aten_index_add,
                      a.argsort.stable: aten_argsort_stable, a.argsort.default: aten_argsort})
    return table


def dsv4_ops() -> set[str]:
    """Names of every op in the dsv4 library (what must have a translation)."""
    import dsv4c.ops.library as lib

    return {f"{lib.LIB}::{n}" for n in dir(torch.ops.dsv4) if isinstance(getattr(torch.ops.dsv4, n, None),
                                                                      torch._ops.OpOverloadPacket)}


# Ops that only a packed (storage-format) KV cache brings into a graph (dsv4c.ops.kv_storage). The onnx
# backend takes dense caches only (onnx_backend.check_kv_storage refuses packed builds), so they have no
# translation.
PACKED_KV_OPS = frozenset(f"dsv4::{n}" for n in ("kv_pack", "kv_unpack", "fp4_pack", "fp4_unpack",
                                                 "sparse_attn_packed", "indexer_score_packed",
                                                 "indexer_topk_packed"))


def covered_ops() -> set[str]:
    return {f"dsv4::{t._opname}" for t in translation_table()}
