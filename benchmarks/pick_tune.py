"""Choose decode-kernel TUNE values from measurements made earlier in the same device call.

Reads ``decode_gemv.json`` (benchmarks/decode_gemv_gpu.py: one decode step's weight-streaming and attention
launches per kernel variant) and, if given, the ``kernels_gpu.py --only topk_ids`` JSON; writes the TUNE
overrides as a JSON object for ``gpu_suite.py --tune-from`` and prints why each was chosen.

- the variant with the lowest total time among those within tolerance (``ok``) wins, its TUNE values are
  taken (the default variant wins ties: no override);
- ``triton_topk`` is switched on when every top-k case selected exactly the reference ids and the kernel
  beat ``torch.topk`` on each single-token (decode) case.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def pick_variant(gemv: dict) -> tuple[str, dict]:
    ok = {name: rec for name, rec in gemv["variants"].items() if rec.get("ok") and "us" in rec}
    if not ok:
        return "default", {}
    best = min(ok, key=lambda n: (ok[n]["us"]["all"], n != "default"))
    return best, dict(ok[best]["tune"])


def pick_topk(rows: list[dict]) -> tuple[bool, str]:
    if not rows:
        return False, "no top-k measurements"
    if not all(r["ok"] for r in rows):
        return False, "a top-k case differed from the reference ids"
    decode = [r for r in rows if " S=1 " in r["case"]]
    slower = [r["case"] for r in decode if r.get("baseline_ms") is not None and r["ms"] >= r["baseline_ms"]]
    if not decode or slower:
        return False, f"not faster than torch.topk on {slower or 'any decode case'}"
    return True, "exact and faster than torch.topk on every decode case"


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
    else:
        on, why = False, "no top-k measurements"
    tune["triton_topk"] = on
    print(f"triton_topk={on}: {why}")
    Path(args.out).write_text(json.dumps(tune))
    return 0


if __name__ == "__main__":
    sys.exit(main())
