"""Cache row writes as index_put_ (runtime/cache_row_writes.py): every compressed-entry write of the decode
and prefill graphs is rewritten, and the step's logits and written cache stay bit for bit the same (CPU)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "passes"))  # passes_helpers.py (tests/ has no packages)

from passes_helpers import assert_same_step, call_positions, h100_program  # noqa: E402

from dsv4c.program import Program  # noqa: E402
from dsv4c.runtime.cache_row_writes import rows_as_index_put  # noqa: E402

aten = torch.ops.aten


@pytest.mark.parametrize("numerics, dtype, storage", [("reference", torch.bfloat16, "packed"),
                                                      ("exact", torch.float32, None)])
@pytest.mark.parametrize("entry", ["decode", "prefill"])
def test_row_writes_become_index_puts_with_the_same_step(tiny_spec, tiny_ckpt, entry, numerics, dtype, storage):
    ref, w, ctx = h100_program(tiny_spec, tiny_ckpt, entry, numerics, dtype)
    assert (ctx.kv_storage == "packed") == (storage == "packed")
    new = Program.from_json(ref.to_json())  # as a load reads it (no shapes: the pattern is the evidence)
    # compressed blocks: packed entries are 3 parts (FP8 nope, scales, rope) + 2 indexer parts (codes, scales)
    # in a CSA block, 3 in an HCA block; unpacked: one tensor each
    kinds = [tiny_spec.attn_kind(i) for i in range(tiny_spec.num_layers)]
    per = {"csa": 5, "hca": 3} if storage == "packed" else {"csa": 2, "hca": 1}
    want = sum(per.get(k, 0) for k in kinds)
    assert len(call_positions(new, aten.scatter_.src)) == want
    assert rows_as_index_put(new.graph_module, torch.device("cpu")) == want
    assert not call_positions(new, aten.scatter_.src)
    assert len(call_positions(new, aten.index_put_.default)) == want
    assert rows_as_index_put(new.graph_module, torch.device("cpu")) == 0
    assert_same_step(ref, new, w, ctx, entry, seed=12)
