"""Every product pass leaves the logits (and the cache it writes) unchanged, in both numerics modes, in
fp32 and bf16, for prefill and decode, on fresh random inputs; and matches exactly where the spec says."""

from __future__ import annotations

import pytest
import torch

from dsv4c.testing import rel_err
from passes_helpers import COMBOS, PRODUCT_PASSES, check_counts, combo_id, passes_only, run

# fp32: the bound; bf16: one unit in the last place of bf16 (2^-8 relative). Both are upper bounds:
# on this machine every fused op reproduces the chain it replaces bit for bit.
TOL = {"fp32": 1e-5, "bf16": 2.0**-8}
CASES = [(c, p) for c in COMBOS for p in (*PRODUCT_PASSES, "all")]


@pytest.mark.parametrize("combo,pass_name", CASES, ids=[f"{combo_id(c)}-{p}" for c, p in CASES])
def test_pass_on_off_same_logits(combo, pass_name, traced, tiny_params, baseline, tiny_spec):
    numerics, dtype, entry = combo
    ctx, inputs, ref, ref_cache = baseline(combo)
    keep = set(PRODUCT_PASSES) if pass_name == "all" else {pass_name}
    progs, w, records = passes_only({entry: traced(*combo)}, tiny_params(dtype), ctx, keep)
    rec = {r["name"]: r for r in records}
    for p in keep:
        assert rec[p]["matches"][entry] > 0 and not rec[p]["skipped"], rec[p]
    got, cache = run(progs[entry], w, ctx, inputs)
    assert got.dtype == ref.dtype and got.shape == ref.shape
    assert rel_err(got, ref) <= TOL[dtype]
    for k in ref_cache:
        assert rel_err(cache[k], ref_cache[k]) <= TOL[dtype], k
    if pass_name == "all":
        check_counts(records, tiny_spec, [entry], dtype=getattr(torch, {"bf16": "bfloat16", "fp32": "float32"}[dtype]))
        assert not progs[entry].graph_module.graph.eliminate_dead_code()  # the rewrites left nothing dead
