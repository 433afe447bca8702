"""Load-time rewrites of the inductor backend's graphs for the device they will run on (CUDA).

The artifact's graphs are device-neutral; before Inductor compiles them on a GPU, :func:`prepare_graph`
swaps a few aten patterns for kernels that suit a decode step's few rows:

- ``linear_w16``: bf16-stored weights applied in fp32 (head, MoE gate, compressor / indexer projections)
  stream the bf16 weight instead of an fp32 copy of it (:func:`rewrite_w16_linears`);
- ``hc_pre``: the mHC mix, Sinkhorn split, pre-collapse and the sub-layer's RMSNorm in one launch
  (:func:`fuse_hc_pre`, kernel in ``dsv4c.ops.triton_mhc``), decode only;
- the mHC post-mix ``einsum`` as a product and a 4-term sum that Inductor fuses with the residual update,
  instead of a cuBLAS batched GEMM per sub-layer (:func:`rewrite_hc_post_einsums`), every entry (an 8k
  prefill's batched 4 x 4 GEMMs took 1.7 ms per sub-layer on the H100);
- the remaining narrow fp32 mixes (the head's) as reductions (:func:`rewrite_narrow_fp32_mms`), decode only;
- the indexer's Hadamard rotations as reductions (:func:`rewrite_const_mms`, TUNE ``const_mm_reduction``),
  decode only;
- RoPE as one element-wise expression instead of a stack and a cat (``runtime/rope_rewrite.py``);
- cache row writes as ``index_put_``, which Inductor does in place (``runtime/cache_row_writes.py``);
- the MoE routers' ``topk(...).indices`` as ``dsv4::topk_ids`` (:func:`rewrite_router_topk`), decode only;
- the attention output's grouped projection reading ``wo_a`` as FP8 (``runtime/wo_a_fp8.py``, TUNE
  ``wo_a_fp8``), decode only;
- the shared expert on a second stream beside the routed experts, decode only
  (``runtime/shared_expert_stream.py``);
- equal pure computations of different blocks merged into one node (``runtime/pure_cse.py``, TUNE
  ``cse_pure``), decode only;
- ``narrow_mix``: at prefill the mHC mixes of bf16 streams with a narrow fp32 weight run on the tensor
  cores (the weight split into three exact bf16 terms) instead of a cuBLAS fp32 GEMM with N = 24
  (:func:`rewrite_prefill_mixes`).

Graphs loaded from an artifact's JSON carry no node metadata: shapes and dtypes of weights come from the
manifest's params table (:func:`weight_info_from`). Every rewrite keeps the step's numbers up to fp32
summation order (tests/runtime/test_load_rewrites.py).
"""

from __future__ import annotations

import operator
from typing import Any, Callable, Mapping

import torch
import torch.fx as fx

import dsv4c.ops  # noqa: F401  (registers torch.ops.dsv4)
from dsv4c.errors import BackendUnavailableError
from dsv4c.ops.library import hc_pre_reference
from dsv4c.passes.fxutil import fp32_cast_input, input_names
from dsv4c.program import Program

aten = torch.ops.aten
dsv4 = torch.ops.dsv4


@torch.library.custom_op("dsv4c_rt::linear_w16", mutates_args=())
def linear_w16(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x.float() @ weight.float().t()`` (fp32 out) without an fp32 copy of a bf16 weight on the GPU."""
    return x.float() @ weight.float().t()


@linear_w16.register_fake
def _(x, weight):
    return x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=torch.float32)


def _linear_w16_cuda(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    from dsv4c.ops import triton_kernels as tk  # noqa: PLC0415

    return tk.linear_w16(x, weight)


@torch.library.custom_op("dsv4c_rt::hc_pre", mutates_args=())
def hc_pre(x: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, norm_w: torch.Tensor,
           n: int, iters: int, hc_eps: float, mix_eps: float, norm_eps: float,
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A sub-layer's input from the streams: (RMSNorm(sum_i pre_i x_i), post, comb); see ``triton_mhc``."""
    return hc_pre_reference(x, fn, base, scale, norm_w, n, iters, hc_eps, mix_eps, norm_eps)


@hc_pre.register_fake
def _(x, fn, base, scale, norm_w, n, iters, hc_eps, mix_eps, norm_eps):
    lead = x.shape[:-2]
    return (x.new_empty((*lead, x.shape[-1])), x.new_empty((*lead, n), dtype=torch.float32),
            x.new_empty((*lead, n, n), dtype=torch.float32))


def _hc_pre_cuda(x, fn, base, scale, norm_w, n, iters, hc_eps, mix_eps, norm_eps):
    from dsv4c.ops import triton_mhc  # noqa: PLC0415

    return triton_mhc.hc_pre(x, fn, base, scale, norm_w, n, iters, hc_eps, mix_eps, norm_eps)


_CUDA_READY = False


@torch.library.custom_op("dsv4c_rt::narrow_mix", mutates_args=())
def narrow_mix(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x.float() @ weight.t()`` for a narrow fp32 ``weight`` [R, K] (an mHC mix: R = (2 + n) n)."""
    return x.float() @ weight.t()


@narrow_mix.register_fake
def _(x, weight):
    return x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=torch.float32)


def _narrow_mix_cuda(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """bf16 rows: the transposed product ``weight @ x^T`` through ``linear_w16`` (the fp32 weight as its
    three-term left operand, the rows as its bf16 right operand): exact products, fp32 sums, on the tensor
    cores. Other dtypes: the fp32 matmul."""
    from dsv4c.ops import triton_kernels as tk  # noqa: PLC0415

    if x.dtype != torch.bfloat16 or weight.dtype != torch.float32:
        return x.float() @ weight.t()
    rows = x.reshape(-1, x.shape[-1])
    return tk.linear_w16(weight, rows).t().contiguous().view(*x.shape[:-1], weight.shape[0])


def _register_cuda() -> None:
    global _CUDA_READY
    if _CUDA_READY:
        return
    from dsv4c.ops import triton_kernels as tk  # noqa: PLC0415

    if not tk.register_cuda_kernels():
        raise BackendUnavailableError("The inductor backend on CUDA needs triton, which is not importable.",
                                      "install triton (it ships with CUDA builds of torch).")
    torch.library.register_kernel("dsv4c_rt::linear_w16", "cuda", _linear_w16_cuda)
    torch.library.register_kernel("dsv4c_rt::hc_pre", "cuda", _hc_pre_cuda)
    torch.library.register_kernel("dsv4c_rt::narrow_mix", "cuda", _narrow_mix_cuda)
    from .shared_expert_stream import register_cuda  # noqa: PLC0415

    register_cuda()
    _CUDA_READY = True


def is_call(n: Any, target: Any) -> bool:
    """Whether ``n`` is a graph node calling ``target`` (the rewrites' matching predicate)."""
    return isinstance(n, fx.Node) and n.op == "call_function" and n.target == target


def call_nodes(g: fx.Graph, target: Any) -> list[fx.Node]:
    """The nodes calling ``target``, in graph order, taken before a rewrite inserts or erases any."""
    return list(g.find_nodes(op="call_function", target=target))


def replace_node(old: fx.Node, new: fx.Node) -> None:
    """``new`` (which computes ``old``'s value) takes over ``old``'s users and metadata; ``old`` is erased."""
    new.meta.update(old.meta)
    old.replace_all_uses_with(new)
    old.graph.erase_node(old)


def _rewrite_weight_matmuls(gm: fx.GraphModule,
                            replace: Callable[[fx.Graph, fx.Node, fx.Node], fx.Node | None]) -> int:
    """Every ``matmul(x, t(w))`` for which ``replace(graph, x, w)`` inserts a node (before the matmul) is
    replaced by that node; returns how many were."""
    g = gm.graph
    n_done = 0
    for n in call_nodes(g, aten.matmul.default):
        if len(n.args) != 2 or not is_call(n.args[1], aten.t.default):
            continue
        with g.inserting_before(n):
            new = replace(g, n.args[0], n.args[1].args[0])
        if new is None:
            continue
        replace_node(n, new)
        n_done += 1
    g.eliminate_dead_code()
    gm.recompile()
    return n_done


def rewrite_w16_linears(gm: fx.GraphModule) -> int:
    """``matmul(x.float(), W.float().t())`` -> ``dsv4c_rt.linear_w16(x, W)``: bf16-stored weights applied in
    fp32 (head, MoE gate, compressor and indexer projections). Without it every step would write and
    read an fp32 copy of each such weight (the head alone: 2 GiB per decode step on Flash)."""

    def replace(g: fx.Graph, a: fx.Node, t_in: fx.Node) -> fx.Node | None:
        w = fp32_cast_input(t_in)
        if w is None:
            return None
        x = fp32_cast_input(a) or a
        return g.call_function(torch.ops.dsv4c_rt.linear_w16.default, (x, w))

    return _rewrite_weight_matmuls(gm, replace)


NARROW_MM_MAX_ROWS = 64  # fp32 weights of at most this many rows (the mHC mixes: (2 + n) n = 24 on Flash)


WeightInfo = Callable[[fx.Node], "tuple[tuple[int, ...], torch.dtype] | None"]


def weight_info_from(prog: Program, params: Mapping[str, Mapping[str, Any]] | None) -> WeightInfo:
    """(shape, dtype) of a graph input: its fake value when the graph carries metadata, else its entry in
    the manifest's ``params`` table (graphs loaded from an artifact's JSON have no node metadata)."""
    names = input_names(prog)

    def info(node: fx.Node):
        val = node.meta.get("val")
        if val is not None:
            return tuple(val.shape), val.dtype
        name = names.get(node, "")
        ent = (params or {}).get(name[len("params."):]) if name.startswith("params.") else None
        if ent is None:
            return None
        return tuple(ent["shape"]), getattr(torch, ent["dtype"])

    return info


def _narrow_fp32_weight(w: fx.Node, weight_info: WeightInfo, max_rows: int) -> fx.Node | None:
    """The graph input behind a matmul's weight operand when it is an fp32 matrix of at most ``max_rows``
    rows (an mHC mix), else None. A cast the pipeline leaves when it runs without remove_noop_casts is
    looked through."""
    w = fp32_cast_input(w) or w
    if getattr(w, "op", None) != "placeholder":
        return None
    wi = weight_info(w)
    if wi is None or wi[1] != torch.float32 or len(wi[0]) != 2 or wi[0][0] > max_rows:
        return None
    return w


def rewrite_narrow_fp32_mms(gm: fx.GraphModule, weight_info: WeightInfo,
                            max_rows: int = NARROW_MM_MAX_ROWS) -> int:
    """``matmul(x, W.t())`` with ``W`` an fp32 weight input of at most ``max_rows`` rows ->
    ``(x.unsqueeze(-2) * W).sum(-1)``: for the decode step's few rows a reduction that Inductor generates
    (and fuses with the producers of ``x``) instead of a narrow cuBLAS GEMV per mHC mix (on the H100 ~8 us
    each for 1.5 MB of weight). Same products, fp32 sums in another order (``x`` is fp32 too: matmul
    takes one dtype). ``weight_info``: (shape, dtype) of a placeholder (:func:`weight_info_from`)."""

    def replace(g: fx.Graph, x: fx.Node, w: fx.Node) -> fx.Node | None:
        w = _narrow_fp32_weight(w, weight_info, max_rows)
        if w is None:
            return None
        prod = g.call_function(aten.mul.Tensor, (g.call_function(aten.unsqueeze.default, (x, -2)), w))
        return g.call_function(aten.sum.dim_IntList, (prod, [-1]))

    return _rewrite_weight_matmuls(gm, replace)


def rewrite_prefill_mixes(gm: fx.GraphModule, weight_info: WeightInfo,
                          max_rows: int = NARROW_MM_MAX_ROWS) -> int:
    """``matmul(x.float(), W.t())`` with ``W`` an fp32 weight input of at most ``max_rows`` rows ->
    ``dsv4c_rt.narrow_mix(x, W)``: the prefill's mHC mixes (8192 x 16384 streams times 24 x 16384 on Flash
    took ~1.7 ms each as a cuBLAS fp32 GEMM on the H100, 14 ms of an 8k prefill). ``x`` keeps its own
    dtype (the op computes in fp32 products and sums either way)."""

    def replace(g: fx.Graph, a: fx.Node, w: fx.Node) -> fx.Node | None:
        x = fp32_cast_input(a)
        w = _narrow_fp32_weight(w, weight_info, max_rows)
        if x is None or w is None:
            return None
        return g.call_function(torch.ops.dsv4c_rt.narrow_mix.default, (x, w))

    return _rewrite_weight_matmuls(gm, replace)


def rewrite_const_mms(gm: fx.GraphModule, input_names: Mapping[fx.Node, str],
                      consts: tuple[str, ...] = ("consts.hadamard",)) -> int:
    """``matmul(x, H)`` with ``H`` one of the step's constant inputs ``consts`` (the indexer's 128 x 128
    Walsh-Hadamard rotation of its queries) -> ``(x.unsqueeze(-1) * H).sum(-2)``: at decode a reduction
    Inductor generates (and can fuse with the producer of ``x``) instead of a cuBLAS fp32 SIMT GEMM and its
    split-K reduce (H100, session 13's profile: ~10 us a rotation; the keys' rotation is inside the
    compressor's own op and not matched here). Same products, fp32 sums in another order.
    ``input_names``: each placeholder's input name (``dsv4c.passes.fxutil.input_names``)."""
    g = gm.graph
    n_done = 0
    for n in call_nodes(g, aten.matmul.default):
        if len(n.args) != 2:
            continue
        h = fp32_cast_input(n.args[1]) or n.args[1]
        if getattr(h, "op", None) != "placeholder" or input_names.get(h) not in consts:
            continue
        with g.inserting_before(n):
            prod = g.call_function(aten.mul.Tensor, (g.call_function(aten.unsqueeze.default, (n.args[0], -1)), h))
            new = g.call_function(aten.sum.dim_IntList, (prod, [-2]))
        replace_node(n, new)
        n_done += 1
    g.eliminate_dead_code()
    gm.recompile()
    return n_done


def _skip_casts(n: Any) -> Any:
    while is_call(n, aten.to.dtype):
        n = n.args[0]
    return n


def _only_cast_users(n: fx.Node) -> fx.Node:
    """``n`` followed down through single-user ``aten.to.dtype`` nodes (the casts the reference makes)."""
    while len(n.users) == 1 and is_call(next(iter(n.users)), aten.to.dtype):
        n = next(iter(n.users))
    return n


def _rms_eps(rs: Any, x: Any) -> float | None:
    """eps when ``rs`` is ``rsqrt(mean(x ** 2, -1, keepdim) + eps)``, else None."""
    if not is_call(rs, aten.rsqrt.default) or not is_call(rs.args[0], aten.add.Tensor):
        return None
    mean, eps = rs.args[0].args
    if not (is_call(mean, aten.mean.dim) and list(mean.args[1]) == [-1] and mean.args[2:] == (True,)):
        return None
    sq = mean.args[0]
    if not (is_call(sq, aten.pow.Tensor_Scalar) and sq.args[1] == 2 and sq.args[0] is x):
        return None
    return float(eps) if isinstance(eps, (int, float)) else None


def _match_hc_pre(split: fx.Node) -> dict | None:
    """The nodes of one mHC sub-layer input around ``dsv4.hc_split`` (frontend ``hc_pre`` + ``rms_norm``):
    mix = (xf @ fn.t()) * rsqrt(mean(xf ** 2) + eps); pre, post, comb = hc_split(mix, ...);
    u = (pre[..., None] * x).sum(2), cast; y = u * rsqrt(mean(u ** 2) + eps) * w, cast."""
    mix, base, scale, n, iters, hc_eps = split.args
    if not is_call(mix, aten.mul.Tensor):
        return None
    mm, rs = mix.args
    if not (is_call(mm, aten.matmul.default) and is_call(mm.args[1], aten.t.default)):
        return None
    xf, fn = mm.args[0], _skip_casts(mm.args[1].args[0])
    flat = fp32_cast_input(xf) or xf
    if not (is_call(flat, aten.flatten.using_ints) and flat.args[1:] == (2,)) or fn.op != "placeholder":
        return None
    x = flat.args[0]
    mix_eps = _rms_eps(rs, xf)
    gets = {u.args[1]: u for u in split.users if is_call(u, operator.getitem)}
    if mix_eps is None or set(gets) != {0, 1, 2} or len(gets[0].users) != 1:
        return None
    unsq = next(iter(gets[0].users))
    if not (is_call(unsq, aten.unsqueeze.default) and unsq.args[1] in (3, -1) and len(unsq.users) == 1):
        return None
    prod = next(iter(unsq.users))
    if not (is_call(prod, aten.mul.Tensor) and prod.args[0] is unsq
            and (fp32_cast_input(prod.args[1]) or prod.args[1]) is x and len(prod.users) == 1):
        return None
    tot = next(iter(prod.users))
    if not (is_call(tot, aten.sum.dim_IntList) and list(tot.args[1]) == [2] and len(tot.args) == 2):
        return None
    uf = _only_cast_users(tot)  # u rounded to the activation dtype and back to fp32 (bf16 graphs)
    pw = [u for u in uf.users if is_call(u, aten.pow.Tensor_Scalar)]
    nm = [u for u in uf.users if is_call(u, aten.mul.Tensor)]
    if len(uf.users) != 2 or len(pw) != 1 or len(nm) != 1 or nm[0].args[0] is not uf:
        return None
    norm_eps = _rms_eps(nm[0].args[1], uf)
    if norm_eps is None or len(nm[0].users) != 1:
        return None
    wmul = next(iter(nm[0].users))
    if not (is_call(wmul, aten.mul.Tensor) and wmul.args[0] is nm[0]):
        return None
    w = _skip_casts(wmul.args[1])
    if getattr(w, "op", None) != "placeholder":
        return None
    return {"x": x, "fn": fn, "base": base, "scale": scale, "w": w, "n": n, "iters": iters, "hc_eps": hc_eps,
            "mix_eps": mix_eps, "norm_eps": norm_eps, "post": gets[1], "comb": gets[2],
            "out": _only_cast_users(wmul)}


def fuse_hc_pre(gm: fx.GraphModule) -> int:
    """Each mHC sub-layer input (mix, split, collapse, RMSNorm; :func:`_match_hc_pre`) -> one
    ``dsv4c_rt.hc_pre`` call; returns how many. The head's collapse (no split, no norm) is not one."""
    g = gm.graph
    n_done = 0
    for split in call_nodes(g, dsv4.hc_split.default):
        m = _match_hc_pre(split)
        if m is None:
            continue
        with g.inserting_before(split):
            fused = g.call_function(torch.ops.dsv4c_rt.hc_pre.default,
                                    (m["x"], m["fn"], m["base"], m["scale"], m["w"], m["n"], m["iters"],
                                     m["hc_eps"], m["mix_eps"], m["norm_eps"]))
            outs = [g.call_function(operator.getitem, (fused, i)) for i in range(3)]
        m["out"].replace_all_uses_with(outs[0])
        m["post"].replace_all_uses_with(outs[1])
        m["comb"].replace_all_uses_with(outs[2])
        n_done += 1
    g.eliminate_dead_code()
    gm.recompile()
    return n_done


HC_POST_EQUATION = "bsij,bsid->bsjd"


def rewrite_einsums(gm: fx.GraphModule, equation: str, build: Callable[[fx.Graph, fx.Node, fx.Node], fx.Node]) -> int:
    """Every two-operand ``einsum(equation, a, b)`` -> ``build(graph, a, b)`` (its nodes inserted where the
    einsum was); the number rewritten."""
    g = gm.graph
    n_done = 0
    for n in call_nodes(g, aten.einsum.default):
        if not (n.args[0] == equation and len(n.args[1]) == 2):
            continue
        with g.inserting_before(n):
            new = build(g, *n.args[1])
        replace_node(n, new)
        n_done += 1
    gm.recompile()
    return n_done


def rewrite_hc_post_einsums(gm: fx.GraphModule) -> int:
    """``einsum("bsij,bsid->bsjd", comb, x)`` (the mHC post-mix, n = 4 terms per output) ->
    ``(comb[..., None] * x[..., None, :]).sum(2)``: Inductor fuses it with the residual update into one
    kernel instead of running a cuBLAS batched GEMM (plus a copy of its input) per sub-layer."""
    def product_sum(g: fx.Graph, comb: fx.Node, x: fx.Node) -> fx.Node:
        prod = g.call_function(aten.mul.Tensor, (g.call_function(aten.unsqueeze.default, (comb, -1)),
                                                 g.call_function(aten.unsqueeze.default, (x, 3))))
        return g.call_function(aten.sum.dim_IntList, (prod, [2]))

    return rewrite_einsums(gm, HC_POST_EQUATION, product_sum)


def _topk_indices_only(n: fx.Node) -> bool:
    """``aten.topk(x, k)`` over the last dim, largest first, sorted, of which only the indices are used."""
    dim = n.args[2] if len(n.args) > 2 else n.kwargs.get("dim", -1)
    largest = n.args[3] if len(n.args) > 3 else n.kwargs.get("largest", True)
    ordered = n.args[4] if len(n.args) > 4 else n.kwargs.get("sorted", True)
    return (dim == -1 and largest is True and ordered is True and isinstance(n.args[1], int)
            and bool(n.users) and all(is_call(u, operator.getitem) and u.args[1] == 1 for u in n.users))


def rewrite_router_topk(gm: fx.GraphModule) -> int:
    """The MoE routers' expert choice ``topk(scores + bias, k).indices`` as ``dsv4::topk_ids`` (one Triton
    launch on CUDA instead of torch.topk's gather and sort kernels, ~10 us a layer at decode on the H100).
    The same ids in the same order (largest first) wherever the scores have no ties; on an exact tie the
    smaller expert id comes first, where torch.topk leaves the order open. Returns how many were rewritten."""
    g = gm.graph
    n_done = 0
    for n in call_nodes(g, aten.topk.default):
        if not _topk_indices_only(n):
            continue
        with g.inserting_before(n):
            ids = g.call_function(dsv4.topk_ids.default, (n.args[0], n.args[1], None))
        for u in list(n.users):
            replace_node(u, ids)
        g.erase_node(n)
        n_done += 1
    gm.recompile()
    return n_done


def prepare_graph(prog: Program, device: torch.device, params: Mapping[str, Mapping[str, Any]] | None = None,
                  ) -> dict:
    """Device-specific load-time rewrites of one program (in place); returns what was done. ``params``: the
    manifest's parameter table (shapes and dtypes of the weight inputs)."""
    from dsv4c.ops.triton_kernels import TUNE  # noqa: PLC0415  (imports triton when present)

    done = {}
    if device.type == "cuda":
        done["linear_w16"] = rewrite_w16_linears(prog.graph_module)
        if TUNE["rope_one_expression"]:
            from .rope_rewrite import rope_as_one_expression  # noqa: PLC0415

            done["rope_one_expression"] = rope_as_one_expression(prog.graph_module, device)
        if TUNE["cache_index_put"]:
            from .cache_row_writes import rows_as_index_put  # noqa: PLC0415

            done["cache_index_put"] = rows_as_index_put(prog.graph_module, device)
        if prog.entry == "decode":
            if TUNE["hc_pre_fused"]:
                done["hc_pre"] = fuse_hc_pre(prog.graph_module)
            done["narrow_fp32_mm"] = rewrite_narrow_fp32_mms(prog.graph_module, weight_info_from(prog, params))
            if TUNE["const_mm_reduction"]:
                done["const_mm"] = rewrite_const_mms(prog.graph_module, input_names(prog))
            if TUNE["router_topk_triton"]:
                done["router_topk"] = rewrite_router_topk(prog.graph_module)
            if TUNE["wo_a_fp8"]:
                from .wo_a_fp8 import rewrite_wo_a_fp8  # noqa: PLC0415

                done["wo_a_fp8"] = rewrite_wo_a_fp8(prog.graph_module)
            if TUNE["shared_expert_stream"]:
                from .shared_expert_stream import overlap_shared_experts  # noqa: PLC0415

                done["shared_expert_stream"] = overlap_shared_experts(prog.graph_module)
        elif TUNE["prefill_narrow_mix"]:
            done["narrow_mix"] = rewrite_prefill_mixes(prog.graph_module, weight_info_from(prog, params))
        # every entry: an 8k prefill ran its 8 post-mixes as cuBLAS batched 4 x 4 GEMMs, 1.7 ms each (H100)
        done["hc_post_einsum"] = rewrite_hc_post_einsums(prog.graph_module)
        if prog.entry == "decode" and TUNE["cse_pure"]:  # last: the rewrites above match the unmerged forms
            from .pure_cse import dedupe_pure_nodes  # noqa: PLC0415

            done["cse_pure"] = dedupe_pure_nodes(prog.graph_module)
    return done


__all__ = ["prepare_graph", "rewrite_w16_linears", "fuse_hc_pre", "rewrite_hc_post_einsums",
           "rewrite_narrow_fp32_mms", "rewrite_const_mms", "rewrite_prefill_mixes", "rewrite_router_topk", "weight_info_from", "linear_w16", "hc_pre",
           "narrow_mix", "is_call", "call_nodes", "replace_node", "rewrite_einsums"]
