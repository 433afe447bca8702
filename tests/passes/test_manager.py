"""The pass manager: registry, per-target pipelines, uuids, disabling, provenance, logs and dumps."""

from __future__ import annotations

import json

import pytest
import torch

from dsv4c.errors import ConfigError
from dsv4c.passes import run_pipeline
from dsv4c.passes.dump import find_stage
from dsv4c.passes.manager import REGISTRY
from dsv4c.passes.pipeline import PIPELINES, make_passes
from dsv4c.program import Program
from passes_helpers import PRODUCT_PASSES, clone_program

COMBO = ("reference", "bf16", "decode")
RECORD_KEYS = {"name", "uuid", "matches", "ms", "nodes_before", "nodes_after", "skipped", "notes"}


def test_unknown_pass_names_and_targets_are_config_errors():
    with pytest.raises(ConfigError) as e:
        run_pipeline({}, {}, None, "cpu", disable=["rewrite_swiglu"])
    assert "rewrite_swiglu_clamp" in str(e.value) and "schedule_expert_waves" in str(e.value)
    with pytest.raises(ConfigError):
        make_passes("a100")
    with pytest.raises(ConfigError):
        make_passes("cpu", {"schedule_expert_waves": {"waves": 2}})
    assert set(PIPELINES) == {"cpu", "h100", "h200"}
    for target, steps in PIPELINES.items():
        assert {n for n, _ in steps} >= set(PRODUCT_PASSES) and all(n in REGISTRY for n, _ in steps)


def test_uuids_hash_source_and_config():
    a = make_passes("cpu")
    b = make_passes("cpu", {"schedule_expert_waves": {"num_waves": 4}})
    assert [p.uuid() for p in a] == [p.uuid() for p in make_passes("cpu")]
    assert len({p.uuid() for p in a}) == len(a)  # no two passes share a uuid, even from one module
    diff = [p.name for p, q in zip(a, b) if p.uuid() != q.uuid()]
    assert diff == ["schedule_expert_waves"]
    h100 = {p.name: p.uuid() for p in make_passes("h100")}
    assert h100["pack_fp4_experts"] != {p.name: p.uuid() for p in a}["pack_fp4_experts"]  # other tile


def test_records_logs_provenance_disable_and_dumps(tmp_path, traced, tiny_params, tiny_spec, baseline):
    ctx, *_ = baseline(COMBO)
    progs = {"decode": clone_program(traced(*COMBO))}
    logs: list[str] = []
    dump = tmp_path / "dump"
    w, records = run_pipeline(progs, tiny_params("bf16"), ctx, "cpu", ["pack_fp4_experts"], dump, logs.append)
    names = [n for n, _ in PIPELINES["cpu"]]
    assert [r["name"] for r in records] == names
    assert len(logs) == len(names) and all(line.startswith(f"pass {k:02d} ") for k, line in enumerate(logs, 1))
    for r in records:
        assert RECORD_KEYS <= set(r) and set(r["matches"]) == {"decode"}
    off = records[names.index("pack_fp4_experts")]
    assert off["skipped"] and "disabled" in off["notes"] and off["nodes_before"] == off["nodes_after"]
    assert any(n.endswith("experts.w1.weight") for n in progs["decode"].param_names)  # left unpacked
    assert "layers.0.ffn.experts.w1.weight" in w and "layers.0.ffn.experts.w1.packed_weight" not in w
    # provenance, also through the artifact's JSON form
    g = progs["decode"].graph_module.graph
    fused = [n for n in g.nodes if n.op == "call_function" and n.target is torch.ops.dsv4.swiglu_clamp.default]
    # per block: the shared expert's, and the routed experts' copied into each of the 2 waves
    assert len(fused) == tiny_spec.num_layers * (1 + 2)
    by_pass = {}
    for n in g.nodes:
        by_pass.setdefault(n.meta.get("dsv4c_pass"), []).append(n)
    assert {n.meta["dsv4c_pass"] for n in fused} == {"rewrite_swiglu_clamp", "schedule_expert_waves"}
    pair = [n for n in g.nodes if n.op == "call_function" and n.target is torch.ops.dsv4.compress_finish_pair.default]
    assert len(pair) == 2 and all(n.meta["dsv4c_pass"] == "fuse_compress_indexer" for n in pair)
    again = Program.from_json(progs["decode"].to_json())
    assert sum(n.meta.get("dsv4c_pass") == "fuse_compress_indexer" for n in again.graph_module.graph.nodes) == \
        len(by_pass["fuse_compress_indexer"])
    # the caller's weights are untouched; the returned table is rewritten
    assert "layers.1.attn.compressor.wkv.weight" in tiny_params("bf16")
    # (fuse_shared_input_gemms then stacks the fused compressor projection with the indexer's weights_proj)
    assert "layers.1.attn.compressor.wkv.weight" not in w
    assert "layers.1.attn.compressors.wkv_wgate+indexer.weights_proj.weight" in w
    # dumps
    index = json.loads((dump / "index.json").read_text())
    assert [p["name"] for p in index["passes"]] == [n for n in names if n != "pack_fp4_experts"]
    stem, when = find_stage(index, "rewrite_swiglu_clamp", "decode")
    assert (stem, when) == ("03_rewrite_swiglu_clamp.decode", "after")
    for ext in (".before.py", ".after.py", ".diff", ".dot"):
        assert (dump / f"{stem}{ext}").stat().st_size > 0
    diff = (dump / f"{stem}.diff").read_text()
    assert "+" in diff and "dsv4.swiglu_clamp" in diff and "-    " in diff and "silu" in diff
    assert "# [block 1], <- rewrite_swiglu_clamp" in (dump / f"{stem}.after.py").read_text()
    dot = (dump / f"{stem}.dot").read_text()
    assert dot.startswith("digraph") and "swiglu_clamp" in dot and "cluster_removed" in dot
    assert find_stage(index, "traced", "decode") == ("01_eliminate_dead_code.decode", "before")
