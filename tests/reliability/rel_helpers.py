"""Helpers shared by the reliability tests (a uniquely named module: tests/ has no packages, and the
test directories put their own folders on sys.path)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from dsv4c.artifact import MANIFEST_DIGEST, manifest_digest


def dsv4c_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "dsv4c.cli", *args]


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """The real command line in a subprocess (progress off so stderr holds only the error)."""
    return subprocess.run(dsv4c_cmd("-q", *args), capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


def edit_manifest(art: Path, fn, resign: bool = True) -> None:
    """Apply ``fn`` to the manifest; ``resign`` recomputes its digest, as a buggy or hostile writer would
    (so that the check under test, not the digest, is what refuses the edit)."""
    m = json.loads((art / "manifest.json").read_text())
    fn(m)
    if resign:
        m[MANIFEST_DIGEST] = manifest_digest(m)
    (art / "manifest.json").write_text(json.dumps(m))


def flip_bit(path: Path, offset: int, bit: int = 0) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([b ^ (1 << bit)]))


def assert_one_paragraph_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    """Non-zero exit, no traceback, one line on stderr carrying the problem, the fix, and ``needles``."""
    err = r.stderr.strip()
    assert r.returncode != 0, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    assert len(err.splitlines()) == 1, err
    assert "error:" in err and "Fix:" in err, err
    for n in needles:
        assert n in err, (n, err)
    return err
