"""The decode step's shared expert on a second CUDA stream, beside the routed experts.

At batch 1 each MoE layer streams ~25 MB of FP8 shared-expert weight and ~75 MB of FP4 routed-expert
weight through a chain of latency-bound launches (two GEMVs and a SwiGLU each, plus the routing kernels).
The two chains are independent until their outputs are added, so running them on two streams lets the
one fill the memory pipe while the other waits on its own launches.

:func:`overlap_shared_experts` (a load-time rewrite of the decode graph, CUDA only) replaces the chain
``fp8_linear(w1+w3) -> split -> swiglu_clamp -> cast -> fp8_linear(w2) -> cast to fp32`` with

- ``dsv4c_rt.shared_expert_fork(x, ..., gate, rows)`` in place of the router's GEMV (``linear_w16(x,
  gate)``) and the gather of the routed experts' input rows (``x[rows]``): on CUDA it makes a side stream
  wait for the current one, enqueues the chain's kernels on the side stream and returns without waiting,
  then computes the router's logits and the rows on the current stream. Returning those two makes every
  routed-expert launch depend on the fork, so the compiled program cannot issue the fork after them
  (with the shared expert alone, Inductor placed it after the first routed GEMV; with the logits alone,
  after the first routed GEMV of a hash-routed layer, whose experts do not depend on the router);
- ``dsv4c_rt.stream_join(h, x, routed)`` in place of the add of the two branches: the current stream
  waits for the side stream, then ``routed + h`` in fp32. ``x`` is an argument so that the compiled
  program keeps the input alive (its memory unreused) until the side stream has read it; ``routed`` so
  that Inductor, which orders launches by data dependencies, cannot place the wait before the routed
  experts (with ``(h, x)`` alone it put the join right after the fork).

Inside a CUDA graph capture the wait/record pairs become graph edges, so the captured decode step runs the
two branches concurrently. The side stream's split-K GEMVs count their programs' arrivals in counters of
their own (``triton_kernels.counter_set("side")``): with one set for both streams, concurrent GEMVs
corrupted each other's counts (NaN logits on the H100, session 10). The same kernels run in the same order on
each branch, so the step's numbers do not change (the CPU implementations run the chain in line;
tests/runtime/test_shared_expert_stream.py).
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

import dsv4c.ops  # noqa: F401  (registers torch.ops.dsv4)
from dsv4c.runtime.load_rewrites import call_nodes, is_call, linear_w16

aten = torch.ops.aten
dsv4 = torch.ops.dsv4


def _shared_chain(x: torch.Tensor, w13: torch.Tensor, s13: torch.Tensor, w2: torch.Tensor, s2: torch.Tensor,
                  act_quant: bool, ue8m0: bool, limit: float, mid_dtype: torch.dtype,
                  fused_cast: bool = False) -> torch.Tensor:
    """The shared expert as the graph computed it: the w2 projection's output (x's dtype). ``fused_cast``
    (TUNE ``fork_join_triton``, a Triton launcher): the SwiGLU writes ``mid_dtype`` itself, one launch fewer
    and the same values (the fp32 result rounded to nearest-even, as ``.to`` rounds)."""
    h = dsv4.fp8_linear(x, w13, s13, act_quant, ue8m0)
    g, v = h.split([h.shape[-1] // 2] * 2, dim=-1)
    if fused_cast:
        from dsv4c.ops import triton_kernels as tk  # noqa: PLC0415

        a = tk.swiglu_clamp(g, v, g, limit, False, out_dtype=mid_dtype)
    else:
        a = dsv4.swiglu_clamp(g, v, g, limit, False).to(mid_dtype)
    return dsv4.fp8_linear(a, w2, s2, act_quant, ue8m0)


@torch.library.custom_op("dsv4c_rt::shared_expert_fork", mutates_args=())
def shared_expert_fork(x: torch.Tensor, w13: torch.Tensor, s13: torch.Tensor, w2: torch.Tensor, s2: torch.Tensor,
                       act_quant: bool, ue8m0: bool, limit: float, mid_dtype: torch.dtype,
                       gate: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(the shared expert's output in x's dtype, the router's logits ``linear_w16(x, gate)``, the routed
    experts' input rows ``x[rows]``); on CUDA the shared expert is enqueued on the side stream, the other
    two on the current one (see the module doc)."""
    h = _shared_chain(x, w13, s13, w2, s2, act_quant, ue8m0, limit, mid_dtype)
    return h, linear_w16(x, gate), x[rows]


@shared_expert_fork.register_fake
def _(x, w13, s13, w2, s2, act_quant, ue8m0, limit, mid_dtype, gate, rows):
    return (x.new_empty((*x.shape[:-1], w2.shape[0])),
            x.new_empty((*x.shape[:-1], gate.shape[0]), dtype=torch.float32),
            x.new_empty((rows.shape[0], *x.shape[1:])))


@torch.library.custom_op("dsv4c_rt::stream_join", mutates_args=())
def stream_join(h: torch.Tensor, x: torch.Tensor, routed: torch.Tensor) -> torch.Tensor:
    """``routed + h`` in fp32 once the side stream's work is done; ``x`` (the fork's input) is held until
    then. Taking the routed experts' sum as an input keeps the compiled program from placing the join
    (and so the wait) before the routed experts. ``routed + h`` promotes h to fp32 inside the add (the
    same values as ``routed + h.float()``, one kernel instead of two)."""
    return routed + h


@stream_join.register_fake
def _(h, x, routed):
    return torch.empty_like(routed, dtype=torch.float32)


_SIDE: dict[int, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    s = _SIDE.get(idx)
    if s is None:
        s = _SIDE[idx] = torch.cuda.Stream(device=idx)
    return s


def _fork_cuda(x, w13, s13, w2, s2, act_quant, ue8m0, limit, mid_dtype, gate, rows):
    side = _side_stream(x.device)
    side.wait_stream(torch.cuda.current_stream(x.device))
    from dsv4c.ops.triton_kernels import TUNE, counter_set  # noqa: PLC0415

    # allocated on the side stream: the allocator reuses these blocks for later side-stream work only; the
    # split-K GEMVs count arrivals in their own counters (the routed experts' run at the same time)
    with torch.cuda.stream(side), counter_set("side"):
        h = _shared_chain(x, w13, s13, w2, s2, act_quant, ue8m0, limit, mid_dtype,
                          fused_cast=bool(TUNE["fork_join_triton"]))
    logits = linear_w16(x, gate)
    if TUNE["gather_rows_triton"]:
        from dsv4c.ops.triton_kernels import gather_rows  # noqa: PLC0415

        return h, logits, gather_rows(x, rows)
    return h, logits, x[rows]


def _join_cuda(h, x, routed):
    torch.cuda.current_stream(h.device).wait_stream(_side_stream(h.device))
    from dsv4c.ops import triton_kernels as tk  # noqa: PLC0415

    return tk.add_f32(routed, h) if tk.TUNE["fork_join_triton"] else routed + h


_CUDA_READY = False


def register_cuda() -> None:
    """The CUDA kernels of the two ops (the dsv4 ops they call must be registered for CUDA already)."""
    global _CUDA_READY
    if not _CUDA_READY:
        torch.library.register_kernel("dsv4c_rt::shared_expert_fork", "cuda", _fork_cuda)
        torch.library.register_kernel("dsv4c_rt::stream_join", "cuda", _join_cuda)
        _CUDA_READY = True


# ---- the rewrite --------------------------------------------------------------------------------------------

def _only_user(n: fx.Node) -> fx.Node | None:
    return next(iter(n.users)) if len(n.users) == 1 else None


def _ancestors(n: Any, limit: int = 64) -> set[fx.Node] | None:
    """``n`` and its graph ancestors, or None when there are more than ``limit`` (the routed rows' index is
    ``repeat_interleave(arange(T), k)``: a few nodes)."""
    todo, seen = [n], set()
    while todo:
        a = todo.pop()
        if not isinstance(a, fx.Node) or a in seen:
            continue
        if len(seen) == limit:
            return None
        seen.add(a)
        todo.extend(a.all_input_nodes)
    return seen


def _match_chain(l1: fx.Node) -> dict | None:
    """The nodes of one shared-expert chain starting at the w1+w3 ``fp8_linear`` ``l1``, else None."""
    x, w13, s13, aq, ue = l1.args
    sp = _only_user(l1)
    if not (is_call(sp, aten.split_with_sizes.default) and sp.args[2:] in ((-1,), (1,))
            and len(sp.args[1]) == 2 and sp.args[1][0] == sp.args[1][1]):
        return None
    gets = {u.args[1]: u for u in sp.users if is_call(u, operator.getitem)}
    if set(gets) != {0, 1}:
        return None
    sw = _only_user(gets[1])
    if not (is_call(sw, dsv4.swiglu_clamp.default) and sw.args[0] is gets[0] and sw.args[1] is gets[1]
            and sw.args[4] is False and set(gets[0].users) == {sw}):
        return None
    cast = _only_user(sw)
    if not (is_call(cast, aten.to.dtype) and len(cast.args) == 2):
        return None
    l2 = _only_user(cast)
    if not (is_call(l2, dsv4.fp8_linear.default) and l2.args[0] is cast and l2.args[3:] == (aq, ue)):
        return None
    out = _only_user(l2)
    if not (is_call(out, aten.to.dtype) and out.args[1:] == (torch.float32,)):
        return None
    add = _only_user(out)  # the MoE output: routed sum + shared expert, in fp32
    if not (is_call(add, aten.add.Tensor) and len(add.args) == 2 and out in add.args and not add.kwargs):
        return None
    routed = add.args[0] if add.args[1] is out else add.args[1]
    gates = [u for u in x.users if is_call(u, torch.ops.dsv4c_rt.linear_w16.default) and u.args[0] is x]
    picks = [u for u in x.users if is_call(u, aten.index.Tensor) and u.args[0] is x and len(u.args[1]) == 1]
    if len(gates) != 1 or len(picks) != 1:
        return None
    up = _ancestors(picks[0].args[1][0])
    if up is None or gates[0] in up or any(a.op == "call_function" and a.is_impure() for a in up):
        return None
    return {"gate": gates[0], "pick": picks[0], "pick_up": up, "x": x, "w13": w13, "s13": s13, "w2": l2.args[1],
            "s2": l2.args[2], "aq": aq, "ue": ue, "limit": sw.args[3], "mid": cast.args[1], "routed": routed,
            "add": add, "dead": [add, out, l2, cast, sw, gets[0], gets[1], sp, l1]}


def overlap_shared_experts(gm: fx.GraphModule) -> int:
    """Every shared-expert chain (see the module doc) -> a fork in place of the router's GEMV and a join in
    place of the add with the routed experts; returns how many were rewritten. Runs after
    ``rewrite_w16_linears`` (the router's GEMV is a ``linear_w16`` by then)."""
    g = gm.graph
    order = {n: i for i, n in enumerate(g.nodes)}
    done = 0
    for l1 in call_nodes(g, dsv4.fp8_linear.default):
        m = _match_chain(l1)
        if m is None:
            continue
        gate, pick = m["gate"], m["pick"]
        first = min(gate, pick, key=lambda n: order[n])
        for a in sorted((a for a in m["pick_up"] if order[a] > order[first]), key=order.__getitem__):
            first.prepend(a)  # the rows' index (pure, not downstream of the router) moves up to the fork
        with g.inserting_before(first):  # every routed-expert node depends on the fork's outputs 1 and 2
            fork = g.call_function(torch.ops.dsv4c_rt.shared_expert_fork.default,
                                   (m["x"], m["w13"], m["s13"], m["w2"], m["s2"], m["aq"], m["ue"], m["limit"],
                                    m["mid"], gate.args[1], pick.args[1][0]))
            h = g.call_function(operator.getitem, (fork, 0))
            logits = g.call_function(operator.getitem, (fork, 1))
            rows = g.call_function(operator.getitem, (fork, 2))
        gate.replace_all_uses_with(logits)
        pick.replace_all_uses_with(rows)
        with g.inserting_before(m["add"]):
            join = g.call_function(torch.ops.dsv4c_rt.stream_join.default, (h, m["x"], m["routed"]))
        m["add"].replace_all_uses_with(join)
        for n in [*m["dead"], gate, pick]:
            g.erase_node(n)
        done += 1
    gm.recompile()
    return done


__all__ = ["overlap_shared_experts", "shared_expert_fork", "stream_join", "register_cuda"]
