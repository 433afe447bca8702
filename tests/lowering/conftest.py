"""Session fixtures for the ONNX / TensorRT lowering tests.

Every (variant, numerics) pair gets an eager and an onnx artifact built once per session from one trace
(``build_pair.py``), plus the eager artifact's logits for the comparison scenario. The pairs build in
subprocesses, two at a time (tracing is single-threaded Python, so two builds share a 2-core machine
well), started in the background at the end of collection so that the tests that need no artifact run
meanwhile; ``pairs`` waits for them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

HERE = Path(__file__).parent
# name -> (variant, numerics, layers). Reference numerics use the first 3 tiny blocks: window, CSA and
# HCA attention, hash and top-k routing and every quant-dequant simulation, at less build time.
PAIRS = {
    "mini-exact": ("mini", "exact", None),  # longest first
    "tiny-exact": ("tiny", "exact", None),
    "tiny3-reference": ("tiny", "reference", 3),
}
WORKERS = max(1, min(2, os.cpu_count() or 1))
TIMEOUT_S = 1800


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


class _Builder(threading.Thread):
    """Runs build_pair.py for every pair, WORKERS at a time; ``failed`` lists what went wrong."""

    def __init__(self, root: Path) -> None:
        super().__init__(daemon=True)
        self.root = root
        self.pairs = {n: Pair(n, v, num, root / n) for n, (v, num, _) in PAIRS.items()}
        self.failed: list[str] = []
        self.procs: dict[str, subprocess.Popen] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        todo = list(PAIRS)
        running: dict[str, tuple[subprocess.Popen, object, float]] = {}
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        while (todo or running) and not self.stop.is_set():
            while todo and len(running) < WORKERS:
                name = todo.pop(0)
                variant, numerics, layers = PAIRS[name]
                log = open(self.root / f"{name}.log", "w")
                cmd = [sys.executable, str(HERE / "build_pair.py"), str(self.pairs[name].root), variant, numerics,
                       str(layers) if layers else "-"]
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
                self.procs[name] = proc
                running[name] = (proc, log, time.monotonic())
            time.sleep(0.5)
            for name, (proc, log, t0) in list(running.items()):
                if proc.poll() is None and time.monotonic() - t0 > TIMEOUT_S:
                    proc.kill()
                    proc.wait()
                if proc.poll() is not None:
                    log.close()
                    del running[name]
                    if proc.returncode != 0:
                        tail = (self.root / f"{name}.log").read_text()[-3000:]
                        self.failed.append(f"{name} (exit {proc.returncode}):\n{tail}")
        for proc, log, _ in running.values():
            proc.kill()
            proc.wait()
            log.close()


_BUILDER: dict[str, _Builder] = {}


def _start() -> _Builder:
    if "b" not in _BUILDER:
        _BUILDER["b"] = _Builder(Path(tempfile.mkdtemp(prefix="dsv4c-lowering-")))
        _BUILDER["b"].start()
    return _BUILDER["b"]


def _needs_pairs(item: pytest.Item) -> bool:
    return bool({"pairs", "onnx_engines"} & set(getattr(item, "fixturenames", ())))


def pytest_collection_modifyitems(session, config, items) -> None:
    """This directory's tests that need no built pair run first; the builds start now, in the background."""
    mine = [k for k, it in enumerate(items) if HERE in Path(str(it.fspath)).resolve().parents]
    if not mine:
        return
    chosen = [items[k] for k in mine]
    ordered = [it for it in chosen if not _needs_pairs(it)] + [it for it in chosen if _needs_pairs(it)]
    for k, it in zip(mine, ordered):
        items[k] = it
    if any(_needs_pairs(it) for it in chosen):
        _start()


def pytest_sessionfinish(session, exitstatus) -> None:
    b = _BUILDER.pop("b", None)
    if b is not None:
        b.stop.set()
        b.join(timeout=30)
        for p in b.procs.values():
            if p.poll() is None:
                p.kill()
        shutil.rmtree(b.root, ignore_errors=True)


@pytest.fixture(scope="session")
def pairs() -> dict[str, Pair]:
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    b = _start()
    b.join(timeout=TIMEOUT_S + 120)
    if b.is_alive() or b.failed:
        pytest.fail("building the lowering test artifacts failed:\n" + "\n\n".join(b.failed or ["timed out"]),
                    pytrace=False)
    return b.pairs


@pytest.fixture(scope="session")
def onnx_engines(pairs):
    """name -> a loaded onnx Engine (one per artifact; tests reset its state with a prefill)."""
    from dsv4c.runtime import Engine

    return {n: Engine.load(p.onnx) for n, p in pairs.items()}
