"""Run a ``tensorrt`` artifact: one deserialized TensorRT engine per entry point.

The engines have the interface of the onnx backend's models (inputs ``cache.<name>``, ``input_ids``,
``start_pos``; outputs ``logits`` then ``cache_out.<name>``); ``run`` binds the engine's CUDA tensors
by address, runs on the current stream and copies the new cache state back into the engine's cache.

Without the ``tensorrt`` package (or without a CUDA device) loading fails with
``BackendUnavailableError`` saying what to install. Written against the TensorRT 10 API and not yet
run: this project's machines have no TensorRT.
"""

from __future__ import annotations

from typing import Mapping

import torch

from dsv4c.artifact import Artifact
from dsv4c.errors import ArtifactError, BackendUnavailableError

CACHE_OUT = "cache_out."
INSTALL = "pip install tensorrt (NVIDIA TensorRT >= 10, on a machine with a CUDA GPU)"


def _tensorrt():
    try:
        import tensorrt as trt  # noqa: PLC0415
    except ImportError:
        raise BackendUnavailableError("Running a tensorrt artifact needs TensorRT, which is not installed.",
                                      f"{INSTALL}; or rebuild with --backend onnx, which runs with onnxruntime "
                                      "and needs no TensorRT.") from None
    return trt


class TensorRTExecutor:
    def __init__(self, art: Artifact, device: torch.device) -> None:
        trt = _tensorrt()
        if device.type != "cuda":
            raise BackendUnavailableError(f"TensorRT engines run on CUDA devices, not {device.type!r}.",
                                          "load the artifact on cuda, or rebuild with --backend onnx for cpu.")
        self.trt, self.device = trt, device
        self.logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(self.logger)
        self.engines, self.contexts = {}, {}
        for entry, ent in art.manifest["programs"].items():
            if ent.get("format") != "tensorrt":
                raise ArtifactError(f"{art.path}: program {entry!r} is {ent.get('format')!r}, not tensorrt.",
                                    "rebuild the artifact with --backend tensorrt.")
            with torch.cuda.device(device):
                engine = runtime.deserialize_cuda_engine(art.file(ent["file"]).read_bytes())
            if engine is None:
                raise ArtifactError(f"TensorRT {trt.__version__} cannot load {ent['file']} (built with TensorRT "
                                    f"{ent.get('tensorrt_version')} on {ent.get('device')}).",
                                    "rebuild the artifact on this machine with this TensorRT.")
            self.engines[entry] = engine
            self.contexts[entry] = engine.create_execution_context()

    def run(self, entry: str, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        trt, engine, ctx = self.trt, self.engines[entry], self.contexts[entry]
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        ins = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        alive = []
        for n in ins:
            t = inputs[n].to(self.device).contiguous()
            alive.append(t)
            ctx.set_input_shape(n, tuple(t.shape))
            ctx.set_tensor_address(n, t.data_ptr())
        bufs = {}
        for n in outs:
            if n.startswith(CACHE_OUT):
                like = inputs["cache." + n[len(CACHE_OUT):]]
                buf = torch.empty(like.shape, dtype=like.dtype, device=self.device)
            else:
                shape = tuple(ctx.get_tensor_shape(n))
                buf = torch.empty(shape, dtype=torch.float32, device=self.device)
            bufs[n] = buf
            ctx.set_tensor_address(n, buf.data_ptr())
        stream = torch.cuda.current_stream(self.device)
        if not ctx.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"TensorRT failed to run the {entry} engine.")
        for n, buf in bufs.items():
            if n.startswith(CACHE_OUT):
                inputs["cache." + n[len(CACHE_OUT):]].copy_(buf)
        return bufs["logits"]


def make_executor(art: Artifact, device: torch.device) -> TensorRTExecutor:
    return TensorRTExecutor(art, device)
