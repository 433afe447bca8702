"""Where Inductor's generated kernels wait under programmatic dependent launch, with and without dsv4c's
wait-first patch (runtime/inductor_pdl.py), on a CUDA sm_90+ GPU.

    python benchmarks/inductor_pdl_probe.py --out $OUT

Compiles a few small functions (a kernel reading a buffer older than the previous kernel's output, a
store-only ``zeros`` kernel, a fused reduction) and counts, in the generated Triton source, the kernels
that touch global memory before their ``gdc_wait``. Inductor's own placement can leave such accesses ahead
of the wait; with the patch none may remain. ``informative`` says whether Inductor's own placement left
any (session 13's single fused kernel had none, so it showed nothing). Each compiled function is also run
against eager. Results: ``$OUT/inductor_pdl.json``.
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


def older_buffer(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A kernel that writes ``x``, a cuBLAS GEMM, then a kernel that reads ``a`` and ``x`` (older than the
    GEMM) before the GEMM's output."""
    x = torch.sin(a) * 2
    y = x @ b
    y2 = a + torch.cos(y)
    return x + (y2 - y2.amax(-1, keepdim=True))


def store_only(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A zero-filled buffer (a store-only kernel: it never reads, so Inductor gives it no wait) scattered
    into after a GEMM, as the decode graph's ``zeros`` + ``index_put_`` kernels are."""
    h = torch.relu(a @ b)
    z = torch.zeros(a.shape[0] * 2, a.shape[1], device=a.device)
    idx = torch.arange(0, a.shape[0] * 2, 2, device=a.device)
    return z.index_put((idx,), h[:, : a.shape[1]]) * 3


def fused_softmax(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Session 12's probe: cuBLAS, then one fused reduction kernel (reads ``a`` and the GEMM's output)."""
    h = torch.relu(a @ b)
    s = h.sum(-1, keepdim=True)
    return torch.softmax(h * s + a, dim=-1)


PROBES = (older_buffer, store_only, fused_softmax)


def probe_all(a: torch.Tensor, b: torch.Tensor) -> dict:
    """Per probe function: early / total kernels of its generated code and its max error against eager."""
    out = {}
    for fn in PROBES:
        want = fn(a, b)
        code, got = compiled_code(fn, a, b)
        out[fn.__name__] = dict(zip(("early", "kernels"), early_accesses(code)),
                                max_abs_err=float((got - want).abs().max()))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9:
        print("needs a CUDA GPU of sm_90 or newer", file=sys.stderr)
        return 2
    a = torch.randn(64, 256, device="cuda")
    b = torch.randn(256, 256, device="cuda")
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    res["inductor_own"] = probe_all(a, b)
    from dsv4c.runtime.inductor_pdl import install_wait_first

    res["patched"] = install_wait_first()
    res["wait_first"] = probe_all(a, b)
    # informative only where Inductor's own placement left an early access for the patch to remove
    res["informative"] = sum(r["early"] for r in res["inductor_own"].values()) > 0
    res["ok"] = res["patched"] and all(r["early"] == 0 and r["max_abs_err"] < 1e-3 for r in res["wait_first"].values())
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "inductor_pdl.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res))
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
