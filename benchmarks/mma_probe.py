"""Where the register-fed MMA GEMVs differ from the reference, if they do: small cases on the GPU.

    python benchmarks/mma_probe.py

- dsv4c.ops.triton_fp4_mma against ``dsv4::fp4_grouped_linear_packed``'s torch composite (on the GPU):
  3 rows x 256 outputs x 512 K (two experts, one invalid id), split 1 and 2; for a failing case the error
  per output row modulo 16 (a lane's rows g / g + 8) and per 32-wide K group (one weight group switched on
  at a time), to tell a fragment-layout slip from a scale slip;
- dsv4c.ops.triton_fp8_mma against ``dsv4::fp8_linear``'s: 1 and 5 rows x 256 x 512, split 1 and 2; for a
  failing case the error per activation row and per output row modulo 16.

Exit status 1 when either is off by more than 1e-2 of the largest output.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def main() -> int:
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    import dsv4c.ops  # noqa: F401  (defines torch.ops.dsv4.*)
    from dsv4c import quant
    from dsv4c.ops import fused
    from dsv4c.ops.triton_fp4_mma import fp4_gemv_mma, mma_supported
    from dsv4c.ops.triton_fp8_mma import fp8_gemv_mma

    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    E, N, K = 2, 256, 512
    w, s = quant.quantize_fp4_weight(torch.randn(E, N, K, generator=g) * 0.05)
    s = s * torch.exp2(torch.randint(-3, 4, s.shape, generator=g).float())
    pw, ps = (t.to(dev) for t in fused.pack_fp4_tiled(w, s, 128, 128))
    x = torch.randn(3, K, generator=g).to(torch.bfloat16).to(dev)
    expert = torch.tensor([1, -1, 0], device=dev)
    print("supported:", mma_supported(pw, x))
    ref = torch.ops.dsv4.fp4_grouped_linear_packed(x, expert, pw, ps, True, True).float()
    worst = 0.0
    for split in (1, 2):
        out = fp4_gemv_mma(x, expert, pw, ps, True, split_k=split).float()
        err = ((out - ref).abs().max() / ref.abs().max()).item()
        worst = max(worst, err)
        print(f"split {split}: max rel err {err:.2e}; invalid row all zero: {not out[1].any().item()}")
    bad = fp8_probe(dev, g, fp8_gemv_mma)
    if worst <= 1e-2:
        return int(bad)
    out = fp4_gemv_mma(x, expert, pw, ps, True, split_k=1).float()
    rel = ((out - ref).abs() / ref.abs().max()).cpu()
    print("error by row % 16 (row 0):", [round(rel[0, r::16].max().item(), 3) for r in range(16)])
    for grp in range(4):  # one group of the first K tile on, the rest of the weight zeroed
        keep = torch.zeros_like(pw)
        keep[..., 0, :, 16 * grp:16 * grp + 16] = pw[..., 0, :, 16 * grp:16 * grp + 16]
        o1 = fp4_gemv_mma(x, expert, keep, ps, True, split_k=1).float()
        r1 = torch.ops.dsv4.fp4_grouped_linear_packed(x, expert, keep, ps, True, True).float()
        print(f"group {grp} only: max rel err {((o1 - r1).abs().max() / r1.abs().max()).item():.2e}")
    return 1


def fp8_probe(dev, g, fp8_gemv_mma) -> bool:
    """The FP8 GEMV's cases; True when one is off."""
    from dsv4c import quant

    w, s = quant.quantize_fp8_weight(torch.randn(256, 512, generator=g) * 0.05)
    w, s = w.to(dev), s.to(dev)
    bad = False
    for m in (1, 5):
        x = torch.randn(m, 512, generator=g).to(torch.bfloat16).to(dev)
        ref = torch.ops.dsv4.fp8_linear(x, w, s, True, True).float()
        for split in (1, 2):
            out = fp8_gemv_mma(x, w, s, True, split_k=split).float()
            err = ((out - ref).abs().max() / ref.abs().max()).item()
            print(f"fp8 rows {m} split {split}: max rel err {err:.2e}")
            if err > 1e-2:
                bad = True
                rel = ((out - ref).abs() / ref.abs().max()).cpu()
                print("  by activation row:", [round(rel[i].max().item(), 3) for i in range(m)])
                print("  by output row % 16:", [round(rel[:, r::16].max().item(), 3) for r in range(16)])
    return bad


if __name__ == "__main__":
    sys.exit(main())
