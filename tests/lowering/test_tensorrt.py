"""``--backend tensorrt``: without TensorRT it must say what to install (and that the onnx backend runs
without it) instead of building anything; with TensorRT and a GPU, the engine must match onnx."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from dsv4c.artifact import Artifact
from dsv4c.errors import BackendUnavailableError
from dsv4c.lowering import backends

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None
NEEDS_TRT = "needs TensorRT and a CUDA GPU (pip install tensorrt on a GPU machine); not installed here"


@pytest.mark.skipif(HAVE_TRT, reason="TensorRT is installed here; the engine test covers it")
def test_build_without_tensorrt_says_what_to_install(tmp_path):
    class Writer:  # nothing may be written
        def path(self, rel):  # noqa: ANN001, ANN201
            raise AssertionError(f"wrote {rel}")

        write_bytes = write_text = write_tensors = path

    with pytest.raises(BackendUnavailableError) as e:
        backends.lower("tensorrt", "h100", {}, Writer(), {"max_seq_len": 16}, print)
    msg = str(e.value)
    assert "pip install tensorrt" in msg and "--backend onnx" in msg
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(HAVE_TRT, reason="TensorRT is installed here; the engine test covers it")
def test_loading_a_tensorrt_artifact_without_tensorrt_says_what_to_install(tmp_path):
    from dsv4c.runtime.executors import make_executor

    art = Artifact(Path(tmp_path), {"backend": "tensorrt", "programs": {}})
    with pytest.raises(BackendUnavailableError) as e:
        make_executor(art, torch.device("cpu"))
    assert "pip install tensorrt" in str(e.value) and "--backend onnx" in str(e.value)


@pytest.mark.skipif(not (HAVE_TRT and torch.cuda.is_available()), reason=NEEDS_TRT)
def test_tensorrt_engine_matches_onnx(tmp_path):  # pragma: no cover - no TensorRT on CI
    from dsv4c.lowering.build import BuildRequest, build
    from dsv4c.runtime import Engine
    from dsv4c.testing import rel_err

    out = {}
    for backend in ("onnx", "tensorrt"):
        out[backend] = tmp_path / backend
        build(BuildRequest(output=out[backend], variant="tiny", backend=backend, target="h100", numerics="exact",
                           dtype="fp32", max_seq_len=64, max_batch=2), progress=lambda m: None)
    a, b = Engine.load(out["onnx"], device="cuda"), Engine.load(out["tensorrt"], device="cuda")
    prompts = [[1, 2, 3, 4, 5], [9, 8, 7]]
    assert rel_err(b.prefill(prompts), a.prefill(prompts)) <= 1e-3
    for _ in range(8):
        assert rel_err(b.decode([3, 4]), a.decode([3, 4])) <= 1e-3
