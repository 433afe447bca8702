"""RoPE as one element-wise expression (runtime/rope_rewrite.py): every apply_rope output of the h100 decode
and prefill graphs is rewritten, and the step's logits and written cache stay bit for bit the same (CPU)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "passes"))  # passes_helpers.py (tests/ has no packages)

from passes_helpers import assert_same_step, call_positions, h100_program  # noqa: E402

from dsv4c.program import Program  # noqa: E402
from dsv4c.runtime.rope_rewrite import rope_as_one_expression  # noqa: E402

aten = torch.ops.aten


@pytest.mark.parametrize("entry", ["decode", "prefill"])
def test_every_rope_is_rewritten_and_the_step_is_bitwise_the_same(tiny_spec, tiny_ckpt, entry):
    ref, w, ctx = h100_program(tiny_spec, tiny_ckpt, entry)
    new = Program.from_json(ref.to_json())
    kinds = [tiny_spec.attn_kind(i) for i in range(tiny_spec.num_layers)]
    # q, kv and the output's inverse rotation in every block, the indexer's q in CSA blocks (the
    # compressors' rotations live inside the fused compress-finish ops)
    want = 3 * len(kinds) + kinds.count("csa")
    assert rope_as_one_expression(new.graph_module, torch.device("cpu")) == want
    assert rope_as_one_expression(new.graph_module, torch.device("cpu")) == 0
    assert not call_positions(new, aten.stack.default)
    assert_same_step(ref, new, w, ctx, entry, seed=14)
