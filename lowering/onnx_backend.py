"""``--backend onnx``: the prefill and decode programs as ONNX models, run by onnxruntime.

Artifact files::

    programs/prefill.onnx   shape-inferred model, opset OPSET, default ONNX domain only
    programs/decode.onnx
    programs/weights.data   ONNX external data shared by both models: every parameter and constant
                            the graphs read, raw little-endian bytes (e4m3 weights stay FLOAT8E4M3FN,
                            packed FP4 experts stay UINT8), 64/4096-byte aligned

Model interface (both entry points): inputs ``cache.<name>`` (every cache tensor), ``input_ids``
[B, S] int64, ``start_pos`` [B] int64; outputs ``logits`` [B, vocab] fp32, then ``cache_out.<name>``
(the new cache state, one per ``cache.<name>`` input, same order). Symbolic dims as in the programs:
prefill ``seq`` (batch 1), decode ``batch`` (seq 1).

How a program becomes ONNX (``export_program``):

1. Functionalize: the program mutates its ``cache.*`` inputs in place (``copy_`` / ``scatter_``). The
   in-place ops become their functional twins, later readers read the new value, and the final value
   of each cache input becomes an explicit output. (A view of a cache input that is taken before a
   mutation and read after it would make this rewrite wrong; it is detected and refused.)
2. Fake values are re-propagated through the graph with one symbolic dim (the frontend stitches
   graphs of several exports, and passes add parameters whose shapes only the weights know).
3. Fast path (``direct``): every FX node is translated with torch.onnx's own aten translation library
   plus ``lowering/onnx_ops.py`` for the ``dsv4`` ops, without re-tracing (seconds). Fallback
   (``public``): ``torch.onnx.export(dynamo=True, custom_translation_table=...)`` of the functionalized
   graph, which re-traces with torch.export (minutes); used if the fast path fails, e.g. because a
   torch release changed the exporter internals it uses.
4. Opset conversion to OPSET, constant folding, CSE, dead-code removal; ``params.*`` / ``consts.*``
   inputs become external-data initializers (unused ones are dropped); strict shape inference is
   stored and ``onnx.checker.check_model(full_check=True)`` must pass.

Weights: the build writes the weights after lowering, and passes (``pack_fp4_experts``) add
parameters whose shapes only the weights know, so ``lower`` runs the export when the build writes the
``params`` tensors through the artifact writer (or at once when it is given ``weights=``).
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from dsv4c.errors import BackendUnavailableError, ConfigError
from dsv4c.program import Program

OPSET = 21  # >= 19 for Cast to FLOAT8E4M3FN
FORMAT = "onnx"
WEIGHTS_FILE = "programs/weights.data"
CACHE_OUT = "cache_out."
LOGITS = "logits"
INSTALL = "pip install onnx onnxscript onnxruntime (or: pip install -e '.[onnx]')"
_EXAMPLE_SEQ = 8
_EXAMPLE_BATCH = 2

Progress = Callable[[str], None]
log = logging.getLogger(__name__)


def require() -> None:
    missing = []
    for mod in ("onnx", "onnxscript", "onnx_ir", "onnxruntime"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    if missing:
        raise BackendUnavailableError(f"The onnx backend needs {', '.join(missing)}, which is not installed.",
                                      f"{INSTALL}; or build with --backend eager.")


def check(target: str, dtype: str) -> None:
    """What an onnx build needs, checked in milliseconds (the build may call it before tracing)."""
    require()
    if dtype != "fp32":
        raise ConfigError(f"The onnx backend exports fp32 programs; --dtype {dtype} is not supported yet "
                          "(ONNX Einsum and most of onnxruntime's CPU kernels have no bfloat16).",
                          "build with --dtype fp32 (the ONNX graph still stores FP8/FP4 weights as such).")


def check_kv_storage(kv_storage: str) -> None:
    """The ONNX models carry the cache as dense fp32 inputs/outputs; a packed (storage-format) cache has no
    ONNX lowering of its codecs (kv_pack / fp4_pack / the packed attention and indexer ops)."""
    if kv_storage != "dense":
        raise ConfigError(f"The onnx backend takes a dense KV cache; this build's cache is {kv_storage!r} "
                          "(entries in FP8/FP4 storage format).",
                          "build with --dtype fp32 (which uses the dense cache), or use --backend eager/inductor.")


class ExportUnsupported(Exception):
    """The fast path cannot take this graph; the public ``torch.onnx.export`` path will."""


# ---- inputs ---------------------------------------------------------------------------------------------

def input_specs(prog: Program, tensors: Mapping[str, torch.Tensor], cache_layout: Mapping[str, dict]
                ) -> dict[str, tuple[tuple, torch.dtype]]:
    """name -> (shape, dtype) for every program input; ``"B"`` / ``"S"`` mark the symbolic dims.

    ``tensors``: ``params.*`` and ``consts.*`` values; ``cache_layout``: the manifest's cache table."""
    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    out: dict[str, tuple[tuple, torch.dtype]] = {}
    decode = prog.entry == "decode"
    b = "B" if decode else 1
    for name in prog.input_names:
        if name.startswith(("params.", "consts.")):
            if name in tensors:
                t = tensors[name]
                out[name] = (tuple(t.shape), t.dtype)
                continue
            val = prog.placeholder(name).meta.get("val")
            if isinstance(val, torch.Tensor) and all(isinstance(d, int) for d in val.shape):
                out[name] = (tuple(val.shape), val.dtype)
                continue
            raise ConfigError(f"the onnx backend has no value or shape for program input {name!r}.",
                              "report a dsv4c bug (the build must hand the weights to the backend).")
        elif name.startswith("cache."):
            ent = cache_layout[name[len("cache."):]]
            out[name] = ((b, *ent["shape"]), dt[ent["dtype"]])
        elif name == "input_ids":
            out[name] = ((b, 1) if decode else (1, "S"), torch.int64)
        elif name == "start_pos":
            out[name] = ((b,), torch.int64)
        else:
            raise ConfigError(f"unknown program input {name!r}.", "report a dsv4c bug.")
    return out


def _example(specs: Mapping[str, tuple[tuple, torch.dtype]], tensors: Mapping[str, torch.Tensor],
             names: list[str], max_seq_len: int) -> tuple[torch.Tensor, ...]:
    sizes = {"B": _EXAMPLE_BATCH, "S": min(_EXAMPLE_SEQ, max_seq_len)}
    out = []
    for n in names:
        if n in tensors:
            out.append(tensors[n])
            continue
        shape, dtype = specs[n]
        out.append(torch.zeros([sizes.get(d, d) for d in shape], dtype=dtype))
    return tuple(out)


# ---- functionalization ------------------------------------------------------------------------------------

def _inplace_to_functional(target) -> Any:
    """``aten.<op>_.<overload>`` -> ``aten.<op>.<overload>`` (None when ``target`` mutates nothing)."""
    if not isinstance(target, torch._ops.OpOverload):
        return None
    if not any(a.alias_info is not None and a.alias_info.is_write for a in target._schema.arguments):
        return None
    name = target._opname
    if target.namespace != "aten" or not name.endswith("_") or name.startswith("_"):
        raise ExportUnsupported(f"mutating op {target} has no functional twin")
    packet = getattr(torch.ops.aten, name[:-1], None)
    fn = getattr(packet, target._overloadname, None) if packet is not None else None
    if fn is None:
        raise ExportUnsupported(f"no functional twin for {target}")
    return fn


def _is_view(node: torch.fx.Node) -> bool:
    t = node.target
    if node.op != "call_function" or not isinstance(t, torch._ops.OpOverload):
        return False
    return any(r.alias_info is not None for r in t._schema.returns)


def functionalize(graph: torch.fx.Graph, state: list[torch.fx.Node]) -> dict[torch.fx.Node, torch.fx.Node]:
    """Rewrite in-place ops on the ``state`` placeholders into their functional twins, in place.

    Every later reader of a mutated value reads the new value instead; returns placeholder -> final
    value. Raises ``ExportUnsupported`` when a mutation is not on a state input (or an earlier
    functional result of one), or when a view of a state value taken before a mutation is read after
    it (eager mode would read the new data through the view)."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    root = {p: p for p in state}
    final = {p: p for p in state}
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        fn = _inplace_to_functional(node.target)
        if fn is None:
            continue
        cur = node.args[0]
        if cur not in root:
            raise ExportUnsupported(f"{node.format_node()} mutates something that is not a cache input")
        i = order[node]
        todo, seen = [cur], set()
        while todo:
            v = todo.pop()
            for u in v.users:
                if u is node or u in seen or order.get(u, -1) > i:
                    continue
                seen.add(u)
                if _is_view(u):
                    if any(order.get(w, -1) > i for w in u.users):
                        raise ExportUnsupported(f"{u.format_node()} is a view of {root[cur].name} read after "
                                                f"{node.name} mutates it")
                    todo.append(u)
        with graph.inserting_before(node):
            new = graph.call_function(fn, node.args, node.kwargs)
        new.meta.update(node.meta)
        order[new] = i
        later = [u for u in cur.users if u is not node and order.get(u, -1) > i]
        node.replace_all_uses_with(new)
        for u in later:
            u.replace_input_with(cur, new)
        graph.erase_node(node)
        root[new] = root[cur]
        final[root[cur]] = new
    return final


def functional_graph(prog: Program) -> torch.fx.GraphModule:
    """A copy of the program's graph returning ``(logits, *final cache values)`` with no mutation."""
    graph = torch.fx.Graph()
    out = graph.graph_copy(prog.graph_module.graph, {})  # the output's value; no output node is copied
    phs = [n for n in graph.nodes if n.op == "placeholder"]
    state = [p for p, n in zip(phs, prog.input_names) if n.startswith("cache.")]
    logits = out
    while isinstance(logits, (list, tuple)) and len(logits) == 1:
        logits = logits[0]
    if not isinstance(logits, torch.fx.Node):
        raise ConfigError(f"program {prog.entry!r} returns {type(logits).__name__}, not one logits tensor.",
                          "report a dsv4c bug.")
    graph.output((logits, *state))
    final = functionalize(graph, state)
    out_node = next(n for n in graph.nodes if n.op == "output")
    out_node.args = ((final.get(logits, logits), *[final[p] for p in state]),)
    for n in list(graph.nodes):
        if n.op == "call_function" and n.target in _ASSERTS and not n.users:
            graph.erase_node(n)
    graph.eliminate_dead_code()
    graph._codegen = torch.fx.graph.CodeGen()
    gm = torch.fx.GraphModule(torch.nn.Module(), graph)
    gm.recompile()
    return gm


_ASSERTS = {torch.ops.aten.sym_constrain_range_for_size.default, torch.ops.aten._assert_async.default,
            torch.ops.aten._assert_async.msg, torch.ops.aten._assert_scalar.default,
            torch.ops.aten._assert_tensor_metadata.default}


def propagate_fake(gm: torch.fx.GraphModule, names: list[str], specs: Mapping[str, tuple[tuple, torch.dtype]],
                   max_seq_len: int) -> None:
    """Set ``meta['val']`` of every node from fresh fake inputs that share one symbolic dim (seconds per
    program: every node runs on fake tensors)."""
    from torch._dynamo.source import ConstantSource
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    env = ShapeEnv()
    mode = FakeTensorMode(shape_env=env, allow_non_fake_inputs=True)
    syms = {}
    for key, hint in (("B", _EXAMPLE_BATCH), ("S", min(_EXAMPLE_SEQ, max_seq_len))):
        s = env.create_symbol(hint, ConstantSource({"B": "batch", "S": "seq"}[key]), dynamic_dim=DimDynamic.DYNAMIC)
        syms[key] = env.create_symintnode(s, hint=hint)
    with mode:
        vals = [torch.empty([syms.get(d, d) if isinstance(d, str) else d for d in specs[n][0]], dtype=specs[n][1])
                for n in names]
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for p, v in zip(phs, vals):
        p.meta["val"] = v
    with torch._dispatch.python.enable_python_dispatcher(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*vals)


def complete_fake(gm: torch.fx.GraphModule, names: list[str], specs: Mapping[str, tuple[tuple, torch.dtype]]) -> bool:
    """Reuse the traced fake values and infer the missing ones locally (the frontend stitches graphs of
    several exports, one fake mode each, and passes add nodes and parameters without values): a node
    without a value runs on its inputs' values in the mode of its symbolic inputs, static inputs of
    other modes re-made in that mode. False when that is not possible (then re-propagate)."""
    import operator

    from torch._subclasses.fake_tensor import FakeTensor

    def has_syms(v) -> bool:
        return isinstance(v, torch.Tensor) and any(isinstance(d, torch.SymInt) for d in v.shape)

    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    any_mode = next((p.meta["val"].fake_mode for p in phs if isinstance(p.meta.get("val"), FakeTensor)), None)
    if any_mode is None:
        return False
    for p, n in zip(phs, names):
        if not isinstance(p.meta.get("val"), torch.Tensor):
            shape, dtype = specs[n]
            if any(isinstance(d, str) for d in shape):
                return False
            with any_mode:
                p.meta["val"] = torch.empty(shape, dtype=dtype)
    for node in gm.graph.nodes:
        if node.op != "call_function" or "val" in node.meta:
            continue
        vals = [a.meta.get("val") for a in node.all_input_nodes]
        if any(v is None for v in vals):
            return False
        modes = {id(v.fake_mode): v.fake_mode for v in vals if has_syms(v) and isinstance(v, FakeTensor)}
        modes.update({id(v.node.shape_env): None for v in vals if isinstance(v, torch.SymInt)})
        if len(modes) > 1:
            return False
        mode = next(iter(modes.values())) if modes else next(
            (v.fake_mode for v in vals if isinstance(v, FakeTensor)), any_mode)
        if mode is None:
            return False

        def remake(a):
            v = a.meta["val"] if isinstance(a, torch.fx.Node) else a
            if isinstance(v, FakeTensor) and v.fake_mode is not mode:
                with mode:
                    return torch.empty_strided(v.shape, v.stride(), dtype=v.dtype)
            return v

        try:
            args = torch.fx.node.map_aggregate(node.args, remake)
            kwargs = torch.fx.node.map_aggregate(node.kwargs, remake)
            if node.target is operator.getitem:
                node.meta["val"] = args[0][args[1]]
            else:
                with mode:
                    node.meta["val"] = node.target(*args, **kwargs)
        except Exception:  # noqa: BLE001 - anything unexpected: re-propagate instead
            return False
    return True


def _symbols(gm: torch.fx.GraphModule) -> set[str]:
    """Names of the free symbols in the graph's fake values (one per stitched export, all the same dim)."""
    out: set[str] = set()
    for n in gm.graph.nodes:
        vals = n.meta.get("val")
        for v in vals if isinstance(vals, (list, tuple)) else (vals,):
            dims = v.shape if isinstance(v, torch.Tensor) else (v,) if isinstance(v, torch.SymInt) else ()
            for d in dims:
                if isinstance(d, torch.SymInt):
                    out |= {str(s) for s in d.node.expr.free_symbols}
    return out


# ---- export ---------------------------------------------------------------------------------------------

_REGISTRY: list = []


def _registry():
    """torch.onnx's aten translation library plus the dsv4 translations (built once per process)."""
    if _REGISTRY:
        return _REGISTRY[0]
    from torch.onnx._internal.exporter import _registration

    from . import onnx_ops

    with _quiet_loggers():
        reg = _registration.ONNXRegistry.from_torchlib()
    for target, fn in onnx_ops.translation_table(aten=True).items():
        reg.register_op(target, fn, is_complex=False)
    _REGISTRY.append(reg)
    return reg


def _needs_type_promotion(gm: torch.fx.GraphModule) -> bool:
    """Whether torch.onnx's InsertTypePromotion would insert any cast (it re-runs the whole graph on
    fake tensors; traced programs rarely mix dtypes). Any doubt answers True."""
    try:
        from torch.onnx._internal.fx import type_utils
        from torch.onnx._internal.fx.passes import type_promotion as tp

        table = tp.TypePromotionTable()

        def val(a):
            if isinstance(a, torch.fx.Node):
                return a.meta["val"]
            if isinstance(a, (list, tuple)):
                return type(a)(val(x) for x in a)
            return a

        def differs(a, dtype) -> bool:
            if dtype is None:
                return False
            if isinstance(a, torch.fx.Node):
                v = a.meta["val"]
                if isinstance(v, torch.Tensor):
                    return v.dtype != dtype
                return type_utils.from_scalar_type_to_torch_dtype(type(v)) != dtype
            if isinstance(a, (list, tuple)):
                return any(differs(x, dtype) for x in a)
            eq = type_utils.from_scalar_type_to_torch_dtype(type(a))
            return eq is not None and eq != dtype

        for n in gm.graph.nodes:
            if n.op != "call_function":
                continue
            rule = tp.get_type_promotion_rule(n, table)
            if rule is None:
                continue
            info = rule.preview_type_promotion(val(n.args), val(n.kwargs))
            if any(differs(a, info.args_dtypes.get(i)) for i, a in enumerate(n.args)):
                return True
            if any(differs(a, info.kwargs_dtypes.get(k)) for k, a in n.kwargs.items()):
                return True
        return False
    except Exception:  # noqa: BLE001
        return True


def export_direct(gm: torch.fx.GraphModule, name: str):
    """Translate a functional graph (fake values on every node) node by node with torch.onnx's aten
    library and the dsv4 translations, without re-tracing. Uses torch.onnx internals."""
    import onnx_ir as ir
    from torch.onnx._internal.exporter import _constants, _core, _ir_passes
    from torch.onnx._internal.fx import passes

    if _needs_type_promotion(gm):  # the caller re-propagated fake values of one mode for this
        with _quiet_loggers(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            passes.InsertTypePromotion(gm).run()
    model = ir.Model(ir.Graph([], [], nodes=[], name=name), ir_version=_constants.ONNX_IR_VERSION,
                     producer_name="dsv4c", producer_version=_version())
    with _quiet_loggers(), _memo_op_signatures():
        _core._translate_fx_graph(gm.graph, model, graph_like=model.graph, owned_graphs={}, lower="at_conversion",
                                  registry=_registry())
    _ir_passes.add_opset_imports(model)
    return model


class _memo_op_signatures:
    """torch.onnx rebuilds an ``OpSignature`` from the ONNX schema for every op it records (half of the
    translation time); the signature of a schema never changes, so build each once while translating.
    (Default attributes are copied per node by the recorder, so sharing a signature is safe.)"""

    def __enter__(self):
        import onnx_ir as ir

        self.cls = ir.schemas.OpSignature
        self.orig = self.cls.__dict__["from_op_schema"]
        memo: dict = {}
        build = self.orig.__func__

        def from_op_schema(cls, op_schema):  # noqa: ANN001, ANN202
            key = (cls, op_schema.domain, op_schema.name, op_schema.since_version)
            if key not in memo:
                memo[key] = build(cls, op_schema)
            return memo[key]

        self.cls.from_op_schema = classmethod(from_op_schema)
        return self

    def __exit__(self, *exc):
        self.cls.from_op_schema = self.orig


_KEEP_META = ("namespace",)  # torch.onnx also stores the FX node, stack trace and class path: megabytes


def _tidy_metadata(model) -> None:
    """Keep the short provenance of every node (Netron shows it): torch.onnx's ``namespace`` (the module
    and aten/dsv4 op it came from) plus dsv4c's block index, expert wave and the pass that made it."""
    for node in model.graph:
        props = node.metadata_props
        for k in [k for k in props if k not in _KEEP_META]:
            del props[k]
        fx = node.meta.get("node")
        meta = getattr(fx, "meta", None) or {}
        for key, name in (("dsv4c_block", "dsv4c.block"), ("dsv4c_wave", "dsv4c.wave"), ("dsv4c_pass", "dsv4c.pass")):
            if key in meta:
                props[name] = str(meta[key])


def export_public(gm: torch.fx.GraphModule, example: tuple, dynamic: list, name: str):
    """``torch.onnx.export(dynamo=True)`` of the functional graph (re-traces with torch.export)."""
    from . import onnx_ops

    class Step(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gm = gm

        def forward(self, *flat):
            return tuple(self.gm(*flat))

    dims = {"B": torch.export.Dim("batch", min=1, max=1024), "S": torch.export.Dim("seq", min=1)}
    ds = tuple({i: dims[d] for i, d in enumerate(shape) if isinstance(d, str)} or None for shape in dynamic)
    with warnings.catch_warnings(), _quiet_loggers():
        warnings.simplefilter("ignore")
        onnx_program = torch.onnx.export(
            Step(), example, dynamo=True, dynamic_shapes=(ds,),
            custom_translation_table=onnx_ops.translation_table(aten=True), opset_version=18,
            optimize=False, verify=False, report=False, external_data=False, verbose=False)
    model = onnx_program.model
    model.graph.name = name
    return model


def export_program(prog: Program, tensors: Mapping[str, torch.Tensor], cache_layout: Mapping[str, dict],
                   max_seq_len: int, opset: int = OPSET, method: str = "auto"):
    """The program as an ``onnx_ir`` model (inputs named like the program's, outputs ``logits`` and
    ``cache_out.<name>``); returns (model, method used: ``direct`` or ``public``).

    ``method``: ``direct`` (fast, torch.onnx internals), ``public`` (torch.onnx.export) or ``auto``."""
    names = prog.input_names
    specs = input_specs(prog, tensors, cache_layout)
    gm = functional_graph(prog)
    graph_name = f"dsv4c_{prog.entry}"
    model, used = None, method
    if method in ("auto", "direct"):
        try:
            # The traced values are reused when they cover the graph (their symbols differ per stitched
            # export and are renamed below); type promotion needs one fake mode, so it re-propagates.
            if not complete_fake(gm, names, specs) or _needs_type_promotion(gm):
                propagate_fake(gm, names, specs, max_seq_len)
            syms = _symbols(gm)
            model, used = export_direct(gm, graph_name), "direct"
        except Exception as e:  # noqa: BLE001 - any failure of the fast path falls back
            if method == "direct":
                raise
            log.warning("direct ONNX translation of %s failed (%s: %s); re-exporting with torch.onnx.export",
                        prog.entry, type(e).__name__, e)
            gm = functional_graph(prog)
    if model is None:
        example = _example(specs, tensors, names, max_seq_len)
        model, used = export_public(gm, example, [specs[n][0] for n in names], graph_name), "public"
        syms = set()
    _finish_ir(model, prog, syms, opset)
    return model, used


def _finish_ir(model, prog: Program, symbols: set[str], opset: int) -> None:
    """Name inputs/outputs like the program, name the symbolic dim, convert the opset, clean up."""
    import onnx_ir as ir
    import onnx_ir.passes.common as common
    from onnxscript import optimizer
    from onnxscript.version_converter import convert_version
    from torch.onnx._internal.exporter import _ir_passes

    names = prog.input_names
    cache = [n for n in names if n.startswith("cache.")]
    g = model.graph
    if len(g.inputs) != len(names):
        raise ExportUnsupported(f"{len(g.inputs)} ONNX inputs for {len(names)} program inputs")
    for v, n in zip(g.inputs, names):
        v.name = n
    out_names = [LOGITS] + [CACHE_OUT + n[len("cache."):] for n in cache]
    if len(g.outputs) != len(out_names):
        raise ExportUnsupported(f"{len(g.outputs)} ONNX outputs, expected {len(out_names)}")
    seen = set()
    for i, n in enumerate(out_names):
        v = g.outputs[i]
        if v.is_graph_input() or id(v) in seen:
            # An output must be a value of its own (e.g. a cache input the step does not change).
            ident = ir.node("Identity", [v], num_outputs=1)
            g.append(ident)
            nv = ident.outputs[0]
            nv.shape, nv.dtype = v.shape, v.dtype
            g.outputs[i] = v = nv
        seen.add(id(v))
        v.name = n
    # One symbolic dim per entry point, named after what it is (every symbol of the graph stands for it).
    ids = next(v for v in g.inputs if v.name == "input_ids")
    dim = ids.shape[0 if prog.entry == "decode" else 1]
    if isinstance(dim, ir.SymbolicDim) and dim.value:
        symbols = set(symbols) | {dim.value}
    name = "batch" if prog.entry == "decode" else "seq"
    if symbols:
        _ir_passes.rename_axis(model, {s: name for s in symbols})
    _tidy_metadata(model)
    if opset != 18:
        convert_version(model, opset)
    common.RemoveUnusedNodesPass()(model)
    optimizer.fold_constants(model)
    common.CommonSubexpressionEliminationPass()(model)
    common.RemoveUnusedNodesPass()(model)


class _quiet_loggers:
    """torch.onnx / torch.export log at INFO/WARNING; keep the build's one line per step."""

    NAMES = ("torch.onnx", "torch.export", "torch._export", "onnxscript", "torch.fx.experimental.symbolic_shapes",
             "torch.onnx._internal.exporter._registration")

    def __enter__(self):
        names = set(self.NAMES) | {n for n in logging.root.manager.loggerDict if n.startswith(("torch.onnx", "onnxscript"))}
        self.saved = {n: logging.getLogger(n).level for n in names}
        for n in self.saved:
            logging.getLogger(n).setLevel(logging.ERROR)

    def __exit__(self, *exc):
        for n, lvl in self.saved.items():
            logging.getLogger(n).setLevel(lvl)


def _version() -> str:
    from dsv4c import __version__

    return __version__


# ---- weights as external data ---------------------------------------------------------------------

def onnx_dtype(dtype: torch.dtype) -> int:
    from onnx import TensorProto as T

    table = {torch.float32: T.FLOAT, torch.float16: T.FLOAT16, torch.bfloat16: T.BFLOAT16, torch.float64: T.DOUBLE,
             torch.float8_e4m3fn: T.FLOAT8E4M3FN, torch.uint8: T.UINT8, torch.int8: T.INT8, torch.int16: T.INT16,
             torch.int32: T.INT32, torch.int64: T.INT64, torch.bool: T.BOOL}
    if dtype not in table:
        raise ConfigError(f"the onnx backend cannot store a {dtype} tensor.", "report a dsv4c bug.")
    return table[dtype]


class DataFile:
    """One external-data file shared by the models of an artifact: name -> (offset, length)."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.size = 0
        self.where: dict[str, tuple[int, int]] = {}

    def add(self, name: str, t: torch.Tensor) -> tuple[int, int]:
        if name not in self.where:
            t = t.detach().cpu().contiguous()
            data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
            align = 4096 if len(data) >= 1 << 16 else 64
            pad = -self.size % align
            if pad:
                self.chunks.append(b"\0" * pad)
                self.size += pad
            self.where[name] = (self.size, len(data))
            self.chunks.append(data)
            self.size += len(data)
        return self.where[name]

    def write(self, path: Path) -> None:
        with open(path, "wb") as f:
            for c in self.chunks:
                f.write(c)


def bind_initializers(proto, tensors: Mapping[str, torch.Tensor], data: DataFile, location: str) -> list[str]:
    """Turn the graph inputs named in ``tensors`` into external-data initializers (in place) and drop
    those nobody reads. Returns the names bound."""
    from onnx import TensorProto

    g = proto.graph
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    keep, bound = [], []
    for vi in g.input:
        name = vi.name
        if name not in tensors:
            keep.append(vi)
            continue
        if name not in used:
            continue
        t = tensors[name]
        offset, length = data.add(name, t)
        tp = TensorProto()
        tp.name = name
        tp.data_type = onnx_dtype(t.dtype)
        tp.dims.extend(list(t.shape))
        tp.data_location = TensorProto.EXTERNAL
        for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
            e = tp.external_data.add()
            e.key, e.value = k, v
        g.initializer.append(tp)
        bound.append(name)
    del g.input[:]
    g.input.extend(keep)
    return bound


def infer(proto):
    import onnx

    return onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True, data_prop=True)


# ---- the backend ----------------------------------------------------------------------------------

class _Job:
    """Export, bind and write the models of one build."""

    def __init__(self, programs: dict[str, Program], writer, manifest: dict, entries: dict[str, dict],
                 consts: Mapping[str, torch.Tensor], progress: Progress, method: str,
                 weights: Mapping[str, torch.Tensor] | None) -> None:
        self.programs, self.writer, self.manifest, self.entries = programs, writer, manifest, entries
        self.tensors: dict[str, torch.Tensor] = {f"consts.{k}": v for k, v in consts.items()}
        self.progress, self.method, self.weights = progress, method, weights
        self.protos: dict[str, Any] = {}
        self.after_write: list[Callable[[], None]] = []  # run after every (re)write of the models

    def go(self) -> None:
        if self.weights is not None:
            self.export(self.weights)
        else:
            self.progress("onnx: the export runs when the build writes the weights (they fix the shapes of "
                          "packed parameters)")
        self.hook()

    def export(self, weights: Mapping[str, torch.Tensor]) -> None:
        import onnx_ir as ir

        self.tensors.update({f"params.{k}": v for k, v in weights.items()})
        for entry, prog in self.programs.items():
            t0 = time.perf_counter()
            model, used = export_program(prog, self.tensors, self.manifest["cache_layout"],
                                         int(self.manifest["max_seq_len"]), method=self.method)
            self.protos[entry] = ir.serde.serialize_model(model)
            self.entries[entry]["export"] = used
            self.progress(f"exported {entry} to ONNX opset {OPSET} ({used}): {len(self.protos[entry].graph.node)} "
                          f"nodes ({time.perf_counter() - t0:.1f} s)")
        self.write()

    def write(self) -> None:
        import onnx

        t0 = time.perf_counter()
        data = DataFile()
        for entry, proto in self.protos.items():
            p = onnx.ModelProto()
            p.CopyFrom(proto)
            bound = bind_initializers(p, self.tensors, data, Path(WEIGHTS_FILE).name)
            inferred = infer(p)
            ent = self.entries[entry]
            self.writer.path(ent["file"]).write_bytes(inferred.SerializeToString())
            ent["inputs"] = [vi.name for vi in inferred.graph.input]
            ent["outputs"] = [vi.name for vi in inferred.graph.output]
            ent["initializers"] = len(bound)
            ent["nodes"] = len(inferred.graph.node)
        data.write(self.writer.path(WEIGHTS_FILE))
        for entry in self.protos:
            onnx.checker.check_model(str(self.writer.path(self.entries[entry]["file"])), full_check=True)
        self.progress(f"onnx: {len(data.where)} tensors in {WEIGHTS_FILE} ({data.size / 2**20:.1f} MiB); "
                      f"models shape-inferred and checked ({time.perf_counter() - t0:.1f} s)")
        for fn in self.after_write:
            fn()

    def hook(self) -> None:
        """Export when the build writes the parameters through ``writer.write_tensors``; re-bind if the
        constants it writes differ from the ones the models hold."""
        orig = self.writer.write_tensors

        def write_tensors(prefix, tensors, progress=None):  # noqa: ANN001, ANN202
            where = orig(prefix, tensors, progress)
            if prefix == "params" and not self.protos:
                self.export(tensors)
            elif prefix == "consts" and self.protos:
                new = {f"consts.{k}": v for k, v in tensors.items()}
                if any(k not in self.tensors or not torch.equal(self.tensors[k], v) for k, v in new.items()):
                    self.tensors.update(new)
                    self.write()
            return where

        self.writer.write_tensors = write_tensors


def start(target: str, programs: dict[str, Program], writer, manifest: dict, progress: Progress,
          weights: Mapping[str, torch.Tensor] | None = None, consts: Mapping[str, torch.Tensor] | None = None,
          method: str = "auto") -> "_Job":
    """Set up the export of ``programs`` into ``writer`` (``job.go()`` starts it; ``job.entries`` is the
    manifest's programs table, completed when the models are written)."""
    check(target, manifest.get("dtype", "fp32"))
    check_kv_storage(manifest.get("kv_storage", "dense"))
    if consts is None:
        from dsv4c.frontend.model import constants
        from dsv4c.spec import ModelSpec

        consts = constants(ModelSpec.from_dict(manifest["spec"]))
    entries: dict[str, dict] = {}
    for entry, prog in programs.items():
        cache = [n for n in prog.input_names if n.startswith("cache.")]
        entries[entry] = {"file": f"programs/{entry}.onnx", "format": FORMAT, "opset": OPSET,
                          "weights": WEIGHTS_FILE, "state": {n: CACHE_OUT + n[len("cache."):] for n in cache}}
    return _Job(programs, writer, manifest, entries, consts, progress, method, weights)


def lower(target: str, programs: dict[str, Program], writer, manifest: dict, progress: Progress,
          weights: Mapping[str, torch.Tensor] | None = None, consts: Mapping[str, torch.Tensor] | None = None,
          method: str = "auto") -> dict[str, dict]:
    """Backend entry (see ``lowering/backends.py``). Returns the manifest's ``programs`` table; its
    entries are completed when the models are written."""
    if target != "cpu":
        progress(f"onnx: target {target!r} only tags the artifact; the ONNX graphs are the same for every target "
                 "(the CUDA provider of onnxruntime-gpu runs them on a GPU)")
    job = start(target, programs, writer, manifest, progress, weights, consts, method)
    job.go()
    return job.entries
