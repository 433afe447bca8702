"""Choose decode-kernel TUNE values from measurements made earlier in the same device call.

Reads ``decode_gemv.json`` (benchmarks/decode_gemv_gpu.py: one decode step's weight-streaming and attention
launches per kernel variant) and, if given, the ``kernels_gpu.py --only topk_ids`` JSON; writes the TUNE
overrides as a JSON object for ``gpu_suite.py --tune-from`` and prints why each was chosen.

- the variants within tolerance (``ok``) that beat the default's total time are merged, fastest first,
  skipping any whose knobs a faster one already set (:func:`pick_variant`; no override when none is faster);
- with top-k measurements, ``triton_topk`` is switched on when every top-k case selected exactly the
  reference ids and the kernel's single-token (decode) cases take less time in sum than ``torch.topk``'s
  (:func:`pick_topk`); without them its default stands.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


MIN_GAIN_US = 5.0  # a variant must beat the default by more than this to count (variants of one run differ by a few us)


def pick_variant(gemv: dict) -> tuple[str, dict]:
    """Every correct variant faster than the default by more than MIN_GAIN_US, best first, merged while
    their knobs do not overlap (each variant moves one group of kernels, so their gains add; the suite's
    full step measures the merged result). Without a default measurement: the single fastest."""
    ok = {name: rec for name, rec in gemv["variants"].items() if rec.get("ok") and "us" in rec}
    if not ok:
        return "default", {}
    if "default" not in ok:
        best = min(ok, key=lambda n: ok[n]["us"]["all"])
        return best, dict(ok[best]["tune"])
    base = ok["default"]["us"]["all"]
    faster = sorted((n for n in ok if n != "default" and base - ok[n]["us"]["all"] > MIN_GAIN_US),
                    key=lambda n: ok[n]["us"]["all"])
    chosen, tune = [], {}
    for name in faster:
        if any(k in tune for k in ok[name]["tune"]):  # that knob is already set by a faster variant
            continue
        chosen.append(name)
        tune.update(ok[name]["tune"])
    return "+".join(chosen) or "default", tune


def pick_topk(rows: list[dict]) -> tuple[bool, str]:
    """On when every case selected the reference ids and the decode (single-token) cases take less time in
    sum than ``torch.topk`` on them: a decode step runs one of them (the visible length grows with the
    context), so a kernel that wins big at short contexts and loses a little at long ones still pays."""
    if not rows:
        return False, "no top-k measurements"
    if not all(r["ok"] for r in rows):
        return False, "a top-k case differed from the reference ids"
    decode = [r for r in rows if " S=1 " in r["case"] and r.get("baseline_ms") is not None]
    if not decode:
        return False, "no decode case timed against torch.topk"
    ours, theirs = sum(r["ms"] for r in decode), sum(r["baseline_ms"] for r in decode)
    slower = [r["case"] for r in decode if r["ms"] >= r["baseline_ms"]]
    if ours >= theirs:
        return False, f"decode cases {ours * 1e3:.0f} us vs torch.topk {theirs * 1e3:.0f} us"
    return True, (f"exact; decode cases {ours * 1e3:.0f} us vs torch.topk {theirs * 1e3:.0f} us"
                  + (f" (slower on {slower})" if slower else ""))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gemv", required=True, help="decode_gemv.json")
    p.add_argument("--topk", help="kernels_gpu.py --only topk_ids --json output")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    tune: dict = {}
    gemv = json.loads(Path(args.gemv).read_text())
    name, values = pick_variant(gemv)
    tune.update(values)
    print(f"decode launches: variant {name} {values}")
    if args.topk and Path(args.topk).exists():
        on, why = pick_topk(json.loads(Path(args.topk).read_text()).get("results", []))
        tune["triton_topk"] = on
        print(f"triton_topk={on}: {why}")
    else:  # nothing measured in this call: the default stands
        print("triton_topk: no top-k measurements, default kept")
    Path(args.out).write_text(json.dumps(tune))
    return 0


if __name__ == "__main__":
    sys.exit(main())
