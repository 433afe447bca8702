"""Exact match counts from the spec: tiny (in test_numerics), mini here, the fake-tensor pro graph
when DSV4C_SLOW=1. Weights are meta tensors: counting allocates nothing."""

from __future__ import annotations

import os

import pytest
import torch

from dsv4c.frontend.model import StepContext
from dsv4c.layout import model_tensors
from dsv4c.passes import run_pipeline
from dsv4c.spec import get_variant
from passes_helpers import check_counts, clone_program, expected_sites, trace


def meta_weights(spec, dtype):
    return {k: torch.empty(t.shape, dtype=t.dtype, device="meta") for k, t in model_tensors(spec, dtype).items()}


def test_expected_sites_from_the_spec():
    tiny, mini, pro = (get_variant(v) for v in ("tiny", "mini", "pro"))
    assert expected_sites(tiny)["fuse_compress_indexer"] == {"projection": 2, "finish_pair": 2, "finish": 1,
                                                             "indexer_topk": 2}
    assert expected_sites(mini)["rewrite_swiglu_clamp"] == {"routed": 6, "shared": 6}
    # pro: 61 main blocks = 30 CSA + 31 HCA; its MTP block is not part of the traced step
    assert expected_sites(pro)["fuse_compress_indexer"] == {"projection": 30, "finish_pair": 30, "finish": 31,
                                                            "indexer_topk": 30}
    assert expected_sites(pro)["pack_fp4_experts"] == {"grouped_gemms": 183}


def test_mini_counts(traced):
    spec = get_variant("mini")
    ctx = StepContext(spec, "reference", torch.bfloat16)
    prog = traced("reference", "bf16", "prefill", variant="mini")
    progs = {"prefill": clone_program(prog)}
    w, records = run_pipeline(progs, meta_weights(spec, torch.bfloat16), ctx, "h100", log=lambda m: None)
    check_counts(records, spec, ["prefill"])
    pack = next(r for r in records if r["name"] == "pack_fp4_experts")
    assert pack["layout"]["bn"] == 128 and pack["bytes_after"] < pack["bytes_before"]
    assert all(v.device.type == "meta" for v in w.values())


def test_gpu_pipelines_give_decode_no_expert_waves(traced):
    spec = get_variant("tiny")
    ctx = StepContext(spec, "reference", torch.bfloat16)
    progs = {e: clone_program(traced("reference", "bf16", e, variant="tiny")) for e in ("prefill", "decode")}
    _, records = run_pipeline(progs, meta_weights(spec, torch.bfloat16), ctx, "h100", log=lambda m: None)
    check_counts(records, spec, ["prefill", "decode"], no_waves=("decode",))
    waves = next(r for r in records if r["name"] == "schedule_expert_waves")
    assert "decode is not scheduled" in waves["notes"]
    assert not any("dsv4c_wave" in n.meta for n in progs["decode"].graph_module.graph.nodes)
    assert any("dsv4c_wave" in n.meta for n in progs["prefill"].graph_module.graph.nodes)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("DSV4C_SLOW") != "1", reason="traces pro (minutes); run with DSV4C_SLOW=1")
def test_pro_counts_on_the_fake_tensor_graph():
    spec = get_variant("pro")
    ctx = StepContext(spec, "reference", torch.bfloat16)
    progs = {e: trace(ctx, e, 4096) for e in ("prefill", "decode")}
    w, records = run_pipeline(progs, meta_weights(spec, torch.bfloat16), ctx, "h100", log=lambda m: None)
    check_counts(records, spec, ["prefill", "decode"], no_waves=("decode",))  # GPU pipelines: prefill only
    assert all(v.device.type == "meta" for v in w.values())
