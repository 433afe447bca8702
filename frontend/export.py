"""Trace the step function into FX graphs with ``torch.export``.

Two entry points: ``prefill`` (one sequence, S symbolic; the runtime prefills sequence by sequence)
and ``decode`` (S = 1, batch symbolic). Parameters,
constants and the KV cache are user inputs (pytrees of named tensors), the cache is mutated in place
(recorded by export as input mutations), and the output is the last position's logits.

Inputs are fake tensors, so tracing ``--variant pro`` allocates no weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from dsv4c.layout import cache_tensors, model_tensors
from dsv4c.program import Program

from .model import StepContext, block, constants, embed, head, step
from dsv4c.layout import block_prefix

EntryPoint = Literal["prefill", "decode"]
# Example sizes used only to trace; the graphs are symbolic in them.
_EXAMPLE_BATCH = 2
_EXAMPLE_SEQ = 8


class StepModule(torch.nn.Module):
    """``forward(params, consts, cache, input_ids, start_pos) -> logits``; no state of its own."""

    def __init__(self, ctx: StepContext) -> None:
        super().__init__()
        self.ctx = ctx

    def forward(self, params, consts, cache, input_ids, start_pos):  # noqa: ANN001 - pytrees
        return step(self.ctx, params, consts, cache, input_ids, start_pos)


@dataclass(frozen=True)
class TraceConfig:
    max_seq_len: int  # cache capacity (tokens per sequence) the graph is specialized on


def example_inputs(ctx: StepContext, entry: EntryPoint, cfg: TraceConfig, fake_mode: FakeTensorMode | None = None):
    """(params, consts, cache, input_ids, start_pos) with the right shapes; fake when ``fake_mode`` is given."""
    spec = ctx.spec
    seq = 1 if entry == "decode" else min(_EXAMPLE_SEQ, cfg.max_seq_len)
    batch = _EXAMPLE_BATCH if entry == "decode" else 1
    real_consts = constants(spec)

    def make():
        params = {k: torch.empty(t.shape, dtype=t.dtype) for k, t in model_tensors(spec, ctx.dtype).items()}
        cache = {k: torch.empty(t.shape, dtype=t.dtype)
                 for k, t in cache_tensors(spec, batch, cfg.max_seq_len, ctx.dtype, storage=ctx.kv_storage).items()}
        consts = {k: v.clone() for k, v in real_consts.items()}
        ids = torch.zeros(batch, seq, dtype=torch.long)
        start = torch.zeros(batch, dtype=torch.long)
        return params, consts, cache, ids, start

    if fake_mode is None:
        return make()
    with fake_mode:
        return make()


def dynamic_shapes(ctx: StepContext, entry: EntryPoint, cfg: TraceConfig, inputs) -> tuple:  # noqa: ANN001
    params, consts, cache, _, _ = inputs
    if entry == "prefill":
        seq = torch.export.Dim("seq", min=1, max=cfg.max_seq_len)
        return ({k: None for k in params}, {k: None for k in consts}, {k: None for k in cache}, {1: seq}, None)
    batch = torch.export.Dim("batch", min=1, max=1024)
    return ({k: None for k in params}, {k: None for k in consts}, {k: {0: batch} for k in cache}, {0: batch}, {0: batch})


def trace(ctx: StepContext, entry: EntryPoint, cfg: TraceConfig, fake: bool = True) -> torch.export.ExportedProgram:
    """Export one entry point of the step function."""
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else None
    inputs = example_inputs(ctx, entry, cfg, fake_mode)
    ds = dynamic_shapes(ctx, entry, cfg, inputs)
    with torch.no_grad():
        return torch.export.export(StepModule(ctx), inputs, dynamic_shapes=ds, strict=False)


def flat_input_names(inputs) -> list[str]:  # noqa: ANN001 - the pytree of example inputs
    """Names of the flattened inputs: ``params.<k>``, ``consts.<k>``, ``cache.<k>``, ``input_ids``, ``start_pos``."""
    params, consts, cache, _, _ = inputs
    return ([f"params.{k}" for k in params] + [f"consts.{k}" for k in consts] + [f"cache.{k}" for k in cache]
            + ["input_ids", "start_pos"])


def to_program(ep: torch.export.ExportedProgram, entry: EntryPoint, names: list[str], meta: dict) -> Program:
    """Unlift an exported program into a flat-input FX graph: mutations stay as in-place aten ops
    (``copy_``/``scatter_`` on cache inputs); export's input-guard module and metadata asserts go."""
    gm = ep.module()
    g = gm.graph
    for n in list(g.nodes):
        if n.op == "call_module" or (n.op == "call_function" and n.target in _DROPPED and not n.users):
            g.erase_node(n)
    for n in list(g.nodes):
        if n.op == "get_attr" and not n.users:
            g.erase_node(n)
    phs = [n for n in g.nodes if n.op == "placeholder"]
    if len(phs) != len(names):
        raise AssertionError(f"{len(phs)} placeholders for {len(names)} inputs")
    for n, name in zip(phs, names):
        n.name = n.target = name.replace(".", "_")
    out = next(n for n in g.nodes if n.op == "output")
    if isinstance(out.args[0], (list, tuple)) and len(out.args[0]) == 1:
        out.args = (out.args[0][0],)  # a single logits tensor, not a pytree
    g._codegen = torch.fx.graph.CodeGen()
    fresh = torch.fx.GraphModule(torch.nn.Module(), g)
    prog = Program(entry, fresh, list(names), dict(meta))
    prog.recompile()
    return prog


_DROPPED = {torch.ops.aten._assert_tensor_metadata.default}


# ---- block-template tracing ---------------------------------------------------------------------------
# Blocks of the same kind (attention kind, compress ratio, routing kind) have identical graphs up to the
# names of their parameters and cache entries. Tracing one representative per kind and stitching copies
# of its graph makes tracing cost proportional to the number of kinds (4 for pro) instead of blocks (61).

class _EmbedModule(torch.nn.Module):
    def __init__(self, ctx: StepContext) -> None:
        super().__init__()
        self.ctx = ctx

    def forward(self, params, input_ids, start_pos):  # noqa: ANN001
        return embed(self.ctx, params, input_ids, start_pos)


class _BlockModule(torch.nn.Module):
    def __init__(self, ctx: StepContext, index: int) -> None:
        super().__init__()
        self.ctx, self.index = ctx, index

    def forward(self, params, consts, cache, x, input_ids, pos, start_pos):  # noqa: ANN001
        return block(self.ctx, x, input_ids, pos, start_pos, params, self.index, cache, consts)


class _HeadModule(torch.nn.Module):
    def __init__(self, ctx: StepContext) -> None:
        super().__init__()
        self.ctx = ctx

    def forward(self, params, x):  # noqa: ANN001
        return head(self.ctx, params, x)


def _block_key(spec, i: int) -> tuple:
    return (spec.attn_kind(i), spec.compress_ratios[i], spec.route_kind(i))


def _subgraph(mod: torch.nn.Module, args: tuple, ds: tuple) -> torch.fx.Graph:
    with torch.no_grad():
        ep = torch.export.export(mod, args, dynamic_shapes=ds, strict=False)
    g = ep.module().graph
    for n in list(g.nodes):
        if n.op == "call_module" or (n.op == "call_function" and n.target in _DROPPED and not n.users):
            g.erase_node(n)
    return g


def trace_program(ctx: StepContext, entry: EntryPoint, cfg: TraceConfig, log=None) -> Program:  # noqa: ANN001
    """Trace one entry point as a flat-input Program, one representative block per block kind."""
    spec = ctx.spec
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    params, consts, cache, ids, start = example_inputs(ctx, entry, cfg, fake_mode)
    names = flat_input_names((params, consts, cache, ids, start))
    decode = entry == "decode"
    batch = torch.export.Dim("batch", min=1, max=1024) if decode else None
    seq = None if decode else torch.export.Dim("seq", min=1, max=cfg.max_seq_len)
    tok = {0: batch} if decode else {1: seq}  # [B, S] tensors
    bdim = {0: batch} if decode else None  # [B] / [B, ...] tensors

    def none(d):  # noqa: ANN001, ANN202
        return {k: None for k in d}

    top = {k: v for k, v in params.items() if not k.startswith(("layers.", "mtp."))}
    with fake_mode:
        x, pos = embed(ctx, top, ids, start)
    graphs = {"embed": _subgraph(_EmbedModule(ctx), (top, ids, start), (none(top), tok, bdim))}
    reps: dict[tuple, int] = {}
    for i in range(spec.num_layers):
        key = _block_key(spec, i)
        if key in reps:
            continue
        reps[key] = i
        p = block_prefix(spec, i)
        bp = {k: v for k, v in params.items() if k.startswith(p)}
        bc = {k: v for k, v in cache.items() if k.startswith(f"b{i}.")}
        ds = (none(bp), none(consts), {k: bdim for k in bc}, tok, tok, tok, bdim)
        graphs[key] = _subgraph(_BlockModule(ctx, i), (bp, consts, bc, x, ids, pos, start), ds)
        if log:
            log(f"traced {entry} block kind {key} (block {i})")
    graphs["head"] = _subgraph(_HeadModule(ctx), (top, x), (none(top), tok))

    g = torch.fx.Graph()
    ph = {name: g.placeholder(name.replace(".", "_")) for name in names}

    def copy(sub: torch.fx.Graph, inputs: list, block_index: int | None):  # noqa: ANN202
        subph = [n for n in sub.nodes if n.op == "placeholder"]
        assert len(subph) == len(inputs), (len(subph), len(inputs))
        val_map = dict(zip(subph, inputs))
        for sp, node in val_map.items():  # placeholders of the stitched graph take the traced metadata
            if node.op == "placeholder" and "val" not in node.meta and "val" in sp.meta:
                node.meta["val"] = sp.meta["val"]
        before = set(g.nodes)
        out = g.graph_copy(sub, val_map)
        if block_index is not None:
            for n in g.nodes:
                if n not in before:
                    n.meta["dsv4c_block"] = block_index
        while isinstance(out, (list, tuple)) and len(out) == 1:
            out = out[0]  # a single-output module returns a one-element pytree
        return out

    def flat(name_list: list[str]) -> list:
        return [ph[n] for n in name_list]

    xv, posv = copy(graphs["embed"], flat([f"params.{k}" for k in top] + ["input_ids", "start_pos"]), None)
    for i in range(spec.num_layers):
        rep = reps[_block_key(spec, i)]
        rp, ip = block_prefix(spec, rep), block_prefix(spec, i)
        bp = [f"params.{ip}{k[len(rp):]}" for k in params if k.startswith(rp)]
        bc = [f"cache.b{i}.{k[len(f'b{rep}.'):]}" for k in cache if k.startswith(f"b{rep}.")]
        cn = [f"consts.{k}" for k in consts]
        xv = copy(graphs[_block_key(spec, i)], flat(bp) + flat(cn) + flat(bc) + [xv, ph["input_ids"], posv,
                                                                                  ph["start_pos"]], i)
    logits = copy(graphs["head"], flat([f"params.{k}" for k in top]) + [xv], None)
    g.output(logits)
    g._codegen = torch.fx.graph.CodeGen()
    prog = Program(entry, torch.fx.GraphModule(torch.nn.Module(), g), names,
                   {"numerics": ctx.numerics, "dtype": str(ctx.dtype).removeprefix("torch."),
                    "kv_storage": ctx.kv_storage})
    prog.recompile()
    return prog
