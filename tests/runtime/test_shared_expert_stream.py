"""The decode graph's shared experts as fork / join pairs (runtime/shared_expert_stream.py): where the
rewrite applies, where it puts the two ops, and that the step's numbers do not change (CPU, tiny spec)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "passes"))  # passes_helpers.py (tests/ has no packages)

from passes_helpers import assert_same_step, call_positions, h100_program, random_inputs  # noqa: E402

from dsv4c.program import Program  # noqa: E402
from dsv4c.runtime.load_rewrites import rewrite_w16_linears  # noqa: E402
from dsv4c.runtime.shared_expert_stream import overlap_shared_experts  # noqa: E402

dsv4 = torch.ops.dsv4
rt = torch.ops.dsv4c_rt


def test_every_shared_expert_becomes_a_fork_and_a_join_around_the_routed_experts(tiny_spec, tiny_ckpt):
    ref, _, _ = h100_program(tiny_spec, tiny_ckpt, "decode")
    new = Program.from_json(ref.to_json())  # as a load reads it (no node metadata)
    L = tiny_spec.num_layers
    assert overlap_shared_experts(new.graph_module) == 0  # the router's GEMV is not a linear_w16 yet
    rewrite_w16_linears(new.graph_module)
    n_w16 = len(call_positions(new, rt.linear_w16.default))
    n_fp8_before = len(call_positions(new, dsv4.fp8_linear.default))
    assert overlap_shared_experts(new.graph_module) == L
    assert overlap_shared_experts(new.graph_module) == 0  # nothing left to match
    assert len(call_positions(new, dsv4.fp8_linear.default)) == n_fp8_before - 2 * L
    assert len(call_positions(new, dsv4.swiglu_clamp.default)) == L  # the routed experts' own
    assert len(call_positions(new, rt.linear_w16.default)) == n_w16 - L  # the routers' GEMVs are in the forks
    forks, joins = call_positions(new, rt.shared_expert_fork.default), call_positions(new, rt.stream_join.default)
    routed = call_positions(new, dsv4.fp4_grouped_linear_packed.default)
    assert len(forks) == len(joins) == L and len(routed) == 2 * L
    for i in range(L):
        # fork, then the layer's two routed-expert launches, then the join, which takes their sum
        assert forks[i] < routed[2 * i] < routed[2 * i + 1] < joins[i]
    for n in new.graph_module.graph.nodes:
        if n.op == "call_function" and n.target == rt.stream_join.default:
            assert n.args[2].target == torch.ops.aten.index_add.default


def test_the_rewritten_decode_step_computes_the_same_logits_and_cache(tiny_spec, tiny_ckpt):
    ref, w, ctx = h100_program(tiny_spec, tiny_ckpt, "decode")
    new = Program.from_json(ref.to_json())
    rewrite_w16_linears(new.graph_module)
    assert overlap_shared_experts(new.graph_module) == tiny_spec.num_layers
    rewrite_w16_linears(ref.graph_module)  # the reference: the same graph without the fork / join pairs
    # the same ops in the same order on the CPU (an fp32 add commutes)
    assert_same_step(ref, new, w, ctx, "decode", seed=11)


def test_inductor_issues_each_fork_before_and_each_join_after_its_routed_experts(tiny_spec, tiny_ckpt):
    """The order Inductor gives the extern calls in its generated code (CPU codegen, the same scheduler as
    on CUDA): per MoE layer fork, the two routed-expert GEMVs, join. Two earlier forms of the rewrite
    compiled to fork and join next to each other, i.e. no overlap."""
    import re

    from torch._inductor.utils import run_and_get_code

    from dsv4c.frontend.model import constants
    from dsv4c.runtime.inductor_executor import compile_program

    ref, w, ctx = h100_program(tiny_spec, tiny_ckpt, "decode")
    prog = Program.from_json(ref.to_json())
    rewrite_w16_linears(prog.graph_module)
    assert overlap_shared_experts(prog.graph_module) == tiny_spec.num_layers
    prog.recompile()
    cache, ids, start = random_inputs(ctx, "decode", seed=13)
    consts = constants(tiny_spec)
    src = {"params": w, "consts": consts, "cache": cache}
    flat = [ids if n == "input_ids" else start if n == "start_pos" else src[n.split(".", 1)[0]][n.split(".", 1)[1]]
            for n in prog.input_names]
    with torch.no_grad():
        _, code = run_and_get_code(compile_program(prog, torch.device("cpu"), dynamic=False), *flat)
    calls = re.findall(r'dispatcher\("(dsv4c_rt::shared_expert_fork|dsv4c_rt::stream_join|'
                       r'dsv4::fp4_grouped_linear_packed)"', "\n".join(code))
    assert calls == ["dsv4c_rt::shared_expert_fork", "dsv4::fp4_grouped_linear_packed",
                     "dsv4::fp4_grouped_linear_packed", "dsv4c_rt::stream_join"] * tiny_spec.num_layers
