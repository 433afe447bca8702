"""``--backend tensorrt``: TensorRT engines built from the ONNX graphs of the onnx backend.

The programs are exported exactly as for ``--backend onnx`` (``lowering/onnx_backend.py``: functional
graphs, cache state as explicit inputs/outputs, weights as external data); TensorRT's ONNX parser then
reads ``programs/<entry>.onnx`` and the builder writes ``programs/<entry>.engine`` with one
optimization profile per entry (prefill: ``seq`` in 1..max_seq_len; decode: ``batch`` in 1..max_batch).
The ONNX files stay in the artifact (they are what the engine was built from, and what Netron shows).

Requirements, checked before anything is built: the ``tensorrt`` Python package (TensorRT 10 or later,
``pip install tensorrt``), a CUDA GPU at build time (TensorRT builds for the GPU it runs on), and a GPU
target (``--target h100`` / ``h200``). When any is missing the build stops with
``BackendUnavailableError`` saying what to install; nothing pretends to be built. An engine that fails to
parse or build fails the build with TensorRT's own messages.

Status: written against the TensorRT 10 Python API and not yet run: this project's machines have no
TensorRT (the CPU machines cannot use it, the GPU machines cannot install it).
"""

from __future__ import annotations

import time
from typing import Callable, Mapping

import torch

from dsv4c.errors import BackendUnavailableError, ConfigError
from dsv4c.program import Program

from . import onnx_backend

FORMAT = "tensorrt"
INSTALL = ("pip install tensorrt (NVIDIA TensorRT >= 10, for a CUDA GPU; torch-tensorrt is not needed), plus the "
           "onnx backend's packages: pip install onnx onnxscript onnxruntime")
NO_TRT = ("TensorRT is not installed: the tensorrt backend needs the `tensorrt` Python package and a CUDA GPU.",
          f"{INSTALL}; or use --backend onnx, which runs the same ONNX graphs with onnxruntime (CPU, or CUDA with "
          "onnxruntime-gpu) and needs no TensorRT.")

Progress = Callable[[str], None]


def import_tensorrt():
    """The ``tensorrt`` module, or ``BackendUnavailableError`` saying what to install."""
    try:
        import tensorrt as trt  # noqa: PLC0415
    except ImportError:
        raise BackendUnavailableError(*NO_TRT) from None
    major = int(str(getattr(trt, "__version__", "0")).split(".")[0] or 0)
    if major < 10:
        raise BackendUnavailableError(f"TensorRT {trt.__version__} is too old for the tensorrt backend (needs >= 10).",
                                      f"pip install -U tensorrt; or use --backend onnx.")
    return trt


def check(target: str, dtype: str = "fp32") -> None:
    """Everything a tensorrt build needs, checked in milliseconds (before the minutes of tracing)."""
    import_tensorrt()
    if target == "cpu":
        raise ConfigError("TensorRT engines run on NVIDIA GPUs; --target cpu cannot use them.",
                          "build with --target h100 (or h200) on a machine with that GPU, or use --backend onnx.")
    if not torch.cuda.is_available():
        raise BackendUnavailableError("Building a TensorRT engine needs a CUDA GPU on the build machine; none is visible.",
                                      "build on the GPU the engine is for, or use --backend onnx.")
    onnx_backend.check(target, dtype)


def _profile_shapes(entry: dict, manifest: dict, prog_entry: str) -> dict[str, tuple[tuple, tuple, tuple]]:
    """input name -> (min, opt, max) shapes for the entry's one optimization profile."""
    layout = manifest["cache_layout"]
    max_seq, max_batch = int(manifest["max_seq_len"]), int(manifest["max_batch"])
    out = {}
    for name in entry["inputs"]:
        if name.startswith("cache."):
            tail = tuple(layout[name[len("cache."):]]["shape"])
            out[name] = ((1, *tail), (1, *tail), (1, *tail)) if prog_entry == "prefill" else \
                ((1, *tail), (max_batch, *tail), (max_batch, *tail))
        elif name == "input_ids":
            out[name] = ((1, 1), (1, min(max_seq, 512)), (1, max_seq)) if prog_entry == "prefill" else \
                ((1, 1), (max_batch, 1), (max_batch, 1))
        elif name == "start_pos":
            out[name] = ((1,), (1,), (1,)) if prog_entry == "prefill" else ((1,), (max_batch,), (max_batch,))
        else:
            raise ConfigError(f"TensorRT build: unexpected graph input {name!r}.", "report a dsv4c bug.")
    return out


def build_engine(trt, onnx_path: str, shapes: dict, progress: Progress) -> bytes:
    """Parse ``onnx_path`` (external data beside it) and build a serialized engine."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)  # keep the ONNX graph's dtypes
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(onnx_path):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BackendUnavailableError(f"TensorRT's ONNX parser rejected {onnx_path}: {errors[:1500]}",
                                      "use --backend onnx (onnxruntime runs this graph), or report the op TensorRT "
                                      "lacks so the onnx lowering can express it differently.")
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    t0 = time.perf_counter()
    blob = builder.build_serialized_network(network, config)
    if blob is None:
        raise BackendUnavailableError(f"TensorRT could not build an engine from {onnx_path} (see its log above).",
                                      "use --backend onnx, or report the failure with the TensorRT log.")
    progress(f"tensorrt: built an engine from {onnx_path.rsplit('/', 1)[-1]} ({time.perf_counter() - t0:.1f} s)")
    return bytes(blob)


def lower(target: str, programs: dict[str, Program], writer, manifest: dict, progress: Progress,
          weights: Mapping[str, torch.Tensor] | None = None, consts: Mapping[str, torch.Tensor] | None = None
          ) -> dict[str, dict]:
    check(target, manifest.get("dtype", "fp32"))
    trt = import_tensorrt()
    job = onnx_backend.start(target, programs, writer, manifest, progress, weights, consts)
    entries = {e: {"file": f"programs/{e}.engine", "format": FORMAT, "onnx": ent["file"], "weights": ent["weights"],
                   "state": ent["state"], "tensorrt_version": trt.__version__,
                   "device": torch.cuda.get_device_name()}
               for e, ent in job.entries.items()}

    def engines() -> None:
        for e, ent in job.entries.items():
            shapes = _profile_shapes(ent, manifest, e)
            blob = build_engine(trt, str(writer.path(ent["file"])), shapes, progress)
            writer.write_bytes(entries[e]["file"], blob)
            entries[e].update(inputs=ent["inputs"], outputs=ent["outputs"],
                              profile={k: [list(s) for s in v] for k, v in shapes.items()})

    job.after_write.append(engines)
    job.go()
    return entries
