"""The shortest time one kernel launch can take to read N bytes from HBM, as a decode step's GEMVs launch.

    python benchmarks/read_floor.py --out $OUT [--sizes 2,4,8,16,32,64] [--per-sm 1,2,4]

A flash-4 decode step at batch 1 streams its weights through ~35 launches of 2-64 MB each, and the small
ones reach a third to two thirds of the copy rate (session 12's decode_gemv_gpu.py: wq_a+wkv 33 %, wq_b
65 %). A launch costs more than bytes / bandwidth: its start, the first bytes' latency and its tail. This
script measures that cost with nothing else in the kernel, which says how much of a GEMV's gap is the
kernel's and how much any launch of that size pays:

- a read-only kernel: each program xor-reduces a contiguous slice with 16-byte loads and stores one word;
- 20 launches back to back in one CUDA graph, each from its own region of a pool larger than L2;
- three launch forms: plain; programmatic dependent launch waiting first (as the step's kernels that read
  activations do); programmatic launch with every load issued before the wait (what a GEMV could do with
  weights, which do not depend on the previous kernel);
- per size: microseconds a launch and the fraction of the copy bandwidth measured in the same run, against
  one launch reading all 20 regions.

Results: ``$OUT/read_floor.json`` (device named) and a table on stdout. On the CPU the kernel runs under
``TRITON_INTERPRET=1`` in tests/test_read_floor.py (its result is checked there, not timed).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from dsv4c.ops.triton_kernels import _pdl_release, _pdl_wait  # noqa: E402


def graph_time_us(fns: list, reps: int = 20) -> float:
    """Median replay time (us) of one CUDA graph holding ``fns`` (decode_gemv_gpu.py's timer)."""
    from decode_gemv_gpu import graph_time_us as timer  # noqa: PLC0415  (this folder; GPU runs only)

    return timer(fns, reps)

BLOCK = 2048  # int32 words per program per step: 8 KB, four 16-byte loads a thread at 4 warps
LAUNCHES = 20  # launches per graph
MODES = {"plain": (False, False), "pdl_wait_first": (True, False), "pdl_loads_first": (True, True)}


@triton.jit
def _read_kernel(x_ptr, o_ptr, n_per, BLOCK: tl.constexpr, PDL: tl.constexpr, LOADS_FIRST: tl.constexpr):
    """Program p xor-reduces words [p n_per, (p + 1) n_per) of ``x`` (n_per a multiple of BLOCK) into o[p].
    PDL: launched as a programmatic dependent; LOADS_FIRST: the loads before the wait (only the store waits),
    else the wait first."""
    if PDL and not LOADS_FIRST:
        _pdl_wait(PDL)
        _pdl_release(PDL)
    pid = tl.program_id(0)
    base = x_ptr + pid.to(tl.int64) * n_per
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), dtype=tl.int32)
    for i in range(0, n_per, BLOCK):
        acc = acc ^ tl.load(base + i + offs)
    if PDL and LOADS_FIRST:
        _pdl_wait(PDL)
        _pdl_release(PDL)
    tl.store(o_ptr + pid, tl.xor_sum(acc, axis=0))


def read_launch(x: torch.Tensor, programs: int, mode: str = "plain", out: torch.Tensor | None = None,
                num_warps: int = 4) -> torch.Tensor:
    """One read of all of int32 ``x`` (its length a multiple of ``programs`` x BLOCK) by ``programs``
    programs in launch form ``mode`` (see MODES); int32 [programs], each its slice's xor."""
    n = x.numel()
    if n % (programs * BLOCK):
        raise ValueError(f"{n} words do not split into {programs} programs of whole {BLOCK}-word steps")
    pdl, first = MODES[mode]
    out = torch.empty(programs, dtype=torch.int32, device=x.device) if out is None else out
    kw = {"launch_pdl": True} if pdl else {}
    _read_kernel[(programs,)](x, out, n // programs, BLOCK=BLOCK, PDL=pdl, LOADS_FIRST=first, num_warps=num_warps,
                              **kw)
    return out


def copy_bytes_per_s(nbytes: int = 2 << 30) -> float:
    """Device-to-device copy rate (read + write bytes per second), as dsv4c bench measures it."""
    a = torch.empty(nbytes // 4, dtype=torch.int32, device="cuda")
    b = torch.empty_like(a)
    b.copy_(a)
    torch.cuda.synchronize()
    us = graph_time_us([lambda: b.copy_(a)], reps=10)
    return 2 * nbytes / (us / 1e6)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=".")
    ap.add_argument("--sizes", default="1,2,4,8,16,32,64", help="MB read per launch")
    ap.add_argument("--per-sm", default="1,2,4", help="programs per SM")
    ap.add_argument("--warps", type=int, default=4)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    copy = copy_bytes_per_s()
    sizes = [int(s) for s in args.sizes.split(",")]
    per_sm = [int(p) for p in args.per_sm.split(",")]
    pool = torch.randint(-2**31, 2**31 - 1, (LAUNCHES * max(sizes) * (1 << 18),), dtype=torch.int32, device=dev)
    rows = []
    print(f"{torch.cuda.get_device_name(dev)}: copy {copy / 1e12:.3f} TB/s, {sms} SMs, {LAUNCHES} launches a graph")
    print(f"{'MB':>5} {'progs':>6} {'mode':>16} {'us/launch':>10} {'TB/s':>7} {'of copy':>8}")
    for mb in sizes:
        for k in per_sm:
            programs = k * sms
            words = (mb << 18) // (programs * BLOCK) * programs * BLOCK  # whole steps: at most a step less
            if words == 0:
                continue
            regions = [pool[i * words:(i + 1) * words] for i in range(LAUNCHES)]
            want = np.bitwise_xor.reduce(regions[0].view(programs, -1).cpu().numpy(), axis=1)
            outs = [torch.empty(programs, dtype=torch.int32, device=dev) for _ in regions]
            for mode in MODES:
                ok = bool((read_launch(regions[0], programs, mode, outs[0], args.warps).cpu().numpy() == want).all())
                us = graph_time_us([lambda r=r, o=o, m=mode: read_launch(r, programs, m, o, args.warps)
                               for r, o in zip(regions, outs)])
                per = us / LAUNCHES
                rate = 4 * words / (per / 1e6)
                row = {"mb": round(4 * words / 2**20, 3), "programs": programs, "mode": mode, "ok": ok,
                       "us_per_launch": round(per, 3), "bytes_per_s": round(rate), "of_copy": round(rate / copy, 3)}
                rows.append(row)
                print(f"{row['mb']:5.1f} {programs:6d} {mode:>16} {per:10.2f} {rate / 1e12:7.3f} "
                      f"{row['of_copy']:8.1%}{'' if ok else '  WRONG RESULT'}")
        big = pool[:LAUNCHES * (mb << 18) // (4 * sms * BLOCK) * (4 * sms * BLOCK)]
        us = graph_time_us([lambda: read_launch(big, 4 * sms, num_warps=args.warps)])
        rows.append({"mb": round(4 * big.numel() / 2**20, 3), "programs": 4 * sms, "mode": "one_launch_all_regions",
                     "ok": True, "us_per_launch": round(us, 3), "bytes_per_s": round(4 * big.numel() / (us / 1e6)),
                     "of_copy": round(4 * big.numel() / (us / 1e6) / copy, 3)})
        print(f"{rows[-1]['mb']:5.0f} {4 * sms:6d} {'one launch':>16} {us:10.2f} "
              f"{rows[-1]['bytes_per_s'] / 1e12:7.3f} {rows[-1]['of_copy']:8.1%}")
    out = Path(args.out) / "read_floor.json"
    out.write_text(json.dumps({"device": torch.cuda.get_device_name(dev), "torch": torch.__version__,
                               "triton": triton.__version__, "copy_bytes_per_s": round(copy), "sms": sms,
                               "launches_per_graph": LAUNCHES, "warps": args.warps, "rows": rows}, indent=1))
    print(f"wrote {out}")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
