"""Packed (storage-format) KV cache on a GPU, end to end on the tiny model, in one device call:

    python benchmarks/packed_kv_check.py --out $OUT [--target h100] [--backend inductor]

1. build tiny (bf16, reference numerics) twice: packed cache (the default) and ``--kv-storage dense``;
2. serve both on the GPU for a prefill that wraps the window plus decode steps; compare the logits with
   each other and with the CPU eager reference (packed), per step;
3. record the manifest's cache layout, the allocated bytes per token against the formula, and the
   storage-format entry sizes of the Flash dims (layout shapes only).

Writes ``$OUT/packed_kv_check.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--target", default="h100")
    ap.add_argument("--backend", default="inductor")
    ap.add_argument("--steps", type=int, default=20)
    a = ap.parse_args()

    from dsv4c.bench import kv_bytes_report
    from dsv4c.checkpoint import load_checkpoint, synthesize_checkpoint, to_model_params
    from dsv4c.frontend.model import StepContext, constants, step
    from dsv4c.layout import allocated_entry_bytes, cache_tensors, kv_bytes_per_token
    from dsv4c.lowering.build import BuildRequest, build
    from dsv4c.runtime import Engine
    from dsv4c.spec import get_variant
    from dsv4c.testing import new_cache, rel_err

    res: dict = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                 "torch": torch.__version__}
    out = Path(a.out)
    root = Path("/tmp/packed_kv_check")
    spec = get_variant("tiny")
    max_seq = 128
    arts = {}
    for storage in ("packed", "dense"):
        t0 = time.perf_counter()
        arts[storage] = build(BuildRequest(output=root / storage, variant="tiny", target=a.target, backend=a.backend,
                                           numerics="reference", dtype="bf16", max_seq_len=max_seq, max_batch=2,
                                           kv_storage=storage), progress=lambda m: None).output
        res[f"build_{storage}_s"] = round(time.perf_counter() - t0, 1)
        print(f"built {storage} in {res[f'build_{storage}_s']} s", flush=True)

    g = torch.Generator().manual_seed(0)
    n_prompt = 37
    ids = torch.randint(0, spec.vocab_size, (1, n_prompt + a.steps), generator=g)
    logits = {}
    for storage, path in arts.items():
        t0 = time.perf_counter()
        eng = Engine.load(path, device="cuda")
        m = eng.artifact.manifest
        res[storage] = {"kv_storage": m["kv_storage"], "kv_bytes": kv_bytes_report(m),
                        "cache": {k: [list(v.shape), str(v.dtype)] for k, v in eng.cache.items() if k.startswith("b1.")},
                        "cache_bytes_allocated": sum(v.nbytes for v in eng.cache.values())}
        seq = [eng.prefill(ids[:, :n_prompt]).float().cpu()]
        for t in range(a.steps):
            seq.append(eng.decode(ids[:, n_prompt + t]).float().cpu())
        logits[storage] = torch.cat(seq)
        res[storage]["serve_s"] = round(time.perf_counter() - t0, 1)
        print(f"served {storage}: {res[storage]['serve_s']} s", flush=True)
        del eng
        torch.cuda.empty_cache()

    # CPU eager reference, packed cache (reference impls)
    tmp = root / "ckpt"
    synthesize_checkpoint(spec, tmp, seed=0)
    params = to_model_params(spec, load_checkpoint(tmp, spec), torch.bfloat16)
    ctx = StepContext(spec, "reference", torch.bfloat16)
    consts = constants(spec)
    cache = new_cache(spec, 1, max_seq, torch.bfloat16, ctx.kv_storage)
    ref = [step(ctx, params, consts, cache, ids[:, :n_prompt], torch.tensor([0]))]
    for t in range(a.steps):
        ref.append(step(ctx, params, consts, cache, ids[:, n_prompt + t:n_prompt + t + 1], torch.tensor([n_prompt + t])))
    ref = torch.cat(ref).float()

    def per_step(x, y):
        return [round(rel_err(x[i:i + 1], y[i:i + 1]), 6) for i in range(x.shape[0])]

    res["rel_err_packed_vs_dense_gpu"] = per_step(logits["packed"], logits["dense"])
    res["rel_err_packed_gpu_vs_cpu_reference"] = per_step(logits["packed"], ref)
    res["rel_err_dense_gpu_vs_cpu_reference"] = per_step(logits["dense"], ref)
    res["argmax_agree_packed_vs_cpu"] = float((logits["packed"].argmax(-1) == ref.argmax(-1)).float().mean())

    flash = get_variant("flash")
    lay = cache_tensors(flash, 1, 65536, torch.bfloat16, storage="packed")
    ent = allocated_entry_bytes(lay)
    per_tok = sum(v / flash.compress_ratios[int(k.split(".")[0][1:])] for k, v in ent.items()
                  if not k.endswith(".win"))
    res["flash_layout"] = {"main_entry_bytes": ent["b2.ckv"], "indexer_entry_bytes": ent["b2.ikv"],
                           "allocated_per_token": per_tok, "formula_per_token": kv_bytes_per_token(flash)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "packed_kv_check.json").write_text(json.dumps(res, indent=1))
    print(json.dumps({k: v for k, v in res.items() if not isinstance(v, dict)}, indent=1))
    print(json.dumps(res["flash_layout"]), json.dumps(res["packed"]["kv_bytes"]))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:  # noqa: BLE001
        traceback.print_exc()
        sys.exit(1)
