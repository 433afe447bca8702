"""``fuse_shared_input_gemms``: GEMMs that read the same activation become one GEMM on stacked weights.

A block computes several projections of one input: the attention's ``wq_a`` and ``wkv`` of the normed
hidden state, each shared expert's ``w1`` and ``w3``, the routed experts' ``w1`` and ``w3`` of the
dispatched rows. At decode each is a GEMV whose fixed cost (launch, ramp-up, split-K merge) is several
microseconds, as large as streaming a small weight; stacking their weights along N makes one launch that
reads all of them, and one activation quantization instead of several.

- ``dsv4::fp8_linear(x, W_i, S_i, aq, ue8m0)`` with the same ``x``, flags and K, every N_i a multiple of
  the 128-row scale block: ``W = cat(W_i)``, ``S = cat(S_i)`` (rows), one call, ``split_with_sizes``.
- ``dsv4::fp4_grouped_linear_packed(x, expert, W_i, S_i, aq, ue8m0)`` with the same ``x``, ``expert``,
  flags and tile layout: the packed tiles stack along their N-block axis (dim 1 of both tensors).
- a weight applied in fp32 (bf16-stored in a bf16 model), ``matmul(x.float(), W_i.float().t())`` with the
  same ``x`` and K
  (the compressor's ``wkv`` and ``wgate`` of an HCA block; a CSA block's stacked compressor projections
  and its indexer's ``weights_proj``): ``W = cat(W_i)`` (rows), one matmul (one ``linear_w16`` GEMV at
  decode on the GPU).

Each output row is computed from the same weight rows as before, so the result only depends on the GEMM
kernel's reduction order. New parameters are named ``<common prefix>.<leaf>+<leaf>.<suffix>``
(``layers.0.attn.wq_a+wkv.weight``); the stacked originals leave the table.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from dsv4c.program import Program

from .fxutil import aten, call, drop_replaced_params, dsv4, fp32_cast_input, param_input, params, replace
from .manager import PassResult, WeightPass, register

FP8 = dsv4.fp8_linear.default
FP4 = dsv4.fp4_grouped_linear_packed.default
W16 = aten.matmul.default  # x.float() @ W.float().t() (frontend dense_f32; W bf16 in a bf16 model)
SCALE_ROWS = 128  # FP8 weight scale block along N
# positions of (weight, scale) and of the trailing flags in each op's arguments
WS = {FP8: (1, 2), FP4: (2, 3)}


def _w16_weight(mm: fx.Node) -> fx.Node | None:
    """The weight input ``W`` of ``matmul(a, t(W.float()))``, else None."""
    if len(mm.args) != 2 or mm.kwargs:
        return None
    tw = mm.args[1]
    if not (isinstance(tw, fx.Node) and tw.op == "call_function" and tw.target == aten.t.default):
        return None
    w = fp32_cast_input(tw.args[0])
    return w if isinstance(w, fx.Node) and w.op == "placeholder" else None


@dataclass(frozen=True)
class FuseGemmConfig:
    max_group: int = 4  # at most this many GEMMs stacked into one


def fused_name(names: list[str]) -> str:
    """``a.b.x.weight`` + ``a.b.y.weight`` -> ``a.b.x+y.weight`` (common prefix and suffix kept)."""
    parts = [n.split(".") for n in names]
    pre = 0
    while all(len(p) > pre + 1 and p[pre] == parts[0][pre] for p in parts):
        pre += 1
    suf = 0
    while all(len(p) > pre + suf + 1 and p[-1 - suf] == parts[0][-1 - suf] for p in parts):
        suf += 1
    mids = [".".join(p[pre:len(p) - suf]) for p in parts]
    return ".".join(parts[0][:pre] + ["+".join(mids)] + (parts[0][len(parts[0]) - suf:] if suf else []))


@register
class FuseSharedInputGemms(WeightPass):
    name = "fuse_shared_input_gemms"
    Config = FuseGemmConfig

    def run_all(self, programs: dict[str, Program], weights: dict[str, torch.Tensor], ctx) -> PassResult:
        matches: dict[str, int] = {}
        fused: dict[tuple[str, ...], dict] = {}  # original weight names -> what they became
        replaced: set[str] = set()
        for entry, prog in programs.items():
            g = prog.graph_module.graph
            pnames = params(prog)
            n = 0
            for group in self._groups(g, pnames, weights):
                key = tuple(pnames[self._weight(m)] for m in group)
                if key not in fused:
                    fused[key] = self._stack(group, pnames, weights)
                rec = fused[key]
                if group[0].target is W16:
                    self._rewrite_w16(g, group, param_input(prog, rec["weight"], weights[rec["weight"]]), rec["sizes"])
                else:
                    w_node, s_node = (param_input(prog, rec[k], weights[rec[k]]) for k in ("weight", "scale"))
                    self._rewrite(g, group, w_node, s_node, rec["sizes"])
                replaced.update(rec["from"])
                n += 1
            matches[entry] = n
        drop_replaced_params(programs, weights, replaced)
        notes = f"{len(fused)} groups: " + "; ".join(v["weight"] for v in list(fused.values())[:4])
        if len(fused) > 4:
            notes += f"; ... ({len(fused) - 4} more)"
        record = {"groups": {v["weight"]: {"from": v["from"], "sizes": v["sizes"]} for v in fused.values()}}
        return PassResult(matches, skipped=not fused, notes=notes if fused else "nothing to fuse", record=record)

    @staticmethod
    def _weight(m: fx.Node) -> fx.Node:
        return _w16_weight(m) if m.target is W16 else m.args[WS[m.target][0]]

    def _groups(self, g: fx.Graph, pnames: dict, weights: dict) -> list[list[fx.Node]]:
        """GEMM calls that can share one launch, in graph order, each group of two or more."""
        buckets: dict[tuple, list[fx.Node]] = {}
        for node in g.nodes:
            if node.op == "call_function" and node.target is W16:
                w = _w16_weight(node)
                wn = pnames.get(w) if w is not None else None
                wt = weights.get(wn) if wn is not None else None
                if wt is None or wt.dim() != 2 or not wt.dtype.is_floating_point:
                    continue
                x = fp32_cast_input(node.args[0])  # each call casts the shared input itself
                buckets.setdefault((W16, x if x is not None else node.args[0], wt.shape[1], wt.dtype), []).append(node)
                continue
            if node.op != "call_function" or node.target not in (FP8, FP4) or node.kwargs:
                continue
            wi, si = WS[node.target]
            wn, sn = pnames.get(node.args[wi]), pnames.get(node.args[si])
            if wn is None or sn is None or wn not in weights or sn not in weights:
                continue
            wt = weights[wn]
            if node.target is FP8:
                if len(node.args) != 5 or wt.dim() != 2 or wt.shape[0] % SCALE_ROWS:
                    continue
                key = (FP8, node.args[0], node.args[3:], wt.shape[1], wt.dtype)
            else:
                if len(node.args) != 6 or wt.dim() != 5:
                    continue
                key = (FP4, node.args[0], node.args[1], node.args[4:], wt.shape[0], tuple(wt.shape[2:]),
                       tuple(weights[sn].shape[2:]))
            buckets.setdefault(key, []).append(node)
        out = []
        for nodes in buckets.values():
            # a GEMM whose weight another GEMM of the bucket also reads stays alone (nothing to stack)
            seen, uniq = set(), []
            for m in nodes:
                w = self._weight(m)
                if w not in seen:
                    seen.add(w)
                    uniq.append(m)
            for i in range(0, len(uniq), self.config.max_group):
                if len(uniq[i:i + self.config.max_group]) > 1:
                    out.append(uniq[i:i + self.config.max_group])
        return out

    def _stack(self, group: list[fx.Node], pnames: dict, weights: dict) -> dict:
        if group[0].target is W16:  # no scales: the rows of the 16-bit weights
            wn = [pnames[self._weight(m)] for m in group]
            name = fused_name(wn)
            weights[name] = torch.cat([weights[n] for n in wn], dim=0)
            return {"weight": name, "from": wn, "sizes": [weights[n].shape[0] for n in wn]}
        wi, si = WS[group[0].target]
        wn = [pnames[m.args[wi]] for m in group]
        sn = [pnames[m.args[si]] for m in group]
        dim = 0 if group[0].target is FP8 else 1
        w = torch.cat([weights[n] for n in wn], dim=dim)
        s = torch.cat([weights[n] for n in sn], dim=dim)
        names = {"weight": fused_name(wn), "scale": fused_name(sn)}
        weights[names["weight"]], weights[names["scale"]] = w, s
        if group[0].target is FP8:
            sizes = [weights[n].shape[0] for n in wn]
        else:
            sizes = [weights[n].shape[1] * weights[n].shape[3] for n in wn]
        return {**names, "from": wn + sn, "sizes": sizes}

    def _rewrite_w16(self, g: fx.Graph, group: list[fx.Node], w: fx.Node, sizes: list[int]) -> None:
        first = min(group)  # its own fp32 cast of the shared input is defined before it
        with g.inserting_before(first):
            tw = call(g, aten.t.default, call(g, aten.to.dtype, w, torch.float32))
            big = call(g, W16, first.args[0], tw)
            parts = call(g, aten.split_with_sizes.default, big, sizes, -1)
            outs = [call(g, operator.getitem, parts, i, like=m) for i, m in enumerate(group)]
        for m, o in zip(group, outs):
            replace(m, o)

    def _rewrite(self, g: fx.Graph, group: list[fx.Node], w: fx.Node, s: fx.Node, sizes: list[int]) -> None:
        first = min(group)  # nodes compare by graph position: the inputs of all are defined before it
        args = list(first.args)
        wi, si = WS[first.target]
        args[wi], args[si] = w, s
        with g.inserting_before(first):
            big = call(g, first.target, *args)
            parts = call(g, aten.split_with_sizes.default, big, sizes, -1)
            outs = [call(g, operator.getitem, parts, i, like=m) for i, m in enumerate(group)]
        for m, o in zip(group, outs):
            replace(m, o)
