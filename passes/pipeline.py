"""Which passes run, in which order, for each target; and the driver the build calls."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Callable, Iterable

import torch

from dsv4c.program import Program


def eliminate_dead_code(prog: Program) -> int:
    """Drop side-effect-free nodes whose results are unused; return how many went."""
    before = prog.num_nodes()
    prog.graph_module.graph.eliminate_dead_code()
    prog.recompile()
    return before - prog.num_nodes()


def run_pipeline(programs: dict[str, Program], weights: dict[str, torch.Tensor], ctx, target: str,
                 disable: Iterable[str] = (), dump_dir: Path | None = None,
                 log: Callable[[str], None] = print) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Run the target's pipeline over every entry point; return (rewritten weights, per-pass records)."""
    records = []
    t0 = time.perf_counter()
    before = {e: p.num_nodes() for e, p in programs.items()}
    removed = {e: eliminate_dead_code(p) for e, p in programs.items()}
    ms = (time.perf_counter() - t0) * 1e3
    uuid = hashlib.sha256(b"eliminate_dead_code/1").hexdigest()[:16]
    records.append({"name": "eliminate_dead_code", "uuid": uuid, "matches": removed, "ms": round(ms, 2),
                    "nodes_before": before, "nodes_after": {e: p.num_nodes() for e, p in programs.items()},
                    "skipped": False, "notes": ""})
    log(f"pass eliminate_dead_code: removed {sum(removed.values())} nodes in {ms:.0f} ms")
    return weights, records
