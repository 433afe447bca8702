"""Prefill kernels, on/off pairs of their TUNE switches at Flash shapes: checked against each other and timed.

    python benchmarks/prefill_probe.py [--json PATH]

- attention (``TUNE["attn_win_scan"]``): 2048 tokens, 64 heads x 512, window 128, 512 selected entries;
  the window scan must equal the full window loop bit for bit;
- FP4 experts (``TUNE["fp4_prefill_swap"]``): 8192 tokens routed top-6 over 256 experts through w1+w3
  (4096 x 4096) and w2 (4096 x 2048), packed 128 x 128 tiles, ue8m0 activation quantization; the swapped
  product must agree with the unswapped one within 1e-2 of the largest output (both are exact products
  summed in fp32 in different orders), and each form's TFLOP/s is reported (each on the tiles its
  launcher picks: 64 rows for the swapped form, 128 for the other at ~192 rows per expert).

- indexer scores (``TUNE["indexer_prefill_tokens"]``): 8192 queries x 64 heads against 2048 FP4 keys, the
  token-block kernel at a few tiles against the one-token-per-dot kernel (within 1e-5, TFLOP/s each).

- ``--cases fp4_sweep``: the swapped FP4 expert product at a few tiles (rows, warps, stages) against the
  launcher's own.

- ``--attn-sweep``: the prefill attention launch's tiles (heads per program, keys per step, warps, the
  split of the probabilities into two bf16 halves for P @ V) at an 8k prefill's shapes, for a CSA block
  (window 128 + 512 selected of 2048 packed entries) and a window-only block; each against the default
  tiles (rel err of the largest output) with its time and attention TFLOP/s (4 x c flops per visible
  (token, head, key)). ``--attn-tiles shipped`` times the defaults against the tiles used before
  session 13 only.

Exit status 1 when a pair disagrees.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


@contextlib.contextmanager
def tuned(key: str, value):  # noqa: ANN001, ANN201
    """``TUNE[key] = value`` inside the block, restored afterwards."""
    from dsv4c.ops import triton_kernels as tk

    before = tk.TUNE[key]
    tk.TUNE[key] = value
    try:
        yield
    finally:
        tk.TUNE[key] = before


def timed_pair(tune_key: str, run, bench) -> tuple[torch.Tensor, float, torch.Tensor, float]:  # noqa: ANN001
    """(output, ms) with ``TUNE[tune_key]`` on, then off; the switch restored afterwards."""
    with tuned(tune_key, True):
        on, t_on = run(), bench(run)
    with tuned(tune_key, False):
        off, t_off = run(), bench(run)
    return on, t_on, off, t_off


def attention(dev: torch.device, bench) -> dict:  # noqa: ANN001
    from dsv4c.ops import triton_kernels as tk

    g = torch.Generator(device=dev).manual_seed(1)
    S, H, C, nw, E, KC = 2048, 64, 512, 128, 512, 512
    q = torch.randn(1, S, H, C, device=dev, generator=g).to(torch.bfloat16)
    keys = torch.randn(1, nw + S, C, device=dev, generator=g).to(torch.bfloat16)
    pos = torch.arange(S, device=dev)
    key_pos = torch.cat((torch.arange(-nw, 0, device=dev), pos))
    mask = ((key_pos[None, :] >= 0) & (key_pos[None, :] <= pos[:, None]) & (key_pos[None, :] > pos[:, None] - nw))[None]
    comp = torch.randn(1, E, C, device=dev, generator=g).to(torch.bfloat16)
    idx = torch.randint(-1, E, (1, S, KC), device=dev, generator=g)
    sink = torch.randn(H, device=dev, generator=g)

    def run():  # noqa: ANN202
        return tk.sparse_attn(q, keys, mask, comp, idx, sink, C ** -0.5, kv_split=1)

    on, t_on, off, t_off = timed_pair("attn_win_scan", run, bench)
    same = torch.equal(on, off)
    print(f"attention S={S}: window scan bitwise equal to the full loop: {same}; {t_on:.3f} ms vs {t_off:.3f} ms")
    return {"case": f"sparse_attn prefill S={S}", "ok": same, "ms_on": t_on, "ms_off": t_off}


def _prefill_attention_case(dev: torch.device, S: int, topk: int, entries: int):  # noqa: ANN202
    """(run(**tiles), visible (token, head, key) count) for an S-token prefill with window 128 and ``topk``
    of ``entries`` packed compressed entries per token (none when topk = 0), 64 heads x 512."""
    from dsv4c.ops import kv_storage
    from dsv4c.ops import triton_kernels as tk

    g = torch.Generator(device=dev).manual_seed(3)
    H, C, nw, rope = 64, 512, 128, 64
    q = torch.randn(1, S, H, C, device=dev, generator=g).to(torch.bfloat16)
    keys = torch.randn(1, nw + S, C, device=dev, generator=g).to(torch.bfloat16)
    pos = torch.arange(S, device=dev)
    key_pos = torch.cat((torch.arange(-nw, 0, device=dev), pos))
    mask = ((key_pos[None, :] >= 0) & (key_pos[None, :] <= pos[:, None]) & (key_pos[None, :] > pos[:, None] - nw))[None]
    E = max(entries, 1)
    nope, scale, rp = kv_storage.pack_kv_entries(torch.randn(1, E, C, device=dev, generator=g), rope)
    # token t sees the entries its 4:1 compressor has completed, (t + 1) // 4, and keeps the first topk of them
    visible = ((pos + 1) // 4).clamp(max=entries)
    ids = torch.arange(topk, device=dev)
    idx = torch.where(ids[None, :] < visible[:, None], ids[None, :], -1)[None].contiguous()
    sink = torch.randn(H, device=dev, generator=g)
    n_visible = H * (int(mask.sum()) + int((idx >= 0).sum()))

    def run(**tiles):  # noqa: ANN003, ANN202
        return tk.sparse_attn_packed(q, keys, mask, nope, scale, rp, idx, sink, C ** -0.5, kv_split=1, **tiles)

    return run, n_visible * C * 4


ATTN_TILES = [dict(block_h=bh, block_n=bn, num_warps=w, pv_split=pv)
              for bh in (32, 64) for bn in (32, 64) for w in (4, 8) for pv in (True, False)]


# the launcher's prefill tiles before session 13 (its TUNE attn_prefill_* defaults since)
PRE_S13_TILES = dict(block_h=32, block_n=32, num_warps=8, pv_split=True)


def attention_sweep(dev: torch.device, bench, cases: str = "csa,window", tiles_set: str = "all") -> list[dict]:  # noqa: ANN001
    """``tiles_set`` "all": every ATTN_TILES entry; "shipped": the defaults against the pre-session-13 tiles."""
    rows = []
    for name, topk, entries in (("csa", 512, 2048), ("window", 0, 0)):
        if name not in cases.split(","):
            continue
        run, flop = _prefill_attention_case(dev, 8192, topk, entries)
        ref = run()
        scale = ref.float().abs().max().item()
        for tiles in [{}, *(ATTN_TILES if tiles_set == "all" else [PRE_S13_TILES])]:
            row = {"case": f"attention tiles {name} S=8192", **tiles}
            try:
                out = run(**tiles)
                ms = bench(lambda: run(**tiles))  # noqa: B023
            except Exception as exc:  # noqa: BLE001  (a tile that does not fit is a row, not the end)
                row.update(ok=True, error=f"{type(exc).__name__}: {str(exc)[:160]}")
                print(f"{row['case']} {tiles}: {row['error']}")
                rows.append(row)
                continue
            err = (out.float() - ref.float()).abs().max().item() / scale
            row.update(ok=err <= 2e-2, max_rel=err, ms=ms, tflops=flop / ms / 1e9)
            print(f"{row['case']} {tiles or 'default'}: {ms:.3f} ms, {row['tflops']:.1f} TFLOP/s, rel {err:.1e}")
            rows.append(row)
    return rows


def fp4_cases(dev: torch.device):  # noqa: ANN201 - yields (name, x, expert, packed weight, scales, flop)
    """An 8k prefill's routed expert products: 8192 tokens routed top-6 over 256 experts through w1+w3
    (4096 x 4096) and w2 (4096 x 2048), random packed 128 x 128 tiles, bf16 activations."""
    from dsv4c.ops import fused

    g = torch.Generator(device=dev).manual_seed(2)
    T, E, TOPK = 8192, 256, 6
    expert = torch.rand(T, E, device=dev, generator=g).topk(TOPK, dim=-1).indices.reshape(-1).contiguous()
    for name, (n, k) in {"w1+w3": (4096, 4096), "w2": (4096, 2048)}.items():
        w = torch.randint(0, 256, (E, n, k // 2), dtype=torch.uint8, device=dev, generator=g)
        s = torch.exp2(torch.randint(-9, -6, (E, n, k // 32), device=dev, generator=g).float())
        pw, ps = fused.pack_fp4_tiled(w, s, 128, 128)
        x = torch.randn(T * TOPK, k, device=dev, generator=g).to(torch.bfloat16)
        yield name, x, expert, pw, ps, 2.0 * T * TOPK * n * k


def fp4_experts(dev: torch.device, bench) -> list[dict]:  # noqa: ANN001
    from dsv4c.ops import triton_kernels as tk

    T = 8192
    rows = []
    for name, x, expert, pw, ps, flop in fp4_cases(dev):

        def run():  # noqa: ANN202
            return tk.fp4_grouped_linear_packed(x, expert, pw, ps, True, True, direct=False)

        on, t_on, off, t_off = timed_pair("fp4_prefill_swap", run, bench)
        err = ((on.float() - off.float()).abs().max() / off.float().abs().max()).item()
        row = {"case": f"fp4 prefill {name} T={T}", "ok": err <= 1e-2 and bool(torch.isfinite(on).all()),
               "max_rel": err, "ms_on": t_on, "ms_off": t_off,
               "tflops_on": flop / t_on / 1e9, "tflops_off": flop / t_off / 1e9}
        print(f"fp4 prefill {name}: swapped vs plain max rel {err:.2e}; {t_on:.3f} ms ({row['tflops_on']:.0f} "
              f"TFLOP/s) vs {t_off:.3f} ms ({row['tflops_off']:.0f} TFLOP/s)")
        rows.append(row)
    return rows


FP4_TILES = ((64, 4, 3), (64, 4, 4), (64, 4, 2), (64, 8, 3), (128, 8, 3), (128, 4, 3))  # rows, warps, stages


def fp4_sweep(dev: torch.device, bench) -> list[dict]:  # noqa: ANN001
    """The swapped prefill FP4 expert product (``TUNE["fp4_prefill_swap"]``) at each of FP4_TILES (rows of one
    expert per tile, warps, pipeline stages; ``TUNE["fp4_prefill_warps"]`` / ``["fp4_prefill_stages"]``) for
    the fp4 case's shapes, each against the launcher's own tiles: the same products summed in the same
    order per tile, so within 1e-2 of the largest output (bf16 outputs), and TFLOP/s."""
    from dsv4c.ops import triton_kernels as tk

    rows = []
    for name, x, expert, pw, ps, flop in fp4_cases(dev):

        def run(bm=None):  # noqa: ANN001, ANN202
            return tk.fp4_grouped_linear_packed(x, expert, pw, ps, True, True, direct=False, block_m=bm)

        ref, t_ref = run(), bench(run)
        print(f"fp4 prefill {name}: launcher tiles {t_ref:.3f} ms ({flop / t_ref / 1e9:.0f} TFLOP/s)")
        for bm, nw, st in FP4_TILES:
            case = f"fp4 prefill {name} bm={bm} warps={nw} stages={st}"
            with tuned("fp4_prefill_warps", nw), tuned("fp4_prefill_stages", st):
                try:
                    out, t = run(bm), bench(lambda bm=bm: run(bm))
                except Exception as e:  # noqa: BLE001  (a tile that does not fit is a row, not the end)
                    rows.append({"case": case, "ok": False, "error": f"{type(e).__name__}: {str(e)[:300]}"})
                    print(f"  bm={bm} warps={nw} stages={st}: {type(e).__name__}")
                    continue
            err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
            row = {"case": case, "ok": err <= 1e-2 and bool(torch.isfinite(out).all()), "max_rel": err,
                   "ms_on": t, "ms_off": t_ref, "tflops_on": flop / t / 1e9, "tflops_off": flop / t_ref / 1e9}
            print(f"  bm={bm} warps={nw} stages={st}: {t:.3f} ms ({row['tflops_on']:.0f} TFLOP/s), max rel {err:.1e}")
            rows.append(row)
        # the weight dequantized through fp32 (TUNE fp4_prefill_deq_f32): the same bf16 values, so bitwise equal
        with tuned("fp4_prefill_deq_f32", True):
            out, t = run(), bench(run)
        row = {"case": f"fp4 prefill {name} deq_f32", "ok": bool(torch.equal(out, ref)), "ms_on": t, "ms_off": t_ref,
               "tflops_on": flop / t / 1e9, "tflops_off": flop / t_ref / 1e9}
        print(f"  deq_f32: {t:.3f} ms ({row['tflops_on']:.0f} TFLOP/s), bitwise {'equal' if row['ok'] else 'NOT equal'}")
        rows.append(row)
    return rows


INDEXER_TILES = ((2, 128, 8), (2, 64, 4), (2, 64, 8), (4, 64, 8), (4, 128, 8), (1, 128, 4))


def indexer(dev: torch.device, bench) -> list[dict]:  # noqa: ANN001
    """The indexer's scores at an 8k prefill (8192 queries x 64 heads x 128 against 2048 FP4 keys, no visible
    counts, as the prefill graph calls them): the token-block kernel (``TUNE["indexer_prefill_tokens"]``) at
    each of INDEXER_TILES (tokens, keys per step, warps) against the one-token-per-dot kernel. Both sum exact
    products in fp32 in different orders: within 1e-5 of the largest score."""
    from dsv4c.ops import triton_kernels as tk

    g = torch.Generator(device=dev).manual_seed(3)
    S, H, D, E = 8192, 64, 128, 2048
    q = torch.randn(1, S, H, D, device=dev, generator=g).to(torch.bfloat16)
    codes = torch.randint(0, 256, (1, E, D // 2), dtype=torch.uint8, device=dev, generator=g)
    scales = torch.randint(120, 128, (1, E, D // 32), dtype=torch.uint8, device=dev, generator=g)
    w = torch.rand(1, S, H, device=dev, generator=g).to(torch.bfloat16)
    flop = 2.0 * S * H * E * D

    def run():  # noqa: ANN202
        return tk.indexer_score_packed(q, codes, scales, w)

    with tuned("indexer_prefill_tokens", False):
        ref, t_ref = run(), bench(run)
    print(f"indexer scores S={S}: one token per dot {t_ref:.3f} ms ({flop / t_ref / 1e9:.0f} TFLOP/s)")
    rows = []
    for bt, be, nw in INDEXER_TILES:
        with tuned("indexer_prefill_tokens", True), tuned("indexer_prefill_bt", bt), \
                tuned("indexer_prefill_be", be), tuned("indexer_prefill_warps", nw):
            try:
                out, t = run(), bench(run)
            except Exception as e:  # noqa: BLE001  (a tile that does not fit is a row, not the end)
                rows.append({"case": f"indexer prefill bt={bt} be={be} warps={nw}", "ok": False,
                             "error": f"{type(e).__name__}: {str(e)[:300]}"})
                print(f"  bt={bt} be={be} warps={nw}: {type(e).__name__}")
                continue
        err = ((out - ref).abs().max() / ref.abs().max()).item()
        row = {"case": f"indexer prefill bt={bt} be={be} warps={nw}", "ok": err <= 1e-5, "max_rel": err,
               "ms_on": t, "ms_off": t_ref, "tflops_on": flop / t / 1e9, "tflops_off": flop / t_ref / 1e9}
        print(f"  bt={bt} be={be} warps={nw}: {t:.3f} ms ({row['tflops_on']:.0f} TFLOP/s), max rel {err:.1e}")
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--attn-sweep", action="store_true", help="time the prefill attention's tile choices")
    ap.add_argument("--only-sweep", action="store_true", help="the attention sweep alone")
    ap.add_argument("--cases", default="attention,fp4,indexer",
                    help="the on/off cases to run (attention, fp4, indexer, fp4_sweep; '' = none)")
    ap.add_argument("--attn-cases", default="csa,window", help="the sweep's cases (csa, window)")
    ap.add_argument("--attn-tiles", default="all", choices=("all", "shipped"),
                    help="all: every tile choice; shipped: the defaults against the pre-session-13 tiles")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton.testing

    import dsv4c.ops  # noqa: F401  (defines torch.ops.dsv4.*)

    def bench(fn):  # noqa: ANN001, ANN202
        return triton.testing.do_bench(fn, warmup=5, rep=50, return_mode="median")

    dev = torch.device("cuda")
    cases = set() if args.only_sweep else {c for c in args.cases.split(",") if c}
    rows = [attention(dev, bench)] if "attention" in cases else []
    rows += fp4_experts(dev, bench) if "fp4" in cases else []
    rows += indexer(dev, bench) if "indexer" in cases else []
    rows += fp4_sweep(dev, bench) if "fp4_sweep" in cases else []
    if args.attn_sweep or args.only_sweep:
        rows += attention_sweep(dev, bench, args.attn_cases, args.attn_tiles)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
