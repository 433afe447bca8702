"""``rewrite_swiglu_clamp``: the clamped SwiGLU of the experts becomes ``dsv4::swiglu_clamp``.

Matches (MODEL-SEMANTICS section 6)::

    silu(clamp(g.float(), max=L)) * clamp(v.float(), -L, L)                      # shared expert
    silu(clamp(g.float(), max=L)) * clamp(v.float(), -L, L) * w.float()[:, None]  # routed experts

and rewrites each to ``swiglu_clamp(g, v, w, L, has_weight)``; the op computes the same expression in
the same order, so the result is bit-identical. The unweighted form passes ``g`` as the (unread)
weight operand. One site per routed-expert group and one per shared expert of every MoE block.
"""

from __future__ import annotations

import math

import torch

from dsv4c.program import Program

from .fxutil import Cast, Op, V, alive, aten, call, calls, dsv4, match, replace
from .manager import GraphPass, PassResult, register

F32 = torch.float32


def _limit_ok(node, b) -> bool:
    L = b.get("L")
    return isinstance(L, (int, float)) and not isinstance(L, bool) and math.isfinite(L) and L > 0 \
        and b.get("negL") == -L


CORE = Op(aten.mul.Tensor,
          Op(aten.silu.default, Op(aten.clamp.default, Cast(V("g"), F32), None, V("L"))),
          Op(aten.clamp.default, Cast(V("v"), F32), V("negL"), V("L")),
          commutative=True, name="core", check=_limit_ok)
WEIGHTED = Op(aten.mul.Tensor, CORE, Op(aten.unsqueeze.default, Cast(V("w"), F32), V("dim")), commutative=True,
              check=lambda n, b: b["dim"] in (1, -1) and getattr(b["w"], "meta", {}).get("val") is not None
              and b["w"].meta["val"].dim() == 1)


@register
class RewriteSwigluClamp(GraphPass):
    name = "rewrite_swiglu_clamp"
    uses_modules = ("dsv4c.passes.fxutil", "dsv4c.ops.library")

    def run(self, prog: Program, weights, ctx) -> PassResult:
        g = prog.graph_module.graph
        n_weighted = n_plain = 0
        # Outermost first: the weighted form contains the plain one.
        for node in reversed(calls(g, aten.mul.Tensor)):
            if not alive(node) or not node.users:
                continue
            b = match(WEIGHTED, node)
            weighted = b is not None
            if b is None:
                b = match(CORE, node)
            if b is None:
                continue
            with g.inserting_before(node):
                new = call(g, dsv4.swiglu_clamp.default, b["g"], b["v"], b["w"] if weighted else b["g"], float(b["L"]),
                           weighted, like=node)
            replace(node, new)
            if weighted:
                n_weighted += 1
            else:
                n_plain += 1
        n = n_weighted + n_plain
        return PassResult(n, skipped=n == 0, notes=f"{n_weighted} routed, {n_plain} shared",
                          record={"sites": {"routed": n_weighted, "shared": n_plain}})
