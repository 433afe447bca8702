"""The decode-path Triton kernels compile for Hopper (sm_90) on this CPU machine: tests/ops/hopper_compile.py
in a subprocess (the interpreter tests set TRITON_INTERPRET in this process), with an empty Triton cache so
every case is really compiled."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# not imported here: triton imported before the interpreter tests set TRITON_INTERPRET would compile their
# kernels' helpers instead of interpreting them
if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

SCRIPT = Path(__file__).with_name("hopper_compile.py")
EXPECTED = {"fp8_gemv_tc", "fp8_grouped_gemv_tc_bf16", "w16_gemv_tc", "w16_tiled_mix", "fp4_gemv_tc_nb1", "fp4_gemv_tc_nb2", "fp4_gemv_tc_nb4",
            "fp4_gemv_tc_bn64_nb2", "fp4_gemv_mma_w4", "fp4_gemv_mma_w8",
            "fp8_gemv_mma_m1", "fp8_gemv_mma_m5", "w16_gemv_tc_pdl", "fp4_gemv_mma_w8_pdl", "fp4_gemv_mma_w8_pdl_l2", "fp4_gemv_mma_w8_pdl_unroll2",
            "fp4_gemv_mma_w8_pdl_unroll4",
            "fp8_gemv_mma_m1_pdl", "fp8_gemv_mma_m1_pdl_unroll2",
            "w16_gemv_tc_pdl_prefetch", "fp8_gemv_mma_m1_pdl_prefetch", "fp4_packed_prefill", "fp4_packed_prefill_swap",
            "fp4_packed_prefill_swap_deq_f32", "topk_ids_single", "topk_ids_chunked", "topk_split", "topk_level_scores", "topk_level_final", "hc_split_decode", "hc_pre_decode",
            "hc_pre_decode_one_pass",
            "sparse_attn_packed_decode", "attn_merge_decode", "sparse_attn_packed_decode_no_merge",
            "sparse_attn_prefill", "indexer_score_packed_decode", "indexer_score_packed_prefill", "swiglu_clamp", "argmax_rows", "add_f32",
            "gather_rows",
            *(f"{name}_pdl" for name in ("hc_pre_decode_one_pass", "sparse_attn_packed_decode", "attn_merge_decode",
                                         "topk_split", "swiglu_clamp", "indexer_score_packed_decode", "argmax_rows",
                                         "add_f32", "gather_rows"))}


def test_decode_kernels_compile_for_hopper(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    proc = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=600,
                          cwd=SCRIPT.parents[2])
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    errors = {r["case"]: r["error"] for r in rows if "error" in r}
    assert not errors and proc.returncode == 0, (errors, proc.stderr[-3000:])
    assert {r["case"] for r in rows} == EXPECTED
    for r in rows:
        assert r["cubin_bytes"] > 0, r
        assert r["mma"] == r["wants_mma"], r  # the tensor-core kernels really lower their dots to MMAs
        if "wgmma_pending" in r:  # MMAs left running across the K loop
            assert r["wgmma_pending"] >= r["min_wgmma_pending"], r
        if "byte_loads" in r:
            assert r["byte_loads"] <= r["max_byte_loads"], r
        if "asm_one_per_thread" in r:  # lane-level PTX: element i of its tensors must live in thread i
            assert r["asm_one_per_thread"] is True, r
            # one K tile's 4 scale groups (per tile of an unrolled step), not duplicated per element
            assert r["mma_sync_count"] == r["want_mma_sync"], r
        if r.get("loop_copies") is not None:  # None: no nvdisasm in this triton
            # the one-set loops copy the next tile's registers at the back edge (and so wait for its loads);
            # the register sets that take turns must not
            assert (r["loop_copies"] > 0) == (r["want_loop_copies"] == "some"), r
        if "l2_prefetches" in r:
            assert r["l2_prefetches"] == r["want_l2_prefetches"], r
        if "pdl_wait" in r:  # programmatic dependent launch: wait before any write, then release the next kernel
            assert r["pdl_wait"] and r["pdl_release_after_wait"], r
            assert r["pdl_stores_before_wait"] == 0 and r["pdl_plain_loads_before_wait"] == 0, r
    mix = {r["case"]: r["loop_mix"] for r in rows if r.get("loop_mix") is not None}  # needs nvdisasm
    if mix:
        # the prefill FP4 loop converts each weight element e4m3 -> f16 -> bf16 with one F2F (a 1/8-rate
        # unit); TUNE fp4_prefill_deq_f32 goes through fp32 instead and must not
        assert mix["fp4_packed_prefill_swap"].get("F2F", 0) == 128, mix["fp4_packed_prefill_swap"]
        assert mix["fp4_packed_prefill_swap_deq_f32"].get("F2F", 0) == 0, mix["fp4_packed_prefill_swap_deq_f32"]
    pdl = {r["case"]: r for r in rows if "pdl_wait" in r}
    # the FP8 GEMV's first weight tile is in flight before the wait: 4 16-byte loads a lane
    assert pdl["fp8_gemv_mma_m1_pdl"]["pdl_loads_before_wait"] == 4
    assert pdl["fp8_gemv_mma_m1_pdl_unroll2"]["pdl_loads_before_wait"] == 8  # both register sets
    assert pdl["fp4_gemv_mma_w8_pdl"]["pdl_loads_before_wait"] == 0  # the expert ids come from earlier kernels
    for name, r in pdl.items():
        if not name.startswith("fp8_gemv_mma_m1_pdl"):
            assert r["pdl_loads_before_wait"] == 0, r
        # TUNE pdl_prefetch: the weight rows asked into L2 ahead of the wait (two per lane quad in the FP8 GEMV)
        assert (r["pdl_l2_prefetches_before_wait"] > 0) == name.endswith("_prefetch"), r
