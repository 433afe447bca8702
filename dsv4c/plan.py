"""The build plan: what a model is made of, computed from its spec alone (no weights allocated).

Used by ``dsv4c build --dry-run`` and ``dsv4c inspect``: per-block kinds, parameter count and bytes by
storage dtype, active parameters per token, and KV-cache bytes per token.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from itertools import groupby

from .layout import (U8, checkpoint_tensors, indexer_entry_bytes, kv_bytes_per_token, main_entry_bytes, window_bytes)
from .spec import ModelSpec

_STORAGE = {"float8_e4m3fn": "fp8_e4m3", "uint8": "fp4_e2m1 (packed)", "bfloat16": "bf16", "float32": "fp32",
            "int64": "int64"}


@dataclass
class Plan:
    spec: ModelSpec
    block_rows: list[tuple[str, str, str]]  # (block range, attention kind, routing kind)
    params_by_dtype: dict[str, int] = field(default_factory=dict)
    bytes_by_dtype: dict[str, int] = field(default_factory=dict)
    total_params: int = 0
    active_params: int = 0
    kv_bytes_per_token: float = 0.0
    window_bytes_per_seq: int = 0
    kv_storage: str | None = None  # the built cache's layout ("packed" / "dense"); None = not decided (spec only)

    def as_dict(self) -> dict:
        return {
            "variant": self.spec.name,
            "blocks": [{"blocks": r, "attention": a, "routing": k} for r, a, k in self.block_rows],
            "params_by_dtype": self.params_by_dtype,
            "bytes_by_dtype": self.bytes_by_dtype,
            "total_params": self.total_params,
            "active_params_per_token": self.active_params,
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "kv_entry_bytes": {"main": main_entry_bytes(self.spec), "indexer": indexer_entry_bytes(self.spec)},
            "window_bytes_per_sequence": self.window_bytes_per_seq,
            "kv_storage": self.kv_storage,
        }

    def render(self) -> str:
        s = self.spec
        lines = [f"dsv4c plan: {s.name}  (D={s.hidden_size}, H={s.num_heads}, c={s.head_dim}, "
                 f"{s.num_layers} blocks + {s.num_mtp_layers} MTP, {s.n_routed_experts} experts top-{s.num_experts_per_tok})",
                 "", f"  {'blocks':<12} {'attention':<24} {'routing':<8}", f"  {'-' * 12} {'-' * 24} {'-' * 8}"]
        lines += [f"  {r:<12} {a:<24} {k:<8}" for r, a, k in self.block_rows]
        lines += ["", f"  {'storage dtype':<20} {'params':>18} {'bytes':>12}", f"  {'-' * 20} {'-' * 18} {'-' * 12}"]
        for dt in sorted(self.bytes_by_dtype, key=lambda d: -self.bytes_by_dtype[d]):
            count = f"{self.params_by_dtype[dt]:,}" if dt in self.params_by_dtype else "-"
            lines.append(f"  {dt:<20} {count:>18} {_human(self.bytes_by_dtype[dt]):>12}")
        lines.append(f"  {'total':<20} {self.total_params:>18,} {_human(sum(self.bytes_by_dtype.values())):>12}")
        lines += ["", f"  active parameters per token: {self.active_params:,} ({self.active_params / 1e9:.1f} B)",
                  f"  KV cache: {self.kv_bytes_per_token:,.1f} bytes/token ({self.kv_bytes_per_token / 1024:.2f} KiB) "
                  f"+ {_human(self.window_bytes_per_seq)} of window buffers per sequence (storage format)"]
        if self.kv_storage is not None:
            lines.append(f"  KV cache layout: {self.kv_storage} ("
                         + ("entries stored as FP8 e4m3 + ue8m0 scales + bf16 rope, indexer keys as FP4 e2m1 + "
                            "ue8m0: allocated = the formula above" if self.kv_storage == "packed" else
                            "entries stored in the activation dtype: allocated exceeds the formula above") + ")")
        return "\n".join(lines)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def _block_rows(spec: ModelSpec) -> list[tuple[str, str, str]]:
    """Per-block kinds, with runs of a repeating 1- or 2-block pattern folded into one row."""
    def label(i: int) -> tuple[str, str]:
        a, r = spec.block_kinds()[i]
        return (a if a == "window" else f"{a}/{spec.compress_ratios[i]}"), r

    n_main = spec.num_layers
    rows: list[tuple[str, str, str]] = []
    i = 0
    while i < n_main:
        best = (1, 1)  # (period, repeats)
        for period in (1, 2):
            reps = 1
            while i + (reps + 1) * period <= n_main and all(
                    label(i + reps * period + k) == label(i + k) for k in range(period)):
                reps += 1
            if period * reps > best[0] * best[1] and reps > 1:
                best = (period, reps)
        period, reps = best
        j = i + period * reps - 1
        kinds = [label(i + k) for k in range(period)]
        attn = ", ".join(k[0] for k in kinds) + (f"  x{reps}" if period > 1 else "")
        route = ", ".join(dict.fromkeys(k[1] for k in kinds))
        rows.append((f"{i}" if i == j else f"{i}-{j}", attn, route))
        i = j + 1
    for i in range(n_main, spec.num_blocks):
        a, r = label(i)
        rows.append((f"{i} (MTP)", a, r))
    return rows


def make_plan(spec: ModelSpec, kv_storage: str | None = None) -> Plan:
    rows = _block_rows(spec)
    params, nbytes = Counter(), Counter()
    active = 0
    experts = spec.n_routed_experts
    for name, ts in checkpoint_tensors(spec).items():
        # Logical element count: a packed FP4 byte holds two weights.
        if name.endswith(".scale"):
            # Block scales are ue8m0 bytes in the checkpoint; they are not parameters.
            nbytes["ue8m0 scales"] += ts.numel
            continue
        n = ts.numel * (2 if ts.dtype == U8 else 1)
        dt = _STORAGE[str(ts.dtype).removeprefix("torch.")]
        params[dt] += n
        nbytes[dt] += ts.nbytes
        if name.startswith("mtp.") or name == "embed.weight":
            continue  # MTP is a draft head; the embedding is a lookup
        if ".experts." in name:
            active += n * spec.num_experts_per_tok // experts
        else:
            active += n
    plan = Plan(spec, rows, dict(params), dict(nbytes), sum(params.values()), active,
                kv_bytes_per_token(spec), window_bytes(spec), kv_storage)
    return plan
