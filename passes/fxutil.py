"""FX helpers shared by the passes: a small backward pattern matcher, fake-value propagation for
nodes a pass creates, and graph surgery (replace + prune, parameter lookup, node sets).

Patterns describe a node by its target and its arguments, recursively, the way
``torch/_inductor/pattern_matcher.py`` does (``CallFunction``/``KeywordArg``), but much smaller:

    Op(aten.mul.Tensor, Op(aten.silu.default, V("x")), V("y"), commutative=True)

- ``Op(target, *args)`` matches a ``call_function`` node of that target (or one of a tuple of targets)
  whose positional arguments match ``args`` (a trailing ``...`` ignores further arguments; keyword
  arguments are ignored unless ``kwargs=`` is given). ``name=`` binds the node itself.
- ``V(name)`` matches anything and binds it; a name bound twice must bind the same node (or an equal
  literal), which is how a pattern says "this value is used twice" (e.g. RMSNorm reads ``x.float()``
  in two places).
- ``Cast(p, dtype)`` matches ``aten.to.dtype(x, dtype)`` with ``p`` matching ``x``, or, when there is no
  cast, a node whose value already has that dtype. Traced graphs keep ``.float()`` of an fp32 tensor as
  a no-op cast and the cleanup passes remove them, so patterns see through both forms.
- Python literals match equal literals (``True`` does not match ``1``).

Matching is purely functional: a failed branch leaves no bindings behind.
"""

from __future__ import annotations

import operator
from typing import Any, Callable, Iterable

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from dsv4c.program import Program

aten = torch.ops.aten
dsv4 = torch.ops.dsv4
Bindings = dict[str, Any]


# ---- patterns --------------------------------------------------------------------------------------

class Pat:
    def match(self, x: Any, b: Bindings) -> Bindings | None:  # pragma: no cover - interface
        raise NotImplementedError


def match(pat: Any, x: Any, b: Bindings | None = None) -> Bindings | None:
    """Match ``x`` (a node, a literal or a list of them) against ``pat``; the bindings, or None."""
    b = {} if b is None else b
    if isinstance(pat, Pat):
        return pat.match(x, b)
    if isinstance(pat, (list, tuple)):
        if not isinstance(x, (list, tuple)) or len(x) != len(pat):
            return None
        for p, y in zip(pat, x):
            b = match(p, y, b)
            if b is None:
                return None
        return b
    if isinstance(x, fx.Node):
        return None
    return b if _lit_eq(pat, x) else None


def _lit_eq(a: Any, b: Any) -> bool:
    if isinstance(a, bool) != isinstance(b, bool):
        return False
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - symbolic or exotic values never equal a literal
        return False


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, fx.Node) or isinstance(b, fx.Node):
        return isinstance(a, fx.Node) and isinstance(b, fx.Node) and strip_noop_casts(a) is strip_noop_casts(b)
    return _lit_eq(a, b)


def strip_noop_casts(n: fx.Node) -> fx.Node:
    """``n`` without the casts to the dtype it already has (they return their input itself)."""
    while n.op == "call_function" and n.target is aten.to.dtype and len(n.args) == 2 and not n.kwargs \
            and isinstance(n.args[0], fx.Node) and dtype_of(n.args[0]) is not None and dtype_of(n.args[0]) == n.args[1]:
        n = n.args[0]
    return n


class V(Pat):
    """Any value, bound to ``name``; ``check(value)`` may restrict it."""

    def __init__(self, name: str, check: Callable[[Any], bool] | None = None) -> None:
        self.name, self.check = name, check

    def match(self, x: Any, b: Bindings) -> Bindings | None:
        if self.name in b:
            return b if _same(b[self.name], x) else None
        if self.check is not None and not self.check(x):
            return None
        return {**b, self.name: x}


class Op(Pat):
    """A call_function node of ``target`` with matching positional args."""

    def __init__(self, target: Any, *args: Any, name: str | None = None, kwargs: dict | None = None,
                 commutative: bool = False, check: Callable[[fx.Node, Bindings], bool] | None = None) -> None:
        self.targets = tuple(target) if isinstance(target, (tuple, list)) else (target,)
        self.prefix = bool(args) and args[-1] is Ellipsis
        self.args = args[:-1] if self.prefix else args
        self.name, self.kwargs, self.commutative, self.check = name, kwargs, commutative, check

    def match(self, x: Any, b: Bindings) -> Bindings | None:
        if not (isinstance(x, fx.Node) and x.op == "call_function" and x.target in self.targets):
            return None
        if self.name is not None and self.name in b:
            return b if b[self.name] is x else None
        args = list(x.args)
        if self.prefix:
            if len(args) < len(self.args):
                return None
            args = args[: len(self.args)]
        elif len(args) != len(self.args):
            return None
        orders = [list(self.args)]
        if self.commutative and len(self.args) == 2:
            orders.append(list(reversed(self.args)))
        for pats in orders:
            r = match(pats, args, b)
            if r is not None and self.kwargs is not None:
                for k, p in self.kwargs.items():
                    r = match(p, x.kwargs.get(k), r) if r is not None else None
            if r is not None and self.check is not None and not self.check(x, r):
                r = None
            if r is not None:
                return {**r, self.name: x} if self.name is not None else r
        return None


class Cast(Pat):
    """``aten.to.dtype(inner, dtype)``, or ``inner`` itself when its value already has ``dtype``."""

    def __init__(self, inner: Any, dtype: Any) -> None:
        self.inner, self.dtype = inner, dtype

    def match(self, x: Any, b: Bindings) -> Bindings | None:
        if isinstance(x, fx.Node) and x.op == "call_function" and x.target is aten.to.dtype \
                and len(x.args) == 2 and not x.kwargs:
            r = match(self.dtype, x.args[1], b)
            r = match(self.inner, x.args[0], r) if r is not None else None
            if r is not None:
                return r
        d = dtype_of(x)
        if d is None:
            return None
        r = match(self.dtype, d, b)
        return match(self.inner, x, r) if r is not None else None


class Named(Pat):
    """``pat``, and bind the node it matched to ``name``; a second use must be the very same node."""

    def __init__(self, name: str, pat: Any) -> None:
        self.name, self.pat = name, pat

    def match(self, x: Any, b: Bindings) -> Bindings | None:
        if self.name in b:
            return b if b[self.name] is x else None
        r = match(self.pat, x, b)
        return {**r, self.name: x} if r is not None else None


# ---- values ----------------------------------------------------------------------------------------

def val(n: Any) -> Any:
    return n.meta.get("val") if isinstance(n, fx.Node) else n


def dtype_of(n: Any) -> torch.dtype | None:
    v = val(n)
    return v.dtype if isinstance(v, torch.Tensor) else None


def shape_of(n: Any) -> tuple | None:
    v = val(n)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def same_size(a: Any, b: Any) -> bool:
    """Whether two (possibly symbolic) sizes are provably equal."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    try:
        return bool(statically_known_true(a == b))
    except Exception:  # noqa: BLE001
        return False


def same_shape(a: Iterable, b: Iterable) -> bool:
    a, b = tuple(a), tuple(b)
    return len(a) == len(b) and all(same_size(x, y) for x, y in zip(a, b))


def _fake_mode_of(values: list) -> Any:
    """The one fake mode of these values (None if there is none or more than one: graphs stitched from
    several exports carry one mode per export, and a new node only ever combines values of one)."""
    from torch._subclasses.fake_tensor import FakeTensor

    modes = {id(v.fake_mode): v.fake_mode for v in values if isinstance(v, FakeTensor)}
    return next(iter(modes.values())) if len(modes) == 1 else None


def infer_val(node: fx.Node) -> None:
    """Set ``node.meta['val']`` by running its target on its inputs' fake values (when they all have
    one: the stitched frontend leaves placeholders without values)."""
    missing = []
    vals = []

    def v(a: Any) -> Any:
        if isinstance(a, fx.Node):
            if "val" not in a.meta:
                missing.append(a)
            vals.append(a.meta.get("val"))
            return a.meta.get("val")
        return a

    args = fx.node.map_aggregate(node.args, v)
    kwargs = fx.node.map_aggregate(node.kwargs, v)
    mode = _fake_mode_of(vals)
    if node.op == "call_function" and not missing:
        if node.target is operator.getitem:
            node.meta["val"] = args[0][args[1]]
            return
        if mode is not None:
            with mode:
                node.meta["val"] = node.target(*args, **kwargs)


def call(graph: fx.Graph, target: Any, *args: Any, like: fx.Node | None = None, infer: bool = True,
         **kwargs: Any) -> fx.Node:
    """Create a call_function node at the graph's current insertion point, with its fake value:
    ``like``'s (a node whose value has the same shape and dtype, e.g. the node a rewrite replaces: cheap,
    and right where fake propagation cannot run), else inferred from the inputs unless ``infer=False``
    (fake propagation is slow with symbolic shapes; skip it for nodes no later pass reads a value of)."""
    n = graph.call_function(target, tuple(args), kwargs)
    if like is not None and "val" in like.meta:
        n.meta["val"] = like.meta["val"]
    elif infer:
        infer_val(n)
    # The block a node belongs to (the frontend tags traced nodes) carries over to what replaces them.
    for src in ([like] if like is not None else []) + n.all_input_nodes + [n.next, n.prev]:
        if "dsv4c_block" in src.meta:
            n.meta["dsv4c_block"] = src.meta["dsv4c_block"]
            break
    return n


def param_input(prog: Program, name: str, value: torch.Tensor) -> fx.Node:
    """The program's ``params.<name>`` input, added when it has none yet: a weight-rewriting pass that
    meets the same new tensor again (another call site, or the same block in another entry point's
    program) gets the one placeholder. A new one gets a fake value of ``value``'s shape and dtype when
    the program's placeholders carry fake values (of one mode)."""
    for node, pname in params(prog).items():
        if pname == name:
            return node
    node = prog.add_param_input(name)
    mode = _fake_mode_of([n.meta.get("val") for n in prog.graph_module.graph.find_nodes(op="placeholder")])
    if mode is not None:
        with mode:
            node.meta["val"] = torch.empty(value.shape, dtype=value.dtype)
    return node


def fp32_cast_input(n: Any) -> fx.Node | None:
    """The input of ``n`` when ``n`` is a plain ``aten.to.dtype(_, torch.float32)``, else None (the cast
    a dense fp32 product puts on each operand: ``x.float() @ W.float().t()``)."""
    if (isinstance(n, fx.Node) and n.op == "call_function" and n.target == aten.to.dtype
            and n.args[1:] == (torch.float32,) and not n.kwargs):
        return n.args[0]
    return None


# ---- surgery ---------------------------------------------------------------------------------------

def alive(node: fx.Node) -> bool:
    """False once the node was erased (lists of nodes taken before a rewrite may still hold it)."""
    return not getattr(node, "_erased", False)


def calls(graph: fx.Graph, *targets: Any) -> list[fx.Node]:
    """The call_function nodes of these targets, in graph order."""
    found = {n for t in targets for n in graph.find_nodes(op="call_function", target=t)}
    return [n for n in graph.nodes if n in found]


def prune(node: fx.Node) -> int:
    """Erase ``node`` if nothing uses it and it has no side effect, then its inputs the same way."""
    erased, todo = 0, [node]
    while todo:
        n = todo.pop()
        if not alive(n) or n.users or n.op != "call_function" or n.is_impure():
            continue
        inputs = list(dict.fromkeys(n.all_input_nodes))
        n.graph.erase_node(n)
        erased += 1
        todo.extend(inputs)
    return erased


def replace(old: fx.Node, new: fx.Node) -> None:
    """Point every user of ``old`` at ``new`` (which computes the same value) and prune what became dead."""
    if "val" not in new.meta and "val" in old.meta:
        new.meta["val"] = old.meta["val"]
    old.replace_all_uses_with(new)
    prune(old)


def input_names(prog: Program) -> dict[fx.Node, str]:
    """placeholder node -> its input name (``params.*``, ``consts.*``, ``cache.*``, ...)."""
    return dict(zip((n for n in prog.graph_module.graph.nodes if n.op == "placeholder"), prog.input_names))


def params(prog: Program) -> dict[fx.Node, str]:
    """placeholder node -> parameter name (``params.`` stripped), for the parameter inputs."""
    return {n: name[len("params."):] for n, name in input_names(prog).items() if name.startswith("params.")}


def drop_replaced_params(programs: dict[str, Program], weights: dict[str, torch.Tensor], replaced: Iterable[str]) -> int:
    """After a weight rewrite: drop every program's unused ``params.*`` inputs
    (``Program.remove_unused_params``) and, from ``weights``, the ``replaced`` tensors no program reads
    any more. Weights that were unused before the pass (e.g. the untraced MTP block's) stay in the
    artifact. Returns the number of program inputs removed."""
    removed = sum(len(prog.remove_unused_params()) for prog in programs.values())
    still = {n for prog in programs.values() for n in prog.param_names}
    for n in set(replaced) - still:
        weights.pop(n, None)
    return removed
