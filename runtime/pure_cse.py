"""One node per pure computation: a load-time common-subexpression pass for the decode graph (CUDA).

Every attention block of the traced step recomputes the same position arithmetic (its window mask, the
rows of its experts' input, the RoPE angles): the same aten calls on the same inputs, once per block.
Inductor does not merge equal nodes of the FX graph, so each block's copy became kernels of its own (on the
flash-4 decode step, e.g. the window-mask kernel four times and a ``zeros`` kernel four times).

:func:`dedupe_pure_nodes` keeps the first of each set of equal calls and points the others' users at it.
Two calls are equal when they call the same ATen operator with equal constants and the same (already merged)
input nodes. Only values that cannot change are merged, so the step computes the same numbers:

- the operator mutates none of its arguments, is not random (``nondeterministic_seeded``) and the node has
  no side effect;
- neither node's value is written later, directly or through a view of it (an ``index_put_`` into a
  ``zeros`` buffer keeps each block's buffer its own).
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx


def _schema_op(n: fx.Node) -> torch._ops.OpOverload | None:
    return n.target if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload) else None


def _writes_any_argument(op: torch._ops.OpOverload) -> bool:
    return any(a.alias_info is not None and a.alias_info.is_write for a in op._schema.arguments)


def _returns_alias(op: torch._ops.OpOverload) -> bool:
    return any(r.alias_info is not None for r in op._schema.returns)


def _argument_positions(user: fx.Node, node: fx.Node) -> list[int]:
    """Schema positions of ``user``'s arguments that are ``node`` or a list holding it."""
    op = _schema_op(user)
    names = [a.name for a in op._schema.arguments]
    out = []
    for i, a in enumerate(user.args):
        if a is node or (isinstance(a, (list, tuple)) and any(x is node for x in a)):
            out.append(i)
    for k, a in user.kwargs.items():
        if (a is node or (isinstance(a, (list, tuple)) and any(x is node for x in a))) and k in names:
            out.append(names.index(k))
    return out


def is_written(node: fx.Node) -> bool:
    """Whether some user writes ``node``'s value in place, directly or through views of it (or a user this
    cannot see into: a non-ATen call is taken to write)."""
    for user in node.users:
        if user.op == "output":
            continue
        if user.op == "call_function" and user.target is operator.getitem:
            if is_written(user):
                return True
            continue
        op = _schema_op(user)
        if op is None:
            return True
        for i in _argument_positions(user, node):
            info = op._schema.arguments[i].alias_info if i < len(op._schema.arguments) else None
            if info is not None and info.is_write:
                return True
        if _returns_alias(op) and is_written(user):
            return True
    return False


def _mergeable(n: fx.Node) -> bool:
    op = _schema_op(n)
    if op is None or n.is_impure() or _writes_any_argument(op):
        return False
    if torch.Tag.nondeterministic_seeded in op.tags:
        return False
    return not is_written(n)


def _key(n: fx.Node, canon: dict[fx.Node, fx.Node]) -> Any:
    def conv(a: Any) -> Any:
        if isinstance(a, fx.Node):
            return ("node", canon.get(a, a).name)
        if isinstance(a, (list, tuple)):
            return (type(a).__name__, tuple(conv(x) for x in a))
        if isinstance(a, dict):
            return ("dict", tuple(sorted((k, conv(v)) for k, v in a.items())))
        return (type(a).__name__, repr(a))

    return (n.target, conv(n.args), conv(n.kwargs))


def dedupe_pure_nodes(gm: fx.GraphModule) -> int:
    """Merge equal pure ATen calls of ``gm`` (see the module docstring); returns how many were merged."""
    g = gm.graph
    first: dict[Any, fx.Node] = {}
    canon: dict[fx.Node, fx.Node] = {}
    for n in list(g.nodes):
        if not _mergeable(n):
            continue
        k = _key(n, canon)
        keep = first.setdefault(k, n)
        if keep is not n:
            canon[n] = keep
    for dup, keep in canon.items():
        dup.replace_all_uses_with(keep)
        g.erase_node(dup)
    gm.recompile()
    return len(canon)


__all__ = ["dedupe_pure_nodes", "is_written"]
