"""The ``dsv4`` custom-op library: definitions, fake (meta) impls and CPU reference impls.

Each op is one model primitive with the math of MODEL-SEMANTICS written once. The frontend emits the
unfused ops; passes replace chains of them with the fused ones at the bottom of this file. GPU kernels
register CUDA impls for the same names (see ``dsv4c.ops.triton_kernels``), so graphs do not change
between targets.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import quant

LIB = "dsv4"


def _op(name: str, mutates_args: tuple[str, ...] = ()):  # noqa: ANN202 - decorator factory
    return torch.library.custom_op(f"{LIB}::{name}", mutates_args=mutates_args)


# ---- quantization --------------------------------------------------------------------------------

@_op("fp8_qdq")
def fp8_qdq(x: Tensor, block: int, ue8m0: bool) -> Tensor:
    """FP8 e4m3 quant-dequant, one scale per ``block`` elements of the last dim."""
    return quant.fp8_qdq(x, block, ue8m0)


@fp8_qdq.register_fake
def _(x, block, ue8m0):
    return torch.empty_like(x)


@_op("fp4_qdq")
def fp4_qdq(x: Tensor, block: int) -> Tensor:
    """FP4 e2m1 quant-dequant, one ue8m0 scale per ``block`` elements of the last dim."""
    return quant.fp4_qdq(x, block)


@fp4_qdq.register_fake
def _(x, block):
    return torch.empty_like(x)


# ---- linears -------------------------------------------------------------------------------------

def _act_quant(x: Tensor, act_quant: bool, ue8m0: bool) -> Tensor:
    return quant.fp8_qdq(x, 128, ue8m0).float() if act_quant else x.float()


@_op("fp8_linear")
def fp8_linear(x: Tensor, weight: Tensor, scale: Tensor, act_quant: bool, ue8m0: bool) -> Tensor:
    """y = x @ W^T with W in e4m3 + 128x128 block scales; fp32 accumulate; output in x.dtype.

    ``act_quant`` quantizes x per 1x128 block along K to e4m3 first (the reference numerics)."""
    w = quant.dequantize_fp8_weight(weight, scale)
    return (_act_quant(x, act_quant, ue8m0) @ w.t()).to(x.dtype)


@fp8_linear.register_fake
def _(x, weight, scale, act_quant, ue8m0):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@_op("fp4_grouped_linear")
def fp4_grouped_linear(x: Tensor, expert: Tensor, weight: Tensor, scale: Tensor, act_quant: bool,
                       ue8m0: bool) -> Tensor:
    """Row a of the output is x[a] @ W[expert[a]]^T, W in packed e2m1 [E, N, K/2] + ue8m0 [E, N, K/32].

    Rows whose expert id is outside [0, E) produce zeros (used by wave scheduling to skip rows)."""
    xa = _act_quant(x, act_quant, ue8m0)
    out = torch.zeros(x.shape[0], weight.shape[1], dtype=torch.float32, device=x.device)
    for e in torch.unique(expert).tolist():
        if not 0 <= e < weight.shape[0]:
            continue
        rows = (expert == e).nonzero().squeeze(-1)
        w = quant.dequantize_fp4_weight(weight[e], scale[e])
        out[rows] = xa[rows] @ w.t()
    return out.to(x.dtype)


@fp4_grouped_linear.register_fake
def _(x, expert, weight, scale, act_quant, ue8m0):
    return x.new_empty((x.shape[0], weight.shape[1]))


# ---- mHC -----------------------------------------------------------------------------------------

@_op("hc_split")
def hc_split(mix: Tensor, base: Tensor, scale: Tensor, n: int, iters: int, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Split the mHC mixing logits [..., (2+n)n] into pre [.., n], post [.., n] and a Sinkhorn-projected
    doubly-stochastic comb [.., n, n] (comb[i][j]: input stream i -> output stream j). All fp32."""
    mix = mix.float()
    base = base.float()
    scale = scale.float()
    pre = torch.sigmoid(mix[..., :n] * scale[0] + base[:n]) + eps
    post = 2 * torch.sigmoid(mix[..., n:2 * n] * scale[1] + base[n:2 * n])
    logits = mix[..., 2 * n:] * scale[2] + base[2 * n:]
    comb = torch.softmax(logits.unflatten(-1, (n, n)), dim=-1) + eps
    comb = comb / (comb.sum(-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(-1, keepdim=True) + eps)
        comb = comb / (comb.sum(-2, keepdim=True) + eps)
    return pre, post, comb


@hc_split.register_fake
def _(mix, base, scale, n, iters, eps):
    lead = mix.shape[:-1]
    f = torch.float32
    return mix.new_empty((*lead, n), dtype=f), mix.new_empty((*lead, n), dtype=f), mix.new_empty((*lead, n, n), dtype=f)


def hc_pre_reference(x: Tensor, fn: Tensor, base: Tensor, scale: Tensor, norm_w: Tensor, n: int, iters: int,
                     hc_eps: float, mix_eps: float, norm_eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """A sub-layer's input from the mHC streams ``x`` [..., n, D]: (RMSNorm(sum_i pre_i x_i) with weight
    ``norm_w``, in x.dtype [..., D], post [..., n], comb [..., n, n]); the frontend's ``hc_pre`` then
    ``rms_norm``, written once for the fused kernel (``dsv4c.ops.triton_mhc``) and its load-time rewrite."""
    xf = x.flatten(-2).float()
    mix = (xf @ fn.float().t()) * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + mix_eps)
    pre, post, comb = hc_split(mix, base, scale, n, iters, hc_eps)
    u = (pre[..., None] * x.float()).sum(dim=-2).to(x.dtype).float()
    u = u * torch.rsqrt(u.pow(2).mean(-1, keepdim=True) + norm_eps) * norm_w.float()
    return u.to(x.dtype), post, comb


# ---- compressor ----------------------------------------------------------------------------------

@_op("compress_pool")
def compress_pool(a: Tensor, z: Tensor, a_prev: Tensor, z_prev: Tensor, overlap: bool) -> Tensor:
    """Softmax pooling of one compressor over windows (fp32).

    a, z: [B, W, m, k*d] projections of the m tokens of each window (z includes the ape bias).
    Non-overlap (k = 1): entry = sum_t softmax_t(z) * a.
    Overlap (k = 2): entry pools 2m slots: the previous window's first halves (a_prev, z_prev:
    [B, W, m, d]; z_prev = -inf where absent) and this window's second halves; one softmax per feature.
    """
    a = a.float()
    z = z.float()
    if overlap:
        d = a.shape[-1] // 2
        a = torch.cat((a_prev.float(), a[..., d:]), dim=2)
        z = torch.cat((z_prev.float(), z[..., d:]), dim=2)
    return (torch.softmax(z, dim=2) * a).sum(dim=2)


@compress_pool.register_fake
def _(a, z, a_prev, z_prev, overlap):
    d = a.shape[-1] // 2 if overlap else a.shape[-1]
    return a.new_empty((a.shape[0], a.shape[1], d), dtype=torch.float32)


# ---- lightning indexer ---------------------------------------------------------------------------

@_op("indexer_score")
def indexer_score(q: Tensor, k: Tensor, w: Tensor) -> Tensor:
    """score[b, s, j] = sum_h w[b, s, h] * relu(q[b, s, h] . k[b, j]) in fp32.

    q: [B, S, nI, dI], k: [B, E, dI], w: [B, S, nI] (already scaled)."""
    dots = torch.einsum("bshd,bed->bshe", q.float(), k.float())
    return (torch.relu(dots) * w.float()[..., None]).sum(dim=2)


@indexer_score.register_fake
def _(q, k, w):
    return q.new_empty((q.shape[0], q.shape[1], k.shape[1]), dtype=torch.float32)


# ---- attention -----------------------------------------------------------------------------------

@_op("sparse_attn")
def sparse_attn(q: Tensor, win_kv: Tensor, win_mask: Tensor, comp_kv: Tensor, comp_idx: Tensor, sink: Tensor,
                scale: float) -> Tensor:
    """Attention with a sink over a window part and a selected compressed part; keys = values.

    q [B, S, H, c]; win_kv [B, Nw, c] with win_mask [B, S, Nw] (True = visible); comp_kv [B, E, c] with
    comp_idx [B, S, K] (entry ids, -1 = none); sink [H] fp32. Returns [B, S, H, c] in q.dtype.
    p_i = exp(l_i - M) / (sum_V exp(l - M) + exp(sink - M)), M = max over the visible logits."""
    qf = q.float()
    lw = torch.einsum("bshc,bnc->bshn", qf, win_kv.float()) * scale
    lw = lw.masked_fill(~win_mask[:, :, None, :], float("-inf"))
    valid = comp_idx >= 0  # [B, S, K]
    safe = comp_idx.clamp(min=0)
    b_idx = torch.arange(q.shape[0], device=q.device)[:, None, None]
    if comp_kv.shape[1] > 0:
        ck = comp_kv.float()[b_idx, safe]  # [B, S, K, c]
    else:
        ck = comp_kv.new_zeros((*comp_idx.shape, q.shape[-1]), dtype=torch.float32)
    lc = torch.einsum("bshc,bskc->bshk", qf, ck) * scale
    lc = lc.masked_fill(~valid[:, :, None, :], float("-inf"))
    logits = torch.cat((lw, lc), dim=-1)
    m = logits.amax(-1, keepdim=True)
    sinks = sink.float()[None, None, :, None]
    m = torch.maximum(m, torch.full_like(m, -1e30))  # no visible key at all: only the sink remains
    p = torch.exp(logits - m)
    denom = p.sum(-1, keepdim=True) + torch.exp(sinks - m)
    p = p / denom
    nw = lw.shape[-1]
    out = torch.einsum("bshn,bnc->bshc", p[..., :nw], win_kv.float()) + torch.einsum("bshk,bskc->bshc", p[..., nw:], ck)
    return out.to(q.dtype)


@sparse_attn.register_fake
def _(q, win_kv, win_mask, comp_kv, comp_idx, sink, scale):
    return torch.empty_like(q)


# ---- fused ops (created by passes) ---------------------------------------------------------------

@_op("swiglu_clamp")
def swiglu_clamp(g: Tensor, v: Tensor, weight: Tensor, limit: float, has_weight: bool) -> Tensor:
    """silu(min(g, L)) * clamp(v, -L, L) (* weight[:, None] when has_weight), in fp32."""
    h = torch.nn.functional.silu(torch.clamp(g.float(), max=limit)) * torch.clamp(v.float(), -limit, limit)
    return h * weight.float()[..., None] if has_weight else h


@swiglu_clamp.register_fake
def _(g, v, weight, limit, has_weight):
    return g.new_empty(g.shape, dtype=torch.float32)


def select_visible_topk(scores: Tensor, visible: Tensor, topk: int) -> Tensor:
    """Ids [..., topk] of the best-scoring entries of each row among those it may see (entry j is visible
    to a row when j < visible[row]), by descending score and the lower id first on ties; -1 where fewer
    than ``topk`` are visible. Plain aten ops, so traced graphs show them (the ``fuse_compress_indexer``
    pass matches this chain).

    The tie order is part of the result: indexer scores tie exactly whenever every head's ReLU is zero,
    and a tie at the k-th place decides which entry is attended. ``torch.topk`` leaves it unspecified
    (it changes with the row length, so a cache of another capacity could pick another entry); a stable
    sort fixes it to the rule of the compiled paths (``select_topk_ids``, the Triton top-k, ONNX TopK)."""
    ent = torch.arange(scores.shape[-1], device=scores.device)
    scores = scores.masked_fill(ent >= visible[..., None], float("-inf"))
    idx = torch.argsort(scores, dim=-1, descending=True, stable=True)[..., :topk]
    vals = scores.gather(-1, idx)
    return torch.where(torch.isinf(vals), torch.full_like(idx, -1), idx)


def mask_past_lengths(scores: Tensor, lengths: Tensor) -> Tensor:
    """fp32 ``scores`` [..., NE] with the entries at or past each row's length (``lengths`` broadcastable to
    the rows) set to -inf."""
    ent = torch.arange(scores.shape[-1], device=scores.device)
    return scores.float().masked_fill(ent >= lengths.expand(scores.shape[:-1])[..., None], float("-inf"))


def select_topk_ids(scores: Tensor, topk: int, lengths: Tensor | None = None) -> Tensor:
    """int64 [..., topk] ids of the ``topk`` largest scores of each row (last dim), by descending score with
    the lower id first on ties (also at the k-th value: the smallest ids are chosen); -inf (and NaN)
    entries are never selected and the slots they leave are -1. ``lengths`` (integers of the rows' shape,
    optional): entries at or past a row's length count as -inf (the indexer's visible prefix; the kernel
    then reads only that prefix). The selection of ``select_visible_topk`` with a fixed tie order (the
    indexer's decompositions for Inductor call it; on CUDA with ``TUNE["triton_topk"]`` off, ties come in
    ``torch.topk``'s order)."""
    lead, NE = scores.shape[:-1], scores.shape[-1]
    if NE == 0 or scores.numel() == 0:
        return torch.full((*lead, topk), -1, dtype=torch.int64, device=scores.device)
    if lengths is not None:
        scores = mask_past_lengths(scores, lengths)
    s = scores.float().reshape(-1, NE)
    s = torch.where(torch.isnan(s), torch.full_like(s, float("-inf")), s)
    s = torch.where(s == 0, torch.zeros_like(s), s)  # -0.0 ties with +0.0
    kk = min(topk, NE)
    order = torch.sort(-s, dim=-1, stable=True).indices[:, :kk]  # stable: equal scores keep id order
    vals = s.gather(-1, order)
    ids = torch.where(vals == float("-inf"), torch.full_like(order, -1), order)
    out = ids.new_full((s.shape[0], topk), -1)
    out[:, :kk] = ids
    return out.reshape(*lead, topk)


@_op("topk_ids")
def topk_ids(scores: Tensor, topk: int, lengths: Tensor | None = None) -> Tensor:
    """:func:`select_topk_ids` as an op (CUDA: the Triton radix-select kernel of ``triton_topk``)."""
    return select_topk_ids(scores, topk, lengths)


@topk_ids.register_fake
def _(scores, topk, lengths=None):
    return scores.new_empty((*scores.shape[:-1], topk), dtype=torch.int64)


@_op("indexer_topk")
def indexer_topk(q: Tensor, k: Tensor, w: Tensor, visible: Tensor, topk: int) -> Tensor:
    """Indexer scoring fused with top-k selection: ids [B, S, topk] of the best visible entries
    (entry j is visible to row (b, s) when j < visible[b, s]); -1 where fewer are visible."""
    return select_visible_topk(indexer_score(q, k, w), visible, topk)


@indexer_topk.register_fake
def _(q, k, w, visible, topk):
    return q.new_empty((q.shape[0], q.shape[1], topk), dtype=torch.int64)


@_op("compress_finish")
def compress_finish(a: Tensor, z: Tensor, a_prev: Tensor, z_prev: Tensor, norm_w: Tensor, pos: Tensor, freqs: Tensor,
                    hadamard: Tensor, overlap: bool, eps: float, act_dtype_code: int, quant_mode: int,
                    ue8m0: bool) -> Tensor:
    """Pooling + cast + RMSNorm + RoPE (+ Hadamard) (+ quant-dequant) of one compressor, as one op.

    quant_mode: 0 none, 1 FP8 on [..., :-r] (block 64), 2 Hadamard then FP4 (block 32), 3 Hadamard only."""
    from ..rope import apply_rope  # local: ops must not import model code at module load

    dtype = _DTYPE_CODES[act_dtype_code]
    e = compress_pool(a, z, a_prev, z_prev, overlap).to(dtype)
    ef = e.float()
    e = (ef * torch.rsqrt(ef.pow(2).mean(-1, keepdim=True) + eps) * norm_w.float()).to(dtype)
    e = apply_rope(e, pos, freqs)
    r = freqs.shape[0] * 2
    if quant_mode == 1:
        e = torch.cat((quant.fp8_qdq(e[..., :-r], 64, ue8m0), e[..., -r:]), dim=-1)
    elif quant_mode in (2, 3):
        e = (e.float() @ hadamard.float()).to(dtype)
        if quant_mode == 2:
            e = quant.fp4_qdq(e, 32)
    return e


@compress_finish.register_fake
def _(a, z, a_prev, z_prev, norm_w, pos, freqs, hadamard, overlap, eps, act_dtype_code, quant_mode, ue8m0):
    d = a.shape[-1] // 2 if overlap else a.shape[-1]
    return a.new_empty((a.shape[0], a.shape[1], d), dtype=_DTYPE_CODES[act_dtype_code])


_DTYPE_CODES = {0: torch.float32, 1: torch.bfloat16}


def dtype_code(dtype: torch.dtype) -> int:
    return {v: k for k, v in _DTYPE_CODES.items()}[dtype]
