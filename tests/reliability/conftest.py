"""Reliability fixtures: one real artifact per session, built through the CLI after a killed build.

The session artifact doubles as the SIGKILL fault-injection test (issue 6): a first ``dsv4c build`` is
stopped and SIGKILLed right after it starts writing its temporary directory; a second build of the same
output, started while the first was still tracing, then has to succeed over the debris. Only one tiny
build's worth of CPU time is spent on the kill, the two traces overlap, and both run in the background
from the end of collection while the tests that need no artifact run first.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from dsv4c.checkpoint import synthesize_checkpoint
from dsv4c.spec import get_variant

sys.path.insert(0, str(Path(__file__).parent))  # rel_helpers.py, rel_fuzzing.py (tests/ has no packages)

HERE = Path(__file__).resolve().parent

BUILD_ARGS = ("--variant", "tiny", "--max-seq-len", "256", "--max-batch", "2")
BUILD_TIMEOUT_S = 600


@dataclass
class KillReport:
    """What the killed build left behind, observed between SIGSTOP and SIGKILL and after the kill."""

    stopped_while_holding_lock: bool = False
    output_existed_at_kill: bool = True
    temp_dirs_at_kill: list[str] = field(default_factory=list)
    temp_files_at_kill: list[str] = field(default_factory=list)
    output_existed_after_kill: bool = True
    victim_returncode: int | None = None


@dataclass
class BuiltArtifact:
    path: Path
    kill: KillReport
    rebuild_returncode: int
    rebuild_stderr: str
    leftovers_after_rebuild: list[str]


def _holds_lock(pid: int, lock: Path) -> bool:
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == str(lock):
                return True
        except OSError:
            continue
    return False


def _wait_for_line(log: Path, text: str, proc: subprocess.Popen, deadline: float, stop: threading.Event) -> None:
    while time.monotonic() < deadline and not stop.is_set():
        if text in log.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            raise AssertionError(f"build exited ({proc.returncode}) before {text!r}:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {text!r} in the build log:\n{log.read_text()[-3000:]}")


class _KillAndRebuild(threading.Thread):
    """Runs the killed build and the rebuild in the background, so that the tests that need no artifact
    (fuzzers, checkpoint tests) run meanwhile: on CI's two cores the builds' tracing overlaps them."""

    def __init__(self, root: Path) -> None:
        super().__init__(name="dsv4c-kill-and-rebuild", daemon=True)
        self.root = root
        self.result: BuiltArtifact | None = None
        self.error: BaseException | None = None
        self.procs: list[subprocess.Popen] = []
        self.stop = threading.Event()

    def _spawn(self, log: Path) -> subprocess.Popen:
        with open(log, "w") as f:
            p = subprocess.Popen(_unlimited_cmd("build", *BUILD_ARGS, "-o", str(self.root / "tiny")), stdout=f,
                                 stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.procs.append(p)
        return p

    def run(self) -> None:
        try:
            self.result = self._run()
        except BaseException as e:  # noqa: BLE001 - handed to the fixture
            self.error = e
        finally:
            self.kill_all()

    def kill_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    def _run(self) -> BuiltArtifact:
        root, out, lock = self.root, self.root / "tiny", self.root / ".tiny.lock"
        deadline = time.monotonic() + BUILD_TIMEOUT_S
        vlog, rlog = root / "victim.log", root / "rebuild.log"
        victim = self._spawn(vlog)
        report = KillReport()
        # Start the second build once the first is half-way (traced prefill): both trace in parallel and
        # the first reaches its writing phase well before the second does.
        _wait_for_line(vlog, "traced prefill", victim, deadline, self.stop)
        rebuild = self._spawn(rlog)
        # Freeze the first build as soon as it holds the lock and its temp directory exists.
        while time.monotonic() < deadline and not self.stop.is_set():
            if victim.poll() is not None:
                raise AssertionError(f"the build to be killed finished first ({victim.returncode}):\n{vlog.read_text()[-3000:]}")
            if list(root.glob(".tiny.tmp-*")) and _holds_lock(victim.pid, lock):
                victim.send_signal(signal.SIGSTOP)
                break
            time.sleep(0.002)
        else:
            raise AssertionError("the first build never started writing")
        report.stopped_while_holding_lock = _holds_lock(victim.pid, lock)
        report.output_existed_at_kill = out.exists()
        temps = list(root.glob(".tiny.tmp-*"))
        report.temp_dirs_at_kill = [t.name for t in temps]
        report.temp_files_at_kill = sorted(str(p.relative_to(t)) for t in temps for p in t.rglob("*") if p.is_file())
        victim.send_signal(signal.SIGKILL)
        report.victim_returncode = victim.wait(timeout=30)
        report.output_existed_after_kill = out.exists()
        while rebuild.poll() is None:
            if time.monotonic() > deadline or self.stop.is_set():
                raise AssertionError(f"the rebuild did not finish in time:\n{rlog.read_text()[-3000:]}")
            time.sleep(0.1)
        leftovers = sorted(p.name for p in root.iterdir() if p.name.startswith(".tiny"))
        return BuiltArtifact(out, report, rebuild.returncode, rlog.read_text(), leftovers)


def _unlimited_cmd(*args: str) -> list[str]:
    """``dsv4c ARGS`` through a launcher that lifts the address-space cap a fuzz case may have set when the
    process was spawned (rlimits are inherited), then execs the real command line."""
    launcher = ("import os, resource, sys; h = resource.getrlimit(resource.RLIMIT_AS)[1]; "
                "resource.setrlimit(resource.RLIMIT_AS, (h, h)); "
                "os.execv(sys.executable, [sys.executable, '-m', 'dsv4c.cli', *sys.argv[1:]])")
    return [sys.executable, "-c", launcher, *args]


_BUILDER: dict[str, _KillAndRebuild] = {}


def _needs_build(item: pytest.Item) -> bool:
    names = set(getattr(item, "fixturenames", ()))
    return "built" in names or (not os.environ.get("DSV4C_TEST_ARTIFACT") and bool({"artifact", "artifact_copy"} & names))


def pytest_collection_modifyitems(session, config, items) -> None:
    """Run this directory's artifact-free tests first and start the builds in the background now."""
    mine = [k for k, it in enumerate(items) if HERE in Path(str(it.fspath)).resolve().parents]
    if not mine:
        return
    chosen = [items[k] for k in mine]
    ordered = [it for it in chosen if not _needs_build(it)] + [it for it in chosen if _needs_build(it)]
    for k, it in zip(mine, ordered):
        items[k] = it
    if any(_needs_build(it) for it in chosen) and "thread" not in _BUILDER:
        t = _KillAndRebuild(Path(tempfile.mkdtemp(prefix="dsv4c-reliability-build-")))
        _BUILDER["thread"] = t
        t.start()


def pytest_sessionfinish(session, exitstatus) -> None:
    t = _BUILDER.pop("thread", None)
    if t is not None:
        t.stop.set()
        t.join(timeout=60)
        t.kill_all()
        shutil.rmtree(t.root, ignore_errors=True)


@pytest.fixture(scope="session")
def built() -> BuiltArtifact:
    """The killed build and its rebuild (started in the background at collection; waited for here)."""
    t = _BUILDER.get("thread")
    if t is None:  # collected some other way: run it now
        t = _KillAndRebuild(Path(tempfile.mkdtemp(prefix="dsv4c-reliability-build-")))
        _BUILDER["thread"] = t
        t.start()
    t.join(timeout=BUILD_TIMEOUT_S + 60)
    if t.error is not None:
        raise t.error
    assert t.result is not None, "the background build did not finish"
    assert t.result.rebuild_returncode == 0, f"the rebuild after the kill failed:\n{t.result.rebuild_stderr[-3000:]}"
    return t.result


@pytest.fixture(scope="session")
def artifact(request) -> Path:
    """The session's pristine artifact: never modify it; use ``artifact_copy``.

    ``DSV4C_TEST_ARTIFACT=DIR`` reuses an artifact built by ``dsv4c build --variant tiny --max-seq-len 256
    --max-batch 2`` (for quick local iterations; the killed-build test still builds)."""
    pre = os.environ.get("DSV4C_TEST_ARTIFACT")
    if pre:
        return Path(pre)
    return request.getfixturevalue("built").path


@pytest.fixture
def artifact_copy(artifact: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "art"
    shutil.copytree(artifact, dst)
    return dst


@pytest.fixture(scope="session")
def tiny_ckpt_dir(tmp_path_factory) -> Path:
    """A pristine synthesized tiny checkpoint (one shard): never modify it; use ``ckpt_copy``."""
    return synthesize_checkpoint(get_variant("tiny"), tmp_path_factory.mktemp("rel-ckpt") / "tiny", seed=0)


@pytest.fixture
def ckpt_copy(tiny_ckpt_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt_dir, dst)
    return dst
