"""``--backend inductor --target cpu``: Inductor's CPU codegen against the eager executor, in exact fp32.

One tiny slice (a window block and a CSA block with compressor, indexer and hash routing) is built once
with the inductor backend. The build compiles both entry points into a keyed compile cache (the CPU is
the target device); loading the artifact must then find that cache warm. The reference is the eager
executor on the same artifact: the same programs (an eager build writes the identical JSON graphs) and
the same weights. Prefill plus 16 greedy decode steps must agree to 1e-4 relative.
"""

from __future__ import annotations

import json

import pytest
import torch

from dsv4c.testing import rel_err

LAYERS = 2
PROMPT, STEPS = 12, 16


@pytest.fixture(scope="module")
def inductor_artifact(tmp_path_factory):
    from dsv4c.lowering.build import BuildRequest, build

    root = tmp_path_factory.mktemp("inductor_cpu")
    mp = pytest.MonkeyPatch()
    mp.setenv("DSV4C_CACHE", str(root / "cache"))
    mp.setenv("DSV4C_BUILD_COMPILE", "1")
    out = root / "tiny-inductor"
    build(BuildRequest(output=out, variant="tiny", layers=LAYERS, target="cpu", backend="inductor", numerics="exact",
                       dtype="fp32", max_seq_len=64, max_batch=2), progress=lambda m: None)
    yield out
    mp.undo()


def test_manifest_records_the_compile_plan(inductor_artifact):
    m = json.loads((inductor_artifact / "manifest.json").read_text())
    ind = m["inductor"]
    assert m["backend"] == "inductor" and ind["format"] == "dsv4c.inductor/1"
    assert ind["compiled_at"] == "build"  # the CPU target is present at build time
    assert set(ind["at_build"]["seconds"]) == {"prefill", "decode:1"}
    assert ind["entries"]["decode"]["cuda_graphs"] is False
    for entry in ("prefill", "decode"):  # the same JSON graph format as the eager backend
        assert m["programs"][entry]["format"] == "dsv4c.fx-json/1"



def test_inductor_matches_eager_prefill_and_decode(inductor_artifact):
    from torch._dynamo.utils import counters

    from dsv4c.runtime import Engine
    from dsv4c.runtime.executors import EagerExecutor
    from dsv4c.runtime.inductor_executor import InductorExecutor

    counters.clear()
    eng = Engine.load(inductor_artifact, device="cpu")
    assert isinstance(eng._executor, InductorExecutor)
    ref = EagerExecutor(eng.artifact, torch.device("cpu"))
    cache = {k: v[:1].clone() for k, v in eng.cache.items()}

    def run_ref(entry, ids, start):
        inputs = dict(eng._static)
        inputs.update({f"cache.{k}": v for k, v in cache.items()})
        inputs["input_ids"], inputs["start_pos"] = ids, start
        with torch.no_grad():
            return ref.run(entry, inputs)

    ids = torch.randint(0, eng.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    want = run_ref("prefill", ids, torch.zeros(1, dtype=torch.long))
    errs = [rel_err(eng.prefill(ids), want)]
    nxt = want.argmax(-1)
    for t in range(STEPS):
        want = run_ref("decode", nxt[:, None], torch.tensor([PROMPT + t]))
        errs.append(rel_err(eng.decode(nxt), want))
        nxt = want.argmax(-1)
    assert len(errs) == STEPS + 1
    assert max(errs) <= 1e-4, f"worst step {errs.index(max(errs))}: {max(errs):.2e}"
    # the cache written by the build was found: nothing compiled from scratch at load
    assert counters["inductor"]["fxgraph_cache_hit"] >= 2, dict(counters["inductor"])
    assert counters["inductor"]["fxgraph_cache_miss"] == 0, dict(counters["inductor"])
    for a, b in zip(cache.values(), eng.cache.values()):  # the caches were updated alike
        assert rel_err(b[:1], a) <= 1e-4 or (a.abs().max() == 0 and b[:1].abs().max() == 0)
