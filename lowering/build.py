"""``dsv4c build``: spec + weights -> traced graphs -> passes -> backend lowering -> artifact.

Every step logs one progress line. A failed build leaves nothing at the output path (see
``dsv4c.artifact.artifact_writer``).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from dsv4c import __version__
from dsv4c.artifact import SCHEMA_VERSION, artifact_writer
from dsv4c.checkpoint import load_checkpoint, synthesize_checkpoint, to_model_params
from dsv4c.errors import ConfigError
from dsv4c.frontend.export import TraceConfig, trace_program
from dsv4c.frontend.model import DTYPES, NUMERICS, StepContext, constants
from dsv4c.layout import cache_tensors, kv_bytes_per_token, kv_storage_problem, model_tensors
from dsv4c.ops.kv_storage import KV_STORAGE_FORMAT
from dsv4c.passes import check_pass_names, dump_files, run_pipeline
from dsv4c.plan import make_plan
from dsv4c.spec import ModelSpec, get_variant, truncated

from .backends import BACKENDS, TARGETS, lower, preflight

Progress = Callable[[str], None]


@dataclass
class BuildRequest:
    output: Path | None
    variant: str | None = None
    checkpoint: Path | None = None
    target: str = "cpu"
    backend: str = "eager"
    numerics: str = "reference"
    dtype: str = "bf16"
    max_seq_len: int = 4096
    max_batch: int = 8
    layers: int | None = None  # truncate to the first N blocks (benchmark slices)
    seed: int = 0
    dry_run: bool = False
    dump_passes: Path | None = None
    disable_passes: list[str] = field(default_factory=list)
    kv_storage: str | None = None  # "packed" / "dense"; None = derived (dsv4c.layout.default_kv_storage)


@dataclass
class BuildResult:
    output: Path | None
    manifest: dict
    plan_text: str
    seconds: float


def resolve_spec(req: BuildRequest) -> ModelSpec:
    if (req.variant is None) == (req.checkpoint is None):
        raise ConfigError("Give exactly one of --variant and --checkpoint.",
                          "use --variant mini (synthesized weights) or --checkpoint DIR (a hub checkpoint).")
    spec = ModelSpec.from_config(req.checkpoint) if req.checkpoint is not None else get_variant(req.variant)
    return truncated(spec, req.layers) if req.layers is not None else spec


def validate_request(req: BuildRequest, spec: ModelSpec) -> None:
    if req.target not in TARGETS:
        raise ConfigError(f"Unknown target {req.target!r}.", f"use one of: {', '.join(TARGETS)}.")
    if req.backend not in BACKENDS:
        raise ConfigError(f"Unknown backend {req.backend!r}.", f"use one of: {', '.join(BACKENDS)}.")
    if req.numerics not in NUMERICS:
        raise ConfigError(f"Unknown numerics {req.numerics!r}.", f"use one of: {', '.join(NUMERICS)}.")
    if req.dtype not in DTYPES:
        raise ConfigError(f"Unknown dtype {req.dtype!r}.", f"use one of: {', '.join(DTYPES)}.")
    if not 1 <= req.max_seq_len <= spec.max_position_embeddings:
        raise ConfigError(f"--max-seq-len {req.max_seq_len} is outside 1..{spec.max_position_embeddings} "
                          f"(max_position_embeddings).", "pick a context length the model supports.")
    if not 1 <= req.max_batch <= 1024:
        raise ConfigError(f"--max-batch {req.max_batch} is outside 1..1024.", "pick a batch size between 1 and 1024.")
    if not req.dry_run and req.output is None:
        raise ConfigError("No output directory given.", "add -o ARTIFACT_DIR (or --dry-run).")
    check_pass_names(req.disable_passes)  # before tracing: a typo must not cost minutes
    if req.kv_storage is not None:
        problem = kv_storage_problem(spec, req.numerics, DTYPES[req.dtype], req.kv_storage)
        if problem:
            raise ConfigError(f"--kv-storage {req.kv_storage}: {problem}.",
                              "use --kv-storage dense (or auto), or build with --numerics reference --dtype bf16.")


def _fake_weights(spec: ModelSpec, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: torch.empty(t.shape, dtype=t.dtype, device="meta") for k, t in model_tensors(spec, dtype).items()}


def build(req: BuildRequest, progress: Progress = print) -> BuildResult:
    t_start = time.perf_counter()
    spec = resolve_spec(req)
    validate_request(req, spec)
    dtype = DTYPES[req.dtype]
    ctx = StepContext(spec, req.numerics, dtype, req.kv_storage)
    plan = make_plan(spec, kv_storage=ctx.kv_storage)
    cfg = TraceConfig(req.max_seq_len)

    def step(msg: str, t0: float) -> float:
        progress(f"{msg} ({time.perf_counter() - t0:.1f} s)")
        return time.perf_counter()

    t = time.perf_counter()
    progress(f"spec {spec.name}: {spec.num_layers} blocks + {spec.num_mtp_layers} MTP, target {req.target}, "
             f"backend {req.backend}, numerics {req.numerics}, dtype {req.dtype}, KV cache {ctx.kv_storage}")
    preflight(req.backend, req.target, req.dtype, ctx.kv_storage)
    with ExitStack() as stack:
        # The output's lock is taken before the weights are read and the graphs traced: a second build of
        # the same path fails at once instead of after minutes of work.
        w = None if req.dry_run else stack.enter_context(artifact_writer(req.output))
        if req.dry_run:
            weights = _fake_weights(spec, dtype)
        else:
            weights = _load_weights(req, spec, dtype, progress, scratch=w.tmp / '.synth')
            t = step(f"weights ready: {len(weights)} tensors", t)
        programs = {}
        for entry in ("prefill", "decode"):
            programs[entry] = trace_program(ctx, entry, cfg, log=progress)
            t = step(f"traced {entry}: {programs[entry].num_nodes()} nodes", t)
        weights, records = run_pipeline(programs, weights, ctx, req.target, req.disable_passes, req.dump_passes, progress)
        t = step(f"pass pipeline: {len(records)} passes", t)
        pipeline_uuid = hashlib.sha256(json.dumps([r["uuid"] for r in records]).encode()).hexdigest()[:16]
        consts = constants(spec)
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "dsv4c_version": __version__,
            "torch_version": torch.__version__.split("+")[0],
            "triton_version": _triton_version(),
            "target": req.target,
            "backend": req.backend,
            "numerics": req.numerics,
            "dtype": req.dtype,
            "spec": spec.to_dict(),
            "max_seq_len": req.max_seq_len,
            "max_batch": req.max_batch,
            "pipeline": records,
            "pipeline_uuid": pipeline_uuid,
            "kv_storage": ctx.kv_storage,
            "kv_storage_format": KV_STORAGE_FORMAT if ctx.packed_kv else None,
            "cache_layout": {k: {"shape": list(v.shape[1:]), "dtype": str(v.dtype).removeprefix("torch.")}
                             for k, v in cache_tensors(spec, 1, req.max_seq_len, dtype, storage=ctx.kv_storage).items()},
            "kv_bytes_per_token": kv_bytes_per_token(spec),
            "plan": plan.as_dict(),
        }
        if req.dry_run:
            progress(plan.render())
            progress(f"dry run: pipeline {pipeline_uuid}, nothing written")
            return BuildResult(None, manifest, plan.render(), time.perf_counter() - t_start)
        lowered = lower(req.backend, req.target, programs, w, manifest, progress)
        manifest["programs"] = lowered
        where = w.write_tensors("params", weights, progress)
        manifest["params"] = {k: _entry(v, where[k]) for k, v in weights.items()}
        cwhere = w.write_tensors("consts", consts, progress)
        manifest["consts"] = {k: _entry(v, cwhere[k]) for k, v in consts.items()}
        for f in dump_files(req.dump_passes) if req.dump_passes is not None else ():  # for `dsv4c inspect --stage`
            w.write_bytes(f"debug/passes/{f.name}", f.read_bytes())
        out = w.commit(manifest)
        step(f"artifact written to {out}", t)
        return BuildResult(out, manifest, plan.render(), time.perf_counter() - t_start)


def _entry(t: torch.Tensor, file: str) -> dict:
    return {"file": file, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}


def _triton_version() -> str | None:
    try:
        import triton  # noqa: PLC0415

        return triton.__version__
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return None


def _load_weights(req: BuildRequest, spec: ModelSpec, dtype: torch.dtype, progress: Progress,
                  scratch: Path) -> dict[str, torch.Tensor]:
    """The model's parameters from ``--checkpoint``, or from a checkpoint synthesized into ``scratch`` (the
    artifact's temporary directory: a killed build leaves nothing behind) and removed once loaded."""
    if req.checkpoint is not None:
        ckpt = load_checkpoint(req.checkpoint, spec, progress)
    else:
        try:
            synthesize_checkpoint(spec, scratch / "ckpt", seed=req.seed)
            progress(f"synthesized {spec.name} weights (seed {req.seed})")
            ckpt = load_checkpoint(scratch / "ckpt", spec)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return to_model_params(spec, ckpt, dtype)
