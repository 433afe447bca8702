"""End to end through `dsv4c build`: artifacts with and without the product passes serve the same
logits, and `dsv4c inspect` shows the pipeline, the memory plan and every dumped stage."""

from __future__ import annotations

import json

import pytest
import torch

import dsv4c.lowering.build as build_mod
from dsv4c.errors import InputError
from dsv4c.inspect_artifact import inspect_artifact
from dsv4c.lowering.build import BuildRequest, build
from dsv4c.runtime import Engine
from passes_helpers import MAX_SEQ, PRODUCT_PASSES, clone_program


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, traced):
    """(with passes + dumps, without product passes): built from the session's traced graphs."""
    root = tmp_path_factory.mktemp("art")
    mp = pytest.MonkeyPatch()
    mp.setattr(build_mod, "trace_program", lambda ctx, entry, cfg, log=None: clone_program(
        traced(ctx.numerics, {torch.bfloat16: "bf16", torch.float32: "fp32"}[ctx.dtype], entry)))
    try:
        common = dict(variant="tiny", numerics="reference", dtype="bf16", max_seq_len=MAX_SEQ, max_batch=2)
        on = build(BuildRequest(output=root / "on", dump_passes=root / "dump", **common), progress=lambda m: None)
        off = build(BuildRequest(output=root / "off", disable_passes=list(PRODUCT_PASSES), **common),
                    progress=lambda m: None)
    finally:
        mp.undo()
    return on.output, off.output


def test_served_logits_equal_with_and_without_passes(artifacts):
    on, off = (Engine.load(a) for a in artifacts)
    ids = torch.randint(0, on.vocab_size, (1, 16), generator=torch.Generator().manual_seed(7))
    a, b = on.prefill(ids[:, :13]), off.prefill(ids[:, :13])
    assert torch.equal(a, b)
    for t in range(13, 16):
        assert torch.equal(on.decode(ids[:, t]), off.decode(ids[:, t])), t


def test_inspect_tables(artifacts):
    on, off = artifacts
    text = inspect_artifact(on)
    for name in ("fuse_compress_indexer", "rewrite_swiglu_clamp", "pack_fp4_experts", "schedule_expert_waves",
                 "remove_noop_casts", "uuid", "nodes prefill", "routed experts (FP4)", "KV cache", "peak activations",
                 "bfloat16", "uint8"):
        assert name in text, name
    doc = json.loads(inspect_artifact(on, as_json=True))
    pack = next(r for r in doc["pipeline"] if r["name"] == "pack_fp4_experts")
    fp4 = doc["memory"]["fp4_experts"]
    assert (fp4["bytes_before"], fp4["bytes_after"]) == (pack["bytes_before"], pack["bytes_after"])
    assert fp4["bytes_after"] < fp4["bytes_before"]
    assert doc["memory"]["peak_activation_estimate"]["prefill"]["peak"] > 0
    off_doc = json.loads(inspect_artifact(off, as_json=True))
    assert off_doc["memory"]["fp4_experts"] is None and off_doc["pipeline_uuid"] != doc["pipeline_uuid"]
    assert "(off)" in inspect_artifact(off)


def test_inspect_graphs_and_stages(artifacts):
    on, off = artifacts
    final = inspect_artifact(on, graph="prefill")
    assert "dsv4.swiglu_clamp" in final and "<- rewrite_swiglu_clamp" in final and "wave 1" in final
    traced_code = inspect_artifact(on, graph="decode", stage="traced")
    assert "swiglu_clamp" not in traced_code and "silu" in traced_code
    after = inspect_artifact(on, graph="decode", stage="rewrite_swiglu_clamp")
    assert "swiglu_clamp" in after and "fp4_grouped_linear_packed" not in after
    diff = inspect_artifact(on, graph="prefill", diff=["rewrite_swiglu_clamp", "pack_fp4_experts"])
    assert diff.startswith("--- prefill@rewrite_swiglu_clamp") and "+" in diff and "packed_weight" in diff
    with pytest.raises(InputError):
        inspect_artifact(on, graph="prefill", stage="no_such_pass")
    with pytest.raises(InputError):
        inspect_artifact(off, graph="prefill", stage="rewrite_swiglu_clamp")  # built without --dump-passes
    assert "swiglu_clamp" not in inspect_artifact(off, graph="prefill")
