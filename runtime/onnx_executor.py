"""Run an ``onnx`` artifact with onnxruntime.

Each entry point is one ONNX model (``programs/<entry>.onnx``, weights in external data beside it).
Its graph inputs are the cache tensors, ``input_ids`` and ``start_pos`` (plus any ``params.*`` /
``consts.*`` the build left as inputs); its outputs are ``logits`` and the new cache state
``cache_out.<name>`` for every ``cache.<name>`` input. ``run`` binds the engine's tensors to the session
by pointer (no copies in; any dtype, CPU or CUDA), lets onnxruntime write into fresh buffers and copies
the new state back into the engine's cache tensors, so the cache is updated in place like the eager
executor does.

Providers: ``CPUExecutionProvider``; ``CUDAExecutionProvider`` when the device is CUDA and
onnxruntime-gpu provides it. Imports only dsv4c core, the runtime and onnxruntime.
"""

from __future__ import annotations

from typing import Mapping

import torch

from dsv4c.artifact import Artifact
from dsv4c.errors import ArtifactError, BackendUnavailableError

try:
    import onnxruntime as ort
except ImportError:  # pragma: no cover - exercised only without onnxruntime
    ort = None

CACHE_OUT = "cache_out."
# torch dtype -> ONNX TensorProto element type (numbers from onnx.proto; the runtime does not import onnx)
_ONNX_TYPES = {torch.float32: 1, torch.uint8: 2, torch.int8: 3, torch.int16: 5, torch.int32: 6, torch.int64: 7,
               torch.bool: 9, torch.float16: 10, torch.float64: 11, torch.bfloat16: 16, torch.float8_e4m3fn: 17}


def _providers(device: torch.device) -> list[str]:
    available = ort.get_available_providers()
    if device.type == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise BackendUnavailableError(
                "This onnxruntime has no CUDAExecutionProvider, so an onnx artifact cannot run on CUDA here.",
                "pip install onnxruntime-gpu (instead of onnxruntime), or load the artifact on cpu.")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device.type != "cpu":
        raise BackendUnavailableError(f"onnx artifacts run on cpu or cuda, not {device.type!r}.", "load it on cpu.")
    return ["CPUExecutionProvider"]


class OnnxExecutor:
    """One onnxruntime session per entry point."""

    def __init__(self, art: Artifact, device: torch.device, session_options=None) -> None:  # noqa: ANN001
        if ort is None:
            raise BackendUnavailableError("Running an onnx artifact needs onnxruntime, which is not installed.",
                                          "pip install onnxruntime (onnxruntime-gpu for CUDA), or rebuild with "
                                          "--backend eager.")
        self.device = device
        self.providers = _providers(device)
        self.sessions: dict[str, object] = {}
        self.inputs: dict[str, list[str]] = {}
        self.outputs: dict[str, list[str]] = {}
        opts = session_options or ort.SessionOptions()
        for entry, ent in art.manifest["programs"].items():
            if ent.get("format") != "onnx":
                raise ArtifactError(f"{art.path}: program {entry!r} is {ent.get('format')!r}, not onnx.",
                                    "rebuild the artifact with --backend onnx.")
            path = art.file(ent["file"])
            try:
                sess = ort.InferenceSession(str(path), opts, providers=self.providers)
            except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
                raise ArtifactError(f"onnxruntime cannot load {path}: {e}",
                                    "rebuild the artifact with this dsv4c and onnxruntime.") from None
            self.sessions[entry] = sess
            self.inputs[entry] = [i.name for i in sess.get_inputs()]
            self.outputs[entry] = [o.name for o in sess.get_outputs()]
            bad = [o for o in self.outputs[entry][1:] if not o.startswith(CACHE_OUT)]
            if not self.outputs[entry] or bad:
                raise ArtifactError(f"{path} has outputs {self.outputs[entry][:4]}...; expected logits then "
                                    f"{CACHE_OUT}<name>.", "rebuild the artifact with this dsv4c.")

    def _dev(self) -> tuple[str, int]:
        if self.device.type == "cuda":
            return "cuda", self.device.index if self.device.index is not None else torch.cuda.current_device()
        return "cpu", 0

    def run(self, entry: str, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        sess = self.sessions[entry]
        dev_type, dev_id = self._dev()
        binding = sess.io_binding()
        alive = []
        missing = [n for n in self.inputs[entry] if n not in inputs]
        if missing:
            raise ArtifactError(f"the {entry} model needs inputs {missing[:4]} that the engine did not pass.",
                                "rebuild the artifact with this dsv4c.")
        for name in self.inputs[entry]:
            t = inputs[name]
            if t.device != self.device:
                t = t.to(self.device)
            t = t.contiguous()
            alive.append(t)
            binding.bind_input(name, dev_type, dev_id, _ONNX_TYPES[t.dtype], tuple(t.shape), t.data_ptr())
        batch = inputs["input_ids"].shape[0]
        out_bufs = []
        for name in self.outputs[entry]:
            if name.startswith(CACHE_OUT):
                like = inputs["cache." + name[len(CACHE_OUT):]]
                buf = torch.empty(like.shape, dtype=like.dtype, device=self.device)
            else:
                meta = next(o for o in sess.get_outputs() if o.name == name)
                vocab = meta.shape[-1]
                if not isinstance(vocab, int):
                    raise ArtifactError(f"{entry}: logits have no static vocab size ({meta.shape}).", "rebuild the artifact.")
                buf = torch.empty((batch, vocab), dtype=torch.float32, device=self.device)
            out_bufs.append(buf)
            binding.bind_output(name, dev_type, dev_id, _ONNX_TYPES[buf.dtype], tuple(buf.shape), buf.data_ptr())
        sess.run_with_iobinding(binding)
        logits = out_bufs[0]
        for name, buf in zip(self.outputs[entry][1:], out_bufs[1:]):
            inputs["cache." + name[len(CACHE_OUT):]].copy_(buf)
        del alive
        return logits


def make_executor(art: Artifact, device: torch.device) -> OnnxExecutor:
    return OnnxExecutor(art, device)
