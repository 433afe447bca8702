"""FP8 (e4m3) and FP4 (e2m1) codecs: quant-dequant simulations, weight (de)quantization, packing.

All functions are plain torch so that they trace into graphs and lower to ONNX. The scale rule is
MODEL-SEMANTICS section 7: ``s = 2^ceil(log2(max(amax, floor) / qmax))`` for ue8m0 scales, else
``s = max(amax, floor) / qmax``.
"""

from __future__ import annotations

import math

import torch

FP8_MAX = 448.0
FP4_MAX = 6.0
FP8_AMAX_FLOOR = 1e-4
FP4_AMAX_FLOOR = 6.0 * 2.0**-126
# e2m1 code (low 3 bits) -> magnitude; bit 3 is the sign.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# Rounding boundaries between neighbouring magnitudes, and whether a tie rounds up (to the even code).
_E2M1_BOUNDS = ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False), (3.5, True), (5.0, False))


def block_scale(amax: torch.Tensor, qmax: float, floor: float, ue8m0: bool = True) -> torch.Tensor:
    """The per-block scale for a block whose largest magnitude is ``amax`` (fp32)."""
    a = torch.clamp(amax.float(), min=floor) / qmax
    if not ue8m0:
        return a
    # 2^ceil(log2(a)), exact: fp32 log2 can round a value a few ulps above a power of two down onto it,
    # so correct the power of two by one step either way (products of powers of two are exact).
    s = torch.exp2(torch.ceil(torch.log2(a)))
    s = torch.where(s < a, s * 2, s)
    return torch.where(s * 0.5 >= a, s * 0.5, s)


def _blocked(x: torch.Tensor, block: int) -> torch.Tensor:
    if x.shape[-1] % block:
        raise ValueError(f"last dim {x.shape[-1]} is not a multiple of the quantization block {block}")
    return x.float().unflatten(-1, (x.shape[-1] // block, block))


def e4m3_round(x: torch.Tensor) -> torch.Tensor:
    """Round fp32 values (already inside [-448, 448]) to the nearest e4m3 value, ties to even."""
    return x.to(torch.float8_e4m3fn).float()


def e2m1_code(x: torch.Tensor) -> torch.Tensor:
    """e2m1 codes (int64, sign in bit 3) of fp32 values inside [-6, 6], round to nearest, ties to even."""
    a = x.abs()
    code = torch.zeros_like(a, dtype=torch.int64)
    for bound, tie_up in _E2M1_BOUNDS:
        code = code + ((a >= bound) if tie_up else (a > bound)).to(torch.int64)
    return code + 8 * (x < 0).to(torch.int64)


def e2m1_decode(code: torch.Tensor) -> torch.Tensor:
    """fp32 values of e2m1 codes (table lookup)."""
    table = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=code.device)
    mag = table[(code & 7).long()]
    return torch.where((code & 8) != 0, -mag, mag)


def e2m1_round(x: torch.Tensor) -> torch.Tensor:
    """Round fp32 values inside [-6, 6] to the nearest e2m1 value, ties to even (arithmetic form)."""
    a = x.abs()
    mag = torch.zeros_like(a)
    prev = 0.0
    for (bound, tie_up), value in zip(_E2M1_BOUNDS, E2M1_VALUES[1:]):
        up = (a >= bound) if tie_up else (a > bound)
        mag = mag + up.to(a.dtype) * (value - prev)
        prev = value
    return torch.where(x < 0, -mag, mag)


def fp8_qdq(x: torch.Tensor, block: int, ue8m0: bool = True) -> torch.Tensor:
    """FP8 e4m3 quant-dequant with one scale per ``block`` elements of the last dim; returns x.dtype."""
    xb = _blocked(x, block)
    s = block_scale(xb.abs().amax(-1, keepdim=True), FP8_MAX, FP8_AMAX_FLOOR, ue8m0)
    q = e4m3_round(torch.clamp(xb / s, -FP8_MAX, FP8_MAX)) * s
    return q.flatten(-2).to(x.dtype)


def fp4_qdq(x: torch.Tensor, block: int = 32) -> torch.Tensor:
    """FP4 e2m1 quant-dequant with one ue8m0 scale per ``block`` elements of the last dim."""
    xb = _blocked(x, block)
    s = block_scale(xb.abs().amax(-1, keepdim=True), FP4_MAX, FP4_AMAX_FLOOR, True)
    q = e2m1_round(torch.clamp(xb / s, -FP4_MAX, FP4_MAX)) * s
    return q.flatten(-2).to(x.dtype)


# ---- weights ----------------------------------------------------------------------------------

def quantize_fp8_weight(w: torch.Tensor, block: int = 128, ue8m0: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] -> (e4m3 [N, K], fp32 scale [ceil(N/block), ceil(K/block)]), one scale per block x block tile."""
    n, k = w.shape
    nb, kb = math.ceil(n / block), math.ceil(k / block)
    padded = torch.zeros(nb * block, kb * block, dtype=torch.float32, device=w.device)
    padded[:n, :k] = w.float()
    tiles = padded.view(nb, block, kb, block)
    s = block_scale(tiles.abs().amax(dim=(1, 3)), FP8_MAX, FP8_AMAX_FLOOR, ue8m0)
    q = torch.clamp(tiles / s[:, None, :, None], -FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.view(nb * block, kb * block)[:n, :k].contiguous(), s


def dequantize_fp8_weight(q: torch.Tensor, scale: torch.Tensor, block: int = 128) -> torch.Tensor:
    """Inverse of :func:`quantize_fp8_weight` (exact: e4m3 times a power of two fits fp32)."""
    n, k = q.shape
    s = scale.float().repeat_interleave(block, 0)[:n].repeat_interleave(block, 1)[:, :k]
    return q.float() * s


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """Pack e2m1 codes two per byte along the last dim (low nibble = even element) -> uint8."""
    c = codes.to(torch.uint8)
    return (c[..., 0::2] & 0xF) | ((c[..., 1::2] & 0xF) << 4)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_fp4`: uint8/int8 [..., K/2] -> int64 codes [..., K]."""
    p = packed.view(torch.uint8).to(torch.int64) if packed.dtype == torch.int8 else packed.to(torch.int64)
    return torch.stack((p & 0xF, (p >> 4) & 0xF), dim=-1).flatten(-2)


def quantize_fp4_weight(w: torch.Tensor, block: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., N, K] -> (packed uint8 [..., N, K/2], fp32 ue8m0 scale [..., N, K/block])."""
    wb = _blocked(w, block)
    s = block_scale(wb.abs().amax(-1, keepdim=True), FP4_MAX, FP4_AMAX_FLOOR, True)
    codes = e2m1_code(torch.clamp(wb / s, -FP4_MAX, FP4_MAX)).flatten(-2)
    return pack_fp4(codes), s.squeeze(-1)


def dequantize_fp4_weight(packed: torch.Tensor, scale: torch.Tensor, block: int = 32) -> torch.Tensor:
    """[..., N, K/2] packed + [..., N, K/block] scales -> fp32 [..., N, K]."""
    vals = e2m1_decode(unpack_fp4(packed))
    return (vals.unflatten(-1, (-1, block)) * scale.float().unsqueeze(-1)).flatten(-2)


# ---- Walsh-Hadamard -----------------------------------------------------------------------------

def hadamard_matrix(d: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Normalized Sylvester Hadamard matrix (symmetric, orthonormal): H[i, j] = (-1)^popcount(i & j) / sqrt(d)."""
    if d <= 0 or d & (d - 1):
        raise ValueError(f"Hadamard size must be a power of two, got {d}")
    i = torch.arange(d)
    bits = i[:, None] & i[None, :]
    parity = torch.zeros_like(bits)
    while bool(bits.any()):
        parity ^= bits & 1
        bits = bits >> 1
    return ((1 - 2 * parity).to(torch.float64) / math.sqrt(d)).to(dtype)
