"""Cleanups the product passes rely on: dead code, casts to the dtype a value already has, and views
that do not change the shape.

Both no-op rewrites keep aliasing exactly: ``aten.to.dtype`` with the value's own dtype, and a view,
reshape, expand or full slice to the same shape, return their input (or a view of all of it), so
replacing the node by its input changes nothing even where caches are mutated in place.
"""

from __future__ import annotations

import torch.fx as fx

from dsv4c.program import Program

from .fxutil import aten, dtype_of, prune, same_shape, shape_of
from .manager import GraphPass, PassResult, register

_BIG = 2**63 - 1


@register
class EliminateDeadCode(GraphPass):
    """Drop side-effect-free nodes whose results nobody uses (in-place cache writes are kept)."""

    name = "eliminate_dead_code"

    def run(self, prog: Program, weights, ctx) -> PassResult:
        before = prog.num_nodes()
        prog.graph_module.graph.eliminate_dead_code()
        removed = before - prog.num_nodes()
        return PassResult(removed, skipped=removed == 0)


@register
class RemoveNoopCasts(GraphPass):
    """``x.to(d)`` where x already has dtype d (the traced graph keeps every ``.float()``)."""

    name = "remove_noop_casts"

    def run(self, prog: Program, weights, ctx) -> PassResult:
        n_done = 0
        for n in list(prog.graph_module.graph.nodes):
            if n.op == "call_function" and n.target is aten.to.dtype and len(n.args) == 2 and not n.kwargs \
                    and isinstance(n.args[0], fx.Node) and dtype_of(n.args[0]) is not None \
                    and dtype_of(n.args[0]) == n.args[1]:
                n.replace_all_uses_with(n.args[0])
                prune(n)
                n_done += 1
        return PassResult(n_done, skipped=n_done == 0)


_VIEWS = (aten.view.default, aten.reshape.default, aten.expand.default, aten._unsafe_view.default)


@register
class RemoveNoopViews(GraphPass):
    """view/reshape/expand to the input's own shape, and ``x[:, :]``-style full slices."""

    name = "remove_noop_views"

    def run(self, prog: Program, weights, ctx) -> PassResult:
        n_done = 0
        for n in list(prog.graph_module.graph.nodes):
            if n.op != "call_function" or not n.args or not isinstance(n.args[0], fx.Node) \
                    or not (n.target in _VIEWS or (n.target is aten.slice.Tensor and _full_slice(n.args))):
                continue
            src = n.args[0]
            s_in, s_out = shape_of(src), shape_of(n)
            if s_in is not None and s_out is not None and same_shape(s_in, s_out):
                n.replace_all_uses_with(src)
                prune(n)
                n_done += 1
        return PassResult(n_done, skipped=n_done == 0)


def _full_slice(args: tuple) -> bool:
    start = args[2] if len(args) > 2 else None
    end = args[3] if len(args) > 3 else None
    step = args[4] if len(args) > 4 else 1
    return start in (None, 0) and end in (None, _BIG) and step == 1
