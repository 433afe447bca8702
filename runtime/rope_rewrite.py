"""RoPE as one element-wise expression over the whole head (a load-time rewrite for Inductor, CUDA).

``dsv4c.rope.apply_rope`` splits the head into its ``c - r`` pass-through dims and ``r`` rotated dims,
rotates the even / odd halves of the latter, ``stack``s them back into pairs and ``cat``s the two parts.
Inductor realizes each ``stack`` and ``cat`` input as a buffer of its own: at decode the q and kv paths
of every attention block became four kernels each (the RMS reduction, the rotated halves, the
interleave, the pass-through part), ~40 of the step's ~250 launches on the Flash slice.

:func:`rope_as_one_expression` rewrites that pattern into

    d = arange(c); j = max(d - (c - r), 0) // 2         # the pair of each rotated dim
    rot = y * cos[j] + where(d even, -y[d ^ 1], y[d ^ 1]) * sin[j]
    out = where(d < c - r, y, rot.to(dtype))

with ``cos[j]`` / ``sin[j]`` built by views (each value twice, zeros in front) and ``y[d ^ 1]`` by a flip of
``y``'s pairs, so that every index is affine (a gather there tripped Inductor's index range analysis): one
element-wise expression over the head that Inductor can fuse with the RMSNorm producing ``y``. Each output
element is the same two products as before, added in an order IEEE addition does not distinguish (``a - b`` is
``a + (-b)``, ``a + b`` is ``b + a``), so the values do not change (tests/runtime/test_rope_rewrite.py).
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

from dsv4c.runtime.load_rewrites import call_nodes, is_call, replace_node

aten = torch.ops.aten
_END = 2 ** 63 - 1  # slice's "to the end"


def _slice(n: Any) -> tuple | None:
    """(input, dim, start, end, step) of an ``aten.slice.Tensor`` node, else None."""
    if not is_call(n, aten.slice.Tensor):
        return None
    a = list(n.args) + [0, None, None, 1][len(n.args) - 1:]
    return a[0], a[1], a[2], _END if a[3] is None else a[3], a[4]


def _products(n: Any, op: Any) -> tuple | None:
    """((p, q), (s, t)) when ``n`` is ``op(mul(p, q), mul(s, t))``."""
    if not is_call(n, op) or len(n.args) != 2 or n.kwargs:
        return None
    m1, m2 = n.args
    if not (is_call(m1, aten.mul.Tensor) and is_call(m2, aten.mul.Tensor)):
        return None
    return tuple(m1.args), tuple(m2.args)


def _match(cat: fx.Node) -> dict | None:
    """The pieces of ``apply_rope``'s output ``cat((y[..., :-r], rotated.to(dt)), -1)``, else None."""
    if len(cat.args) < 1 or len(cat.args[0]) != 2:
        return None
    nope, back = cat.args[0]
    sn = _slice(nope)
    if sn is None or sn[2] != 0 or not isinstance(sn[3], int) or sn[3] >= 0 or sn[4] != 1:
        return None
    y, dim, r = sn[0], sn[1], -sn[3]
    if (cat.args[1] if len(cat.args) > 1 else 0) not in (dim, -1) or not is_call(back, aten.to.dtype):
        return None
    fl = back.args[0]
    if not (is_call(fl, aten.flatten.using_ints) and len(fl.args) == 2 and fl.args[1] == -2):
        return None
    st = fl.args[0]
    if not (is_call(st, aten.stack.default) and len(st.args) == 2 and st.args[1] == -1 and len(st.args[0]) == 2):
        return None
    re, im = st.args[0]
    pr, pi = _products(re, aten.sub.Tensor), _products(im, aten.add.Tensor)
    if pr is None or pi is None:
        return None
    (a, cos), (b, sin) = pr
    if pi != ((a, sin), (b, cos)):
        return None
    sa, sb = _slice(a), _slice(b)
    if sa is None or sb is None or sa[0] is not sb[0] or sa[1:] != (dim, 0, _END, 2) or sb[1:] != (dim, 1, _END, 2):
        return None
    rot = sa[0]
    if not (is_call(rot, aten.to.dtype) and rot.args[1] == torch.float32):
        return None
    sr = _slice(rot.args[0])
    if sr is None or sr[0] is not y or sr[1:] != (dim, -r, _END, 1) or r % 2:
        return None
    return {"y": y, "r": r, "cos": cos, "sin": sin, "dtype": back.args[1]}


def rope_as_one_expression(gm: fx.GraphModule, device: torch.device) -> int:
    """Every ``apply_rope`` output of the graph as the single expression of the module doc; returns how
    many were rewritten."""
    g = gm.graph
    done = 0
    for cat in call_nodes(g, aten.cat.default):
        m = _match(cat)
        if m is None:
            continue
        y, r = m["y"], m["r"]

        def f(op, *args, **kw):  # noqa: ANN001, ANN202
            return g.call_function(op, args, kw)

        with g.inserting_before(cat):
            c = f(aten.sym_size.int, y, -1)
            keep = f(operator.sub, c, r)  # the pass-through dims
            d = f(aten.arange.default, c, dtype=torch.long, device=device)
            yf = f(aten.to.dtype, y, torch.float32)
            # y[d ^ 1]: pairs swapped (views and a flip: affine indexing, no gathers)
            partner = f(aten.flatten.using_ints, f(aten.flip.default, f(aten.unflatten.int, yf, -1, [-1, 2]), [-1]),
                        -2)
            even = f(aten.eq.Scalar, f(aten.remainder.Scalar, d, 2), 0)
            signed = f(aten.where.self, even, f(aten.neg.default, partner), partner)

            def per_dim(t):  # noqa: ANN001, ANN202  cos / sin [..., r/2] -> [..., c]: each twice, after keep zeros
                return f(aten.constant_pad_nd.default, f(aten.repeat_interleave.self_int, t, 2, -1), [keep, 0], 0.0)

            rot = f(aten.add.Tensor, f(aten.mul.Tensor, yf, per_dim(m["cos"])),
                    f(aten.mul.Tensor, signed, per_dim(m["sin"])))
            out = f(aten.where.self, f(aten.lt.Scalar, d, keep), y, f(aten.to.dtype, rot, m["dtype"]))
        replace_node(cat, out)
        done += 1
    g.eliminate_dead_code()
    gm.recompile()
    return done


__all__ = ["rope_as_one_expression"]
