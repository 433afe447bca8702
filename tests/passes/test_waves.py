"""schedule_expert_waves: every routed expert in exactly one wave, outputs identical for 1, 2 and 4
waves, dispatch of wave i+1 ordered before the GEMMs of wave i, and the schedule saved with the graph."""

from __future__ import annotations

import torch

from dsv4c.program import Program
from dsv4c.testing import rel_err
from passes_helpers import PRODUCT_PASSES, passes_only, run

TOL = {"fp32": 1e-5, "bf16": 2.0**-8}


def test_waves_1_2_4_identical(traced, tiny_params, baseline, tiny_spec):
    combo = ("reference", "bf16", "decode")  # batch-symbolic rows; prefill is covered by test_numerics
    numerics, dtype, entry = combo
    ctx, inputs, ref, ref_cache = baseline(combo)
    E = tiny_spec.n_routed_experts
    outs = {}
    for W in (1, 2, 4):
        progs, w, records = passes_only({entry: traced(*combo)}, tiny_params(dtype), ctx, set(PRODUCT_PASSES),
                                        config={"schedule_expert_waves": {"num_waves": W}})
        prog = progs[entry]
        rec = next(r for r in records if r["name"] == "schedule_expert_waves")
        assert rec["matches"][entry] == tiny_spec.num_layers and rec["config"] == {"num_waves": W, "entries": ("prefill", "decode")}
        sched = prog.meta["expert_waves"]
        assert len(sched) == tiny_spec.num_layers
        for block, s in sched.items():
            experts = [e for lo, hi in s["waves"] for e in range(lo, hi)]
            assert sorted(experts) == list(range(E)) and len(experts) == E  # each expert in exactly one wave
            want = ["dispatch 0"] + [x for i in range(W) for x in ([f"dispatch {i + 1}"] if i + 1 < W else [])
                                     + [f"experts {i}"]] + (["combine"] if W > 1 else [])
            assert s["order"] == want, (block, s["order"])
        tagged = {}
        for n in prog.graph_module.graph.nodes:
            if "dsv4c_wave" in n.meta:
                tagged.setdefault(n.meta["dsv4c_wave"], []).append(n)
                assert n.meta["dsv4c_pass"] == "schedule_expert_waves"
        assert sorted(tagged) == list(range(W))
        grouped = [n for n in prog.graph_module.graph.nodes
                   if n.op == "call_function" and "grouped_linear" in str(n.target)]
        assert len(grouped) == 2 * W * tiny_spec.num_layers  # w1+w3 stacked (fuse_shared_input_gemms), w2
        # the wave tags survive the artifact's JSON form
        again = Program.from_json(prog.to_json())
        assert sum("dsv4c_wave" in n.meta for n in again.graph_module.graph.nodes) == sum(map(len, tagged.values()))
        outs[W], cache = run(prog, w, ctx, inputs)
        assert rel_err(outs[W], ref) <= TOL[dtype]
    assert torch.equal(outs[1], outs[2]) and torch.equal(outs[2], outs[4])


def test_more_waves_than_experts_is_one_expert_per_wave(traced, tiny_params, baseline, tiny_spec):
    combo = ("reference", "bf16", "decode")
    ctx, *_ = baseline(combo)
    progs, _, records = passes_only({"decode": traced(*combo)}, tiny_params("bf16"), ctx, {"schedule_expert_waves"},
                                    config={"schedule_expert_waves": {"num_waves": 100}})
    waves = next(r for r in records if r["name"] == "schedule_expert_waves")["waves"]["decode"]
    assert waves == [[e, e + 1] for e in range(tiny_spec.n_routed_experts)]
