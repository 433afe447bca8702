"""Executors run one artifact entry point (prefill or decode) given named input tensors.

The engine hands every executor the same thing: a mapping of input name -> tensor (parameters,
constants, the cache slices of the sequences in the call, ``input_ids``, ``start_pos``). An executor
returns the logits and leaves the cache updated in place.
"""

from __future__ import annotations

import importlib
from typing import Mapping, Protocol

import torch

from dsv4c.artifact import Artifact
from dsv4c.errors import ArtifactError, BackendUnavailableError
from dsv4c.program import Program


class Executor(Protocol):
    def run(self, entry: str, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor: ...


class EagerExecutor:
    """Runs the serialized FX graphs op by op (the ``eager`` backend)."""

    def __init__(self, art: Artifact, device: torch.device) -> None:
        self.programs: dict[str, Program] = {}
        for entry, ent in art.manifest["programs"].items():
            prog = Program.from_json(art.read_text(ent["file"]), where=f"{art.path}/{ent['file']}", device=device)
            prog.recompile()
            self.programs[entry] = prog

    def run(self, entry: str, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        prog = self.programs[entry]
        return prog(*[inputs[n] for n in prog.input_names])


_EXTERNAL = {"inductor": "dsv4c.runtime.inductor_executor", "onnx": "dsv4c.runtime.onnx_executor",
             "tensorrt": "dsv4c.runtime.tensorrt_executor"}


_DENSE_CACHE_ONLY = ("onnx", "tensorrt")  # their models take the cache as dense tensors


def make_executor(art: Artifact, device: torch.device) -> Executor:
    backend = art.manifest.get("backend")
    storage = art.manifest.get("kv_storage", "dense")
    if backend in _DENSE_CACHE_ONLY and storage != "dense":
        raise ArtifactError(f"{art.path}: a {backend!r} artifact with a {storage!r} KV cache; the {backend} runtime "
                            "takes dense caches only.", "rebuild it with --dtype fp32 (dense cache).")
    if backend == "eager":
        return EagerExecutor(art, device)
    if backend not in _EXTERNAL:
        raise ArtifactError(f"{art.path} names unknown backend {backend!r}.", "rebuild the artifact with this dsv4c.")
    try:
        mod = importlib.import_module(_EXTERNAL[backend])
    except ModuleNotFoundError as e:
        raise BackendUnavailableError(f"Running a {backend!r} artifact needs {e.name}, which is not installed.",
                                      f"install it, or rebuild with --backend eager.") from None
    return mod.make_executor(art, device)
