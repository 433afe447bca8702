"""Check and time the Triton kernels of dsv4c.ops.triton_kernels at DeepSeek-V4-Flash sizes on a CUDA GPU.

Every case runs the launcher and the reference op on the same GPU tensors (the reference is the library's
torch composite, run on the GPU: CUDA kernels are registered only at the end, for a dispatch check), then
prints one row per case and optionally writes JSON:

    python benchmarks/kernels_gpu.py [--json out.json] [--only fp8_linear,sparse_attn] [--quick]

Columns: max abs error, max error relative to max |ref|, tolerance verdict, median time (triton.testing.do_bench),
TFLOP/s (useful math only) and GB/s (bytes that must move at least once).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

FLASH = dict(D=4096, H=64, C=512, R=64, QL=1024, E=256, TOPK=6, MI=2048, NI=64, DI=128, NHC=4, WIN=128,
             ITOPK=512, OG=8, OR=1024)
# token counts: decode batch, prefill tokens (--quick: the smaller pair), context for the compressed caches
RUN = dict(T_DEC=64, T_PRE=4096, T_DEC_QUICK=16, T_PRE_QUICK=512, CTX=32768, IDX_ENTRIES=8192, ATTN_PRE=1024,
           IDX_PRE=2048)


def _bf16(*shape, dev, scale=1.0):
    return (torch.randn(*shape, device=dev) * scale).to(torch.bfloat16)


def fp8_weight(n, k, dev):
    w = (torch.randn(n, k, device=dev) * 64).clamp(-448, 448).to(torch.float8_e4m3fn)
    s = torch.exp2(torch.randint(-14, -10, (math.ceil(n / 128), math.ceil(k / 128)), device=dev).float())
    return w, s


def fp4_weight(e, n, k, dev):
    w = torch.randint(0, 256, (e, n, k // 2), dtype=torch.uint8, device=dev)
    s = torch.exp2(torch.randint(-9, -6, (e, n, k // 32), device=dev).float())
    return w, s


def cases(dev, quick: bool):
    """(name, op, args, flops, bytes, tolerance) for each case; args are passed to both impls."""
    f, r = FLASH, RUN
    T_dec, T_pre = (r["T_DEC_QUICK"], r["T_PRE_QUICK"]) if quick else (r["T_DEC"], r["T_PRE"])
    out = []

    # ---- fp8_linear: the dense FP8 GEMMs of one block
    lin = {"wq_a": (f["QL"], f["D"]), "wq_b": (f["H"] * f["C"], f["QL"]), "wkv": (f["C"], f["D"]),
           "wo_b": (f["D"], f["OG"] * f["OR"]), "shared_w1": (f["MI"], f["D"]), "idx_wq_b": (f["NI"] * f["DI"], f["QL"])}
    for lname, (n, k) in lin.items():
        w, s = fp8_weight(n, k, dev)
        for t in (T_dec, T_pre):
            x = _bf16(t, k, dev=dev)
            out.append((f"fp8_linear/{lname} M={t} N={n} K={k}", "fp8_linear", (x, w, s, True, True),
                        2 * t * n * k, t * k * 2 + n * k + s.numel() * 4 + t * n * 2, 1e-2))

    # ---- fp4_grouped_linear: routed experts, top-6 of 256
    for pname, (n, k) in {"w1": (f["MI"], f["D"]), "w2": (f["D"], f["MI"])}.items():
        w, s = fp4_weight(f["E"], n, k, dev)
        for t in (T_dec, T_pre):
            ids = torch.rand(t, f["E"], device=dev).topk(f["TOPK"], dim=-1).indices.reshape(-1)
            x = _bf16(t * f["TOPK"], k, dev=dev)
            used = int(torch.unique(ids).numel())
            out.append((f"fp4_grouped/{pname} T={t} A={x.shape[0]} N={n} K={k}", "fp4_grouped_linear",
                        (x, ids, w, s, True, True), 2 * x.shape[0] * n * k,
                        used * n * (k // 2 + k // 32 * 4) + x.numel() * 2 + x.shape[0] * n * 2, 1e-2))

    # ---- sparse_attn: CSA (top-512 of the compressed cache) + 128-token window
    for b, sq, ctx in ((T_dec, 1, r["CTX"]), (1, min(T_pre, r["ATTN_PRE"]), r["CTX"])):
        ne = ctx // 4
        q = _bf16(b, sq, f["H"], f["C"], dev=dev)
        win = _bf16(b, f["WIN"], f["C"], dev=dev)
        comp = _bf16(b, ne, f["C"], dev=dev)
        mask = torch.rand(b, sq, f["WIN"], device=dev) < 0.9
        idx = torch.rand(b, sq, ne, device=dev).topk(f["ITOPK"], dim=-1).indices
        sink = torch.randn(f["H"], device=dev)
        nvis = f["WIN"] + f["ITOPK"]
        out.append((f"sparse_attn B={b} S={sq} H={f['H']} c={f['C']} win={f['WIN']} topk={f['ITOPK']}", "sparse_attn",
                    (q, win, mask, comp, idx, sink, f["C"] ** -0.5), 4 * b * sq * f["H"] * nvis * f["C"],
                    2 * q.numel() * 2 + b * sq * nvis * f["C"] * 2 + idx.numel() * 8, 1e-2))

    # ---- hc_split (mHC Sinkhorn), per token
    n = f["NHC"]
    for t in (T_dec, T_pre):
        mix = torch.randn(t, (2 + n) * n, device=dev)
        base = torch.randn((2 + n) * n, device=dev)
        sc = torch.rand(3, device=dev) + 0.5
        out.append((f"hc_split T={t} n={n} iters=20", "hc_split", (mix, base, sc, n, 20, 1e-6), 0,
                    t * ((2 + n) * n + 2 * n + n * n) * 4, 1e-4))

    # ---- swiglu_clamp on routed-expert activations
    for t in (T_dec, T_pre):
        a = t * f["TOPK"]
        g, v = _bf16(a, f["MI"], dev=dev, scale=4), _bf16(a, f["MI"], dev=dev, scale=4)
        wt = torch.rand(a, device=dev)
        out.append((f"swiglu_clamp rows={a} N={f['MI']}", "swiglu_clamp", (g, v, wt, 10.0, True), 0,
                    a * f["MI"] * (2 + 2 + 4), 1e-4))

    # ---- indexer_score: 64 heads x 128 against the compressed indexer keys
    for b, sq, ne in ((T_dec, 1, r["IDX_ENTRIES"]), (1, min(T_pre, r["IDX_PRE"]), r["IDX_ENTRIES"])):
        q = _bf16(b, sq, f["NI"], f["DI"], dev=dev)
        k = _bf16(b, ne, f["DI"], dev=dev)
        w = torch.randn(b, sq, f["NI"], device=dev) * (f["DI"] * f["NI"]) ** -0.5
        out.append((f"indexer_score B={b} S={sq} E={ne}", "indexer_score", (q, k, w), 2 * b * sq * f["NI"] * ne * f["DI"],
                    q.numel() * 2 + k.numel() * 2 + w.numel() * 4 + b * sq * ne * 4, 1e-4))

    # ---- compress_pool: CSA main (m=4, overlap, d=512), HCA (m=128, d=512), CSA indexer (m=4, overlap, d=128)
    t = T_pre
    for cname, m, d, ov in (("csa", 4, f["C"], True), ("hca", 128, f["C"], False), ("idx", 4, f["DI"], True)):
        nwin = max(1, t // m)
        kd = 2 * d if ov else d
        a = torch.randn(1, nwin, m, kd, device=dev)
        z = torch.randn(1, nwin, m, kd, device=dev)
        if ov:
            ap = torch.cat((torch.zeros(1, 1, m, d, device=dev), a[:, :-1, :, :d]), 1).contiguous()
            zp = torch.cat((torch.full((1, 1, m, d), float("-inf"), device=dev), z[:, :-1, :, :d]), 1).contiguous()
        else:
            ap = zp = torch.zeros(0, device=dev)
        out.append((f"compress_pool/{cname} T={t} m={m} d={d}", "compress_pool", (a, z, ap, zp, ov), 0,
                    (a.numel() + z.numel() + ap.numel() + zp.numel() + nwin * d) * 4, 1e-4))
    # ---- topk_ids: the indexer's selection (top-512 of the compressed entries at 8k / 64k) and a MoE gate
    for b, sq, ne, k in ((1, 1, 2048, 512), (1, 1, 16384, 512), (T_dec, 1, 2048, 512), (1, 1, 256, 6),
                         (1, min(T_pre, r["IDX_PRE"]), 2048, 512)):
        sc = torch.randn(b, sq, ne, device=dev)
        sc[..., ne - ne // 8:] = float("-inf")  # entries a row may not see
        out.append((f"topk_ids B={b} S={sq} E={ne} k={k}", "topk_ids", (sc, k), 0, sc.numel() * 4 + b * sq * k * 8, 0.0))
    # the decode artifact's indexer: 16512 scored entries (64k + 512 context), 2048 / 16384 of them visible
    for vis in (2048, 16384):
        sc = torch.randn(1, 1, 16512, device=dev)
        ln = torch.full((1, 1), vis, dtype=torch.int64, device=dev)
        out.append((f"topk_ids B=1 S=1 E=16512 k=512 visible={vis}", "topk_ids", (sc, 512, ln), 0,
                    vis * 4 + 512 * 8, 0.0))
    # a 1M context: 262144 entries (the multi-level selection)
    sc = torch.randn(1, 1, 262144, device=dev)
    out.append(("topk_ids B=1 S=1 E=262144 k=512", "topk_ids", (sc, 512), 0, sc.numel() * 4 + 512 * 8, 0.0))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", help="write the results here")
    p.add_argument("--only", help="comma-separated op names to run")
    p.add_argument("--quick", action="store_true", help="smaller token counts")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton
    from triton.testing import do_bench

    import dsv4c.ops  # noqa: F401  (defines torch.ops.dsv4.*)
    from dsv4c.ops import triton_kernels as tk

    dev = torch.device("cuda")
    torch.manual_seed(0)
    only = set(args.only.split(",")) if args.only else None
    from dsv4c.ops import triton_topk

    launchers = {name: getattr(tk, name) for name in ("fp8_linear", "fp4_grouped_linear", "sparse_attn", "hc_split",
                                                      "swiglu_clamp", "indexer_score", "compress_pool")}
    launchers["topk_ids"] = triton_topk.topk_ids
    tk.TUNE["triton_topk"] = True  # the kernel itself (the op's CUDA impl follows this switch)
    baselines = {"topk_ids": lambda sc, k, *_: torch.topk(sc, min(k, sc.shape[-1]), dim=-1)}  # what a user calls
    rows = []
    hdr = f"{'case':<66} {'max_abs':>9} {'max_rel':>9} {'ok':>3} {'ms':>9} {'TFLOP/s':>8} {'GB/s':>8}"
    print(hdr)
    print("-" * len(hdr))
    for name, op, a, flops, nbytes, tol in cases(dev, args.quick):
        if only and op not in only:
            continue
        ref = getattr(torch.ops.dsv4, op)(*a)  # torch composite on the GPU (no CUDA kernel registered yet)
        got = launchers[op](*a)
        refs = ref if isinstance(ref, tuple) else (ref,)
        gots = got if isinstance(got, tuple) else (got,)
        abs_err = max((g.float() - r.float()).abs().max().item() for g, r in zip(gots, refs))
        rel_err = max(((g.float() - r.float()).abs().max() / r.float().abs().max().clamp(min=1e-30)).item()
                      for g, r in zip(gots, refs))
        ok = all(g.shape == r.shape and g.dtype == r.dtype for g, r in zip(gots, refs)) and rel_err <= tol
        ms = do_bench(lambda op=op, a=a: launchers[op](*a), warmup=25, rep=100)
        tflops = flops / (ms * 1e-3) / 1e12 if flops else 0.0
        gbps = nbytes / (ms * 1e-3) / 1e9
        base_ms = do_bench(lambda a=a: baselines[op](*a), warmup=25, rep=100) if op in baselines else None
        print(f"{name:<66} {abs_err:9.2e} {rel_err:9.2e} {'yes' if ok else 'NO':>3} {ms:9.4f} {tflops:8.1f} {gbps:8.0f}"
              + (f"  (torch {base_ms:.4f} ms)" if base_ms is not None else ""))
        rows.append(dict(case=name, op=op, max_abs_err=abs_err, max_rel_err=rel_err, tolerance=tol, ok=ok, ms=ms,
                         tflops=tflops, gbps=gbps, flops=flops, bytes=nbytes, baseline_ms=base_ms))
        del ref, got
        torch.cuda.empty_cache()

    # dispatch check: the registered CUDA impls are the launchers
    tk.register_cuda_kernels()
    x = _bf16(8, 256, dev=dev)
    w, s = fp8_weight(128, 256, dev)
    dispatch_ok = torch.equal(torch.ops.dsv4.fp8_linear(x, w, s, True, True), tk.fp8_linear(x, w, s, True, True))
    print(f"\ntorch.ops.dsv4 dispatches to the Triton kernels on CUDA: {dispatch_ok}")
    all_ok = dispatch_ok and all(r["ok"] for r in rows)
    if args.json:
        meta = dict(device=torch.cuda.get_device_name(dev), torch=torch.__version__, triton=triton.__version__,
                    python=platform.python_version(), quick=args.quick, dispatch_ok=dispatch_ok, all_ok=all_ok)
        with open(args.json, "w") as fh:
            json.dump(dict(meta=meta, results=rows), fh, indent=1)
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
