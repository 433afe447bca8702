"""RoPE frequency tables (MODEL-SEMANTICS section 4): plain for window-only blocks, YaRN for
blocks with a compressor. Interleaved pairs (2i, 2i+1) of the last r dims rotate together."""

from __future__ import annotations

import math

import torch

from .spec import ModelSpec


def inv_freq(spec: ModelSpec, compressed: bool) -> torch.Tensor:
    """fp32 [r/2] frequencies; ``compressed`` selects compress_rope_theta with YaRN."""
    r = spec.rope_dim
    theta = spec.compress_rope_theta if compressed else spec.rope_theta
    f = 1.0 / (theta ** (torch.arange(0, r, 2, dtype=torch.float32) / r))
    if not compressed or spec.yarn_factor <= 1.0:
        return f

    def corr(beta: float) -> float:
        return r * math.log(spec.yarn_original_max_position / (beta * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(corr(spec.yarn_beta_fast)), 0)
    high = min(math.ceil(corr(spec.yarn_beta_slow)), r - 1)
    if high == low:
        high += 0.001
    ramp = torch.clamp((torch.arange(r // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    smooth = 1 - ramp
    return f / spec.yarn_factor * (1 - smooth) + f * smooth


def apply_rope(x: torch.Tensor, pos: torch.Tensor, freqs: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Rotate the last r dims of ``x`` [..., S, (H,) c] by angle pos * f (or its negative), in fp32.

    ``pos`` broadcasts against x's leading dims without the head dim: shape [B, S] for x [B, S, c],
    and x [B, S, H, c] gets pos[..., None].
    """
    r = freqs.shape[0] * 2
    ang = pos.to(torch.float32)[..., None] * freqs  # [..., r/2]
    while ang.dim() < x.dim():
        ang = ang.unsqueeze(-2)
    cos, sin = torch.cos(ang), torch.sin(ang)
    if inverse:
        sin = -sin
    nope, rot = x[..., :-r], x[..., -r:].float()
    xr, xi = rot[..., 0::2], rot[..., 1::2]
    out = torch.stack((xr * cos - xi * sin, xr * sin + xi * cos), dim=-1).flatten(-2)
    return torch.cat((nope, out.to(x.dtype)), dim=-1)
