"""``dsv4c bench ARTIFACT --json PATH``: speed and memory of a built artifact on its device.

Measured in one run (all GPU times with CUDA events, medians over repeats):

- ``hbm``: device-to-device copy bandwidth of a large buffer (bytes read + bytes written), the yardstick
  for the decode fractions below.
- ``decode``: step time at each (batch, context). The KV cache is filled directly with random values
  (N(0, 1) entries, or for a packed cache random e4m3 codes, ue8m0 scale bytes near 2^0 and random
  e2m1 pairs; plausible compressor state) and the positions set to the context length, instead of
  prefilling 8k/64k tokens: the step does the same work either way (same visible entries, same top-k
  sizes), only the selected entries differ. Steps run back to back (the next token is the previous
  step's argmax, never copied to the host), as a serving loop would: ``step_ms`` is the greedy chain
  where the executor has one (``Engine.decode_greedy``: CUDA graphs that end with the argmax and feed it
  to the next replay, ``step_source`` "device chain"), else the Python loop; ``step_ms_python_loop`` is
  the loop of executor calls with the argmax and position update between them; ``graph_replay_ms`` is
  the bare CUDA-graph replay, ``host_ms_per_step`` the host's time to enqueue one loop step (when it
  nears the step time, Python, not the device, sets the pace). ``bytes_per_step``: what a step must move at
  least: every weight the step reads (routed experts: the expected number of distinct experts a batch
  touches, E(1 - (1 - k/E)^B), times one expert's bytes; embedding and hash-routing tables: the rows
  used) plus the KV entries it reads in the allocated layout (window, all visible HCA entries, CSA
  indexer keys and the top-k selected entries). ``hbm_fraction`` = bytes_per_step / step time / measured copy bandwidth.
  ``wo_a`` counts as the engine reads it: in the activation dtype as the artifact holds it (the reference
  applies the dequantized weight), or as e4m3 + block scales under TUNE ``wo_a_fp8``;
  ``hbm_fraction_stored`` counts it at that stored FP8 size either way.
- ``prefill``: one sequence of ``prefill_tokens`` (8192) tokens, tokens/s and model TFLOP/s (the useful
  FLOPs of the math: every GEMM, the attention over the visible keys, the indexer scores; counted from
  the spec).
- ``kv_bytes_per_token``: bytes the allocated cache spends per token of context vs the storage-format
  formula of MODEL-SEMANTICS section 10 (``dsv4c.layout.kv_bytes_per_token``); plus the fixed bytes per
  sequence (windows, compressor state).
- ``load``: Engine.load, first prefill and first decode wall times (these include compiling, or loading
  from the keyed compile cache when it is warm; ``compile_cache_warm`` says which).
"""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch

DEFAULT_BATCHES = (1, 32)
DEFAULT_CONTEXTS = (8192, 65536)
PREFILL_TOKENS = 8192


# ---- measurement helpers --------------------------------------------------------------------------------

def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _time_ms(fn, dev: torch.device, reps: int = 10, warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        fn()
    _sync(dev)
    out = []
    for _ in range(reps):
        if dev.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            out.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t) * 1e3)
    return out


def hbm_bandwidth(dev: torch.device, nbytes: int = 4 << 30) -> dict:
    """Device-to-device copy bandwidth (read + write bytes per second)."""
    n = nbytes // 4
    a = torch.randn(n, device=dev)
    b = torch.empty_like(a)
    ms = _time_ms(lambda: b.copy_(a), dev, reps=10, warmup=3)
    med = statistics.median(ms)
    del a, b
    return {"buffer_bytes": nbytes, "copy_ms": round(med, 4), "bytes_per_s": 2 * nbytes / (med / 1e3),
            "tb_per_s": round(2 * nbytes / (med / 1e3) / 1e12, 3)}


# ---- model accounting -----------------------------------------------------------------------------------

def _dtype_size(name: str) -> int:
    return {"bfloat16": 2, "float16": 2, "float32": 4, "float8_e4m3fn": 1, "uint8": 1, "int8": 1, "int32": 4,
            "int64": 8, "bool": 1}[name]


def decode_weight_bytes(manifest: dict, used: set[str], batch: int, wo_a_fp8: bool = False) -> dict:
    """Weight bytes one decode step reads (see the module docstring). ``wo_a``, which the artifact holds in
    the activation dtype (the reference's dequantized weight), counts at that size unless ``wo_a_fp8`` (the
    engine reads it as e4m3 + fp32 scales per 128 x 128 block, runtime/wo_a_fp8.py); ``total_stored`` counts
    it at that stored FP8 size either way."""
    spec = manifest["spec"]
    E, k, V = spec["n_routed_experts"], spec["num_experts_per_tok"], spec["vocab_size"]
    distinct = E * (1 - (1 - k / E) ** batch)
    tot = {"experts": 0.0, "head": 0.0, "embed_rows": 0.0, "wo_a": 0.0, "other": 0.0}
    wo_a_stored = 0.0
    for name, ent in manifest["params"].items():
        if name not in used:
            continue
        nbytes = math.prod(ent["shape"]) * _dtype_size(ent["dtype"])
        if ".experts." in name and ent["shape"] and ent["shape"][0] == E:
            tot["experts"] += nbytes * distinct / E
        elif name == "head.weight":
            tot["head"] += nbytes
        elif name == "embed.weight" or name.endswith("gate.tid2eid"):
            tot["embed_rows"] += nbytes / ent["shape"][0] * min(batch, ent["shape"][0])
        elif name.endswith(".wo_a.weight"):
            n = math.prod(ent["shape"])
            stored = n + 4 * n / (128 * 128)  # e4m3 bytes + one fp32 scale a block
            wo_a_stored += stored
            tot["wo_a"] += stored if wo_a_fp8 else nbytes
        else:
            tot["other"] += nbytes
    tot["total"] = sum(tot.values())
    tot["total_stored"] = tot["total"] - tot["wo_a"] + wo_a_stored
    tot["wo_a_read_as"] = "fp8" if wo_a_fp8 else "held"
    tot["distinct_experts_per_block"] = round(distinct, 2)
    return tot


def reads_wo_a_fp8(eng) -> bool:  # noqa: ANN001 - an Engine
    """Whether the engine's decode graph reads ``wo_a`` as FP8 (the load-time rewrite of
    runtime/wo_a_fp8.py ran on it)."""
    return bool(getattr(eng._executor, "rewrites", {}).get("decode", {}).get("wo_a_fp8"))


def _blocks(spec: dict) -> list[tuple[str, int]]:
    out = []
    for i in range(spec["num_layers"]):
        m = spec["compress_ratios"][i]
        out.append(("window" if m == 0 else "csa" if m == 4 else "hca", m))
    return out


def decode_kv_bytes(manifest: dict, batch: int, ctx: int) -> float:
    """KV bytes one decode step at position ``ctx`` reads per batch, allocated layout."""
    spec = manifest["spec"]
    lay = manifest["cache_layout"]
    nw, topk = spec["sliding_window"], spec["index_topk"]
    ent = _entry_bytes(lay)  # bytes of one entry per b{i}.win / ckv / ikv, all storage parts summed
    total = 0.0
    for i, (kind, m) in enumerate(_blocks(spec)):
        total += min(ctx, nw) * ent[f"b{i}.win"]
        if kind == "window":
            continue
        vis = (ctx + 1) // m
        if kind == "hca":
            total += vis * ent[f"b{i}.ckv"]
        else:
            total += vis * ent[f"b{i}.ikv"] + min(topk, vis) * ent[f"b{i}.ckv"]
        for key, t in lay.items():  # compressor state (a/z of the open window, previous halves)
            if key.startswith(f"b{i}.") and key.split(".")[1] in ("c_a", "c_z", "c_pa", "c_pz", "i_a", "i_z",
                                                                   "i_pa", "i_pz"):
                total += math.prod(t["shape"]) * _dtype_size(t["dtype"])
    return total * batch


def _entry_bytes(lay: dict) -> dict[str, float]:
    """Bytes of one cache entry per ``b{i}.win`` / ``b{i}.ckv`` / ``b{i}.ikv`` of a manifest cache layout
    (either storage: the dense tensor, or the packed parts summed)."""
    from dsv4c.layout import entry_group  # noqa: PLC0415

    out: dict[str, float] = {}
    for key, ent in lay.items():
        g = entry_group(key)
        if g is not None:
            k = f"{key.split('.', 1)[0]}.{g}"
            out[k] = out.get(k, 0) + ent["shape"][-1] * _dtype_size(ent["dtype"])
    return out


def kv_bytes_report(manifest: dict) -> dict:
    from dsv4c.layout import (entry_group, indexer_entry_bytes, kv_bytes_per_token, main_entry_bytes,  # noqa: PLC0415
                              window_bytes)
    from dsv4c.spec import ModelSpec  # noqa: PLC0415

    spec = ModelSpec.from_dict(manifest["spec"])
    lay = manifest["cache_layout"]
    storage = manifest.get("kv_storage", "dense")
    per_tok = 0.0
    fixed = 0
    win = 0
    for key, ent in lay.items():
        nbytes = math.prod(ent["shape"]) * _dtype_size(ent["dtype"])
        i, _ = key.split(".", 1)
        g = entry_group(key)
        if g in ("ckv", "ikv"):
            m = spec.compress_ratios[int(i[1:])]
            per_tok += ent["shape"][-1] * _dtype_size(ent["dtype"]) / m
        else:
            fixed += nbytes
            win += nbytes if g == "win" else 0
    ent = _entry_bytes(lay)
    formula = kv_bytes_per_token(spec)
    return {"kv_storage": storage,
            "allocated_per_token": round(per_tok, 4), "formula_per_token": round(formula, 4),
            "allocated_over_formula": round(per_tok / formula, 4) if formula else None,
            "allocated_equals_formula": abs(per_tok - formula) < 1e-9 * max(formula, 1.0),
            "allocated_main_entry_bytes": next((v for k, v in ent.items() if k.endswith(".ckv")), None),
            "allocated_indexer_entry_bytes": next((v for k, v in ent.items() if k.endswith(".ikv")), None),
            "formula_main_entry_bytes": main_entry_bytes(spec),
            "formula_indexer_entry_bytes": indexer_entry_bytes(spec),
            "allocated_fixed_per_sequence": fixed, "allocated_window_per_sequence": win,
            "formula_window_per_sequence": window_bytes(spec),
            "note": "allocated = the cache tensors the engine holds (" + (
                "packed: entries in storage format" if storage == "packed" else
                "dense: entries in the activation dtype") + "); formula = storage format (FP8 nope + ue8m0 "
                    "scales + bf16 rope; FP4 indexer keys); fixed = window buffers + compressor state"}


def prefill_flops(spec: dict, S: int) -> float:
    """Useful FLOPs of prefilling S tokens at positions 0..S-1 (GEMMs, attention, indexer scores)."""
    D, H, c = spec["hidden_size"], spec["num_heads"], spec["head_dim"]
    ql, g, dg = spec["q_lora_rank"], spec["o_groups"], spec["o_lora_rank"]
    nw, nI, dI, topk = spec["sliding_window"], spec["index_n_heads"], spec["index_head_dim"], spec["index_topk"]
    E, k, I = spec["n_routed_experts"], spec["num_experts_per_tok"], spec["moe_intermediate_size"]
    n = spec["hc_mult"]
    sh = spec.get("n_shared_experts", 1)
    t = torch.arange(S, dtype=torch.float64)
    win = torch.clamp(t + 1, max=nw).sum().item()
    per_tok = (2 * D * ql + 2 * ql * H * c + 2 * D * c + 2 * H * c * dg + 2 * g * dg * D  # attention GEMMs
               + 2 * D * E + k * 3 * 2 * D * I + sh * 3 * 2 * D * I  # gate, routed and shared experts
               + 2 * 2 * (n * D) * ((2 + n) * n))  # mHC mixing (attention and MoE)
    total = 0.0
    for kind, m in _blocks(spec):
        total += per_tok * S + 4 * H * c * win
        if kind == "window":
            continue
        vis = torch.div(t + 1, m, rounding_mode="floor")
        if kind == "hca":
            total += 2 * D * (2 * c) * S + 4 * H * c * vis.sum().item()
        else:
            total += (2 * D * (4 * c) + 2 * D * (4 * dI)) * S  # both compressors (overlap: 2 d each, a and z)
            total += (2 * ql * nI * dI + 2 * D * nI) * S + 2 * nI * dI * vis.sum().item()  # indexer
            total += 4 * H * c * torch.clamp(vis, max=topk).sum().item()
    total += 2 * D * spec["vocab_size"]  # head on the last position
    return total


# ---- the benchmark ----------------------------------------------------------------------------------------

def fill_cache(eng, rows: int, ctx: int, seed: int = 0) -> None:
    """Rows ``:rows`` of the engine's cache filled with seeded random entries (as if ``ctx`` tokens were
    decoded): a decode step's inputs without a prefill."""
    g = torch.Generator(device=eng.device).manual_seed(seed)
    for name, t in eng.cache.items():
        v = t[:rows]
        if v.dtype == torch.uint8:  # packed storage: ue8m0 scale bytes near 2^0, random e2m1 code pairs
            lo, hi = (120, 128) if name.endswith("_scale") else (0, 256)
            v.copy_(torch.randint(lo, hi, v.shape, generator=g, device=eng.device, dtype=torch.uint8))
        elif v.dtype.is_floating_point:
            x = torch.randn(v.shape, generator=g, device=eng.device)
            if name.endswith(("_z", "_pz")):
                x = x * 0.5
            v.copy_(x.to(v.dtype))
    eng.lengths = [ctx] * rows


def bench_decode(eng, batch: int, ctx: int, steps: int = 20) -> dict:
    ex = eng._executor
    dev = eng.device

    def fresh_start():  # every timed run decodes from the same context length: cache re-filled, new ids
        fill_cache(eng, batch, ctx)
        return (torch.randint(0, eng.vocab_size, (batch, 1), device=dev),
                torch.full((batch,), ctx, dtype=torch.long, device=dev))

    ids, start = fresh_start()
    inputs = dict(eng._static)
    inputs.update({f"cache.{k}": v[:batch] for k, v in eng.cache.items()})
    t0 = time.perf_counter()
    with torch.no_grad():
        inputs["input_ids"], inputs["start_pos"] = ids, start
        logits = ex.run("decode", inputs)  # compile / capture for this bucket (first time)
    _sync(dev)
    first_s = time.perf_counter() - t0

    def loop():
        nonlocal ids, start
        with torch.no_grad():
            for _ in range(steps):
                inputs["input_ids"], inputs["start_pos"] = ids, start
                out = ex.run("decode", inputs)
                ids = out.argmax(-1, keepdim=True)
                start = start + 1

    def host_timed_loop():  # the host's share: enqueueing the steps (no wait on the device inside)
        t = time.perf_counter()
        loop()
        host.append((time.perf_counter() - t) * 1e3 / steps)

    times: list[float] = []
    host: list[float] = []
    for _ in range(5):
        ids, start = fresh_start()
        times.extend(t / steps for t in _time_ms(host_timed_loop, dev, reps=1, warmup=0))
    loop_ms = statistics.median(times)
    chain_ms = None
    if getattr(ex, "use_graphs", False) and hasattr(ex, "decode_greedy"):  # the same steps chained on the device
        chain: list[float] = []
        for rep in range(6):  # the first run captures the chain's graph
            inputs["input_ids"], inputs["start_pos"] = fresh_start()
            _sync(dev)
            with torch.no_grad():
                t = _time_ms(lambda: ex.decode_greedy(inputs, steps), dev, reps=1, warmup=0)[0]
            if rep:
                chain.append(t / steps)
        chain_ms = statistics.median(chain)
    step_ms = chain_ms if chain_ms is not None else loop_ms
    res = {"batch": batch, "context": ctx, "step_ms": round(step_ms, 4),
           "step_source": "device chain" if chain_ms is not None else "python loop",
           "step_ms_python_loop": round(loop_ms, 4),
           "host_ms_per_step": round(statistics.median(host), 4), "first_call_s": round(first_s, 2),
           "tokens_per_s": round(batch / step_ms * 1e3, 1), "finite": bool(torch.isfinite(logits).all())}
    graphs = getattr(ex, "_decode", None)
    if graphs is not None:
        res["cuda_graphs"] = graphs.failed or "captured"
    if graphs is not None and graphs.graphs:
        g = min((gg for b, gg in graphs.graphs.items() if b >= batch), key=lambda gg: gg.out.shape[0])
        res["graph_replay_ms"] = round(statistics.median(_time_ms(g.graph.replay, dev, reps=20, warmup=3)), 4)
        res["bucket"] = int(g.out.shape[0])
    return res


def bench_prefill(eng, tokens: int, reps: int = 3) -> dict:
    dev = eng.device
    ids = torch.randint(0, eng.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(1))
    t0 = time.perf_counter()
    eng.prefill(ids)
    _sync(dev)
    first_s = time.perf_counter() - t0
    ms = statistics.median(_time_ms(lambda: eng.prefill(ids), dev, reps=reps, warmup=0))
    flops = prefill_flops(eng.artifact.manifest["spec"], tokens)
    return {"tokens": tokens, "ms": round(ms, 2), "tokens_per_s": round(tokens / ms * 1e3, 1),
            "model_tflop": round(flops / 1e12, 3), "tflop_per_s": round(flops / (ms / 1e3) / 1e12, 1),
            "first_call_s": round(first_s, 2)}


def run(artifact: str | Path, device: str | None = None, batches=DEFAULT_BATCHES, contexts=DEFAULT_CONTEXTS,
        prefill_tokens: int = PREFILL_TOKENS, steps: int = 20, extra: dict | None = None, log=print,
        deadline: float | None = None, engine=None, profile: bool = False,
        new_bucket_seconds: float = 0.0, progress=None) -> dict:
    """Benchmark ``artifact`` (see the module docstring). ``deadline`` (a ``time.perf_counter()`` value):
    configurations not started by then are skipped and listed under ``skipped``. ``progress`` (optional) is
    called with the results so far after each measurement, so a caller that may be killed can save them."""
    from dsv4c.artifact import open_artifact  # noqa: PLC0415
    from dsv4c.runtime import Engine  # noqa: PLC0415

    art = open_artifact(artifact)
    m = art.manifest
    dev = torch.device(device or ("cpu" if m["target"] == "cpu" else "cuda"))
    res: dict[str, Any] = {"artifact": str(artifact), "target": m["target"], "backend": m["backend"],
                           "spec": m["spec"]["name"], "numerics": m["numerics"], "dtype": m["dtype"],
                           "max_seq_len": m["max_seq_len"], "max_batch": m["max_batch"],
                           "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                           "torch": torch.__version__}
    if dev.type == "cuda":
        res["hbm"] = hbm_bandwidth(dev)
        log(f"bench: copy bandwidth {res['hbm']['tb_per_s']} TB/s")
    cache_warm = None
    if m["backend"] == "inductor":
        from dsv4c.runtime.inductor_executor import compile_cache_dir  # noqa: PLC0415

        texts = {e: art.read_text(ent["file"]) for e, ent in m["programs"].items()}
        cache_warm = compile_cache_dir(m, texts, dev).exists()
    if engine is None:
        eng, res["load"] = load_engine(artifact, dev, log)
        res["load"]["compile_cache_warm"] = cache_warm
    else:
        eng = engine
    res["kv_bytes_per_token"] = kv_bytes_report(m)
    used = set()
    prog = eng._executor.programs.get("decode") if hasattr(eng._executor, "programs") else None
    if prog is not None:
        used = {n[len("params."):] for n in prog.input_names if n.startswith("params.")}
    res["decode"] = []
    res["skipped"] = []

    def late(what: str) -> bool:
        if deadline is not None and time.perf_counter() > deadline:
            res["skipped"].append(what)
            log(f"bench: out of time, skipping {what}")
            return True
        return False

    def one(b: int, ctx: int) -> None:
        if ctx + steps * 4 + 2 > m["max_seq_len"]:
            log(f"bench: skip context {ctx} (artifact context {m['max_seq_len']})")
            return
        if b > m["max_batch"]:
            log(f"bench: skip batch {b} (artifact max batch {m['max_batch']})")
            return
        if late(f"decode batch {b} context {ctx}"):
            return
        graphs = getattr(eng._executor, "_decode", None)
        fresh = graphs is None or b not in graphs.graphs
        if (fresh and b > 1 and deadline is not None
                and time.perf_counter() + new_bucket_seconds > deadline):  # compiling a new bucket takes minutes
            res["skipped"].append(f"decode batch {b} context {ctx} (no time to compile a new bucket)")
            log(f"bench: skipping batch {b}: compiling its bucket needs ~{new_bucket_seconds:.0f} s")
            return
        r = bench_decode(eng, b, ctx, steps)
        w = decode_weight_bytes(m, used, b, wo_a_fp8=reads_wo_a_fp8(eng))
        kv = decode_kv_bytes(m, b, ctx)
        r["bytes_per_step"] = {"weights": round(w["total"]), "kv_read": round(kv), "total": round(w["total"] + kv),
                               "total_stored": round(w["total_stored"] + kv),
                               "weights_detail": {k: v if isinstance(v, str) else round(v) for k, v in w.items()}}
        bw = (w["total"] + kv) / (r["step_ms"] / 1e3)
        r["achieved_bytes_per_s"] = round(bw)
        if "hbm" in res:
            r["hbm_fraction"] = round(bw / res["hbm"]["bytes_per_s"], 3)
            # wo_a counted at its stored FP8 size: the least any engine must read
            r["hbm_fraction_stored"] = round((w["total_stored"] + kv) / (r["step_ms"] / 1e3) / res["hbm"]["bytes_per_s"],
                                             3)
            if "graph_replay_ms" in r:
                r["hbm_fraction_replay"] = round((w["total"] + kv) / (r["graph_replay_ms"] / 1e3)
                                                 / res["hbm"]["bytes_per_s"], 3)
        if profile and b == min(batches) and ctx == contexts[0] and dev.type == "cuda":
            g = decode_graph(eng, r.get("bucket", b))
            if g is not None:
                try:
                    res["profile_decode"] = profile_kernels(g.graph.replay, dev, reps=5, top=120)
                    log(f"bench: decode step = {res['profile_decode']['kernels_per_call']:.0f} kernels, "
                        f"{res['profile_decode']['device_us_per_call']:.0f} us of kernel time")
                except Exception as e:  # noqa: BLE001 - profiling is best effort
                    res["profile_decode"] = {"error": f"{type(e).__name__}: {e}"}
        res["decode"].append(r)
        log(f"bench: decode batch {b} context {ctx}: {r['step_ms']:.3f} ms/step"
            + (f", {100 * r['hbm_fraction']:.0f}% of HBM bandwidth ({100 * r['hbm_fraction_stored']:.0f}% with wo_a "
               f"at its stored FP8 size)" if "hbm_fraction" in r else ""))
        if progress is not None:
            progress(res)

    # batch 1 first (the bandwidth-bound case), then prefill, then the larger batches (their first step
    # compiles and captures a new bucket)
    for b in sorted(batches):
        for ctx in contexts:
            one(b, ctx)
        if b == min(batches) and prefill_tokens and prefill_tokens <= m["max_seq_len"] \
                and not late(f"prefill {prefill_tokens}"):
            res["prefill"] = bench_prefill(eng, prefill_tokens)
            log(f"bench: prefill {prefill_tokens} tokens: {res['prefill']['ms']} ms, "
                f"{res['prefill']['tflop_per_s']} TFLOP/s")
            if progress is not None:
                progress(res)
            if profile and dev.type == "cuda":
                ids = torch.randint(0, eng.vocab_size, (1, prefill_tokens))
                try:
                    res["profile_prefill"] = profile_kernels(lambda: eng.prefill(ids), dev, reps=1)
                except Exception as e:  # noqa: BLE001
                    res["profile_prefill"] = {"error": f"{type(e).__name__}: {e}"}
    ex = eng._executor
    res["executor"] = {"type": type(ex).__name__, "compile_seconds": getattr(ex, "compile_seconds", None),
                       "rewrites": getattr(ex, "rewrites", None),
                       "cache_dir": str(getattr(ex, "cache_dir", "")) or None}
    try:
        from dsv4c.ops import triton_kernels as tk  # noqa: PLC0415

        res["kernel_tune"] = dict(tk.TUNE)
    except ImportError:
        pass
    if extra:
        res.update(extra)
    return res


def load_engine(artifact: str | Path, dev: torch.device, log=print, first_prefill: bool = True):
    """Engine.load, then a first prefill and a first decode (compiling, or loading from the keyed cache).
    ``first_prefill=False``: no prefill (nor its compile); the first decode starts from a seeded cache fill
    (:func:`fill_cache`) of 16 tokens."""
    from dsv4c.runtime import Engine  # noqa: PLC0415

    t0 = time.perf_counter()
    eng = Engine.load(artifact, device=str(dev))
    _sync(dev)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    if first_prefill:
        eng.prefill(torch.randint(0, eng.vocab_size, (1, 16)))
    else:
        fill_cache(eng, 1, 16)
    _sync(dev)
    prefill_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    eng.decode(torch.zeros(1, dtype=torch.long))
    _sync(dev)
    decode_s = time.perf_counter() - t0
    log(f"bench: load {load_s:.1f} s, first prefill {prefill_s:.1f} s{'' if first_prefill else ' (none: a cache fill)'}, "
        f"first decode {decode_s:.1f} s")
    return eng, {"engine_load_s": round(load_s, 2), "first_prefill_s": round(prefill_s, 2) if first_prefill else None,
                 "first_decode_s": round(decode_s, 2),
                 "load_to_first_token_s": round(load_s + prefill_s + decode_s, 2) if first_prefill else None}


def decode_graph(eng, bucket: int):  # noqa: ANN001, ANN201 - an Engine; its captured graph or None
    """The CUDA graph an engine's executor captured for decode batch bucket ``bucket``, or None."""
    graphs = getattr(eng._executor, "_decode", None)
    return graphs.graphs.get(bucket) if graphs is not None else None


def profile_kernels(fn, dev: torch.device, reps: int = 1, top: int = 30) -> dict:
    """CUDA kernels launched by ``fn`` (run ``reps`` times): count per call and the top kernels by time."""
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

    fn()
    _sync(dev)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        _sync(dev)
    agg: dict[str, list] = {}
    n = 0
    for ev in prof.events():
        if getattr(ev, "device_type", None) is not None and str(ev.device_type).endswith("CUDA"):
            d = ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total
            a = agg.setdefault(ev.name[:90], [0, 0.0])
            a[0] += 1
            a[1] += d
            n += 1
    total = sum(v[1] for v in agg.values())
    rows = sorted(agg.items(), key=lambda kv: -kv[1][1])[:top]
    return {"kernels_per_call": n / reps, "device_us_per_call": round(total / reps, 1),
            "top": [{"name": k, "calls": v[0] / reps, "us_per_call": round(v[1] / reps, 1)} for k, v in rows]}


def run_bench(args) -> str:  # noqa: ANN001 - the CLI's argparse namespace
    """``dsv4c bench``: run :func:`run` on ``args.artifact``; write JSON to ``args.json`` when given;
    return a short text summary."""
    import sys  # noqa: PLC0415

    kw = {}
    for key in ("device", "batches", "contexts", "prefill_tokens", "steps"):
        if getattr(args, key, None) is not None:
            kw[key] = getattr(args, key)
    res = run(args.artifact, log=lambda s: print(s, file=sys.stderr, flush=True), **kw)
    if getattr(args, "json", None):
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=1))
    return summarize(res)


def summarize(res: dict) -> str:
    lines = [f"{res['spec']} {res['backend']} on {res['device']}"]
    if "hbm" in res:
        lines.append(f"  copy bandwidth            {res['hbm']['tb_per_s']:.2f} TB/s")
    ld = res.get("load", {})
    lines.append(f"  load / first prefill / first decode  {ld.get('engine_load_s')} / {ld.get('first_prefill_s')} / "
                 f"{ld.get('first_decode_s')} s (compile cache warm: {ld.get('compile_cache_warm')})")
    for r in res.get("decode", []):
        frac = (f"  {100 * r['hbm_fraction']:.0f}% HBM ({100 * r['hbm_fraction_stored']:.0f}% wo_a as FP8)"
                if "hbm_fraction" in r else "")
        lines.append(f"  decode b={r['batch']:<3} ctx={r['context']:<6} {r['step_ms']:8.3f} ms/step "
                     f"{r['bytes_per_step']['total'] / 1e9:6.3f} GB/step{frac}")
    if "prefill" in res:
        p = res["prefill"]
        lines.append(f"  prefill {p['tokens']} tokens   {p['ms']} ms  {p['tokens_per_s']} tok/s  {p['tflop_per_s']} TFLOP/s")
    kv = res["kv_bytes_per_token"]
    lines.append(f"  KV bytes/token allocated {kv['allocated_per_token']} vs formula {kv['formula_per_token']} "
                 f"({kv.get('kv_storage', 'dense')} cache)")
    return "\n".join(lines)
