"""Cache row writes as ``index_put_`` so that Inductor writes them in place (a load-time rewrite, CUDA).

The frontend writes completed compressed entries into the cache with ``scatter_`` along the row dim
(``frontend.model._write_rows``: ``dst.scatter_(1, idx, where(ok, val, dst.gather(1, idx)))`` with ``idx`` the
row ids expanded over the whole row). Inductor has no in-place form of ``scatter``: the functionalized graph
copies the whole cache tensor, scatters the few rows into the copy and copies it back. On the Flash slice
that is 10.7 MB of CSA cache read and written twice per decode step at batch 1 (~25 us on the H100), and 32
times that at batch 32. ``index_put_`` with (batch ids, row ids) writes the same rows, and Inductor turns
it back into an in-place write of only those rows.

:func:`rows_as_index_put` rewrites exactly that pattern (the gather of the same rows under the ``where``
marks a whole-row write, which the frontend's index spans) and leaves any other ``scatter_`` alone. FP8
parts, which the frontend writes through a byte view, are written into the FP8 tensor itself (the new rows
viewed back as FP8), since a write through the view is again a copy of the whole tensor.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from dsv4c.runtime.load_rewrites import call_nodes, is_call, replace_node

aten = torch.ops.aten


def _row_index(idx: Any) -> fx.Node | None:
    """``rows`` when ``idx`` is ``rows.unsqueeze(2 or -1).expand(B, W, k)``, else None."""
    if not is_call(idx, aten.expand.default):
        return None
    un = idx.args[0]
    if not (is_call(un, aten.unsqueeze.default) and un.args[1] in (2, -1) and len(idx.args[1]) == 3):
        return None
    return un.args[0]


def _full_rows(dst: fx.Node, idx: fx.Node) -> bool:
    """Whether the index spans dst's whole rows, where the graph carries shapes (graphs loaded from JSON do
    not: there the pattern itself, built by ``_write_rows`` from dst's row width, is the evidence)."""
    val = dst.meta.get("val")
    k = idx.args[1][2]
    return val is None or not isinstance(k, int) or val.shape[-1] == k


def _fp8_base(dst: fx.Node) -> fx.Node | None:
    """The FP8 tensor behind ``dst`` when ``dst`` is its byte view (``frontend.model._bytes``, which views
    only float8_e4m3fn tensors; Inductor copies a whole tensor to write it through such a view)."""
    if not (is_call(dst, aten.view.dtype) and dst.args[1] == torch.uint8):
        return None
    base = dst.args[0]
    val = base.meta.get("val") if isinstance(base, fx.Node) else None
    return base if val is None or val.dtype == torch.float8_e4m3fn else None


def rows_as_index_put(gm: fx.GraphModule, device: torch.device) -> int:
    """Every ``dst.scatter_(1, rows-expanded, where(ok, v, dst.gather(1, same)))`` -> ``dst.index_put_((b,
    rows), where(ok, v, dst[b, rows]))`` with ``b`` the batch ids; returns how many were rewritten."""
    g = gm.graph
    done = 0
    for n in call_nodes(g, aten.scatter_.src):
        if not (n.args[1] == 1 and len(n.args) == 4):
            continue
        dst, _, idx, val = n.args
        rows = _row_index(idx)
        if rows is None or not _full_rows(dst, idx) or not is_call(val, aten.where.self):
            continue
        ok, v, old = val.args
        if not (is_call(old, aten.gather.default) and old.args[0] is dst and old.args[1] == 1 and old.args[2] is idx):
            continue
        base = _fp8_base(dst)
        with g.inserting_before(n):
            nb = g.call_function(aten.sym_size.int, (dst, 0))
            b = g.call_function(aten.arange.default, (nb,), {"dtype": torch.long, "device": device})
            b = g.call_function(aten.expand_as.default, (g.call_function(aten.unsqueeze.default, (b, 1)), rows))
            cur = g.call_function(aten.index.Tensor, (dst, [b, rows]))
            new = g.call_function(aten.where.self, (ok, v, cur))
            if base is not None:  # written into the FP8 tensor itself: a write through its byte view is copied
                dst, new = base, g.call_function(aten.view.dtype, (new, torch.float8_e4m3fn))
            put = g.call_function(aten.index_put_.default, (dst, [b, rows], new))
        replace_node(n, put)
        for dead in (val, old, idx):
            if not dead.users:
                g.erase_node(dead)
        done += 1
    gm.recompile()
    return done


__all__ = ["rows_as_index_put"]
