"""Every tensor of a DeepSeek-V4 model, named and shaped from a spec.

Three tables, all derived from a ``ModelSpec`` alone:

- ``checkpoint_tensors``: the hub checkpoint (MODEL-SEMANTICS section 9), one entry per stored tensor,
  FP8 weights with 128x128 block scales, per-expert FP4 weights packed two per byte.
- ``model_tensors``: what the traced program takes as parameters: the same names, except that routed
  experts are stacked per block (``ffn.experts.w1.weight`` [E, N, K/2]) and ``wo_a`` is dequantized
  once to the activation dtype (the reference applies it as a plain grouped matmul).
- ``cache_tensors``: the heterogeneous KV cache of a batch of sequences.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .spec import CSA_RATIO, FP4_BLOCK, FP8_WEIGHT_BLOCK, ModelSpec


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


BF16, F32, F8, U8, I64 = torch.bfloat16, torch.float32, torch.float8_e4m3fn, torch.uint8, torch.int64


def _fp8(out: int, inp: int) -> dict[str, TensorSpec]:
    b = FP8_WEIGHT_BLOCK
    return {"weight": TensorSpec((out, inp), F8), "scale": TensorSpec((math.ceil(out / b), math.ceil(inp / b)), F32)}


def _fp4(out: int, inp: int, lead: tuple[int, ...] = ()) -> dict[str, TensorSpec]:
    return {"weight": TensorSpec((*lead, out, inp // 2), U8), "scale": TensorSpec((*lead, out, inp // FP4_BLOCK), F32)}


def _put(table: dict[str, TensorSpec], prefix: str, parts: dict[str, TensorSpec]) -> None:
    for k, v in parts.items():
        table[f"{prefix}.{k}"] = v


def _block_tensors(spec: ModelSpec, i: int, p: str, stacked_experts: bool) -> dict[str, TensorSpec]:
    D, H, c = spec.hidden_size, spec.num_heads, spec.head_dim
    n = spec.hc_mult
    t: dict[str, TensorSpec] = {}
    t[f"{p}attn_norm.weight"] = TensorSpec((D,), BF16)
    t[f"{p}ffn_norm.weight"] = TensorSpec((D,), BF16)
    for sub in ("attn", "ffn"):
        t[f"{p}hc_{sub}_fn"] = TensorSpec(((2 + n) * n, n * D), F32)
        t[f"{p}hc_{sub}_base"] = TensorSpec(((2 + n) * n,), F32)
        t[f"{p}hc_{sub}_scale"] = TensorSpec((3,), F32)
    a = f"{p}attn"
    _put(t, f"{a}.wq_a", _fp8(spec.q_lora_rank, D))
    _put(t, f"{a}.wq_b", _fp8(H * c, spec.q_lora_rank))
    _put(t, f"{a}.wkv", _fp8(c, D))
    _put(t, f"{a}.wo_a", _fp8(spec.o_groups * spec.o_lora_rank, spec.o_group_in))
    _put(t, f"{a}.wo_b", _fp8(D, spec.o_groups * spec.o_lora_rank))
    t[f"{a}.q_norm.weight"] = TensorSpec((spec.q_lora_rank,), BF16)
    t[f"{a}.kv_norm.weight"] = TensorSpec((c,), BF16)
    t[f"{a}.attn_sink"] = TensorSpec((H,), F32)
    kind = spec.attn_kind(i)
    m = spec.compress_ratios[i]
    if kind != "window":
        k = 2 if kind == "csa" else 1
        comps = [(f"{a}.compressor", c)] + ([(f"{a}.indexer.compressor", spec.index_head_dim)] if kind == "csa" else [])
        for cp, d in comps:
            t[f"{cp}.wkv.weight"] = TensorSpec((k * d, D), BF16)
            t[f"{cp}.wgate.weight"] = TensorSpec((k * d, D), BF16)
            t[f"{cp}.ape"] = TensorSpec((m, k * d), F32)
            t[f"{cp}.norm.weight"] = TensorSpec((d,), BF16)
        if kind == "csa":
            _put(t, f"{a}.indexer.wq_b", _fp8(spec.index_n_heads * spec.index_head_dim, spec.q_lora_rank))
            t[f"{a}.indexer.weights_proj.weight"] = TensorSpec((spec.index_n_heads, D), BF16)
    f = f"{p}ffn"
    E, I = spec.n_routed_experts, spec.moe_intermediate_size
    t[f"{f}.gate.weight"] = TensorSpec((E, D), BF16)
    if spec.route_kind(i) == "hash":
        t[f"{f}.gate.tid2eid"] = TensorSpec((spec.vocab_size, spec.num_experts_per_tok), I64)
    else:
        t[f"{f}.gate.bias"] = TensorSpec((E,), F32)
    if stacked_experts:
        _put(t, f"{f}.experts.w1", _fp4(I, D, (E,)))
        _put(t, f"{f}.experts.w3", _fp4(I, D, (E,)))
        _put(t, f"{f}.experts.w2", _fp4(D, I, (E,)))
    else:
        for e in range(E):
            _put(t, f"{f}.experts.{e}.w1", _fp4(I, D))
            _put(t, f"{f}.experts.{e}.w3", _fp4(I, D))
            _put(t, f"{f}.experts.{e}.w2", _fp4(D, I))
    if spec.n_shared_experts:
        _put(t, f"{f}.shared_experts.w1", _fp8(I, D))
        _put(t, f"{f}.shared_experts.w3", _fp8(I, D))
        _put(t, f"{f}.shared_experts.w2", _fp8(D, I))
    return t


def block_prefix(spec: ModelSpec, i: int) -> str:
    """Checkpoint prefix of block i: ``layers.i.`` for main blocks, ``mtp.k.`` for MTP blocks."""
    return f"layers.{i}." if i < spec.num_layers else f"mtp.{i - spec.num_layers}."


def _tensors(spec: ModelSpec, stacked_experts: bool) -> dict[str, TensorSpec]:
    D, V, n = spec.hidden_size, spec.vocab_size, spec.hc_mult
    t: dict[str, TensorSpec] = {
        "embed.weight": TensorSpec((V, D), BF16),
        "head.weight": TensorSpec((V, D), BF16),
        "norm.weight": TensorSpec((D,), BF16),
        "hc_head_fn": TensorSpec((n, n * D), F32),
        "hc_head_base": TensorSpec((n,), F32),
        "hc_head_scale": TensorSpec((1,), F32),
    }
    for i in range(spec.num_blocks):
        p = block_prefix(spec, i)
        t.update(_block_tensors(spec, i, p, stacked_experts))
        if i >= spec.num_layers:
            _put(t, f"{p}e_proj", _fp8(D, D))
            _put(t, f"{p}h_proj", _fp8(D, D))
            for nm in ("enorm", "hnorm", "norm"):
                t[f"{p}{nm}.weight"] = TensorSpec((D,), BF16)
            t[f"{p}hc_head_fn"] = TensorSpec((n, n * D), F32)
            t[f"{p}hc_head_base"] = TensorSpec((n,), F32)
            t[f"{p}hc_head_scale"] = TensorSpec((1,), F32)
    return t


def checkpoint_tensors(spec: ModelSpec) -> dict[str, TensorSpec]:
    """The hub checkpoint's tensors (per-expert FP4 weights)."""
    return _tensors(spec, stacked_experts=False)


def model_tensors(spec: ModelSpec, act_dtype: torch.dtype) -> dict[str, TensorSpec]:
    """The traced program's parameters: experts stacked per block, wo_a dequantized to act_dtype."""
    t = _tensors(spec, stacked_experts=True)
    for name in [k for k in t if k.endswith(".wo_a.scale")]:
        del t[name]
        w = name[: -len("scale")] + "weight"
        t[w] = TensorSpec(t[w].shape, act_dtype)
    return t


# ---- KV cache ---------------------------------------------------------------------------------------

def entry_capacity(max_seq_len: int, ratio: int) -> int:
    """Compressed-entry slots of one block: every complete window fits, plus one slot that the
    static-shape step writes for a window that is still open (never read)."""
    return -(-max_seq_len // ratio) + 1


KV_STORAGES = ("dense", "packed")


def default_kv_storage(spec: ModelSpec, numerics: str, act_dtype: torch.dtype) -> str:
    """``packed`` (entries in their storage format, lossless) where every cached entry is already
    quant-dequantized with ue8m0 scales: reference numerics, bf16 activations, ue8m0 scale_fmt. Else
    ``dense`` (entries in the activation dtype: exact numerics, fp32, the ONNX/TensorRT backends)."""
    ok = numerics == "reference" and act_dtype == BF16 and spec.scale_fmt == "ue8m0"
    return "packed" if ok else "dense"


def kv_storage_problem(spec: ModelSpec, numerics: str, act_dtype: torch.dtype, storage: str) -> str | None:
    """Why ``storage`` cannot hold this model's cache losslessly (None when it can)."""
    if storage not in KV_STORAGES:
        return f"unknown KV storage {storage!r} (use one of {', '.join(KV_STORAGES)})"
    if storage == "packed" and default_kv_storage(spec, numerics, act_dtype) != "packed":
        return (f"packed KV storage needs reference numerics, bf16 activations and ue8m0 scales "
                f"(have {numerics}, {str(act_dtype).removeprefix('torch.')}, {spec.scale_fmt})")
    return None


def _main_entry(prefix: str, lead: tuple[int, ...], spec: ModelSpec, act_dtype: torch.dtype,
                storage: str) -> dict[str, TensorSpec]:
    c = spec.head_dim
    if storage == "dense":
        return {prefix: TensorSpec((*lead, c), act_dtype)}
    nope = spec.nope_dim
    return {f"{prefix}_nope": TensorSpec((*lead, nope), F8),
            f"{prefix}_scale": TensorSpec((*lead, _kv_scale_bytes(nope)), U8),
            f"{prefix}_rope": TensorSpec((*lead, spec.rope_dim), BF16)}


def _indexer_entry(prefix: str, lead: tuple[int, ...], spec: ModelSpec, act_dtype: torch.dtype,
                   storage: str) -> dict[str, TensorSpec]:
    d = spec.index_head_dim
    if storage == "dense":
        return {prefix: TensorSpec((*lead, d), act_dtype)}
    return {f"{prefix}_codes": TensorSpec((*lead, d // 2), U8), f"{prefix}_scale": TensorSpec((*lead, d // 32), U8)}


def _kv_scale_bytes(nope: int) -> int:
    return -(-(nope // 64) // 8) * 8


def cache_tensors(spec: ModelSpec, batch: int, max_seq_len: int, act_dtype: torch.dtype,
                  blocks: range | None = None, storage: str = "dense") -> dict[str, TensorSpec]:
    """The KV cache of ``batch`` sequences of up to ``max_seq_len`` tokens, block by block:
    ``b{i}.win`` window ring buffer; ``b{i}.ckv`` compressed entries; ``b{i}.c_a/c_z`` the compressor's
    projections of the open window (+ ``c_pa/c_pz``: the previous window's first halves for CSA);
    ``b{i}.ikv`` indexer keys and ``b{i}.i_*`` the indexer compressor's state (CSA only).

    ``storage="dense"``: entries in the activation dtype. ``storage="packed"``: entries in their storage
    format (``dsv4c.ops.kv_storage``): ``win`` and ``ckv`` become ``<name>_nope`` (e4m3 [c - r]),
    ``<name>_scale`` (ue8m0 bytes, one per 64, padded to 8) and ``<name>_rope`` (bf16 [r]); ``ikv``
    becomes ``ikv_codes`` (e2m1 pairs [d/2]) and ``ikv_scale`` (ue8m0 bytes [d/32]). The open-window
    state of the compressors stays fp32 either way."""
    if storage not in KV_STORAGES:
        raise ValueError(f"unknown KV storage {storage!r} (use one of {', '.join(KV_STORAGES)})")
    B, c = batch, spec.head_dim
    out: dict[str, TensorSpec] = {}
    for i in blocks if blocks is not None else range(spec.num_layers):
        p = f"b{i}."
        out.update(_main_entry(p + "win", (B, spec.sliding_window), spec, act_dtype, storage))
        kind = spec.attn_kind(i)
        if kind == "window":
            continue
        m = spec.compress_ratios[i]
        cap = entry_capacity(max_seq_len, m)
        comps = [("c", c)] + ([("i", spec.index_head_dim)] if kind == "csa" else [])
        for tag, d in comps:
            kd = 2 * d if kind == "csa" else d
            entry = _main_entry if tag == "c" else _indexer_entry
            out.update(entry(f"{p}{'ckv' if tag == 'c' else 'ikv'}", (B, cap), spec, act_dtype, storage))
            out[f"{p}{tag}_a"] = TensorSpec((B, m, kd), F32)
            out[f"{p}{tag}_z"] = TensorSpec((B, m, kd), F32)
            if kind == "csa":
                out[f"{p}{tag}_pa"] = TensorSpec((B, m, d), F32)
                out[f"{p}{tag}_pz"] = TensorSpec((B, m, d), F32)
    return out


ENTRY_TENSORS = ("win", "ckv", "ikv")


def entry_group(name: str) -> str | None:
    """``win`` / ``ckv`` / ``ikv`` for a cache tensor that holds entries (either storage), else None:
    ``b3.ckv_scale`` -> ``ckv``; ``b3.c_a`` -> None."""
    leaf = name.split(".", 1)[-1]
    for g in ENTRY_TENSORS:
        if leaf == g or leaf.startswith(g + "_"):
            return g
    return None


def allocated_entry_bytes(layout: dict[str, TensorSpec]) -> dict[str, int]:
    """Bytes one entry takes in an allocated cache layout, per ``b{i}.<group>`` (all parts summed)."""
    out: dict[str, int] = {}
    for name, t in layout.items():
        g = entry_group(name)
        if g is not None:
            key = f"{name.split('.', 1)[0]}.{g}"
            out[key] = out.get(key, 0) + t.shape[-1] * t.dtype.itemsize
    return out


def kv_bytes_per_token(spec: ModelSpec, blocks: range | None = None) -> float:
    """Storage-format KV bytes per token of context (MODEL-SEMANTICS section 10): a main entry is
    FP8 nope dims + one ue8m0 byte per 64 (padded to 8) + bf16 rope dims; an indexer key is FP4
    + one ue8m0 byte per 32. Amortized over the compress ratio; the fixed window is excluded."""
    total = 0.0
    for i in blocks if blocks is not None else range(spec.num_layers):
        kind = spec.attn_kind(i)
        if kind == "window":
            continue
        m = spec.compress_ratios[i]
        total += main_entry_bytes(spec) / m
        if kind == "csa":
            total += indexer_entry_bytes(spec) / m
    return total


def main_entry_bytes(spec: ModelSpec) -> int:
    nope = spec.nope_dim
    return nope + _kv_scale_bytes(nope) + 2 * spec.rope_dim


def indexer_entry_bytes(spec: ModelSpec) -> int:
    return spec.index_head_dim // 2 + spec.index_head_dim // 32


def window_bytes(spec: ModelSpec, blocks: range | None = None) -> int:
    """Fixed storage-format bytes of the window ring buffers of one sequence."""
    n = len(blocks) if blocks is not None else spec.num_layers
    return n * spec.sliding_window * main_entry_bytes(spec)


__all__ = ["TensorSpec", "checkpoint_tensors", "model_tensors", "cache_tensors", "kv_bytes_per_token",
           "block_prefix", "entry_capacity", "CSA_RATIO", "KV_STORAGES", "default_kv_storage", "kv_storage_problem",
           "entry_group", "allocated_entry_bytes"]
