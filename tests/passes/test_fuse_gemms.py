"""fuse_shared_input_gemms: which GEMMs share a launch, the stacked weights, the names, and what stays."""

from __future__ import annotations

import collections

import torch

from dsv4c.passes.fuse_shared_input_gemms import fused_name
from passes_helpers import PRODUCT_PASSES, passes_only


def test_fused_names():
    assert fused_name(["layers.0.attn.wq_a.weight", "layers.0.attn.wkv.weight"]) == "layers.0.attn.wq_a+wkv.weight"
    assert (fused_name(["layers.1.attn.wq_b.scale", "layers.1.attn.indexer.wq_b.scale"])
            == "layers.1.attn.wq_b+indexer.wq_b.scale")
    assert (fused_name(["layers.2.ffn.experts.w1.packed_weight", "layers.2.ffn.experts.w3.packed_weight"])
            == "layers.2.ffn.experts.w1+w3.packed_weight")


def _ops(prog) -> collections.Counter:
    return collections.Counter(str(n.target) for n in prog.graph_module.graph.nodes if n.op == "call_function")


def test_decode_launches_and_stacked_weights(traced, tiny_params, baseline, tiny_spec):
    combo = ("reference", "bf16", "decode")
    ctx = baseline(combo)[0]
    params = tiny_params("bf16")
    fused = set(PRODUCT_PASSES) - {"schedule_expert_waves"}  # waves would copy the expert GEMMs per wave
    without = fused - {"fuse_shared_input_gemms"}
    before, _, _ = passes_only({"decode": traced(*combo)}, params, ctx, without)
    after, w, records = passes_only({"decode": traced(*combo)}, params, ctx, fused)
    L = tiny_spec.num_layers
    csa = sum(tiny_spec.attn_kind(i) == "csa" for i in range(L))
    hca = sum(tiny_spec.attn_kind(i) == "hca" for i in range(L))
    b, a = _ops(before["decode"]), _ops(after["decode"])
    # the 16-bit weights applied in fp32: an HCA block's compressor wkv + wgate, a CSA block's compressor
    # projections + its indexer's weights_proj; the head and the MoE gates share their input with nothing
    assert b["aten.matmul.default"] - a["aten.matmul.default"] == csa + hca
    # per block wq_a+wkv and shared w1+w3 share a launch; CSA blocks also wq_b + the indexer's wq_b
    assert b["dsv4.fp8_linear.default"] - a["dsv4.fp8_linear.default"] == 2 * L + csa
    assert b["dsv4.fp4_grouped_linear_packed.default"] - a["dsv4.fp4_grouped_linear_packed.default"] == L
    rec = next(r for r in records if r["name"] == "fuse_shared_input_gemms")
    groups = rec["groups"]
    assert len(groups) == 3 * L + csa + csa + hca
    assert a["aten.split_with_sizes.default"] - b["aten.split_with_sizes.default"] == len(groups)  # one each
    # the stacked tensors are the originals concatenated (rows for FP8 and 16-bit, N blocks for packed FP4)
    packed, _ = passes_only({"decode": traced(*combo)}, params, ctx, without)[1:]
    w16 = {name: g for name, g in groups.items() if packed[g["from"][0]].dtype == torch.bfloat16}  # bf16 model
    assert len(w16) == csa + hca
    assert any("compressor.wkv+wgate" in name for name in w16) and not any("ffn.gate" in n or "head" in n for g in w16.values() for n in g["from"])
    for name, g in w16.items():
        assert torch.equal(w[name], torch.cat([packed[n] for n in g["from"]], dim=0)), name
        assert all(n not in w for n in g["from"]) and sum(g["sizes"]) == w[name].shape[0]
    for name, g in groups.items():
        if name in w16:
            continue
        half = len(g["from"]) // 2
        dim = 1 if name.endswith("packed_weight") else 0
        scale = fused_name(g["from"][half:])
        assert torch.equal(w[name], torch.cat([packed[n] for n in g["from"][:half]], dim=dim)), name
        assert torch.equal(w[scale], torch.cat([packed[n] for n in g["from"][half:]], dim=dim)), scale
        assert all(n not in w for n in g["from"])  # the originals left the table
        n_out = w[name].shape[0] if dim == 0 else w[name].shape[1] * w[name].shape[3]
        assert sum(g["sizes"]) == n_out, name
