"""A traced step program: an FX graph with flat, named inputs, and its JSON form.

The graph takes its inputs positionally in ``input_names`` order: ``params.<name>`` (weights),
``consts.<name>`` (RoPE tables, Hadamard matrix), ``cache.<name>`` (KV cache, mutated in place by
``aten.copy_``/``scatter_`` nodes), then ``input_ids`` and ``start_pos``. It returns the logits.

The JSON form lists nodes with their op name and arguments. Loading resolves op names against a
whitelist (``aten``, ``dsv4``, ``operator`` and ``torch.sym_*`` functions), so an artifact can only ever
describe a graph of known ops: no pickle, no code execution.
"""

from __future__ import annotations

import json
import math
import operator
import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

import dsv4c.ops  # noqa: F401  (the dsv4 ops must exist before a graph that uses them is loaded)

from .errors import ArtifactError

GRAPH_FORMAT = "dsv4c.fx-json/1"
_PY_FUNCS = {f"operator.{n}": getattr(operator, n) for n in (
    "getitem", "add", "sub", "mul", "floordiv", "truediv", "mod", "neg", "pow", "eq", "ne", "lt", "le", "gt", "ge",
    "and_", "or_")}
_PY_FUNCS.update({f"torch.{n}": getattr(torch, n) for n in ("sym_max", "sym_min", "sym_not", "sym_float", "sym_int",
                                                            "sym_sqrt", "sym_ite") if hasattr(torch, n)})
_PY_FUNCS["math.ceil"] = math.ceil
_PY_FUNCS["math.floor"] = math.floor
_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e8m0fnu,
    torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.bool)}
_LAYOUTS = {"strided": torch.strided}
_MEMFMT = {"contiguous_format": torch.contiguous_format, "preserve_format": torch.preserve_format}


@dataclass
class Program:
    """One entry point (prefill or decode) as a flat-input FX graph."""

    entry: str
    graph_module: fx.GraphModule
    input_names: list[str]
    meta: dict[str, Any] = field(default_factory=dict)

    def __call__(self, *flat: torch.Tensor) -> torch.Tensor:
        return self.graph_module(*flat)

    @property
    def param_names(self) -> list[str]:
        return [n[len("params."):] for n in self.input_names if n.startswith("params.")]

    def num_nodes(self) -> int:
        return len(self.graph_module.graph.nodes)

    def placeholder(self, input_name: str) -> fx.Node:
        idx = self.input_names.index(input_name)
        return [n for n in self.graph_module.graph.nodes if n.op == "placeholder"][idx]

    def add_param_input(self, name: str, like: fx.Node | None = None) -> fx.Node:
        """Append a new ``params.<name>`` placeholder (weight-rewriting passes use this)."""
        g = self.graph_module.graph
        phs = [n for n in g.nodes if n.op == "placeholder"]
        last_param = max(i for i, n in enumerate(self.input_names) if n.startswith("params."))
        with g.inserting_after(phs[last_param]):
            node = g.placeholder(_safe(f"params.{name}"))
        self.input_names.insert(last_param + 1, f"params.{name}")
        if like is not None:
            node.meta.update({k: v for k, v in like.meta.items() if k in ("val", "tensor_meta")})
        return node

    def remove_unused_params(self) -> list[str]:
        """Drop ``params.*`` placeholders with no users; return the removed parameter names."""
        g = self.graph_module.graph
        phs = [n for n in g.nodes if n.op == "placeholder"]
        removed = []
        for name, node in list(zip(self.input_names, phs)):
            if name.startswith("params.") and not node.users:
                g.erase_node(node)
                self.input_names.remove(name)
                removed.append(name[len("params."):])
        return removed

    def recompile(self) -> None:
        self.graph_module.graph.lint()
        self.graph_module.recompile()

    def code(self) -> str:
        """Readable Python of the graph (for inspection and dumps)."""
        return self.graph_module.code

    # ---- JSON --------------------------------------------------------------------------------
    def to_json(self) -> str:
        nodes = []
        for n in self.graph_module.graph.nodes:
            rec: dict[str, Any] = {"name": n.name, "op": n.op}
            if n.op == "call_function":
                rec["target"] = _target_name(n.target)
                rec["args"] = _enc(n.args)
                rec["kwargs"] = _enc(n.kwargs)
            elif n.op == "output":
                rec["args"] = _enc(n.args)
            elif n.op != "placeholder":
                raise ArtifactError(f"graph node {n.name} has unsupported op kind {n.op!r}.", "report a dsv4c bug.")
            prov = n.meta.get("dsv4c_pass")
            if prov:
                rec["pass"] = prov
            if "dsv4c_wave" in n.meta:
                rec["wave"] = n.meta["dsv4c_wave"]
            nodes.append(rec)
        return json.dumps({"format": GRAPH_FORMAT, "entry": self.entry, "inputs": self.input_names,
                           "meta": self.meta, "nodes": nodes}, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str, where: str = "program", device: torch.device | str | None = None) -> "Program":
        fix = "rebuild the artifact with `dsv4c build`."
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise ArtifactError(f"{where} is not valid JSON ({e}).", fix) from None
        if not isinstance(doc, dict) or doc.get("format") != GRAPH_FORMAT:
            raise ArtifactError(f"{where} is not a {GRAPH_FORMAT} graph (format {doc.get('format') if isinstance(doc, dict) else None!r}).", fix)
        g = fx.Graph()
        env: dict[str, fx.Node] = {}
        dev = torch.device(device) if device is not None else None
        try:
            for rec in doc["nodes"]:
                op, name = rec["op"], rec["name"]
                if op == "placeholder":
                    node = g.placeholder(name)
                elif op == "call_function":
                    target = _resolve(rec["target"], where)
                    # named at creation, so the graph's namespace knows the name (nodes a load-time rewrite
                    # adds later must not be given one of these)
                    node = g.create_node("call_function", target, _dec(rec["args"], env, dev),
                                         _dec(rec["kwargs"], env, dev), name=name)
                    if node.name != name:
                        raise ArtifactError(f"{where}: node name {name!r} is used twice.", fix)
                elif op == "output":
                    node = g.output(_dec(rec["args"], env, dev)[0])
                else:
                    raise ArtifactError(f"{where}: node {name!r} has unknown op {op!r}.", fix)
                if "pass" in rec:
                    node.meta["dsv4c_pass"] = rec["pass"]
                if "wave" in rec:
                    node.meta["dsv4c_wave"] = rec["wave"]
                env[name] = node
            inputs = list(doc["inputs"])
        except (KeyError, TypeError, IndexError) as e:
            raise ArtifactError(f"{where}: malformed graph ({type(e).__name__}: {e}).", fix) from None
        if len(inputs) != sum(1 for n in g.nodes if n.op == "placeholder"):
            raise ArtifactError(f"{where}: input list does not match the graph's placeholders.", fix)
        gm = fx.GraphModule(torch.nn.Module(), g)
        return cls(doc.get("entry", "?"), gm, inputs, dict(doc.get("meta", {})))


def _safe(name: str) -> str:
    """A placeholder (Python identifier) name for an input name: other characters become ``_``
    (``params.layers.0.attn.wq_a+wkv.weight`` -> ``params_layers_0_attn_wq_a_wkv_weight``)."""
    return re.sub(r"\W", "_", name)


def _target_name(t: Any) -> str:
    if isinstance(t, torch._ops.OpOverload):
        ns = t.namespace
        return f"{ns}::{t._opname}.{t._overloadname}"
    for k, f in _PY_FUNCS.items():
        if f is t:
            return k
    raise ArtifactError(f"graph calls {t!r}, which dsv4c cannot serialize.", "report a dsv4c bug.")


def _resolve(name: str, where: str) -> Any:
    if name in _PY_FUNCS:
        return _PY_FUNCS[name]
    ns, _, rest = name.partition("::")
    op, _, overload = rest.partition(".")
    if ns not in ("aten", "dsv4") or not op:
        raise ArtifactError(f"{where} calls {name!r}, which is not an aten or dsv4 op.",
                            "only load artifacts built by dsv4c; rebuild this one.")
    try:
        return getattr(getattr(getattr(torch.ops, ns), op), overload or "default")
    except AttributeError:
        raise ArtifactError(f"{where} calls unknown op {name!r} (built by another dsv4c/torch version?).",
                            "rebuild the artifact with this dsv4c and torch.") from None


def _enc(v: Any) -> Any:
    if isinstance(v, fx.Node):
        return {"n": v.name}
    if isinstance(v, (bool, int, str)) or v is None:
        return v
    if isinstance(v, float):
        return {"f": repr(v)} if not math.isfinite(v) else v
    if isinstance(v, (list, tuple)):
        return {"l": [_enc(x) for x in v], "t": isinstance(v, tuple)}
    if isinstance(v, dict):
        return {"d": {k: _enc(x) for k, x in v.items()}}
    if isinstance(v, torch.dtype):
        return {"dtype": str(v).removeprefix("torch.")}
    if isinstance(v, torch.device):
        return {"device": v.type}
    if isinstance(v, torch.layout):
        return {"layout": str(v).removeprefix("torch.")}
    if isinstance(v, torch.memory_format):
        return {"memfmt": str(v).removeprefix("torch.")}
    raise ArtifactError(f"cannot serialize graph argument {v!r} ({type(v).__name__}).", "report a dsv4c bug.")


def _dec(v: Any, env: dict[str, fx.Node], dev: torch.device | None) -> Any:
    if isinstance(v, dict):
        if "n" in v:
            return env[v["n"]]
        if "f" in v:
            return float(v["f"])
        if "l" in v:
            items = [_dec(x, env, dev) for x in v["l"]]
            return tuple(items) if v.get("t") else items
        if "d" in v:
            return {k: _dec(x, env, dev) for k, x in v["d"].items()}
        if "dtype" in v:
            return _DTYPES[v["dtype"]]
        if "device" in v:
            return dev if dev is not None else torch.device(v["device"])
        if "layout" in v:
            return _LAYOUTS[v["layout"]]
        if "memfmt" in v:
            return _MEMFMT[v["memfmt"]]
        raise KeyError(f"unknown argument encoding {sorted(v)}")
    return v
