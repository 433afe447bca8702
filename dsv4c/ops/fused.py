"""Fused ``dsv4`` ops that only passes create (definitions, fake impls, CPU reference impls).

The unfused ops and the fused ops the frontend's math maps onto directly live in ``library.py``;
this file holds ops whose *operands* a pass rewrites (a packed weight layout) or that merge two
library ops into one call. Every reference impl here is written in terms of the library ops, so the
fused op computes exactly what the chain it replaces computed.

Packed FP4 expert layout (``dsv4c.fp4-tiled/1``), produced by the ``pack_fp4_experts`` pass:

- ``weight``: uint8 ``[E, N/bn, K/bk, bn, bk/2]``: the checkpoint's e2m1 nibbles (two per byte, low
  nibble = even k) cut into ``bn x bk`` tiles; a tile's bytes are contiguous, tiles of one N-block
  follow each other along K (the order a GEMM's K loop reads them).
- ``scale``: uint8 ``[E, N/bn, K/32, bn]``: one ue8m0 exponent byte per 1x32 block (value
  ``2^(byte - 127)``), stored K-block-major inside an N-block so one K step reads ``bn`` contiguous
  bytes. A quarter of the fp32 scale bytes, and exact: checkpoint scales are powers of two.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..spec import FP4_BLOCK
from .library import _op, compress_finish, fp4_grouped_linear

PACKED_FP4_LAYOUT = "dsv4c.fp4-tiled/1"
UE8M0_BIAS = 127


# ---- the packed layout ---------------------------------------------------------------------------

def ue8m0_encode(scale: Tensor, check: bool = True) -> Tensor:
    """fp32 power-of-two scales -> uint8 exponent bytes (2^(b - 127)); raises if a scale is not exact.

    ``check=False`` skips the exactness check (no host sync, so it can run inside a CUDA graph) for
    scales that are powers of two by construction (``dsv4c.quant.block_scale`` with ue8m0)."""
    s = scale.float()
    e = torch.round(torch.log2(s))
    if not check:
        return (e + UE8M0_BIAS).to(torch.uint8)
    ok = torch.isfinite(e) & (e >= -UE8M0_BIAS) & (e <= 254 - UE8M0_BIAS) & (torch.exp2(e) == s)
    if not bool(ok.all()):
        bad = s[~ok][:4].tolist()
        raise ValueError(f"scales are not ue8m0 (powers of two in 2^-127..2^127), e.g. {bad}")
    return (e + UE8M0_BIAS).to(torch.uint8)


def ue8m0_decode(code: Tensor) -> Tensor:
    return torch.exp2(code.to(torch.float32) - UE8M0_BIAS)


def pack_fp4_tiled(weight: Tensor, scale: Tensor, bn: int, bk: int) -> tuple[Tensor, Tensor]:
    """Checkpoint layout (uint8 [E, N, K/2], fp32 [E, N, K/32]) -> packed (see the module docstring).

    Works on meta tensors too (shapes only; the exactness check of the scales needs values)."""
    E, N, K2 = weight.shape
    K = 2 * K2
    if N % bn or K % bk or bk % 2 or K % FP4_BLOCK or scale.shape != (E, N, K // FP4_BLOCK):
        raise ValueError(f"tile {bn}x{bk} does not fit the expert weight [{E}, {N}, {K}] with scales {list(scale.shape)}")
    w = weight.view(torch.uint8).reshape(E, N // bn, bn, K // bk, bk // 2).permute(0, 1, 3, 2, 4).contiguous()
    codes = scale.new_empty(scale.shape, dtype=torch.uint8) if scale.is_meta else ue8m0_encode(scale)
    s = codes.reshape(E, N // bn, bn, K // FP4_BLOCK).permute(0, 1, 3, 2).contiguous()
    return w, s


def unpack_fp4_tiled(weight: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    """Inverse of :func:`pack_fp4_tiled`: the checkpoint's uint8 [E, N, K/2] bytes and fp32 [E, N, K/32]."""
    E, n_blk, k_blk, bn, bk2 = weight.shape
    w = weight.permute(0, 1, 3, 2, 4).reshape(E, n_blk * bn, k_blk * bk2)
    s = ue8m0_decode(scale.permute(0, 1, 3, 2).reshape(E, n_blk * bn, scale.shape[2]))
    return w, s


# ---- ops -----------------------------------------------------------------------------------------

@_op("fp4_grouped_linear_packed")
def fp4_grouped_linear_packed(x: Tensor, expert: Tensor, weight: Tensor, scale: Tensor, act_quant: bool,
                              ue8m0: bool) -> Tensor:
    """``fp4_grouped_linear`` on the packed layout (weight [E, N/bn, K/bk, bn, bk/2] uint8, scale
    [E, N/bn, K/32, bn] ue8m0 bytes). Rows whose expert id is outside [0, E) produce zeros."""
    w, s = unpack_fp4_tiled(weight, scale)
    return fp4_grouped_linear(x, expert, w, s, act_quant, ue8m0)


@fp4_grouped_linear_packed.register_fake
def _(x, expert, weight, scale, act_quant, ue8m0):
    return x.new_empty((x.shape[0], weight.shape[1] * weight.shape[3]))


@_op("compress_finish_pair")
def compress_finish_pair(a: Tensor, z: Tensor, a_prev: Tensor, z_prev: Tensor, norm_w: Tensor, pos: Tensor,
                         ia: Tensor, iz: Tensor, ia_prev: Tensor, iz_prev: Tensor, inorm_w: Tensor, ipos: Tensor,
                         freqs: Tensor, hadamard: Tensor, overlap: bool, eps: float, act_dtype_code: int,
                         quant_mode: int, iquant_mode: int, ue8m0: bool) -> tuple[Tensor, Tensor]:
    """Both compressors of a CSA block in one op: the main KV entries and the indexer keys.

    Each output is ``compress_finish`` of its own operands (pooling, cast, RMSNorm, RoPE at its entry
    positions, then quantization ``quant_mode`` / ``iquant_mode``); the two read the same tokens
    over the same windows, so a kernel walks the windows once."""
    kv = compress_finish(a, z, a_prev, z_prev, norm_w, pos, freqs, hadamard, overlap, eps, act_dtype_code,
                         quant_mode, ue8m0)
    keys = compress_finish(ia, iz, ia_prev, iz_prev, inorm_w, ipos, freqs, hadamard, overlap, eps, act_dtype_code,
                           iquant_mode, ue8m0)
    return kv, keys


@compress_finish_pair.register_fake
def _(a, z, a_prev, z_prev, norm_w, pos, ia, iz, ia_prev, iz_prev, inorm_w, ipos, freqs, hadamard, overlap, eps,
      act_dtype_code, quant_mode, iquant_mode, ue8m0):
    from .library import _DTYPE_CODES

    dt = _DTYPE_CODES[act_dtype_code]

    def out(t):
        d = t.shape[-1] // 2 if overlap else t.shape[-1]
        return t.new_empty((t.shape[0], t.shape[1], d), dtype=dt)

    return out(a), out(ia)
