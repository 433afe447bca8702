"""runtime/pure_cse.py: equal pure calls merged, written or random values kept apart, the step unchanged."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.fx as fx

sys.path.insert(0, str(Path(__file__).parents[1] / "passes"))  # passes_helpers.py (tests/ has no packages)

from passes_helpers import assert_same_step, h100_program  # noqa: E402

from dsv4c.program import Program  # noqa: E402
from dsv4c.runtime.pure_cse import dedupe_pure_nodes, is_written  # noqa: E402

aten = torch.ops.aten


def _graph() -> tuple[fx.GraphModule, dict[str, fx.Node]]:
    """x -> two equal aranges, two zeros of which one is written in place (through a view), two equal
    seeded randoms; every value returned."""
    g = fx.Graph()
    x = g.placeholder("x")
    n = {}
    n["ar1"] = g.call_function(aten.arange.default, (8,), {"device": torch.device("cpu")})
    n["ar2"] = g.call_function(aten.arange.default, (8,), {"device": torch.device("cpu")})
    n["sum1"] = g.call_function(aten.add.Tensor, (x, n["ar1"]))
    n["sum2"] = g.call_function(aten.add.Tensor, (x, n["ar2"]))  # equal once ar2 is ar1
    n["z1"] = g.call_function(aten.zeros.default, ([8],), {"device": torch.device("cpu")})
    n["z2"] = g.call_function(aten.zeros.default, ([8],), {"device": torch.device("cpu")})
    view = g.call_function(aten.view.default, (n["z2"], [2, 4]))
    first_two = g.call_function(aten.slice.Tensor, (n["ar1"], 0, 0, 2))
    g.call_function(aten.index_put_.default, (view, [first_two], g.call_function(aten.ones.default, ([2, 4],))))
    n["r1"] = g.call_function(aten.rand.default, ([8],), {"device": torch.device("cpu")})
    n["r2"] = g.call_function(aten.rand.default, ([8],), {"device": torch.device("cpu")})
    g.output((n["sum1"], n["sum2"], n["z1"], n["z2"], n["r1"], n["r2"]))
    return fx.GraphModule(torch.nn.Module(), g), n


def test_equal_pure_calls_merge_and_written_or_random_ones_do_not():
    gm, n = _graph()
    assert is_written(n["z2"]) and not is_written(n["z1"]) and not is_written(n["ar1"])
    x = torch.arange(8.0) * 0.5
    want = gm(x)
    assert dedupe_pure_nodes(gm) == 2  # ar2 into ar1, then sum2 into sum1
    kept = set(gm.graph.nodes)
    assert n["ar2"] not in kept and n["sum2"] not in kept
    assert all(n[k] in kept for k in ("ar1", "sum1", "z1", "z2", "r1", "r2"))
    got = gm(x)
    for a, b in zip(got[:4], want[:4]):
        assert torch.equal(a, b)
    assert got[3][:4].eq(1).all() and not got[2].any()  # z2 written, z1 still zeros
    assert dedupe_pure_nodes(gm) == 0


def test_the_tiny_decode_step_is_bitwise_the_same(tiny_spec, tiny_ckpt):
    """The h100 decode graph of the tiny spec: hundreds of equal per-block computations merged; logits and
    the written cache bit for bit the unmerged step's."""
    prog, w, ctx = h100_program(tiny_spec, tiny_ckpt, "decode")
    new = Program.from_json(prog.to_json())
    before = len(new.graph_module.graph.nodes)
    merged = dedupe_pure_nodes(new.graph_module)
    assert merged >= 100 and len(new.graph_module.graph.nodes) == before - merged
    assert_same_step(prog, new, w, ctx, "decode", seed=3)
