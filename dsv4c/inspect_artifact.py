"""``dsv4c inspect``: what an artifact is made of and what the passes did to it.

- default: the pass pipeline (pass, uuid, matches, time, nodes before -> after, per entry point) and
  the memory plan (weights by storage dtype, the packed FP4 experts before/after packing, KV bytes
  per token and the runtime's cache allocation, a peak-activation estimate);
- ``--graph ENTRY``: the entry point's final graph as readable code, each pass-created node
  annotated with the pass that made it (and its expert wave);
- ``--graph ENTRY --stage PASS``: the graph right after PASS (``traced`` for the graph before the
  first pass), and ``--diff STAGE_A STAGE_B``: the unified diff between two stages. Both read the
  pass dumps the artifact carries under ``debug/passes/`` when it was built with ``--dump-passes``.

Reads only the manifest, the program JSON and the debug files; no weights are loaded.
"""

from __future__ import annotations

import json
import math
from typing import Any

import torch

from .artifact import Artifact, open_artifact
from .errors import ArtifactError, InputError
from .plan import _human
from .spec import ModelSpec

_DEBUG = "debug/passes"


def _nbytes(ent: dict) -> int:
    """Bytes of a manifest tensor entry ({shape, dtype})."""
    dtype = getattr(torch, str(ent["dtype"]), None)
    if not isinstance(dtype, torch.dtype):
        raise ArtifactError(f"the manifest names an unknown tensor dtype {str(ent['dtype'])[:40]!r}.",
                            "rebuild the artifact with this dsv4c.")
    return math.prod(ent["shape"]) * dtype.itemsize


def inspect_artifact(path, graph: str | None = None, stage: str | None = None, diff: list[str] | None = None,
                     as_json: bool = False) -> str:
    art = open_artifact(path)
    if graph is not None or stage is not None or diff:
        return _graph_view(art, graph or "prefill", stage, diff, as_json)
    m = art.manifest
    summary = {"artifact": str(art.path), "variant": m["spec"].get("name"), "target": m["target"],
               "backend": m["backend"], "numerics": m["numerics"], "dtype": m["dtype"],
               "pipeline_uuid": m.get("pipeline_uuid"), "pipeline": m.get("pipeline", []), "memory": memory_plan(m)}
    if as_json:
        return json.dumps(summary, indent=1)
    return "\n".join([
        f"{summary['artifact']}: {summary['variant']} for {m['target']} ({m['backend']} backend, {m['numerics']} "
        f"numerics, {m['dtype']}), max_seq_len {m['max_seq_len']}, max_batch {m['max_batch']}",
        "", f"pass pipeline {summary['pipeline_uuid']}:", render_pipeline(summary["pipeline"]),
        "", "memory plan:", render_memory(summary["memory"]),
        "", _debug_hint(art)])


# ---- the pipeline table ------------------------------------------------------------------------------

def render_pipeline(records: list[dict]) -> str:
    if not records:
        return "  (no passes recorded)"
    entries = list(records[0].get("matches", {}))
    head = ["#", "pass", "uuid"] + [f"matches {e}" for e in entries] + ["ms"] + [f"nodes {e}" for e in entries]
    rows = []
    for k, r in enumerate(records, start=1):
        nb, na = r.get("nodes_before", {}), r.get("nodes_after", {})
        rows.append([f"{k:02d}", r["name"] + (" (off)" if "disabled" in r.get("notes", "") else ""), r["uuid"]]
                    + [str(r.get("matches", {}).get(e, "-")) for e in entries] + [f"{r.get('ms', 0):.0f}"]
                    + [f"{nb.get(e, '?')} -> {na.get(e, '?')}" for e in entries])
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    fmt = "  " + "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths))] + [fmt.format(*row) for row in rows]
    notes = [f"  {r['name']}: {r['notes']}" for r in records if r.get("notes")]
    return "\n".join(lines + (["", "  notes:"] + notes if notes else []))


# ---- the memory plan ---------------------------------------------------------------------------------

def memory_plan(m: dict) -> dict[str, Any]:
    by_dtype: dict[str, dict[str, int]] = {}
    for ent in m.get("params", {}).values():
        d = by_dtype.setdefault(ent["dtype"], {"tensors": 0, "bytes": 0})
        d["tensors"] += 1
        d["bytes"] += _nbytes(ent)
    pack = next((r for r in m.get("pipeline", []) if r.get("name") == "pack_fp4_experts" and "bytes_before" in r), None)
    batch, seq = m["max_batch"], m["max_seq_len"]
    cache = sum(_nbytes(e) for e in m.get("cache_layout", {}).values()) * batch
    kv = float(m.get("kv_bytes_per_token", 0.0))
    spec = ModelSpec.from_dict(m["spec"])
    act_bytes = 2 if m["dtype"] == "bf16" else 4
    return {
        "weights_by_dtype": by_dtype,
        "weights_total": sum(d["bytes"] for d in by_dtype.values()),
        "fp4_experts": None if pack is None else {"layout": pack.get("layout", {}).get("name"),
                                                 "tile": [pack.get("layout", {}).get("bn"), pack.get("layout", {}).get("bk")],
                                                 "bytes_before": pack["bytes_before"], "bytes_after": pack["bytes_after"]},
        "kv_bytes_per_token": kv,
        "kv_storage": m.get("kv_storage", "dense"),
        "kv_allocated_bytes_per_token": _allocated_per_token(m),
        "kv_storage_format_bytes": kv * seq * batch,
        "cache_allocation_bytes": cache,
        "peak_activation_estimate": {
            "prefill": activation_estimate(spec, batch=1, tokens=seq, max_seq_len=seq, act_bytes=act_bytes),
            "decode": activation_estimate(spec, batch=batch, tokens=1, max_seq_len=seq, act_bytes=act_bytes)},
    }


def _allocated_per_token(m: dict) -> float:
    """Bytes per token of context the allocated cache spends on compressed entries (all their parts)."""
    from .layout import entry_group  # noqa: PLC0415

    ratios = m["spec"]["compress_ratios"]
    total = 0.0
    for name, ent in m.get("cache_layout", {}).items():
        if entry_group(name) in ("ckv", "ikv"):
            total += _nbytes({"shape": ent["shape"][-1:], "dtype": ent["dtype"]}) / ratios[int(name.split(".")[0][1:])]
    return total


def activation_estimate(spec: ModelSpec, batch: int, tokens: int, max_seq_len: int, act_bytes: int) -> dict[str, int]:
    """Bytes live at the widest point of one block of the eager reference graph, per sub-layer: the
    fp32 residual streams plus that sub-layer's largest intermediates (a rough upper-bound estimate;
    fused GPU kernels keep the attention logits on chip)."""
    B, S, s = batch, tokens, spec
    bs = B * S
    streams = 2 * bs * s.hc_mult * s.hidden_size * 4
    csa_cap = -(-max_seq_len // 4) + 1
    hca_ratios = [r for r in s.compress_ratios if r > 4]
    hca_cap = -(-max_seq_len // max(hca_ratios)) + 1 if hca_ratios else 0
    K = max(min(s.index_topk, csa_cap), hca_cap)
    keys = s.sliding_window + S + K
    attn = (bs * s.num_heads * keys * 4 * 3            # logits, exp, probabilities
            + B * S * K * s.head_dim * 4              # gathered compressed entries
            + 3 * bs * s.num_heads * s.head_dim * 4)  # q in fp32, output
    indexer = 2 * bs * s.index_n_heads * csa_cap * 4 + bs * csa_cap * 4
    rows = bs * s.num_experts_per_tok
    moe = rows * (s.hidden_size * act_bytes * 2 + s.moe_intermediate_size * (2 * act_bytes + 4 * 2)) \
        + bs * s.hidden_size * 4 + s.moe_intermediate_size * s.hidden_size * 4  # one expert dequantized
    return {"attention": streams + attn, "indexer": streams + indexer, "moe": streams + moe,
            "peak": streams + max(attn, indexer, moe)}


def render_memory(mp: dict) -> str:
    lines = [f"  weights ({_human(mp['weights_total'])}):"]
    for dt, d in sorted(mp["weights_by_dtype"].items(), key=lambda kv: -kv[1]["bytes"]):
        lines.append(f"    {dt:<16} {d['tensors']:>6} tensors  {_human(d['bytes']):>12}")
    fp4 = mp["fp4_experts"]
    if fp4:
        lines.append(f"  routed experts (FP4): {_human(fp4['bytes_before'])} in checkpoint layout -> {_human(fp4['bytes_after'])} "
                     f"packed ({fp4['layout']}, tile {fp4['tile'][0]}x{fp4['tile'][1]}; scales as ue8m0 bytes)")
    layout = ("packed: entries in storage format" if mp.get("kv_storage") == "packed"
              else "dense: entries in the activation dtype")
    lines.append(f"  KV cache: {mp['kv_bytes_per_token']:,.1f} bytes/token in storage format "
                 f"({_human(mp['kv_storage_format_bytes'])} at max_seq_len x max_batch); the runtime allocates "
                 f"{mp.get('kv_allocated_bytes_per_token', 0.0):,.1f} bytes/token, "
                 f"{_human(mp['cache_allocation_bytes'])} in all ({layout}; with window buffers and compressor state)")
    for entry, est in mp["peak_activation_estimate"].items():
        parts = ", ".join(f"{k} {_human(v)}" for k, v in est.items() if k != "peak")
        lines.append(f"  peak activations, {entry} (estimate): {_human(est['peak'])}  [{parts}]")
    return "\n".join(lines)


# ---- graphs ------------------------------------------------------------------------------------------

def _debug_hint(art: Artifact) -> str:
    if _dump_index(art) is None:
        return ("graphs: `dsv4c inspect ART --graph prefill` prints the final graph; build with "
                "`--dump-passes DIR` to keep every pass's before/after in the artifact.")
    return ("graphs: `--graph prefill|decode` (final), `--graph ENTRY --stage PASS` (after PASS; `traced` = "
            "before the first pass), `--graph ENTRY --diff PASS_A PASS_B`; the dumps are under debug/passes/.")


def _dump_index(art: Artifact) -> dict | None:
    rel = f"{_DEBUG}/index.json"
    if rel not in art.manifest.get("files", {}):
        return None
    return json.loads(art.read_text(rel))


def _stage_code(art: Artifact, index: dict, stage: str, entry: str) -> str:
    from .passes.dump import find_stage  # noqa: PLC0415 - only inspection needs the passes package

    try:
        stem, when = find_stage(index, stage, entry)
    except KeyError:
        names = ["traced"] + [f"{r['index']:02d}_{r['name']}" for r in index["passes"]]
        raise InputError(f"no stage {stage!r} in this artifact's pass dump.", f"use one of: {', '.join(names)}.") from None
    return art.read_text(f"{_DEBUG}/{stem}.{when}.py")


def _graph_view(art: Artifact, entry: str, stage: str | None, diff: list[str] | None, as_json: bool) -> str:
    progs = art.manifest["programs"]
    if entry not in progs:
        raise InputError(f"no entry point {entry!r} in {art.path}.", f"use one of: {', '.join(progs)}.")
    if stage is None and not diff:
        ent = progs[entry]
        if ent.get("format") != "dsv4c.fx-json/1":
            raise ArtifactError(f"{entry} is stored as {ent.get('format')!r}, not as an FX graph.",
                                "rebuild with --dump-passes to keep readable graphs in debug/passes/.")
        from .passes.dump import annotated_code  # noqa: PLC0415
        from .program import Program  # noqa: PLC0415

        prog = Program.from_json(art.read_text(ent["file"]), where=f"{art.path}/{ent['file']}")
        prog.recompile()
        code = annotated_code(prog.graph_module)
        return json.dumps({"entry": entry, "stage": "final", "code": code}) if as_json else code
    index = _dump_index(art)
    if index is None:
        raise InputError(f"{art.path} carries no pass dumps, so stages cannot be shown.",
                         "rebuild it with `--dump-passes DIR` (the dumps are copied into the artifact's debug/).")
    if diff:
        from .passes.dump import unified_diff  # noqa: PLC0415

        a, b = diff
        text = unified_diff(_stage_code(art, index, a, entry), _stage_code(art, index, b, entry),
                            f"{entry}@{a}", f"{entry}@{b}")
        return json.dumps({"entry": entry, "diff": [a, b], "text": text}) if as_json else (text or "(no difference)")
    code = _stage_code(art, index, stage, entry)
    return json.dumps({"entry": entry, "stage": stage, "code": code}) if as_json else code
