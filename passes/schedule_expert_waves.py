"""``schedule_expert_waves``: routed experts in waves, the dispatch of wave i+1 ahead of wave i's GEMMs.

The traced MoE block dispatches every (token, chosen expert) row at once (``x[tok]``) and runs three
grouped GEMMs over all rows. This pass splits the routed experts into W waves by expert-id range
(``[i*E/W, (i+1)*E/W)``; every expert in exactly one wave) and rewrites each block to::

    dispatch 0, dispatch 1, experts 0, dispatch 2, experts 1, ..., experts W-1, combine

- **dispatch i** compacts the rows routed to wave i to the front (a stable argsort of "not in wave i"),
  gathers their activations straight from the token matrix (``x[tok[perm]]``), their routing weights,
  and their expert ids (rows of other waves get id -1, which the grouped GEMMs skip and turn into
  zeros; a kernel stops at the first tile of -1 rows).
- **experts i** is a copy of the block's expert computation (grouped GEMMs and SwiGLU, whatever earlier
  passes made of them) on the compacted rows, then un-permuted.
- **combine** picks each row's result from its wave (``where``), so the block's output is bit-identical
  for any W.

The order puts wave i+1's gathers before wave i's GEMMs, which is what lets a second stream (or, with
expert parallelism, the all-to-all) overlap them. Nodes carry ``meta["dsv4c_wave"]``; the schedule of
every block goes into ``Program.meta["expert_waves"]`` (saved with the graph) and is checked with
networkx to be a DAG whose order the graph follows.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import networkx as nx
import torch.fx as fx

from dsv4c.program import Program

from .fxutil import aten, call, calls, dsv4, params, replace, same_size, shape_of
from .manager import GraphPass, PassResult, register

GEMMS = (dsv4.fp4_grouped_linear.default, dsv4.fp4_grouped_linear_packed.default)
# Ops that act row by row (or broadcast a row-indexed operand), so permuting rows commutes with them.
ROWWISE = set(GEMMS) | {dsv4.swiglu_clamp.default, aten.to.dtype, aten.clamp.default, aten.silu.default,
                        aten.mul.Tensor, aten.add.Tensor,
                        aten.split_with_sizes.default, operator.getitem}  # column splits of stacked GEMMs


@dataclass(frozen=True)
class WaveConfig:
    num_waves: int = 2
    # Entry points to schedule. The GPU pipelines leave decode alone: a decode step has a few rows per
    # block, so each wave adds its dispatch kernels and a launch per grouped GEMM and overlaps nothing.
    entries: tuple[str, ...] = ("prefill", "decode")


@register
class ScheduleExpertWaves(GraphPass):
    name = "schedule_expert_waves"
    Config = WaveConfig

    def run(self, prog: Program, weights, ctx) -> PassResult:
        if prog.entry not in self.config.entries:
            return PassResult(0, skipped=True, notes=f"{prog.entry} is not scheduled (entries: "
                                                     f"{', '.join(self.config.entries)})")
        E = ctx.spec.n_routed_experts
        W = max(1, min(int(self.config.num_waves), E))
        waves = [(i * E // W, (i + 1) * E // W) for i in range(W)]
        g = prog.graph_module.graph
        groups: dict[fx.Node, list[fx.Node]] = {}
        for m in calls(g, *GEMMS):
            groups.setdefault(m.args[1], []).append(m)
        pnames = params(prog)
        schedule, notes = {}, []
        for expert, gemms in groups.items():
            label = _block_label(pnames.get(gemms[0].args[2], gemms[0].name))
            why = _schedule(g, expert, gemms, waves, label, schedule)
            if why:
                notes.append(f"{label}: {why}")
        prog.meta["expert_waves"] = schedule
        note = f"{W} waves of experts {waves}"
        if notes:
            note += "; left as is: " + "; ".join(notes)
        return PassResult(len(schedule), skipped=not schedule, notes=note,
                          record={"waves": [list(w) for w in waves], "blocks": len(schedule)})


def _block_label(param_name: str) -> str:
    return param_name.split(".ffn.")[0] if ".ffn." in param_name else param_name


def _schedule(g: fx.Graph, expert: fx.Node, gemms: list[fx.Node], waves: list[tuple[int, int]], label: str,
              schedule: dict) -> str | None:
    out, first = max(gemms), min(gemms)  # nodes compare by their position in the graph
    # The expert computation: nodes between the first GEMM and the last that depend on a GEMM.
    region: list[fx.Node] = []
    inside: set[fx.Node] = set()
    for n in sorted(_ancestors_after(out, first)):
        if n in gemms or any(a in inside for a in n.all_input_nodes):
            region.append(n)
            inside.add(n)
    if not all(m in inside for m in gemms):
        return "a grouped GEMM does not feed the block output"
    bad = sorted({str(n.target) for n in region if n.target not in ROWWISE})
    if bad:
        return f"non-row-wise ops {bad} between the GEMMs"
    rows = shape_of(expert)
    if rows is None or len(rows) != 1:
        return "expert ids are not a 1-D row vector"
    # Everything the expert computation reads is a parameter or indexed by row like the expert ids
    # (dispatched rows, routing weights); anything else could not be permuted safely.
    ext = list(dict.fromkeys(a for n in region for a in n.all_input_nodes if a not in inside))
    row_inputs = [a for a in ext if a is not expert and a.op != "placeholder"]
    odd = [a.name for a in row_inputs if not shape_of(a) or not same_size(shape_of(a)[0], rows[0])]
    if odd:
        return f"inputs {odd} of the expert computation are not indexed by dispatched row"

    stages: dict[str, list[fx.Node]] = {}

    def tag(nodes: list[fx.Node], wave: int, stage: str) -> None:
        for n in nodes:
            n.meta["dsv4c_wave"] = wave
        stages[stage] = nodes

    with g.inserting_before(out):
        disp = {}
        results = []

        def dispatch(i: int) -> None:
            lo, hi = waves[i]
            new: list[fx.Node] = []

            def c(target, *args, like=None, **kw):
                # Values: copied from the node of the same shape where there is one; fake propagation
                # of argsort/index with symbolic row counts is slow and no later pass needs these.
                n = call(g, target, *args, like=like, infer=False, **kw)
                new.append(n)
                return n

            in_wave = c(aten.logical_and.default, c(aten.ge.Scalar, expert, lo), c(aten.lt.Scalar, expert, hi))
            perm = c(aten.argsort.stable, c(aten.logical_not.default, in_wave), stable=True, dim=0)
            env = {expert: c(aten.where.ScalarOther, c(aten.index.Tensor, in_wave, [perm]),
                             c(aten.index.Tensor, expert, [perm], like=expert), -1, like=expert)}
            for r in row_inputs:
                if r.target is aten.index.Tensor and len(r.args[1]) == 1 and isinstance(r.args[1][0], fx.Node) \
                        and shape_of(r.args[1][0]) is not None and len(shape_of(r.args[1][0])) == 1:
                    src, idx = r.args[0], r.args[1][0]  # a gather: gather straight from its source
                    env[r] = c(aten.index.Tensor, src, [c(aten.index.Tensor, idx, [perm], like=idx)], like=r)
                else:
                    env[r] = c(aten.index.Tensor, r, [perm], like=r)
            disp[i] = (in_wave, perm, env)
            tag(new, i, f"dispatch {i}")

        def experts(i: int) -> None:
            in_wave, perm, env = disp[i]
            new: list[fx.Node] = []
            for n in region:
                args = fx.node.map_arg(n.args, lambda a: env.get(a, a))
                kwargs = fx.node.map_arg(n.kwargs, lambda a: env.get(a, a))
                env[n] = call(g, n.target, *args, like=n, infer=False, **kwargs)  # rows permuted, not dropped
                new.append(env[n])
            inv = call(g, aten.argsort.default, perm, 0, infer=False)
            back = call(g, aten.index.Tensor, env[out], [inv], like=out)
            results.append(back)
            tag(new + [inv, back], i, f"experts {i}")

        dispatch(0)
        for i in range(len(waves)):
            if i + 1 < len(waves):
                dispatch(i + 1)
            experts(i)
        acc = results[0]
        comb: list[fx.Node] = []
        for i in range(1, len(waves)):
            m = call(g, aten.unsqueeze.default, disp[i][0], 1, infer=False)
            acc = call(g, aten.where.self, m, results[i], acc, like=out)
            comb += [m, acc]
        stages["combine"] = comb
    replace(out, acc)
    order = _check_schedule(g, stages, len(waves))
    schedule[label] = {"waves": [list(w) for w in waves], "order": order,
                       "nodes": {k: [n.name for n in v] for k, v in stages.items()}}
    return None


def _ancestors_after(out: fx.Node, first: fx.Node) -> set[fx.Node]:
    seen, todo = set(), [out]
    while todo:
        n = todo.pop()
        if n in seen or n < first:
            continue
        seen.add(n)
        todo.extend(n.all_input_nodes)
    return seen


def _check_schedule(g: fx.Graph, stages: dict[str, list[fx.Node]], W: int) -> list[str]:
    """Check (networkx) that the stages with their data and stream-order edges form a DAG and that
    the graph's node order is one of its topological orders; return the stage order."""
    dag = nx.DiGraph()
    stage_of = {n: s for s, nodes in stages.items() for n in nodes}
    dag.add_nodes_from(stages)
    for n, s in stage_of.items():
        for a in n.all_input_nodes:
            if a in stage_of and stage_of[a] != s:
                dag.add_edge(stage_of[a], s)
    for i in range(W - 1):
        dag.add_edge(f"dispatch {i + 1}", f"experts {i}")  # the overlap: wave i+1's dispatch before wave i's GEMMs
        dag.add_edge(f"experts {i}", f"experts {i + 1}")  # one compute stream
    if not nx.is_directed_acyclic_graph(dag):
        raise AssertionError(f"expert-wave schedule has a cycle: {nx.find_cycle(dag)}")
    span = {s: (min(v), max(v)) for s, v in stages.items() if v}
    for a, b in dag.edges:
        if a in span and b in span and not span[a][1] < span[b][0]:
            raise AssertionError(f"graph order breaks the wave schedule: {a!r} does not precede {b!r}")
    return sorted(span, key=lambda s: span[s][0])
