"""Session fixtures for the ONNX / TensorRT lowering tests.

Every (variant, numerics) pair gets an eager and an onnx artifact built once per session from one trace
(``build_pair.py``), plus the eager artifact's logits for the comparison scenario. The pairs build in
subprocesses, two at a time: tracing is single-threaded Python, so two builds share a 2-core machine
well, and the whole set takes about as long as its two longest builds.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
pytest.importorskip("onnxruntime")

HERE = Path(__file__).parent
# name -> (variant, numerics, layers). Reference numerics use the first 3 tiny blocks: window, CSA and
# HCA attention, hash and top-k routing, every quant-dequant simulation, at a third less build time.
PAIRS = {
    "tiny-exact": ("tiny", "exact", None),
    "mini-exact": ("mini", "exact", None),
    "tiny3-reference": ("tiny", "reference", 3),
}
ORDER = ("mini-exact", "tiny-exact", "tiny3-reference")  # longest first
WORKERS = max(1, min(2, os.cpu_count() or 1))
TIMEOUT_S = 1200


@dataclass(frozen=True)
class Pair:
    name: str
    variant: str
    numerics: str
    root: Path

    @property
    def eager(self) -> Path:
        return self.root / "eager"

    @property
    def onnx(self) -> Path:
        return self.root / "onnx"

    @property
    def run_file(self) -> Path:
        return self.root / "eager_run.safetensors"


@pytest.fixture(scope="session")
def pairs(tmp_path_factory) -> dict[str, Pair]:
    root = tmp_path_factory.mktemp("lowering")
    out = {n: Pair(n, v, num, root / n) for n, (v, num, _) in PAIRS.items()}
    todo = list(ORDER)
    running: dict[str, tuple[subprocess.Popen, object, float]] = {}
    failed = []
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    while todo or running:
        while todo and len(running) < WORKERS:
            name = todo.pop(0)
            variant, numerics, layers = PAIRS[name]
            log = open(root / f"{name}.log", "w")
            cmd = [sys.executable, str(HERE / "build_pair.py"), str(out[name].root), variant, numerics,
                   str(layers) if layers else "-"]
            running[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log,
                             time.monotonic())
        time.sleep(0.5)
        for name, (proc, log, t0) in list(running.items()):
            if proc.poll() is None and time.monotonic() - t0 > TIMEOUT_S:
                proc.kill()
                proc.wait()
            if proc.poll() is not None:
                log.close()
                del running[name]
                if proc.returncode != 0:
                    tail = (root / f"{name}.log").read_text()[-3000:]
                    failed.append(f"{name} (exit {proc.returncode}):\n{tail}")
    if failed:
        pytest.fail("building the lowering test artifacts failed:\n" + "\n\n".join(failed), pytrace=False)
    return out


@pytest.fixture(scope="session")
def onnx_engines(pairs):
    """name -> a loaded onnx Engine (one per artifact; tests reset state with a prefill)."""
    from dsv4c.runtime import Engine

    return {n: Engine.load(p.onnx) for n, p in pairs.items()}
