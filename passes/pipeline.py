"""Which passes run, in which order, with which config, for each target; and the driver the build calls.

The pipelines are data: a list of (pass name, config overrides) per target. Targets differ only in
configuration (the FP4 tile layout the expert kernel reads; the GPU targets schedule expert waves in
prefill only), not in the passes that run, so an artifact's graphs are comparable across targets.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from dsv4c.errors import ConfigError
from dsv4c.program import Program

# Importing the pass modules registers them.
from . import (cleanup, fuse_compress_indexer, fuse_shared_input_gemms, pack_fp4_experts,  # noqa: F401
               rewrite_swiglu_clamp, schedule_expert_waves)  # noqa: F401
from .manager import REGISTRY, Pass, PassManager, check_pass_names

_CPU_TILE = {"bn": 16, "bk": 64}  # small tiles: the CPU reference unpacks whole tensors anyway
_HOPPER_TILE = {"bn": 128, "bk": 128}  # one 128x128 tile = 8 KiB of nibbles, a Triton program's K step

PIPELINES: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "cpu": [
        ("eliminate_dead_code", {}),
        ("fuse_compress_indexer", {}),
        ("rewrite_swiglu_clamp", {}),
        ("pack_fp4_experts", _CPU_TILE),
        ("fuse_shared_input_gemms", {}),
        ("schedule_expert_waves", {"num_waves": 2}),
        ("remove_noop_casts", {}),
        ("remove_noop_views", {}),
    ],
    "h100": [
        ("eliminate_dead_code", {}),
        ("fuse_compress_indexer", {}),
        ("rewrite_swiglu_clamp", {}),
        ("pack_fp4_experts", _HOPPER_TILE),
        ("fuse_shared_input_gemms", {}),
        ("schedule_expert_waves", {"num_waves": 2, "entries": ("prefill",)}),
        ("remove_noop_casts", {}),
        ("remove_noop_views", {}),
    ],
}
PIPELINES["h200"] = PIPELINES["h100"]


def make_passes(target: str, config: dict[str, dict[str, Any]] | None = None) -> list[Pass]:
    """The target's pipeline as pass objects; ``config`` overrides options per pass name."""
    if target not in PIPELINES:
        raise ConfigError(f"No pass pipeline for target {target!r}.", f"use one of: {', '.join(PIPELINES)}.")
    config = dict(config or {})
    check_pass_names(config, "the pass config")
    return [REGISTRY[name]({**opts, **config.get(name, {})}) for name, opts in PIPELINES[target]]


def run_pipeline(programs: dict[str, Program], weights: dict[str, torch.Tensor], ctx, target: str,
                 disable: Iterable[str] = (), dump_dir: Path | None = None,
                 log: Callable[[str], None] = print, config: dict[str, dict[str, Any]] | None = None
                 ) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Run the target's pipeline over every entry point (rewriting ``programs`` in place); return the
    rewritten weights (a new dict; ``weights`` is left as it was) and one record per pass."""
    manager = PassManager(make_passes(target, config), disable, dump_dir, log)
    return manager.run(programs, weights, ctx)
