"""A bf16 reference artifact holds its KV cache in storage format: the manifest says so, the engine
allocates exactly the formula's bytes per token, and it serves the eager reference's logits bitwise."""

import pytest
import torch

from dsv4c.bench import kv_bytes_report
from dsv4c.checkpoint import load_checkpoint, to_model_params
from dsv4c.errors import ArtifactError
from dsv4c.frontend.model import StepContext, constants, step
from dsv4c.inspect_artifact import memory_plan
from dsv4c.lowering.build import BuildRequest, build
from dsv4c.runtime import Engine
from dsv4c.runtime.executors import make_executor
from dsv4c.testing import new_cache

MAX_SEQ = 64


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("art") / "tiny-bf16"
    build(BuildRequest(output=out, variant="tiny", numerics="reference", dtype="bf16", max_seq_len=MAX_SEQ,
                       max_batch=2), progress=lambda m: None)
    return out


def test_manifest_and_allocation(artifact, tiny_spec):
    eng = Engine.load(artifact)
    m = eng.artifact.manifest
    assert m["kv_storage"] == "packed" and m["plan"]["kv_storage"] == "packed"
    assert "b1.ckv_nope" in m["cache_layout"] and "b1.ckv" not in m["cache_layout"]
    assert eng.cache["b1.ckv_nope"].dtype == torch.float8_e4m3fn and eng.cache["b1.ikv_codes"].dtype == torch.uint8
    rep = kv_bytes_report(m)
    assert rep["allocated_equals_formula"] and rep["allocated_per_token"] == rep["formula_per_token"]
    assert rep["allocated_main_entry_bytes"] == rep["formula_main_entry_bytes"]
    assert rep["allocated_indexer_entry_bytes"] == rep["formula_indexer_entry_bytes"]
    assert rep["allocated_window_per_sequence"] == rep["formula_window_per_sequence"]
    assert memory_plan(m)["kv_allocated_bytes_per_token"] == pytest.approx(m["kv_bytes_per_token"], abs=0)


def test_engine_equals_eager_reference_bitwise(artifact, tiny_spec, tiny_ckpt):
    params = to_model_params(tiny_spec, load_checkpoint(tiny_ckpt, tiny_spec), torch.bfloat16)
    eng = Engine.load(artifact)
    ctx = StepContext(tiny_spec, "reference", torch.bfloat16)
    consts = constants(tiny_spec)
    cache = new_cache(tiny_spec, 1, MAX_SEQ, torch.bfloat16, ctx.kv_storage)
    ids = torch.randint(0, tiny_spec.vocab_size, (1, 30), generator=torch.Generator().manual_seed(3))
    assert torch.equal(eng.prefill(ids[:, :21]), step(ctx, params, consts, cache, ids[:, :21], torch.tensor([0])))
    for t in range(21, 30):
        ref = step(ctx, params, consts, cache, ids[:, t:t + 1], torch.tensor([t]))
        assert torch.equal(eng.decode(ids[:, t]), ref), t


def test_dense_only_runtimes_refuse_a_packed_cache(artifact):
    eng = Engine.load(artifact)
    eng.artifact.manifest["backend"] = "onnx"  # in memory only
    with pytest.raises(ArtifactError, match="dense caches only"):
        make_executor(eng.artifact, torch.device("cpu"))
