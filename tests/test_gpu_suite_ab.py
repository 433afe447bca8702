"""``gpu_suite.py --ab``: each TUNE switch flipped alone for a decode A/B on the same artifact, then restored
(run here on the CPU with an eager tiny artifact; on the GPU the flipped switch changes the load-time
rewrites of a fresh inductor engine)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))

import gpu_suite  # noqa: E402

from dsv4c.lowering.build import BuildRequest, build  # noqa: E402
from dsv4c.ops import triton_kernels as tk  # noqa: E402
from dsv4c.runtime import Engine  # noqa: E402


def test_ab_flips_one_switch_at_a_time_and_restores_it(tmp_path, monkeypatch):
    out = tmp_path / "tiny"
    build(BuildRequest(output=out, variant="tiny", numerics="reference", dtype="fp32", max_seq_len=128,
                       max_batch=1), progress=lambda m: None)
    before = dict(tk.TUNE)
    main = {"hbm": {"bytes_per_s": 1e12},
            "decode": [{"batch": 1, "context": 64, "step_ms": 2.0, "bytes_per_step": {"total": 10 ** 9}}]}
    seen = {}
    load = Engine.load

    def spy(path, device="cpu"):  # what the switch reads while the engine loads
        seen.setdefault("shared_expert_stream", tk.TUNE["shared_expert_stream"])  # the first A/B flips it
        return load(path, device=device)

    probe = gpu_suite.decode_probe(Engine.load(out, device="cpu"), 64, steps=3)
    assert probe.shape == (3, 256) and torch.isfinite(probe).all()
    monkeypatch.setattr(Engine, "load", spy)
    res = gpu_suite.ab_switches(out, ["shared_expert_stream", "fp4_mma_warps", "no_such_switch", "pdl+triton_argmax",
                                      "fp8_mma_warps=8+fp4_mma_split=None", "default", "default"],
                                main, deadline=1e9, device="cpu", context=64, probe=probe)
    assert seen == {"shared_expert_stream": not before["shared_expert_stream"]}
    assert tk.TUNE == before  # every switch restored
    r = res["shared_expert_stream"]
    assert r["shared_expert_stream"] is (not before["shared_expert_stream"]) and r["batch"] == 1
    assert r["context"] == 64 and r["default_step_ms"] == 2.0 and r["step_ms"] > 0
    assert r["hbm_fraction"] == round(1e9 / (r["step_ms"] / 1e3) / 1e12, 3)
    # the switch only rewrites CUDA graphs: on the CPU the probe's logits are the same bits
    assert r["vs_default"] == {"steps": 3, "bitwise_equal_steps": 3, "max_rel_err": 0.0, "argmax_agree": 3,
                               "finite": True}
    both = res["pdl+triton_argmax"]  # flipped together
    assert both["pdl"] is (not before["pdl"]) and both["triton_argmax"] is (not before["triton_argmax"])
    assert both["vs_default"]["bitwise_equal_steps"] == 3
    assert res["default"]["vs_default"]["bitwise_equal_steps"] == 3 and "default#2" in res  # both controls kept
    knobs = res["fp8_mma_warps=8+fp4_mma_split=None"]  # integer knobs set, then restored
    assert knobs["fp8_mma_warps"] == 8 and knobs["fp4_mma_split"] is None
    assert knobs["vs_default"]["bitwise_equal_steps"] == 3
    assert "not a boolean switch" in res["fp4_mma_warps"]["error"]
    assert "does not exist" in res["no_such_switch"]["error"]
    assert torch.isfinite(torch.tensor(r["step_ms"]))


def test_ab_settings_parses_switches_and_knobs():
    tune = {"pdl": True, "fp8_mma_warps": 4, "fp4_mma_split": 4}
    assert gpu_suite.ab_settings("pdl+fp8_mma_warps=8", tune) == {"pdl": False, "fp8_mma_warps": 8}
    assert gpu_suite.ab_settings("fp4_mma_split=None", tune) == {"fp4_mma_split": None}
    assert gpu_suite.ab_settings("default", tune) == {}
    for bad, msg in (("fp8_mma_warps", "not a boolean switch"), ("pdl=1", "is a boolean switch"),
                     ("fp8_mma_warps=x", "must be an integer or None"), ("nope=1", "does not exist")):
        try:
            gpu_suite.ab_settings(bad, tune)
        except ValueError as e:
            assert msg in str(e), (bad, e)
        else:
            raise AssertionError(f"{bad!r} was accepted")


def test_probe_agreement_counts_bitwise_steps_and_argmax():
    want = torch.tensor([[0.0, 1.0, 2.0], [3.0, 1.0, 0.5]])
    got = want.clone()
    got[1, 0] = 0.25  # step 1 changes its argmax
    r = gpu_suite.probe_agreement(got, want)
    assert r["steps"] == 2 and r["bitwise_equal_steps"] == 1 and r["argmax_agree"] == 1 and r["finite"]
    assert abs(r["max_rel_err"] - gpu_suite.rel_err(got[1], want[1])) < 1e-12 and r["max_rel_err"] > 0.5


def test_decode_only_load_and_chain_need_no_prefill(tmp_path, monkeypatch):
    """``--decode-only``: the engine's first step and the chain-vs-loop check start from a cache fill; no
    prefill runs (the GPU call then compiles none)."""
    from dsv4c import bench

    out = tmp_path / "tiny"
    build(BuildRequest(output=out, variant="tiny", numerics="reference", dtype="fp32", max_seq_len=128,
                       max_batch=1), progress=lambda m: None)

    def no_prefill(self, ids):  # noqa: ANN001, ANN202
        raise AssertionError("prefill ran")

    monkeypatch.setattr(Engine, "prefill", no_prefill)
    eng, load = bench.load_engine(out, torch.device("cpu"), log=lambda m: None, first_prefill=False)
    assert eng.lengths == [17] and load["first_decode_s"] > 0  # the 16-token fill, then one step
    r = gpu_suite.chain_vs_loop_decode(eng, 64, 6)
    assert r == {"steps": 6, "context": 64, "agree": 6, "first_difference": None}
    assert eng.lengths == [70]


def test_determinism_flags_a_chain_or_probe_that_does_not_repeat():
    good = {"chain_vs_loop": {"steps": 64, "agree": 64}, "probe_repeat": {"steps": 16, "bitwise_equal_steps": 16}}
    assert gpu_suite.determinism(good) == {"chain_agrees": True, "probe_repeats": True, "ok": True}
    racy = {"chain_vs_loop": {"steps": 32, "agree": 15}, "probe_repeat": good["probe_repeat"]}  # session 12, run b
    assert gpu_suite.determinism(racy)["ok"] is False
    flaky = {**good, "probe_repeat": {"steps": 16, "bitwise_equal_steps": 15}}
    assert gpu_suite.determinism(flaky) == {"chain_agrees": True, "probe_repeats": False, "ok": False}
    failed = {"chain_vs_loop": {"error": "RuntimeError: x"}}  # a check that did not run proves nothing
    assert gpu_suite.determinism(failed) == {"chain_agrees": None, "probe_repeats": None, "ok": False}
