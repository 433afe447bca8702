"""benchmarks/read_floor.py's read kernel: under the interpreter its per-program xor equals numpy's, and its
three launch forms compile for sm_90 (in a subprocess: the interpreter is set in this process)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("triton")
os.environ.setdefault("TRITON_INTERPRET", "1")

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import read_floor  # noqa: E402


def test_read_kernel_xors_each_programs_slice():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-2**31, 2**31 - 1, (3 * 2 * read_floor.BLOCK,), dtype=torch.int32, generator=g)
    got = read_floor.read_launch(x, 3).numpy()
    want = np.bitwise_xor.reduce(x.view(3, -1).numpy(), axis=1)
    assert got.tolist() == want.tolist()
    with pytest.raises(ValueError, match="do not split into 4 programs"):
        read_floor.read_launch(x, 4)


COMPILE = """
import os, sys
os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, {bench!r})
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import read_floor
for pdl, first in read_floor.MODES.values():
    src = ASTSource(fn=read_floor._read_kernel, signature={{"x_ptr": "*i32", "o_ptr": "*i32", "n_per": "i32",
                    "BLOCK": "constexpr", "PDL": "constexpr", "LOADS_FIRST": "constexpr"}},
                    constexprs={{"BLOCK": read_floor.BLOCK, "PDL": pdl, "LOADS_FIRST": first}},
                    attrs={{(0,): [["tt.divisibility", 16]], (1,): [["tt.divisibility", 16]],
                           (2,): [["tt.divisibility", 16]]}})  # as launched: aligned pool, whole steps
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={{"num_warps": 4}}).asm["ptx"]
    wait = ptx.find("griddepcontrol.wait")
    load = ptx.find("ld.global")
    print(pdl, first, wait >= 0, "ld.global.v4" in ptx, wait < load if pdl else None)
"""


def test_read_kernel_compiles_for_hopper_in_each_launch_form():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", COMPILE.format(bench=str(BENCH))], env=env, capture_output=True,
                          text=True, timeout=300, cwd=BENCH.parent)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.split("\n")[:3]
    # plain: no wait; wait first: the wait before the first load; loads first: the loads before it
    assert lines == ["False False False True None", "True False True True True", "True True True True False"], lines
