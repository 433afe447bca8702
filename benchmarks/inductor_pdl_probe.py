"""Where Inductor's generated kernels wait under programmatic dependent launch, with and without dsv4c's
wait-first patch (runtime/inductor_pdl.py), on a CUDA sm_90+ GPU.

    python benchmarks/inductor_pdl_probe.py --out $OUT

Compiles a small function whose second kernel reads a buffer the kernel before last wrote (not the
previous kernel's output) and counts, in the generated Triton source, the kernels that touch global
memory before their ``gdc_wait``. Inductor's own placement leaves such accesses ahead of the wait; with
the patch none remains. Also runs the compiled function against eager. Results: ``$OUT/inductor_pdl.json``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def _kernels(code: str) -> list[str]:
    return re.findall(r"@triton\.jit\ndef \w+\(.*?(?=\n@triton|\n''', device_str|\Z)", code, re.S)


def early_accesses(code: str) -> tuple[int, int]:
    """(kernels that load or store before their first gdc_wait or have none, kernels that touch memory)."""
    early = total = 0
    for body in _kernels(code):
        lines = body.splitlines()
        touch = [i for i, line in enumerate(lines) if "tl.load(" in line or "tl.store(" in line]
        if not touch:
            continue
        total += 1
        waits = [i for i, line in enumerate(lines) if "gdc_wait" in line]
        early += not waits or touch[0] < waits[0]
    return early, total


def compiled_code(fn, *args) -> tuple[str, torch.Tensor]:  # noqa: ANN001
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    out, codes = run_and_get_code(torch.compile(fn, options={"triton.enable_pdl": True}), *args)
    return "\n".join(codes), out


def step(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    h = torch.relu(a @ b)  # cuBLAS, then an elementwise kernel
    s = h.sum(-1, keepdim=True)  # a reduction over the previous kernel's output
    return torch.softmax(h * s + a, dim=-1)  # reads a (older than the previous kernel) and both


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9:
        print("needs a CUDA GPU of sm_90 or newer", file=sys.stderr)
        return 2
    a = torch.randn(64, 256, device="cuda")
    b = torch.randn(256, 256, device="cuda")
    want = step(a, b)
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    code, out = compiled_code(step, a, b)
    res["inductor_own"] = dict(zip(("early", "kernels"), early_accesses(code)),
                               max_abs_err=float((out - want).abs().max()))
    from dsv4c.runtime.inductor_pdl import install_wait_first

    res["patched"] = install_wait_first()
    code, out = compiled_code(step, a, b)
    res["wait_first"] = dict(zip(("early", "kernels"), early_accesses(code)),
                             max_abs_err=float((out - want).abs().max()))
    res["ok"] = res["patched"] and res["wait_first"]["early"] == 0 and res["wait_first"]["max_abs_err"] < 1e-4
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "inductor_pdl.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res))
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
