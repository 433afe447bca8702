"""``--backend inductor``: programs compiled by torch.compile / Inductor, Triton kernels for the ``dsv4`` ops.

The artifact holds what is independent of the machine that runs it: the passed programs as JSON graphs
(the same whitelisted format as ``eager``) and, in ``manifest["inductor"]``, the compile plan: which
entry points compile how (prefill with a dynamic sequence length; decode per batch-size bucket, captured
in CUDA graphs on GPUs), the target's kernel choices, the load-time rewrites, and the key of the compile
cache. Inductor's output (generated Triton/C++ code, compiled kernels) is specific to the torch/triton
versions and the exact device, so it lives in a keyed compile cache on the machine
(``dsv4c.runtime.inductor_executor.compile_cache_dir``), not in the artifact.

When the build machine has the target device (``cpu``: always; ``h100``/``h200``: a CUDA GPU of that
name), the build compiles prefill and decode (bucket 1) once into that cache, right after it writes
the weights (the compile runs the graph on zero-valued inputs of the real shapes), and the manifest
records ``compiled_at: build``; otherwise ``first_load``. ``DSV4C_BUILD_COMPILE=0`` skips it.
"""

from __future__ import annotations

import os
import time
from typing import Callable, Mapping

import torch

from dsv4c.artifact import ArtifactWriter
from dsv4c.program import GRAPH_FORMAT, Program

Progress = Callable[[str], None]
_GPU_NAMES = {"h100": "H100", "h200": "H200"}
KERNELS = {
    "cpu": {"dsv4 ops": "CPU reference impls (extern calls)", "element-wise": "Inductor C++ (cpp_wrapper)"},
    "cuda": {
        "fp4_grouped_linear_packed": "Triton: decode = one row per tile, activation quantized in-kernel, split-K "
                                     "with an arrival counter (one launch); prefill = rows sorted by expert, "
                                     "tiles of 16-128 rows; packed e2m1 nibbles -> e4m3 bits -> bf16 in registers",
        "fp8_linear": "Triton: <= 64 rows = fused act quant + split-K; more = e4m3 tensor-core GEMM",
        "sparse_attn": "Triton: online softmax with sink; decode splits the keys across programs (flash decoding)",
        "linear_w16 (load-time rewrite)": "Triton: bf16 weights applied in fp32 without an fp32 weight copy",
        "other dsv4 ops": "Triton kernels of dsv4c.ops.triton_kernels",
        "element-wise / reductions": "Inductor-generated Triton",
    },
}


def target_device(target: str) -> torch.device | None:
    """The device to compile on at build time, when this machine has the target's hardware."""
    if os.environ.get("DSV4C_BUILD_COMPILE", "1") == "0":
        return None
    if target == "cpu":
        return torch.device("cpu")
    want = _GPU_NAMES.get(target)
    if want and torch.cuda.is_available() and want in torch.cuda.get_device_name(0):
        return torch.device("cuda", 0)
    return None


def lower(target: str, programs: dict[str, Program], w: ArtifactWriter, manifest: dict,
          progress: Progress) -> dict[str, dict]:
    from dsv4c.runtime.inductor_executor import DECODE_BUCKETS, FORMAT  # noqa: PLC0415

    out = {}
    texts = {}
    for entry, prog in programs.items():
        rel = f"programs/{entry}.json"
        texts[entry] = prog.to_json()
        w.write_text(rel, texts[entry])
        out[entry] = {"file": rel, "format": GRAPH_FORMAT, "inputs": len(prog.input_names)}
        progress(f"lowered {entry} (inductor): {rel}")
    gpu = target != "cpu"
    dev = target_device(target)
    manifest["inductor"] = {
        "format": FORMAT,
        "device": "cuda" if gpu else "cpu",
        "entries": {
            "prefill": {"shapes": "dynamic sequence length (input_ids dim 1), batch 1", "cuda_graphs": False},
            "decode": {"shapes": "static per batch-size bucket", "buckets": [b for b in DECODE_BUCKETS
                                                                               if b <= manifest["max_batch"]]
                       + ([] if manifest["max_batch"] in DECODE_BUCKETS else [manifest["max_batch"]]),
                       "cuda_graphs": gpu},
        },
        "load_time_rewrites": (["linear_w16: matmul(x.float(), W_bf16.float().t()) -> dsv4c_rt::linear_w16"]
                               if gpu else []),
        "decompositions": ["dsv4::compress_finish", "dsv4::compress_finish_pair", "dsv4::indexer_topk",
                           "dsv4::indexer_topk_packed"],
        "kernels": KERNELS["cuda" if gpu else "cpu"],
        "compile_cache": {"root": "$DSV4C_CACHE or ~/.cache/dsv4c",
                          "key": ["pipeline_uuid", "programs_sha256", "dsv4c", "torch", "triton", "device"]},
        "compiled_at": "first_load",
        "at_build": None,
    }
    if dev is not None:
        _compile_when_weights_are_written(programs, texts, w, manifest, dev, progress)
    else:
        progress(f"inductor: no {target} device here; entry points compile at the first load into the keyed cache")
    return out


def _compile_when_weights_are_written(programs: dict[str, Program], texts: dict[str, str], w: ArtifactWriter,
                                      manifest: dict, dev: torch.device, progress: Progress) -> None:
    """The build writes parameters, then constants; once both exist, compile on ``dev``."""
    orig = w.write_tensors
    seen: dict[str, Mapping[str, torch.Tensor]] = {}

    def write_tensors(prefix, tensors, prog=None):  # noqa: ANN001, ANN202
        where = orig(prefix, tensors, prog)
        seen[prefix] = tensors
        if "params" in seen and "consts" in seen and manifest["inductor"]["at_build"] is None:
            shapes = {**{f"params.{k}": v for k, v in seen["params"].items()},
                      **{f"consts.{k}": v for k, v in seen["consts"].items()}}
            _compile(programs, texts, shapes, manifest, dev, progress)
        return where

    w.write_tensors = write_tensors


def _compile(programs: dict[str, Program], texts: dict[str, str], shapes: Mapping[str, torch.Tensor], manifest: dict,
             dev: torch.device, progress: Progress) -> None:
    from dsv4c.runtime.inductor_executor import compile_at_build  # noqa: PLC0415

    t0 = time.perf_counter()
    _with_shapes(programs, shapes)
    done = compile_at_build(programs, manifest, dev, progress=progress, texts=texts)
    done["seconds_total"] = round(time.perf_counter() - t0, 2)
    manifest["inductor"]["compiled_at"] = "build"
    manifest["inductor"]["at_build"] = {**done, "entries": ["prefill", "decode:1"],
                                        "note": "other decode buckets compile at first use into the same cache"}


def _with_shapes(programs: dict[str, Program], tensors: Mapping[str, torch.Tensor]) -> None:
    """Give every placeholder a ``val`` (shape/dtype) for the example inputs: weight-rewriting passes add
    parameters without metadata; the tensors the build writes have them all."""
    import torch._subclasses.fake_tensor as ft  # noqa: PLC0415

    mode = ft.FakeTensorMode()
    for prog in programs.values():
        phs = [n for n in prog.graph_module.graph.nodes if n.op == "placeholder"]
        for name, node in zip(prog.input_names, phs):
            t = tensors.get(name)
            if t is not None:
                with mode:
                    node.meta["val"] = torch.empty(tuple(t.shape), dtype=t.dtype)
