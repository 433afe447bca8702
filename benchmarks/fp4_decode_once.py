"""A few launches of the decode FP4 expert GEMV at Flash shapes, for a kernel profiler (``ncu``) to look at.

    ncu --clock-control none -k regex:fp4_gemv_mma -c 4 --section SpeedOfLight \\
        --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy \\
        python benchmarks/fp4_decode_once.py

Draws the 256 packed experts of one block's w1+w3 and w2 (``decode_gemv_gpu.fp4_experts``), picks 6 of
them for one decode row, and runs each product twice (the first launch compiles). decode_gemv_gpu.py times
the same launches inside the whole step; this script only gives the profiler the kernels alone. ``--tune
k=v,...`` sets TUNE knobs first (integers, or True / False).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from decode_gemv_gpu import D, MI, TOPK, fp4_experts  # noqa: E402  (this folder)


def _value(text: str) -> object:
    return {"True": True, "False": False, "None": None}.get(text, int(text) if text.lstrip("-").isdigit() else text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tune", default="", help="TUNE knobs to set first, e.g. fp4_mma_split=2")
    args = ap.parse_args(argv)
    from dsv4c.ops import triton_kernels as tk  # noqa: PLC0415

    for kv in filter(None, args.tune.split(",")):
        k, v = kv.split("=")
        tk.TUNE[k] = _value(v)
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    expert = torch.randperm(256, generator=g, device=dev)[:TOPK]
    for n, k in ((2 * MI, D), (D, MI)):
        w, s = fp4_experts(n, k, dev)
        x = torch.randn(TOPK, k, generator=g, device=dev).to(torch.bfloat16)
        for _ in range(2):
            out = tk.fp4_grouped_linear_packed(x, expert, w, s, True, True)
        torch.cuda.synchronize()
        print(f"w {n} x {k}: out {tuple(out.shape)}, finite {bool(out.isfinite().all())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
