"""The command line end to end: synth, build from a checkpoint, run, verify, dry runs."""

import json
import os
import subprocess
import sys

import pytest

from dsv4c.layout import kv_bytes_per_token
from dsv4c.spec import get_variant


def dsv4c(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dsv4c.cli", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_synth_build_from_checkpoint_run_verify(tmp_path):
    ckpt, art = tmp_path / "ckpt", tmp_path / "art"
    r = dsv4c("synth", "--variant", "tiny", "-o", str(ckpt))
    assert r.returncode == 0, r.stderr
    assert (ckpt / "model.safetensors.index.json").is_file() and (ckpt / "config.json").is_file()
    r = dsv4c("build", "--checkpoint", str(ckpt), "--target", "cpu", "--backend", "eager", "--max-seq-len", "128",
              "-o", str(art))
    assert r.returncode == 0, r.stderr
    assert "traced prefill" in r.stderr and "artifact written" in r.stderr
    r = dsv4c("run", str(art), "--prompt-ids", "1,2,3", "--max-new-tokens", "5", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["prompt_ids"] == [1, 2, 3] and len(out["generated_ids"]) == 5
    assert all(0 <= t < 256 for t in out["generated_ids"])
    r = dsv4c("verify", str(art))
    assert r.returncode == 0 and r.stdout.startswith("ok:")


@pytest.mark.parametrize("variant", ["flash", "pro"])
def test_dry_run_of_the_published_models(variant):
    """Traces the whole model on fake tensors: no weights are allocated, so it fits this machine."""
    r = dsv4c("build", "--variant", variant, "--target", "cpu", "--dry-run", timeout=1500)
    assert r.returncode == 0, r.stderr[-2000:]
    kv = kv_bytes_per_token(get_variant(variant))
    assert f"KV cache: {kv:,.1f} bytes/token" in r.stdout
    assert "nothing written" in r.stdout
    assert "traced decode" in r.stderr
