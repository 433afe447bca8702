"""The weight-streaming kernels of one flash-4 decode step, checked and timed as the step runs them.

    python benchmarks/decode_gemv_gpu.py --out $OUT [--batch 1] [--variants baseline,tc,...]

One decode step of ``flash`` truncated to 4 blocks streams, at batch 1, after ``fuse_shared_input_gemms``:
20 FP8 linears (wq_a+wkv, wq_b (+ the indexer's wq_b in the CSA block), wo_b, shared w1+w3, shared w2 per
block), 8 packed FP4 expert GEMMs (w1+w3 and w2 of 6 routed experts per block) and the bf16 head; with
them each block's sparse attention over the packed cache at context 8k, the 8 fused mHC sub-layer inputs
and the CSA block's indexer top-k (latency rather than bytes). This script draws those weights (distinct per block,
so nothing stays in L2), and for each kernel configuration (a set of ``TUNE`` overrides):

- checks every distinct launch against the reference op (the torch composite, on the GPU);
- captures the whole sequence in one CUDA graph and times its replay, and the FP8 / FP4 / head parts in
  graphs of their own, reporting microseconds and the fraction of the copy bandwidth measured in the
  same run (bytes the weights occupy / time).

Results: ``$OUT/decode_gemv.json`` (device named) and a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from kernels_gpu import fp4_weight, fp8_weight  # noqa: E402  (this folder: the same random FP8/FP4 weights)

# TUNE overrides per variant (the rest of TUNE as the package ships it)
VARIANTS = {
    "fma": {"gemv_tc": False, "w16_gemv_tc": False},  # the FMA GEMVs with a quantization launch each
    "default": {},
    "bf16dot": {"tc_fp8_dot": False},
    "fp4_fma": {"fp4_tc": False},  # packed FP4 on the FMA GEMV (the tensor-core GEMV is the default)
    "fp4_tc_noasm": {"fp4_tc_asm": False},  # nibble decode per element instead of four bytes per instruction
    "fp4_kb2": {"fp4_tc_kblocks": 2},
    "fp4_kb4": {"fp4_tc_kblocks": 4},
    "fp4_kb4_bn64": {"fp4_tc_kblocks": 4, "fp4_tc_bn": 64},
    "fp4_kb4_split1": {"fp4_tc_kblocks": 4, "split_target": 1},
    "fp4_kb4_w8": {"fp4_tc_kblocks": 4, "fp4_tc_warps": 8},
    "fp4_kb2_bn64": {"fp4_tc_kblocks": 2, "fp4_tc_bn": 64},
    "fp4_tc_bn64": {"fp4_tc_bn": 64},
    "fp4_tc_w8": {"fp4_tc_warps": 8},
    "fp4_tc_s2": {"fp4_tc_stages": 2},
    "fp4_tc_s4": {"fp4_tc_stages": 4},
    # packed FP4 on warp-level MMAs fed from registers (dsv4c.ops.triton_fp4_mma)
    "fp4_mma": {"fp4_mma": True},
    "fp4_mma_w8": {"fp4_mma": True, "fp4_mma_warps": 8},
    "fp4_mma_split2": {"fp4_mma": True, "fp4_mma_split": 2},
    "fp4_mma_split4": {"fp4_mma": True, "fp4_mma_split": 4},
    "fp4_mma_split8": {"fp4_mma": True, "fp4_mma_split": 8},
    # FP8 decode rows on the same register-fed MMAs (dsv4c.ops.triton_fp8_mma)
    "fp8_mma": {"fp8_mma": True},
    "fp8_mma_w8": {"fp8_mma": True, "fp8_mma_warps": 8},
    "fp8_mma_split4": {"fp8_mma": True, "fp8_mma_split": 4},
    "fp8_mma_split8": {"fp8_mma": True, "fp8_mma_split": 8},
    "mma_both": {"fp4_mma": True, "fp8_mma": True},
    "fp4_mma_w8_split2": {"fp4_mma": True, "fp4_mma_warps": 8, "fp4_mma_split": 2},
    "fp4_mma_w8_split4": {"fp4_mma": True, "fp4_mma_warps": 8, "fp4_mma_split": 4},
    "fp4_mma_w8_split8": {"fp4_mma": True, "fp4_mma_warps": 8, "fp4_mma_split": 8},
    # each FP4 MMA program's weight range asked into L2 once its expert is known (TUNE fp4_mma_l2_prefetch)
    "fp4_l2pf": {"fp4_mma_l2_prefetch": True},
    "fp4_l2pf_split1": {"fp4_mma_l2_prefetch": True, "fp4_mma_split": 1},
    "fp4_l2pf_split2": {"fp4_mma_l2_prefetch": True, "fp4_mma_split": 2},
    "fp4_l2pf_split8": {"fp4_mma_l2_prefetch": True, "fp4_mma_split": 8},
    # register sets of K tiles in flight per lane, taking turns (TUNE fp4_mma_unroll)
    "fp4_u2": {"fp4_mma_unroll": 2},
    "fp4_u4": {"fp4_mma_unroll": 4},
    "fp4_u4_l2pf": {"fp4_mma_unroll": 4, "fp4_mma_l2_prefetch": True},
    "fp4_u2_split2": {"fp4_mma_unroll": 2, "fp4_mma_split": 2},
    "fp4_u4_split2": {"fp4_mma_unroll": 4, "fp4_mma_split": 2},
    "fp4_u4_split8": {"fp4_mma_unroll": 4, "fp4_mma_split": 8},
    "fp4_split3": {"fp4_mma_split": 3},
    "fp8_u2": {"fp8_mma_unroll": 2},
    "both_u2": {"fp8_mma_unroll": 2, "fp4_mma_unroll": 2},
    "both_u2_fp4u4": {"fp8_mma_unroll": 2, "fp4_mma_unroll": 4},
    "fp8_tc": {"fp8_mma": False},  # session 8's default: the e4m3 tensor-core dot
    "fp4_tc": {"fp4_mma": False},  # session 8's default: the FP4 tensor-core GEMV
    "fp8_mma_w8_split2": {"fp8_mma": True, "fp8_mma_warps": 8, "fp8_mma_split": 2},
    "fp8_s4": {"tc_stages": 4},
    "fp8_bn64": {"tc_bn": 64},
    "fp8_w8": {"tc_warps": 8},
    "attn_bh32_bn32": {"attn_decode_bh": None, "attn_decode_bn": None},  # the head and key blocks of larger batches
    "attn_split4": {"attn_split_target": 4},
    "attn_split1": {"attn_split_target": 1},  # fewer key splits: a cheaper merge in the last program
    "attn_bn32": {"attn_decode_bn": 32},
    "attn_merge": {"attn_merge_launch": True},  # the key splits merged by a launch of their own
    "mhc_twopass": {"hc_pre_bd": None, "hc_pre_warps": 4},  # session 6's default: two passes over the streams
    "mhc_w1": {"hc_pre_bd": None, "hc_pre_warps": 1},  # the Sinkhorn reductions inside one warp, a narrower collapse
    "mhc_w2": {"hc_pre_bd": None, "hc_pre_warps": 2},
    "mhc_c512": {"hc_pre_chunk": 512},  # fewer partial mixes for the last program to sum
    "mhc_w1_c512": {"hc_pre_bd": None, "hc_pre_warps": 1, "hc_pre_chunk": 512},
    "mhc_onepass_w8": {"hc_pre_bd": 4096, "hc_pre_warps": 8},  # the 4 x 4096 streams loaded once, early
    "mhc_onepass_w16": {"hc_pre_bd": 4096, "hc_pre_warps": 16},
    "topk_w4": {"topk_warps": 4},
    "topk_w16": {"topk_warps": 16},
    "topk_c2048": {"topk_chunk": 2048},
    "topk_nosplit": {"topk_split_seg": None},  # one CTA per row (session 8's default)
    "topk_split2048": {"topk_split_seg": 2048},  # the 64k row over 9 programs, the last picking among 4608
    "topk_split4096": {"topk_split_seg": 4096},  # 5 segments of the 16512 entries instead of 9
    "pdl_off": {"pdl": False},
    "split4": {"split_target": 4},
    "split8": {"split_target": 8},
}

D, QL, H, C, OG, OR, MI, E, TOPK, V, NI, DI = 4096, 1024, 64, 512, 8, 1024, 2048, 256, 6, 129280, 64, 128
NHC, MHC = 4, 24  # mHC streams, mix width (2 + n) n
# the stacked launches of fuse_shared_input_gemms (wq_a+wkv, shared and routed w1+w3)
FP8_SHAPES = {"wq_a+wkv": (QL + C, D), "wq_b": (H * C, QL), "wo_b": (D, OG * OR),
              "shared_w1+w3": (2 * MI, D), "shared_w2": (D, MI)}
FP4_SHAPES = {"w1+w3": (2 * MI, D), "w2": (D, MI)}


def log(msg: str, t0=time.perf_counter()) -> None:
    print(f"[gemv {time.perf_counter() - t0:6.1f}s] {msg}", flush=True)


def fp4_experts(n: int, k: int, dev) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed (``dsv4c.fp4-tiled/1``, 128x128 tiles) random experts, as the h100 pipeline stores them."""
    from dsv4c.ops.fused import pack_fp4_tiled

    return pack_fp4_tiled(*fp4_weight(E, n, k, dev), 128, 128)


def build_step(batch: int, blocks: int, dev) -> dict:
    """Weights and launches of one decode step: {"fp8": [...], "fp4": [...], "head": [...]}, each a list of
    (name, op name, args, weight bytes)."""
    g = torch.Generator(device=dev).manual_seed(0)
    step = {"fp8": [], "fp4": [], "head": []}
    for b in range(blocks):
        shapes = dict(FP8_SHAPES)
        if b == 2:  # the CSA block: the indexer's query projection stacks onto wq_b
            shapes["wq_b"] = (H * C + NI * DI, QL)
        for name, (n, k) in shapes.items():
            w, s = fp8_weight(n, k, dev)
            x = torch.randn(batch, k, device=dev, generator=g).to(torch.bfloat16)
            step["fp8"].append((f"{b}.{name}", "fp8_linear", (x, w, s, True, True), w.numel() + s.numel() * 4))
        rows = batch * TOPK
        ids = torch.rand(batch, E, device=dev, generator=g).topk(TOPK, dim=-1).indices.reshape(-1).contiguous()
        used = int(torch.unique(ids).numel())
        for name, (n, k) in FP4_SHAPES.items():
            pw, ps = fp4_experts(n, k, dev)
            x = torch.randn(rows, k, device=dev, generator=g).to(torch.bfloat16)
            step["fp4"].append((f"{b}.{name}", "fp4_grouped_linear_packed", (x, ids, pw, ps, True, True),
                                used * n * (k // 2 + k // 32)))
    # the packed-cache sparse attention of each block at context 8k: window of 128 + this token, then
    # nothing (window-only blocks), top-512 of 2048 (CSA, ratio 4) or all 64 (HCA, ratio 128) entries
    from dsv4c.ops.kv_storage import pack_kv_entries

    step["attn"] = []
    for b, (ne, kc) in enumerate(((0, 0), (0, 0), (2048, 512), (64, 64))[:blocks]):
        q = torch.randn(batch, 1, H, C, device=dev, generator=g).to(torch.bfloat16)
        win = torch.randn(batch, 129, C, device=dev, generator=g).to(torch.bfloat16)
        mask = torch.ones(batch, 1, 129, dtype=torch.bool, device=dev)
        comp = pack_kv_entries(torch.randn(batch, ne, C, device=dev, generator=g).to(torch.bfloat16), 64)
        idx = torch.rand(batch, 1, ne, device=dev, generator=g).topk(kc, dim=-1).indices if ne else \
            torch.zeros(batch, 1, 0, dtype=torch.long, device=dev)
        sink = torch.randn(H, device=dev, generator=g)
        step["attn"].append((f"{b}.attn_ne{ne}", "sparse_attn_packed", (q, win, mask, *comp, idx, sink, C ** -0.5),
                             win.numel() * 2 + kc * batch * 584))
    w = (torch.randn(V, D, device=dev, generator=g) / 64).to(torch.bfloat16)
    x = torch.randn(batch, D, device=dev, generator=g).to(torch.bfloat16)
    step["head"].append(("head", "linear_w16", (x, w), w.numel() * 2))
    # the mHC input of each sub-layer (dsv4c_rt::hc_pre: 24 x 16384 fp32 mix weights) and the CSA block's
    # top-512 of the indexer scores (16512 scored entries, 2048 visible at context 8k, 16384 at 64k)
    step["mhc"] = []
    for b in range(2 * blocks):
        xs = torch.randn(batch, 1, NHC, D, device=dev, generator=g).to(torch.bfloat16)
        fn = torch.randn(MHC, NHC * D, device=dev, generator=g) * 0.01
        base, scale = torch.randn(MHC, device=dev, generator=g) * 0.1, torch.rand(3, device=dev, generator=g) + 0.5
        nw = (1 + 0.1 * torch.randn(D, device=dev, generator=g)).to(torch.bfloat16)
        step["mhc"].append((f"{b // 2}.{('attn', 'ffn')[b % 2]}_hc_pre", "hc_pre",
                            (xs, fn, base, scale, nw, NHC, 20, 1e-6, 1e-6, 1e-6), fn.numel() * 4))
    # (timed as one part; per kind each: the 64k-context selection is the second)
    sc = torch.randn(batch, 1, 16512, device=dev, generator=g)
    step["topk"] = [(f"2.topk_ids{tag}", "topk_ids", (sc, 512, torch.full((batch, 1), vis, dtype=torch.long,
                                                                       device=dev)), 0)
                    for tag, vis in (("", 2048), ("_64k", 16384))]
    return step


def graph_time_us(fns: list, reps: int = 20) -> float:
    """Median replay time of one CUDA graph holding ``fns`` in order."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in fns:  # warm up (compiles) outside the capture
            f()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for f in fns:
            f()
    graph.replay()
    torch.cuda.synchronize()
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
    times = []
    for _ in range(reps):
        ev[0].record()
        graph.replay()
        ev[1].record()
        torch.cuda.synchronize()
        times.append(ev[0].elapsed_time(ev[1]) * 1e3)
    del graph
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--variants", default=",".join(VARIANTS))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton

    import dsv4c.ops  # noqa: F401  (defines torch.ops.dsv4.*)
    from dsv4c.bench import hbm_bandwidth
    from dsv4c.ops import triton_kernels as tk

    dev = torch.device("cuda")
    torch.manual_seed(0)
    bw = hbm_bandwidth(dev)["bytes_per_s"]  # the copy rate dsv4c bench measures
    log(f"copy bandwidth {bw / 1e12:.3f} TB/s")
    step = build_step(args.batch, args.blocks, dev)
    log("weights drawn: " + ", ".join(f"{k} {sum(r[3] for r in v) / 1e6:.0f} MB" for k, v in step.items()))
    # references (torch composites on the GPU), once per launch
    from dsv4c.ops import library, triton_mhc, triton_topk

    reference = {"linear_w16": lambda x, w: x.float() @ w.float().t(), "hc_pre": library.hc_pre_reference,
                 "topk_ids": triton_topk.topk_ids_reference}
    refs = {}
    for part, launches in step.items():
        for name, op, a, _ in launches:
            refs[name] = reference[op](*a) if op in reference else getattr(torch.ops.dsv4, op)(*a)
    tk.prepare_device(dev)
    launcher = {"fp8_linear": tk.fp8_linear, "fp4_grouped_linear_packed": tk.fp4_grouped_linear_packed,
                "linear_w16": tk.linear_w16, "sparse_attn_packed": tk.sparse_attn_packed,
                "hc_pre": triton_mhc.hc_pre, "topk_ids": triton_topk.topk_ids}
    base_tune = dict(tk.TUNE)
    results = {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__, "triton": triton.__version__,
               "batch": args.batch, "blocks": args.blocks, "copy_tb_per_s": bw / 1e12,
               "bytes": {k: sum(r[3] for r in v) for k, v in step.items()}, "variants": {}}
    out = Path(args.out)
    # warm up (clocks, caches) before the first variant: in session 6 the variant timed first read ~15 us
    # slower on the FP8 launches than the same launches timed later, enough to tip pick_tune
    for part, launches in step.items():
        for _, op, a, _ in launches:
            launcher[op](*a)
    graph_time_us([lambda op=op, a=a: launcher[op](*a) for launches in step.values() for _, op, a, _ in launches],
                  reps=30)
    for vname in args.variants.split(","):
        tk.TUNE.clear()
        tk.TUNE.update(base_tune)
        tk.TUNE.update(VARIANTS[vname])
        rec = {"tune": VARIANTS[vname]}
        try:
            worst = {}
            for part, launches in step.items():
                for name, op, a, _ in launches:
                    got, ref = launcher[op](*a), refs[name]
                    if isinstance(got, tuple):  # hc_pre: the sub-layer input (post and comb are fp32 on the way)
                        got, ref = got[0], ref[0]
                    if op == "topk_ids":  # ids: exact or wrong
                        err = float(not torch.equal(got, ref))
                    else:
                        err = ((got.float() - ref.float()).abs().max() / ref.float().abs().max().clamp(min=1e-30)).item()
                    worst[part] = max(worst.get(part, 0.0), err)
            rec["max_rel_err"] = worst
            rec["ok"] = all(v <= 1e-2 for v in worst.values())
            us = {}
            for part, launches in step.items():
                us[part] = graph_time_us([lambda op=op, a=a: launcher[op](*a) for _, op, a, _ in launches])
            # per launch kind (the 4 blocks' launches of e.g. wq_b in one graph: distinct weights, no L2 reuse)
            kinds = {}
            for launches in step.values():
                for name, op, a, nbytes in launches:
                    kinds.setdefault(name.split(".")[-1], []).append((op, a, nbytes))
            rec["per_kind"] = {}
            for kind, ls in kinds.items():
                t = graph_time_us([lambda op=op, a=a: launcher[op](*a) for op, a, _ in ls])
                rec["per_kind"][kind] = {"launches": len(ls), "us": t,
                                         "hbm_fraction": sum(b for _, _, b in ls) / (t * 1e-6) / bw}
            us["all"] = graph_time_us([lambda op=op, a=a: launcher[op](*a)
                                       for launches in step.values() for _, op, a, _ in launches])
            rec["us"] = us
            tot = sum(results["bytes"].values())
            rec["hbm_fraction"] = {k: (results["bytes"][k] if k != "all" else tot) / (v * 1e-6) / bw
                                   for k, v in us.items()}
            log(f"{vname:12s} ok={rec['ok']} err " + " ".join(f"{k} {v:.1e}" for k, v in worst.items())
                + " | us " + " ".join(f"{k} {v:.0f} ({rec['hbm_fraction'][k]:.0%})" for k, v in us.items())
                + "\n    " + " ".join(f"{k} {v['us']:.0f}us/{v['hbm_fraction']:.0%}" for k, v in rec["per_kind"].items()))
        except Exception as e:  # a variant that fails to compile or run is recorded, the next one runs
            rec["error"] = f"{type(e).__name__}: {e}"[:2000]
            log(f"{vname:12s} FAILED {rec['error'][:300]}")
        results["variants"][vname] = rec
        torch.cuda.synchronize()
        out.mkdir(parents=True, exist_ok=True)
        (out / "decode_gemv.json").write_text(json.dumps(results, indent=1))  # after each: a timeout keeps them
    tk.TUNE.clear()
    tk.TUNE.update(base_tune)
    return 0


if __name__ == "__main__":
    sys.exit(main())
