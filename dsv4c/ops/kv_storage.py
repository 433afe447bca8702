"""The KV cache in its storage format (MODEL-SEMANTICS section 10): codecs and the ops that read it.

In reference numerics every entry the cache holds has already been quant-dequantized (main KV: FP8
e4m3 on the nope dims with one ue8m0 scale per 64; indexer keys: FP4 e2m1 with one ue8m0 scale per 32,
after the Hadamard), so storing the codes instead of the dequantized values is lossless:

- main entry ``[c]`` -> ``nope`` float8_e4m3fn ``[c - r]``, ``scale`` uint8 ``[S8]`` (one ue8m0 exponent
  byte per 64 nope dims, value ``2^(byte - 127)``, padded with 127 to a multiple of 8 bytes), ``rope``
  bfloat16 ``[r]``: ``(c - r) + S8 + 2 r`` bytes (584 for c = 512, r = 64);
- indexer key ``[d]`` -> ``codes`` uint8 ``[d / 2]`` (two e2m1 nibbles per byte, low nibble = even
  element), ``scale`` uint8 ``[d / 32]`` ue8m0: ``d / 2 + d / 32`` bytes (68 for d = 128).

Invariants (bitwise, bf16 inputs): ``kv_unpack(*kv_pack(e, r)) == cat(fp8_qdq(e[..., :-r], 64, True),
e[..., -r:])`` and ``fp4_unpack(*fp4_pack(e, 32), 32) == fp4_qdq(e, 32)``.

The attention and indexer ops here take the compressed entries in that format; their reference impls
unpack and call the dense ops of ``library.py`` (pure torch: they run on CUDA too). GPU kernels register
CUDA impls for the same names (``dsv4c.ops.triton_kernels``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import quant
from .fused import UE8M0_BIAS, ue8m0_decode, ue8m0_encode
from .library import _op, indexer_score, indexer_topk, sparse_attn

KV_BLOCK = 64  # FP8 scale block of the main KV entries' nope dims
INDEXER_BLOCK = 32  # FP4 scale block of the indexer keys
SCALE_PAD = 8  # the main entry's scale bytes are padded to a multiple of this
KV_STORAGE_FORMAT = "dsv4c.kv-fp8-ue8m0-bf16rope+fp4-ue8m0/1"


def kv_scale_bytes(nope_dim: int) -> int:
    """Scale bytes of one main entry: one per 64 nope dims, padded to a multiple of 8."""
    return -(-(nope_dim // KV_BLOCK) // SCALE_PAD) * SCALE_PAD


# ---- codecs (plain functions: the ops below wrap them; Inductor decomposes the ops into them) --

def pack_kv_entries(e: Tensor, rope_dim: int) -> tuple[Tensor, Tensor, Tensor]:
    r = rope_dim
    nope = e[..., :-r]
    xb = quant._blocked(nope, KV_BLOCK)
    s = quant.block_scale(xb.abs().amax(-1, keepdim=True), quant.FP8_MAX, quant.FP8_AMAX_FLOOR, True)
    q = torch.clamp(xb / s, -quant.FP8_MAX, quant.FP8_MAX).to(torch.float8_e4m3fn).flatten(-2)
    codes = ue8m0_encode(s.squeeze(-1), check=False)
    pad = kv_scale_bytes(nope.shape[-1]) - codes.shape[-1]
    if pad:
        codes = torch.cat((codes, codes.new_full((*codes.shape[:-1], pad), UE8M0_BIAS)), dim=-1)
    return q, codes, e[..., -r:].to(torch.bfloat16, copy=True).contiguous()


def unpack_kv_entries(nope: Tensor, scale: Tensor, rope: Tensor) -> Tensor:
    nb = nope.shape[-1] // KV_BLOCK
    s = ue8m0_decode(scale[..., :nb])
    x = (nope.float().unflatten(-1, (nb, KV_BLOCK)) * s[..., None]).flatten(-2)
    return torch.cat((x.to(torch.bfloat16), rope.to(torch.bfloat16)), dim=-1)


def pack_fp4_keys(e: Tensor, block: int) -> tuple[Tensor, Tensor]:
    xb = quant._blocked(e, block)
    s = quant.block_scale(xb.abs().amax(-1, keepdim=True), quant.FP4_MAX, quant.FP4_AMAX_FLOOR, True)
    codes = quant.e2m1_code(torch.clamp(xb / s, -quant.FP4_MAX, quant.FP4_MAX)).flatten(-2)
    return quant.pack_fp4(codes), ue8m0_encode(s.squeeze(-1), check=False)


def unpack_fp4_keys(codes: Tensor, scale: Tensor, block: int) -> Tensor:
    return quant.dequantize_fp4_weight(codes, ue8m0_decode(scale), block).to(torch.bfloat16)


# ---- ops -----------------------------------------------------------------------------------------

@_op("kv_pack")
def kv_pack(e: Tensor, rope_dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """Main KV entries [..., c] -> storage format (nope e4m3 [..., c-r], ue8m0 scale bytes [..., S8],
    bf16 rope [..., r]). The nope dims get the FP8 rule of MODEL-SEMANTICS section 7 with ue8m0 scales,
    one per 64; the scale row is padded with 127 (= 1.0) to a multiple of 8 bytes."""
    return pack_kv_entries(e, rope_dim)


@kv_pack.register_fake
def _(e, rope_dim):
    lead, n = e.shape[:-1], e.shape[-1] - rope_dim
    return (e.new_empty((*lead, n), dtype=torch.float8_e4m3fn),
            e.new_empty((*lead, kv_scale_bytes(n)), dtype=torch.uint8),
            e.new_empty((*lead, rope_dim), dtype=torch.bfloat16))


@_op("kv_unpack")
def kv_unpack(nope: Tensor, scale: Tensor, rope: Tensor) -> Tensor:
    """Inverse of ``kv_pack``: bf16 [..., c] = (nope * 2^(scale - 127) per 64-block) ++ rope."""
    return unpack_kv_entries(nope, scale, rope)


@kv_unpack.register_fake
def _(nope, scale, rope):
    return nope.new_empty((*nope.shape[:-1], nope.shape[-1] + rope.shape[-1]), dtype=torch.bfloat16)


@_op("fp4_pack")
def fp4_pack(e: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """[..., d] -> (e2m1 codes uint8 [..., d/2], low nibble = even element; ue8m0 bytes [..., d/block]),
    the FP4 rule of MODEL-SEMANTICS section 7."""
    return pack_fp4_keys(e, block)


@fp4_pack.register_fake
def _(e, block):
    lead, d = e.shape[:-1], e.shape[-1]
    return e.new_empty((*lead, d // 2), dtype=torch.uint8), e.new_empty((*lead, d // block), dtype=torch.uint8)


@_op("fp4_unpack")
def fp4_unpack(codes: Tensor, scale: Tensor, block: int) -> Tensor:
    """Inverse of ``fp4_pack``: bf16 [..., d]."""
    return unpack_fp4_keys(codes, scale, block)


@fp4_unpack.register_fake
def _(codes, scale, block):
    return codes.new_empty((*codes.shape[:-1], codes.shape[-1] * 2), dtype=torch.bfloat16)


@_op("sparse_attn_packed")
def sparse_attn_packed(q: Tensor, win_kv: Tensor, win_mask: Tensor, comp_nope: Tensor, comp_scale: Tensor,
                       comp_rope: Tensor, comp_idx: Tensor, sink: Tensor, scale: float) -> Tensor:
    """``sparse_attn`` with the compressed entries [B, E, ...] in storage format (``kv_pack``); the window
    part stays dense (win_kv [B, Nw, c]: the dequantized ring and this call's tokens)."""
    return sparse_attn(q, win_kv, win_mask, unpack_kv_entries(comp_nope, comp_scale, comp_rope).to(win_kv.dtype), comp_idx,
                       sink, scale)


@sparse_attn_packed.register_fake
def _(q, win_kv, win_mask, comp_nope, comp_scale, comp_rope, comp_idx, sink, scale):
    return torch.empty_like(q)


def _key_block(k_codes: Tensor, k_scale: Tensor) -> int:
    return 2 * k_codes.shape[-1] // k_scale.shape[-1]


@_op("indexer_score_packed")
def indexer_score_packed(q: Tensor, k_codes: Tensor, k_scale: Tensor, w: Tensor,
                         visible: Tensor | None = None) -> Tensor:
    """``indexer_score`` with the keys [B, E, ...] in storage format (``fp4_pack``): fp32 [B, S, E]. With
    ``visible`` (integers [B, S]) entries j >= visible[b, s] score -inf (a kernel need not read them: the
    cache holds max_seq_len / ratio entries, a prefix of which is live)."""
    scores = indexer_score(q, unpack_fp4_keys(k_codes, k_scale, _key_block(k_codes, k_scale)), w)
    if visible is None:
        return scores
    ent = torch.arange(scores.shape[-1], device=scores.device)
    return scores.masked_fill(ent >= visible[..., None], float("-inf"))


@indexer_score_packed.register_fake
def _(q, k_codes, k_scale, w, visible=None):
    return q.new_empty((q.shape[0], q.shape[1], k_codes.shape[1]), dtype=torch.float32)


@_op("indexer_topk_packed")
def indexer_topk_packed(q: Tensor, k_codes: Tensor, k_scale: Tensor, w: Tensor, visible: Tensor,
                        topk: int) -> Tensor:
    """``indexer_topk`` with the keys in storage format: int64 [B, S, topk], -1 where fewer are visible."""
    return indexer_topk(q, unpack_fp4_keys(k_codes, k_scale, _key_block(k_codes, k_scale)), w, visible, topk)


@indexer_topk_packed.register_fake
def _(q, k_codes, k_scale, w, visible, topk):
    return q.new_empty((q.shape[0], q.shape[1], topk), dtype=torch.int64)


__all__ = ["pack_kv_entries", "unpack_kv_entries", "pack_fp4_keys", "unpack_fp4_keys",
           "kv_pack", "kv_unpack", "fp4_pack", "fp4_unpack", "sparse_attn_packed", "indexer_score_packed",
           "indexer_topk_packed", "kv_scale_bytes", "KV_STORAGE_FORMAT", "KV_BLOCK", "INDEXER_BLOCK"]
