"""``fuse_compress_indexer``: one projection, one finishing op and one selection op per CSA block.

A CSA block runs two compressors over the same tokens and windows (main KV entries at c dims, indexer
keys at index_head_dim; MODEL-SEMANTICS section 5), then scores the indexer keys and keeps the top k.
The traced graph has, per compressor, two fp32 projections of the same ``u`` and then a chain of
pooling, cast, RMSNorm, RoPE and quantization; and for the indexer, scoring, masking and top-k. This
pass rewrites, per CSA block:

1. **projection**: the four ``u @ W^T`` (main wkv, main wgate, indexer wkv, indexer wgate) become one
   GEMM against a new parameter ``<block>.attn.compressors.wkv_wgate.weight`` (the four weights stacked
   along N, in that order) followed by four slices. Weight-rewriting: the four old parameters leave
   the parameter table.
2. **finish_pair**: both chains ``compress_pool -> to -> RMSNorm -> RoPE -> quant`` become one
   ``dsv4::compress_finish_pair`` producing the KV entries and the indexer keys. The indexer's window
   gathers are hoisted above the main compressor's cache write for that (pure nodes only, and only
   if no cache they read is written in between).
3. **indexer_topk**: ``indexer_score -> masked_fill(entry >= visible) -> stable argsort[:k] -> gather -> where(isinf, -1)``
   becomes ``dsv4::indexer_topk`` (packed KV storage: ``indexer_score_packed`` -> ... becomes
   ``dsv4::indexer_topk_packed``, reading the keys' e2m1 codes and ue8m0 bytes).

Packed KV storage (``StepContext.kv_storage == "packed"``): the frontend finishes the main entries
without the FP8 quant-dequant (quant mode 0) and the indexer keys with the Hadamard only (mode 3), and
quantizes by packing (``dsv4::kv_pack`` / ``dsv4::fp4_pack``) into the cache; the chains fused here are
the same up to that mode, so the pack ops simply follow the fused op.

HCA blocks have a single compressor: its chain becomes ``dsv4::compress_finish`` (**finish**).
Every fused op computes exactly the chain it replaces (same ops, same order), so logits are unchanged.
"""

from __future__ import annotations

import math
import operator
from collections import defaultdict

import torch
import torch.fx as fx

from dsv4c.ops import dtype_code
from dsv4c.program import Program

from .fxutil import (Cast, Named, Op, V, aten, call, calls, drop_replaced_params, dsv4, match,
                     param_input, params, replace, strip_noop_casts)
from .manager import PassResult, WeightPass, register

F32 = torch.float32
BIG = 2**63 - 1
_PROJ = ("compressor.wkv", "compressor.wgate", "indexer.compressor.wkv", "indexer.compressor.wgate")
FUSED_PROJ = "compressors.wkv_wgate.weight"


# ---- patterns (written from frontend/model.py: compressor(), rms_norm(), apply_rope(), indexer()) --------

def _rms_norm(x):
    xf = Named("xf", Cast(x, F32))
    ms = Op(aten.add.Tensor, Op(aten.mean.dim, Op(aten.pow.Tensor_Scalar, xf, 2), [-1], True), V("eps"))
    y = Op(aten.mul.Tensor, Op(aten.mul.Tensor, xf, Op(aten.rsqrt.default, ms)), Cast(V("norm_w"), F32))
    return Cast(y, V("dtype"))


def _rope(x):
    xin = Named("rope_in", x)
    ang = Named("ang", Op(aten.mul.Tensor, Op(aten.unsqueeze.default, Cast(V("pos"), F32), V("udim")), V("freqs")))
    cos, sin = Named("cos", Op(aten.cos.default, ang)), Named("sin", Op(aten.sin.default, ang))
    rot = Named("rot", Cast(Op(aten.slice.Tensor, xin, V("sd"), V("negr"), BIG), F32))
    ev = Named("even", Op(aten.slice.Tensor, rot, V("sd"), 0, BIG, 2))
    od = Named("odd", Op(aten.slice.Tensor, rot, V("sd"), 1, BIG, 2))
    re = Op(aten.sub.Tensor, Op(aten.mul.Tensor, ev, cos), Op(aten.mul.Tensor, od, sin))
    im = Op(aten.add.Tensor, Op(aten.mul.Tensor, ev, sin), Op(aten.mul.Tensor, od, cos))
    out = Cast(Op(aten.flatten.using_ints, Op(aten.stack.default, [re, im], -1), -2), V("dtype"))
    return Op(aten.cat.default, [Op(aten.slice.Tensor, xin, V("sd"), 0, V("negr")), out], -1)


_POOL = Op(dsv4.compress_pool.default, V("a"), V("z"), V("a_prev"), V("z_prev"), V("overlap"), name="pool")
_E = Named("e", _rope(_rms_norm(Cast(_POOL, V("dtype")))))
_HAD = Cast(Op(aten.matmul.default, Cast(_E, F32), Cast(V("had"), F32)), V("dtype"))
# quant_mode (see dsv4::compress_finish) -> the chain's last node
_FINISH = (
    (2, Op(dsv4.fp4_qdq.default, _HAD, 32)),
    (1, Op(aten.cat.default, [Op(dsv4.fp8_qdq.default, Op(aten.slice.Tensor, _E, V("sd"), 0, V("negr")), 64, V("ue8m0")),
                              Op(aten.slice.Tensor, _E, V("sd"), V("negr"), BIG)], -1)),
    (3, _HAD),
    (0, _E),
)
_FINISH_DEPTH = 40  # the longest chain (quant mode 2) is ~25 nodes deep

_PROJ_MM = Op(aten.matmul.default, Cast(V("u"), F32), Op(aten.t.default, Cast(V("w"), F32)), name="mm")

def _topk_pattern(score):
    hidden = Op(aten.ge.Tensor, Op(aten.arange.default, V("n_ent")), Op(aten.unsqueeze.default, V("visible"), V("vd")))
    scores = Named("scores", Op(aten.masked_fill.Scalar, score, hidden, -math.inf))
    order = Op(aten.argsort.stable, scores, kwargs={"stable": True, "descending": True})
    idx = Named("idx", Op(aten.slice.Tensor, order, V("sd"), 0, V("topk")))
    return Op(aten.where.self, Op(aten.isinf.default, Op(aten.gather.default, scores, -1, idx)),
              Op(aten.full_like.default, idx, -1), idx)


_TOPK = _topk_pattern(Op(dsv4.indexer_score.default, V("q"), V("k"), V("w")))
# packed KV storage: the keys are e2m1 codes + ue8m0 bytes (dsv4c.ops.kv_storage)
_TOPK_PACKED = _topk_pattern(Op(dsv4.indexer_score_packed.default, V("q"), V("k"), V("k_scale"), V("w")))


@register
class FuseCompressIndexer(WeightPass):
    name = "fuse_compress_indexer"
    uses_modules = ("dsv4c.passes.fxutil", "dsv4c.ops.library", "dsv4c.ops.fused")

    def run_all(self, programs: dict[str, Program], weights: dict[str, torch.Tensor], ctx) -> PassResult:
        counts: dict[str, dict[str, int]] = {}
        replaced: set[str] = set()
        notes = []
        for entry, prog in programs.items():
            c = counts[entry] = {"projection": 0, "finish_pair": 0, "finish": 0, "indexer_topk": 0}
            c["projection"] = _fuse_projections(prog, weights, replaced, notes)
            c["finish_pair"], c["finish"] = _fuse_finish(prog, ctx, notes)
            c["indexer_topk"] = _fuse_topk(prog)
        removed = drop_replaced_params(programs, weights, replaced)
        total = {e: sum(c.values()) for e, c in counts.items()}
        first = next(iter(counts.values()), {})
        note = ", ".join(f"{k} {v}" for k, v in first.items()) + " per entry"
        if removed:
            note += f"; {removed} unused program inputs dropped (all entries)"
        if notes:
            note += "; " + "; ".join(sorted(set(notes)))
        return PassResult(total, skipped=not any(total.values()), notes=note, record={"sites": counts})


# ---- 1. one projection GEMM ---------------------------------------------------------------------------------

def _fuse_projections(prog: Program, weights: dict[str, torch.Tensor], replaced: set[str], notes: list) -> int:
    g = prog.graph_module.graph
    pnames = params(prog)
    found: dict[str, dict[str, dict]] = defaultdict(dict)  # block attn prefix -> projection -> bindings
    for mm in calls(g, aten.matmul.default):
        b = match(_PROJ_MM, mm)
        if b is None or b["w"] not in pnames:
            continue
        name = pnames[b["w"]]
        for proj in _PROJ:
            suffix = f".{proj}.weight"
            if name.endswith(suffix) and (proj.startswith("indexer") or not name.endswith(".indexer" + suffix)):
                found[name[: -len(suffix)]][proj] = b
    n = 0
    for attn, bs in found.items():
        if len(bs) != len(_PROJ):
            continue  # HCA block (one compressor) or an unexpected graph
        if len({strip_noop_casts(b["u"]) for b in bs.values()}) != 1:
            notes.append(f"{attn}: compressor projections read different inputs; left unfused")
            continue
        olds = [f"{attn}.{p}.weight" for p in _PROJ]
        if any(o not in weights for o in olds) or len({weights[o].dtype for o in olds}) != 1:
            notes.append(f"{attn}: compressor weights missing or of mixed dtype; left unfused")
            continue
        new_name = f"{attn}.{FUSED_PROJ}"
        if new_name not in weights:
            weights[new_name] = torch.cat([weights[o] for o in olds], dim=0)
        mms = [bs[p]["mm"] for p in _PROJ]
        first = min(mms)  # nodes compare by their position in the graph
        u = strip_noop_casts(bs[_PROJ[0]]["u"])
        w_node = param_input(prog, new_name, weights[new_name])
        with g.inserting_before(first):
            fused = call(g, aten.matmul.default, call(g, aten.to.dtype, u, F32),
                         call(g, aten.t.default, call(g, aten.to.dtype, w_node, F32)))
            dim = fused.meta["val"].dim() - 1 if "val" in fused.meta else -1
            start, parts = 0, []
            for p in _PROJ:
                rows = weights[f"{attn}.{p}.weight"].shape[0]
                parts.append(call(g, aten.slice.Tensor, fused, dim, start, start + rows))
                start += rows
        for mm, part in zip(mms, parts):
            replace(mm, part)
        replaced.update(olds)
        n += 1
    return n


# ---- 2. the finishing chains -----------------------------------------------------------------------------

def _match_finish(pool: fx.Node, spec) -> tuple[fx.Node, int, dict] | None:
    """(last node, quant_mode, bindings) of the longest finishing chain that starts at ``pool``."""
    frontier, seen = [pool], {pool}
    cands = []
    for _ in range(_FINISH_DEPTH):
        nxt = []
        for n in frontier:
            for u in n.users:
                if u not in seen:
                    seen.add(u)
                    nxt.append(u)
        cands.extend(nxt)
        frontier = nxt
    for end in sorted(cands, reverse=True):
        for mode, pat in _FINISH:
            b = match(pat, end)
            if b is not None and b["pool"] is pool and b["negr"] == -spec.rope_dim \
                    and isinstance(b["eps"], float) and b["dtype"] in (torch.bfloat16, torch.float32):
                return end, mode, b
    return None


def _fuse_finish(prog: Program, ctx, notes: list) -> tuple[int, int]:
    g = prog.graph_module.graph
    pnames = params(prog)
    by_block: dict[str, dict[str, tuple]] = defaultdict(dict)  # "layers.N" -> main/indexer -> match
    alone: list[tuple] = []  # compressors whose norm weight is not a named parameter
    for pool in calls(g, dsv4.compress_pool.default):
        m = _match_finish(pool, ctx.spec)
        if m is None:
            notes.append(f"a compress_pool ({pool.name}) had no recognizable finishing chain")
            continue
        name = pnames.get(m[2]["norm_w"], "")
        if name.endswith(".attn.indexer.compressor.norm.weight"):
            by_block[name.split(".attn.")[0]]["indexer"] = m
        elif name.endswith(".attn.compressor.norm.weight"):
            by_block[name.split(".attn.")[0]]["main"] = m
        else:
            alone.append(m)
    pairs = singles = 0
    for ms in by_block.values():
        if "main" in ms and "indexer" in ms and _emit_pair(g, ms["main"], ms["indexer"], ctx):
            pairs += 1
        else:
            alone.extend(ms.values())
    for m in alone:
        _emit_single(g, m, ctx)
        singles += 1
    return pairs, singles


def _finish_args(m: tuple, ctx) -> tuple[list, dict]:
    end, mode, b = m
    return [b["a"], b["z"], b["a_prev"], b["z_prev"], b["norm_w"], b["pos"]], \
        {"freqs": b["freqs"], "had": b.get("had"), "overlap": b["overlap"], "eps": b["eps"],
         "dtype": dtype_code(b["dtype"]), "mode": mode, "ue8m0": b.get("ue8m0", ctx.ue8m0)}


def _emit_single(g: fx.Graph, m: tuple, ctx) -> None:
    end = m[0]
    ops, k = _finish_args(m, ctx)
    with g.inserting_before(end):
        new = call(g, dsv4.compress_finish.default, *ops, k["freqs"], k["had"] if k["had"] is not None else k["freqs"],
                   k["overlap"], k["eps"], k["dtype"], k["mode"], k["ue8m0"], like=end)
    replace(end, new)


def _emit_pair(g: fx.Graph, main: tuple, idx: tuple, ctx) -> bool:
    ops_m, km = _finish_args(main, ctx)
    ops_i, ki = _finish_args(idx, ctx)
    same = all(km[k] == ki[k] if not isinstance(km[k], fx.Node) else km[k] is ki[k]
               for k in ("freqs", "overlap", "eps", "dtype"))
    if not same:
        return False
    at = main[0]
    if not _hoist_before([a for a in ops_i if isinstance(a, fx.Node)] + ([ki["had"]] if ki["had"] is not None else []), at):
        return False
    had = ki["had"] if ki["had"] is not None else km["freqs"]
    with g.inserting_before(at):
        pair = call(g, dsv4.compress_finish_pair.default, *ops_m, *ops_i, km["freqs"], had, km["overlap"], km["eps"],
                    km["dtype"], km["mode"], ki["mode"], km["ue8m0"], infer=False)
        kv = call(g, operator.getitem, pair, 0, like=main[0])
        keys = call(g, operator.getitem, pair, 1, like=idx[0])
    replace(main[0], kv)
    replace(idx[0], keys)
    return True


_VIEW_LIKE = {aten.slice.Tensor, aten.view.default, aten.view.dtype, aten.reshape.default, aten.unsqueeze.default, aten.expand.default,
              aten.t.default, aten.permute.default, aten.select.int, aten.alias.default, aten.squeeze.dim,
              aten.flatten.using_ints}


def _storage_root(n: fx.Node) -> fx.Node:
    """The node whose storage ``n`` may alias: through views and in-place ops to a placeholder or a producer."""
    while n.op == "call_function" and (n.target in _VIEW_LIKE or n.is_impure()) and n.args \
            and isinstance(n.args[0], fx.Node):
        n = n.args[0]
    return n


def _hoist_before(needed: list[fx.Node], at: fx.Node) -> bool:
    """Move the pure nodes that ``needed`` depends on and that come after ``at`` to just before it.

    Refuses (returns False, graph untouched) if one of them has a side effect or reads storage that a
    side-effecting node between ``at`` and its old position writes."""
    move: set[fx.Node] = set()
    todo = [n for n in needed if n > at]
    while todo:
        n = todo.pop()
        if n in move:
            continue
        if n.op != "call_function" or n.is_impure():
            return False
        move.add(n)
        todo.extend(a for a in n.all_input_nodes if a > at)
    if not move:
        return True
    last, written, n = max(move), set(), at
    while n is not last:  # side effects between ``at`` and the last node to move
        if n.op == "call_function" and n.is_impure() and n.args and isinstance(n.args[0], fx.Node):
            written.add(_storage_root(n.args[0]))
        n = n.next
    for n in move:
        for a in n.all_input_nodes:
            if a not in move and _storage_root(a) in written:
                return False
    for n in sorted(move):
        at.prepend(n)
    return True


# ---- 3. scoring + top-k --------------------------------------------------------------------------------------

def _fuse_topk(prog: Program) -> int:
    g = prog.graph_module.graph
    n = 0
    for w in calls(g, aten.where.self):
        b = match(_TOPK, w)
        packed = b is None
        if packed:
            b = match(_TOPK_PACKED, w)
        if b is None:
            continue
        k_shape = b["k"].meta["val"].shape if "val" in b["k"].meta else None
        if (k_shape is None or b["n_ent"] != k_shape[1] or b["vd"] not in (-1, 2) or b["sd"] not in (-1, 2)
                or not isinstance(b["topk"], int)):
            continue
        with g.inserting_before(w):
            if packed:
                new = call(g, dsv4.indexer_topk_packed.default, b["q"], b["k"], b["k_scale"], b["w"], b["visible"],
                           b["topk"], like=w)
            else:
                new = call(g, dsv4.indexer_topk.default, b["q"], b["k"], b["w"], b["visible"], b["topk"], like=w)
        replace(w, new)
        n += 1
    return n
