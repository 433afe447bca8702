"""RoPE as one element-wise expression (runtime/rope_rewrite.py): every apply_rope output of the h100 decode
and prefill graphs is rewritten, and the step's logits and written cache stay bit for bit the same (CPU)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "passes"))  # passes_helpers.py (tests/ has no packages)

from passes_helpers import PRODUCT_PASSES, passes_only, random_inputs, run, trace  # noqa: E402

from dsv4c.checkpoint import load_checkpoint, to_model_params  # noqa: E402
from dsv4c.frontend.model import StepContext  # noqa: E402
from dsv4c.program import Program  # noqa: E402
from dsv4c.runtime.rope_rewrite import rope_as_one_expression  # noqa: E402

aten = torch.ops.aten


def _bytes(t):
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


@pytest.mark.parametrize("entry", ["decode", "prefill"])
def test_every_rope_is_rewritten_and_the_step_is_bitwise_the_same(tiny_spec, tiny_ckpt, entry):
    ctx = StepContext(tiny_spec, "reference", torch.bfloat16)
    w = to_model_params(tiny_spec, load_checkpoint(tiny_ckpt, tiny_spec), torch.bfloat16)
    progs, w, _ = passes_only({entry: trace(ctx, entry)}, w, ctx, set(PRODUCT_PASSES), target="h100")
    ref = progs[entry]
    new = Program.from_json(ref.to_json())
    kinds = [tiny_spec.attn_kind(i) for i in range(tiny_spec.num_layers)]
    # q, kv and the output's inverse rotation in every block, the indexer's q in CSA blocks (the
    # compressors' rotations live inside the fused compress-finish ops)
    want = 3 * len(kinds) + kinds.count("csa")
    assert rope_as_one_expression(new.graph_module, torch.device("cpu")) == want
    assert rope_as_one_expression(new.graph_module, torch.device("cpu")) == 0
    assert not any(n.op == "call_function" and n.target == aten.stack.default for n in new.graph_module.graph.nodes)
    inputs = random_inputs(ctx, entry, seed=14)
    got, got_cache = run(new, w, ctx, inputs)
    want_logits, want_cache = run(ref, w, ctx, inputs)
    assert torch.equal(got, want_logits)
    for k in want_cache:
        assert torch.equal(_bytes(got_cache[k]), _bytes(want_cache[k])), k
