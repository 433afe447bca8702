"""ONNX artifacts of tiny and mini against the eager artifact of the same spec and seed.

The eager artifact runs a scenario once (two ragged prompts, then 32 greedy decode steps; see
``build_pair.py``); the onnx artifact replays the same tokens through ``Engine`` + onnxruntime and
must give the same logits: fp32 exact numerics within 1e-4 relative, reference numerics (every
quant-dequant simulation) within 1e-3.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from dsv4c.artifact import open_artifact
from dsv4c.testing import rel_err

onnx = pytest.importorskip("onnx")

TOL = {"exact": 1e-4, "reference": 1e-3}


def _replay(engine, run: dict[str, torch.Tensor]) -> tuple[float, list[float]]:
    prompts = [run[k].tolist() for k in sorted(k for k in run if k.startswith("prompt"))]
    got = engine.prefill(prompts)
    want = run["prefill_logits"]
    prefill = max(rel_err(got[b], want[b]) for b in range(len(prompts)))
    steps = []
    for s, tokens in enumerate(run["decode_tokens"]):
        got = engine.decode(tokens)
        want = run["decode_logits"][s]
        steps.append(max(rel_err(got[b], want[b]) for b in range(len(prompts))))
    return prefill, steps


@pytest.mark.parametrize("name", ["tiny-exact", "mini-exact", "tiny3-reference"])
def test_onnx_logits_match_the_eager_artifact(pairs, onnx_engines, name):
    pair = pairs[name]
    run = load_file(str(pair.run_file))
    assert run["decode_tokens"].shape[0] == 32
    prefill, steps = _replay(onnx_engines[name], run)
    tol = TOL[pair.numerics]
    assert prefill <= tol, f"prefill rel err {prefill:.2e}"
    worst = max(range(len(steps)), key=steps.__getitem__)
    assert steps[worst] <= tol, f"decode step {worst}: rel err {steps[worst]:.2e} (all: {[f'{e:.1e}' for e in steps]})"


@pytest.mark.parametrize("name", ["tiny-exact", "mini-exact"])
def test_onnx_artifact_is_complete_and_checked(pairs, name):
    art = open_artifact(pairs[name].onnx, backend="onnx", full_check=True)
    m = art.manifest
    assert set(m["programs"]) == {"prefill", "decode"}
    for entry, ent in m["programs"].items():
        assert ent["format"] == "onnx" and ent["file"] == f"programs/{entry}.onnx"
        assert ent["weights"] == "programs/weights.data" and ent["export"] == "direct"
        assert ent["inputs"] == list(ent["state"]) + ["input_ids", "start_pos"]
        assert ent["outputs"] == ["logits"] + list(ent["state"].values())
    assert {"programs/prefill.onnx", "programs/decode.onnx", "programs/weights.data"} <= set(m["files"])


@pytest.mark.parametrize("name", ["tiny-exact", "mini-exact"])
@pytest.mark.parametrize("entry", ["prefill", "decode"])
def test_onnx_model_is_checker_clean_and_shape_inferred(pairs, name, entry):
    path = pairs[name].onnx / "programs" / f"{entry}.onnx"
    onnx.checker.check_model(str(path), full_check=True)
    m = onnx.load(str(path), load_external_data=False)
    opsets = {o.domain or "ai.onnx": o.version for o in m.opset_import}
    assert set(opsets) == {"ai.onnx"} and opsets["ai.onnx"] >= 18
    assert not m.functions and all(n.domain in ("", "ai.onnx") for n in m.graph.node), "standard ONNX ops only"
    # Interface: cache state in and out, symbolic dims named like the program's.
    ins = {i.name: i for i in m.graph.input}
    outs = [o.name for o in m.graph.output]
    cache = [n for n in ins if n.startswith("cache.")]
    assert list(ins) == cache + ["input_ids", "start_pos"]
    assert outs == ["logits"] + ["cache_out." + n[len("cache."):] for n in cache]

    def dims(vi):
        return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]

    assert dims(ins["input_ids"]) == ([1, "seq"] if entry == "prefill" else ["batch", 1])
    if entry == "decode":
        assert all(dims(ins[n])[0] == "batch" for n in cache)
        assert all(dims(o)[0] == "batch" for o in m.graph.output)
    # The stored model is shape-inferred: every value has a type with a known rank.
    typed = {v.name: v for v in list(m.graph.value_info) + list(m.graph.output)}
    untyped = [o for n in m.graph.node for o in n.output if o and o not in typed]
    assert not untyped, f"{len(untyped)} values without inferred type/shape, e.g. {untyped[:5]}"
    assert all(v.type.tensor_type.HasField("shape") for v in typed.values())
    # Weights: every parameter and constant is external data in the one shared file, FP8 / packed FP4
    # kept in their storage types; what stays inline is the exporter's few small folded constants.
    assert not [n for n in ins if n.startswith(("params.", "consts."))]
    weights = [t for t in m.graph.initializer if t.name.startswith(("params.", "consts."))]
    assert weights and all(t.data_location == onnx.TensorProto.EXTERNAL for t in weights)
    locs = {e.value for t in weights for e in t.external_data if e.key == "location"}
    assert locs == {"weights.data"}
    inline = [t for t in m.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL]
    assert sum(len(t.raw_data) for t in inline) < 1 << 20, "large tensors inline in the model"
    types = {t.data_type for t in weights}
    assert {onnx.TensorProto.FLOAT8E4M3FN, onnx.TensorProto.UINT8, onnx.TensorProto.FLOAT} <= types


def test_onnx_decode_batch_is_symbolic(pairs, onnx_engines):
    """The decode graph serves any batch: 1, 3 and 4 sequences in one artifact."""
    eng = onnx_engines["tiny-exact"]
    for n in (1, 3, 4):
        eng.prefill([[5 + b, 6, 7, 8 + b] for b in range(n)])
        logits = eng.decode([1] * n)
        assert logits.shape == (n, eng.vocab_size) and torch.isfinite(logits).all()


def test_onnx_executor_updates_the_engine_cache_in_place(pairs, onnx_engines):
    eng = onnx_engines["tiny-exact"]
    eng.prefill([[1, 2, 3]])
    before = {k: v.clone() for k, v in eng.cache.items()}
    ptrs = {k: v.data_ptr() for k, v in eng.cache.items()}
    eng.decode([4])
    assert {k: v.data_ptr() for k, v in eng.cache.items()} == ptrs
    assert not torch.equal(eng.cache["b0.win"], before["b0.win"])


def test_manifest_records_the_onnx_programs(pairs):
    m = json.loads((pairs["tiny-exact"].onnx / "manifest.json").read_text())
    assert m["backend"] == "onnx"
    assert all(ent["opset"] >= 18 and ent["nodes"] > 0 and ent["initializers"] > 0 for ent in m["programs"].values())
