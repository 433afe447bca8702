"""The inductor executor's load-time graph rewrites (run on CUDA before compiling): where they apply and
that they leave the step's numbers unchanged (CPU, tiny spec, fixed seeds)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "passes"))  # passes_helpers.py (tests/ has no packages)

from passes_helpers import (  # noqa: E402
    PRODUCT_PASSES, call_positions, h100_program, passes_only, random_inputs, run, trace)

from dsv4c.frontend.model import StepContext  # noqa: E402
from dsv4c.program import Program  # noqa: E402
from dsv4c.runtime.inductor_executor import _params_table  # noqa: E402
from dsv4c.passes.fxutil import input_names  # noqa: E402
from dsv4c.runtime.load_rewrites import (  # noqa: E402
    fuse_hc_pre, rewrite_const_mms, rewrite_hc_post_einsums, rewrite_narrow_fp32_mms,
    rewrite_w16_linears, weight_info_from)
from dsv4c.testing import rel_err  # noqa: E402

aten = torch.ops.aten


def _fp32_weight_mms(prog, table) -> int:
    """matmuls whose right operand is the transpose of an fp32 graph input (the mHC mixes)."""
    info = weight_info_from(prog, table)
    n = 0
    for node in prog.graph_module.graph.nodes:
        if node.op == "call_function" and node.target == aten.matmul.default:
            t = node.args[1]
            if t.op == "call_function" and t.target == aten.t.default and t.args[0].op == "placeholder":
                n += info(t.args[0])[1] == torch.float32
    return n


def _as_loaded(prog):
    """The program as a load reads it from the artifact's JSON: no node metadata."""
    loaded = Program.from_json(prog.to_json())
    assert all("val" not in n.meta for n in loaded.graph_module.graph.nodes if n.op == "placeholder")
    return loaded


def _same_step(ref_prog, new, w, ctx, seed: int, cache: bool = True, entry: str = "decode") -> None:
    """One step of both programs on the same random inputs: logits (and the written cache) within 1e-5
    relative."""
    inputs = random_inputs(ctx, entry, seed=seed)
    want, want_cache = run(ref_prog, w, ctx, inputs)
    got, got_cache = run(new, w, ctx, inputs)
    assert rel_err(got, want) <= 1e-5
    for k in want_cache if cache else ():
        assert rel_err(got_cache[k], want_cache[k]) <= 1e-5, k


def test_narrow_fp32_mms_become_reductions_with_the_same_logits(tiny_spec, tiny_params_fp32):
    """Exact numerics in fp32: every mHC mix (two per block, one before the head) is rewritten, and the
    decode logits and written cache agree with the matmul form to fp32 rounding."""
    ctx = StepContext(tiny_spec, "exact", torch.float32)
    progs, w, _ = passes_only({"decode": trace(ctx, "decode")}, tiny_params_fp32, ctx, set(PRODUCT_PASSES))
    ref_prog = progs["decode"]
    table = _params_table(ref_prog)  # what the manifest's params table holds
    assert _fp32_weight_mms(ref_prog, table) == 2 * tiny_spec.num_layers + 1
    new = _as_loaded(ref_prog)
    assert rewrite_narrow_fp32_mms(new.graph_module, weight_info_from(new, None)) == 0  # no shapes: no rewrite
    assert rewrite_narrow_fp32_mms(new.graph_module, weight_info_from(new, table)) == 2 * tiny_spec.num_layers + 1
    assert _fp32_weight_mms(new, table) == 0
    _same_step(ref_prog, new, w, ctx, seed=5)


def test_rewrites_of_the_h100_decode_graph(tiny_spec, tiny_ckpt):
    """Reference numerics in bf16 after the h100 pipeline: the bf16 weights applied in fp32 become
    linear_w16 and leave the fp32 mixes to the narrow rewrite; nothing is matched twice."""
    ref_prog, _, _ = h100_program(tiny_spec, tiny_ckpt, "decode")
    table = _params_table(ref_prog)
    prog = _as_loaded(ref_prog)
    gm, info = prog.graph_module, weight_info_from(prog, table)
    n_w16 = rewrite_w16_linears(gm)
    # the head, one MoE gate per block, and the compressor / indexer projections of the compressed blocks
    assert n_w16 >= 1 + tiny_spec.num_layers
    assert rewrite_narrow_fp32_mms(gm, info) == 2 * tiny_spec.num_layers + 1
    assert rewrite_w16_linears(gm) == 0 and rewrite_narrow_fp32_mms(gm, info) == 0
    assert _fp32_weight_mms(prog, table) == 0


def _hadamard_mms(prog) -> int:
    names = input_names(prog)
    return sum(1 for n in prog.graph_module.graph.nodes
               if n.op == "call_function" and n.target == aten.matmul.default
               and names.get(n.args[1]) == "consts.hadamard")


def test_hadamard_rotations_become_reductions_with_the_same_step(tiny_spec, tiny_params_fp32):
    """Exact numerics in fp32: the indexer's query rotation of each CSA block (x @ H with H the Hadamard
    constant) becomes a product and a sum; the decode logits and written cache agree with the matmul form
    to fp32 rounding. Other constant or weight matmuls are left alone."""
    ctx = StepContext(tiny_spec, "exact", torch.float32)
    progs, w, _ = passes_only({"decode": trace(ctx, "decode")}, tiny_params_fp32, ctx, set(PRODUCT_PASSES))
    ref_prog = progs["decode"]
    csa = sum(1 for r in tiny_spec.compress_ratios[:tiny_spec.num_layers] if r == 4)
    assert _hadamard_mms(ref_prog) == csa == 2
    new = _as_loaded(ref_prog)
    mms = len([n for n in new.graph_module.graph.nodes if n.target == aten.matmul.default])
    assert rewrite_const_mms(new.graph_module, input_names(new), consts=("consts.rope.compress",)) == 0
    assert rewrite_const_mms(new.graph_module, input_names(new)) == csa
    assert _hadamard_mms(new) == 0
    assert len([n for n in new.graph_module.graph.nodes if n.target == aten.matmul.default]) == mms - csa
    _same_step(ref_prog, new, w, ctx, seed=6)


def _hc_rewritten(prog):
    """fuse_hc_pre then the post-mix einsum rewrite, as prepare_graph does for decode on CUDA."""
    return fuse_hc_pre(prog.graph_module), rewrite_hc_post_einsums(prog.graph_module)


def test_hc_rewrites_keep_the_exact_step(tiny_spec, tiny_params_fp32):
    """Exact numerics in fp32 (the pipeline removed the no-op casts): every sub-layer's mHC input becomes one
    hc_pre call and every post-mix einsum a product and a sum; logits and cache agree with the graph before."""
    ctx = StepContext(tiny_spec, "exact", torch.float32)
    progs, w, _ = passes_only({"decode": trace(ctx, "decode")}, tiny_params_fp32, ctx, set(PRODUCT_PASSES))
    ref_prog = progs["decode"]
    new = _as_loaded(ref_prog)
    L = tiny_spec.num_layers
    assert len(call_positions(new, aten.einsum.default)) == 3 * L  # post-mix twice per block, wo_a once
    assert _hc_rewritten(new) == (2 * L, 2 * L)
    assert len(call_positions(new, torch.ops.dsv4.hc_split.default)) == 0
    assert len(call_positions(new, torch.ops.dsv4c_rt.hc_pre.default)) == 2 * L
    assert len(call_positions(new, aten.einsum.default)) == L  # wo_a's grouped projection is not a post-mix
    assert _hc_rewritten(new) == (0, 0)
    # the head's mix is left to the narrow rewrite: one fp32 weight matmul remains
    assert _fp32_weight_mms(new, _params_table(ref_prog)) == 1
    _same_step(ref_prog, new, w, ctx, seed=7)


def test_hc_rewrites_of_the_h100_decode_graph(tiny_spec, tiny_ckpt):
    """Reference numerics in bf16 (casts kept) after the h100 pipeline: the same sites match, and the graph
    computes the same step (bf16 casts at the same points as the reference)."""
    ref_prog, w, ctx = h100_program(tiny_spec, tiny_ckpt, "decode")
    new = _as_loaded(ref_prog)
    L = tiny_spec.num_layers
    assert _hc_rewritten(new) == (2 * L, 2 * L)
    assert rewrite_narrow_fp32_mms(new.graph_module, weight_info_from(new, _params_table(ref_prog))) == 1
    _same_step(ref_prog, new, w, ctx, seed=8, cache=False)


def test_prefill_mixes_become_narrow_mix_calls(tiny_spec, tiny_ckpt):
    """Reference numerics in bf16 after the h100 pipeline: every mHC mix of the prefill graph (two per block,
    one before the head) becomes a narrow_mix call on the bf16 streams, once, and the prefill's logits and
    cache are those of the matmul form."""
    from dsv4c.runtime.load_rewrites import rewrite_prefill_mixes

    ref_prog, w, ctx = h100_program(tiny_spec, tiny_ckpt, "prefill")
    table = _params_table(ref_prog)
    new = _as_loaded(ref_prog)
    L = tiny_spec.num_layers
    assert rewrite_prefill_mixes(new.graph_module, weight_info_from(new, table)) == 2 * L + 1
    assert rewrite_prefill_mixes(new.graph_module, weight_info_from(new, table)) == 0
    assert _fp32_weight_mms(new, table) == 0
    assert len(call_positions(new, torch.ops.dsv4c_rt.narrow_mix.default)) == 2 * L + 1
    _same_step(ref_prog, new, w, ctx, seed=9, entry="prefill")


def test_prefill_post_mixes_become_sums_with_the_same_prefill(tiny_spec, tiny_ckpt):
    """Reference numerics in bf16 after the h100 pipeline: prepare_graph's post-mix rewrite applies to the
    prefill graph too (two per block), and the prefill's logits and cache are those of the einsum form."""
    ref_prog, w, ctx = h100_program(tiny_spec, tiny_ckpt, "prefill")
    new = _as_loaded(ref_prog)
    L = tiny_spec.num_layers
    assert rewrite_hc_post_einsums(new.graph_module) == 2 * L
    assert len(call_positions(new, aten.einsum.default)) == L  # wo_a's grouped projection stays
    _same_step(ref_prog, new, w, ctx, seed=10, entry="prefill")


def test_router_topk_becomes_topk_ids_with_the_same_step(tiny_spec, tiny_ckpt):
    """Every top-k routed block's expert choice (only the indices are used) becomes one dsv4::topk_ids call;
    the hash-routed blocks have none. The step is bit for bit the one before (no ties among the scores)."""
    from passes_helpers import assert_same_step

    from dsv4c.runtime.load_rewrites import rewrite_router_topk

    ref_prog, w, ctx = h100_program(tiny_spec, tiny_ckpt, "decode")
    new = _as_loaded(ref_prog)
    routed = sum(tiny_spec.route_kind(i) == "topk" for i in range(tiny_spec.num_layers))
    assert routed >= 1 and len(call_positions(new, aten.topk.default)) == routed
    assert rewrite_router_topk(new.graph_module) == routed
    assert rewrite_router_topk(new.graph_module) == 0
    assert not call_positions(new, aten.topk.default)
    assert len(call_positions(new, torch.ops.dsv4.topk_ids.default)) == routed
    for seed in (9, 10):
        assert_same_step(ref_prog, new, w, ctx, "decode", seed=seed)


def test_router_topk_leaves_a_topk_whose_values_are_used():
    g = torch.fx.Graph()
    x = g.placeholder("x")
    t = g.call_function(aten.topk.default, (x, 2))
    vals = g.call_function(__import__("operator").getitem, (t, 0))
    g.output(vals)
    gm = torch.fx.GraphModule(torch.nn.Module(), g)
    from dsv4c.runtime.load_rewrites import rewrite_router_topk

    assert rewrite_router_topk(gm) == 0
    x = torch.tensor([[0.5, 2.0, -1.0, 3.0]])
    assert torch.equal(gm(x), torch.tensor([[3.0, 2.0]]))
