"""benchmarks/pick_tune.py: which TUNE overrides a device call's own measurements select."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "pick_tune.py"
spec = importlib.util.spec_from_file_location("pick_tune", SCRIPT)
pick_tune = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pick_tune)


def _variant(us: float, ok: bool = True, **tune) -> dict:
    return {"tune": tune, "ok": ok, "us": {"all": us}}


def _topk(case: str, ms: float, base: float | None, ok: bool = True) -> dict:
    return {"case": case, "ok": ok, "ms": ms, "baseline_ms": base}


def test_fastest_correct_variant_wins(tmp_path):
    gemv = {"variants": {"default": _variant(1150.0), "fp4_kb4": _variant(1010.0, fp4_tc_kblocks=4),
                         "fast_but_wrong": _variant(900.0, ok=False, fp4_tc_bn=32),
                         "broken": {"tune": {"x": 1}, "error": "CompilationError"}}}
    topk = {"results": [_topk("topk_ids B=1 S=1 E=2048 k=512", 0.010, 0.030),
                        _topk("topk_ids B=1 S=8192 E=2048 k=512", 0.9, 0.5)]}  # prefill slower: not a decode case
    (tmp_path / "g.json").write_text(json.dumps(gemv))
    (tmp_path / "t.json").write_text(json.dumps(topk))
    assert pick_tune.main(["--gemv", str(tmp_path / "g.json"), "--topk", str(tmp_path / "t.json"),
                           "--out", str(tmp_path / "tune.json")]) == 0
    assert json.loads((tmp_path / "tune.json").read_text()) == {"fp4_tc_kblocks": 4, "triton_topk": True}


def test_default_wins_ties_and_topk_stays_off_when_wrong_or_slower():
    assert pick_tune.pick_variant({"variants": {"split4": _variant(1000.0, split_target=4),
                                                "default": _variant(1000.0)}}) == ("default", {})
    assert pick_tune.pick_topk([_topk("topk_ids B=1 S=1 E=2048 k=512", 0.01, 0.03, ok=False)])[0] is False
    assert pick_tune.pick_topk([_topk("topk_ids B=1 S=1 E=2048 k=512", 0.04, 0.03)])[0] is False
    assert pick_tune.pick_topk([])[0] is False


def test_faster_variants_on_other_knobs_merge_and_a_knob_is_set_once():
    gemv = {"variants": {"default": _variant(1000.0),
                         "mhc_w1": _variant(960.0, hc_pre_warps=1),
                         "mhc_w2": _variant(970.0, hc_pre_warps=2),  # same knob, slower: not taken
                         "attn_split1": _variant(990.0, attn_split_target=1),
                         "noise": _variant(999.0, topk_warps=4),  # within MIN_GAIN_US of the default
                         "slower": _variant(1100.0, fp4_tc_bn=32)}}
    name, tune = pick_tune.pick_variant(gemv)
    assert name == "mhc_w1+attn_split1"
    assert tune == {"hc_pre_warps": 1, "attn_split_target": 1}


def test_topk_stays_on_when_it_wins_in_sum_over_the_decode_cases():
    rows = [_topk("topk_ids B=1 S=1 E=16512 k=512 visible=2048", 0.032, 0.092),
            _topk("topk_ids B=1 S=1 E=16512 k=512 visible=16384", 0.111, 0.093)]
    on, why = pick_tune.pick_topk(rows)
    assert on is True and "visible=16384" in why
    assert pick_tune.pick_topk([rows[1]])[0] is False


def test_without_topk_measurements_the_default_stands(tmp_path):
    """A call that timed no top-k cases writes no triton_topk override (the kernel stays as TUNE has it)."""
    (tmp_path / "g.json").write_text(json.dumps({"variants": {"default": _variant(1000.0)}}))
    assert pick_tune.main(["--gemv", str(tmp_path / "g.json"), "--out", str(tmp_path / "tune.json")]) == 0
    assert json.loads((tmp_path / "tune.json").read_text()) == {}
