"""Backends turn passed programs into artifact files the runtime can execute.

- ``eager``: the graphs themselves (JSON, see ``dsv4c.program``), run op by op by the runtime.
- ``inductor``: GPU lowering (see ``lowering/inductor.py`` when present).
- ``onnx``: ONNX export run with onnxruntime (see ``lowering/onnx_backend.py`` when present).
- ``tensorrt``: a TensorRT engine, only when TensorRT is importable.
"""

from __future__ import annotations

import importlib
from typing import Callable

from dsv4c.artifact import ArtifactWriter
from dsv4c.errors import BackendUnavailableError
from dsv4c.program import Program

TARGETS = ("cpu", "h100", "h200")
BACKENDS = ("eager", "inductor", "onnx", "tensorrt")
# backend -> module implementing `lower(target, programs, writer, manifest, progress) -> {entry: {...}}`
_MODULES = {"inductor": "dsv4c.lowering.inductor", "onnx": "dsv4c.lowering.onnx_backend",
            "tensorrt": "dsv4c.lowering.tensorrt_backend"}


def lower_eager(target: str, programs: dict[str, Program], w: ArtifactWriter, manifest: dict,
                progress: Callable[[str], None]) -> dict[str, dict]:
    out = {}
    for entry, prog in programs.items():
        rel = f"programs/{entry}.json"
        w.write_text(rel, prog.to_json())
        out[entry] = {"file": rel, "format": "dsv4c.fx-json/1", "inputs": len(prog.input_names)}
        progress(f"lowered {entry} (eager): {rel}")
    return out


def preflight(backend: str, target: str, dtype: str, kv_storage: str) -> None:
    """Refuse, in milliseconds, a build the backend cannot lower (missing packages, a dtype or cache layout
    it does not take, no GPU for TensorRT): before the weights are read and the minutes of tracing."""
    if backend not in ("onnx", "tensorrt"):
        return
    mod = _backend_module(backend)
    mod.check(target, dtype)
    importlib.import_module(_MODULES["onnx"]).check_kv_storage(kv_storage)


def _backend_module(backend: str):  # noqa: ANN202 - a module
    try:
        return importlib.import_module(_MODULES[backend])
    except ModuleNotFoundError as e:
        raise BackendUnavailableError(f"The {backend!r} backend is not available in this dsv4c build ({e.name} is missing).",
                                      "use --backend eager, or install the backend's dependencies.") from None


def lower(backend: str, target: str, programs: dict[str, Program], w: ArtifactWriter, manifest: dict,
          progress: Callable[[str], None]) -> dict[str, dict]:
    if backend == "eager":
        return lower_eager(target, programs, w, manifest, progress)
    return _backend_module(backend).lower(target, programs, w, manifest, progress)
