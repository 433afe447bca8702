"""Reliability fixtures: one real artifact per session, built through the CLI after a killed build.

The session artifact doubles as the SIGKILL fault-injection test (issue 6): a first ``dsv4c build`` is
stopped and SIGKILLed right after it starts writing its temporary directory; a second build of the same
output, started while the first was still tracing, then has to succeed over the debris. Only one tiny
build's worth of CPU time is spent on the kill, and the two traces overlap on CI's two cores.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from dsv4c.checkpoint import synthesize_checkpoint
from dsv4c.spec import get_variant

sys.path.insert(0, str(Path(__file__).parent))  # rel_helpers.py, rel_fuzzing.py (tests/ has no packages)
from rel_helpers import dsv4c_cmd  # noqa: E402

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


def _wait_for_line(log: Path, text: str, proc: subprocess.Popen, deadline: float) -> None:
    while time.monotonic() < deadline:
        if text in log.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            raise AssertionError(f"build exited ({proc.returncode}) before {text!r}:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {text!r} in the build log:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="session")
def built(tmp_path_factory) -> BuiltArtifact:
    root = tmp_path_factory.mktemp("build")
    out = root / "tiny"
    lock = root / ".tiny.lock"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    deadline = time.monotonic() + BUILD_TIMEOUT_S
    vlog, rlog = root / "victim.log", root / "rebuild.log"
    with open(vlog, "w") as vf:
        victim = subprocess.Popen(dsv4c_cmd("build", *BUILD_ARGS, "-o", str(out)), stdout=vf, stderr=subprocess.STDOUT, env=env)
    rebuild = None
    report = KillReport()
    try:
        # Start the second build once the first is half-way (traced prefill): both trace in parallel and
        # the first reaches its writing phase well before the second does.
        _wait_for_line(vlog, "traced prefill", victim, deadline)
        with open(rlog, "w") as rf:
            rebuild = subprocess.Popen(dsv4c_cmd("build", *BUILD_ARGS, "-o", str(out)), stdout=rf, stderr=subprocess.STDOUT,
                                       env=env)
        # Freeze the first build as soon as it holds the lock and its temp directory exists.
        while time.monotonic() < deadline:
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
        r_rc = rebuild.wait(timeout=max(deadline - time.monotonic(), 1))
    finally:
        for p in (victim, rebuild):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
    leftovers = sorted(p.name for p in root.iterdir() if p.name.startswith(".tiny"))
    art = BuiltArtifact(out, report, r_rc, rlog.read_text(), leftovers)
    assert r_rc == 0, f"the rebuild after the kill failed:\n{art.rebuild_stderr[-3000:]}"
    return art


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
