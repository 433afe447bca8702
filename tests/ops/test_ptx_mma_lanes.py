"""The inline PTX of the register-fed MMA GEMVs, run lane by lane on the CPU (tests/ops/ptx_warp.py) against
numpy: lane offsets -> loads -> MMAs -> scales -> per-lane results, for two warps of a program. This checks
the PTX text itself (operands, offsets, the nibble decode, fragment registers, scale bits); the Triton code
around it is compiled for sm_90 in test_hopper_compile.py and checked on the GPU by
benchmarks/mma_probe.py and benchmarks/decode_gemv_gpu.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ptx_warp import Memory, f32, run_warp

from dsv4c.ops import triton_fp4_mma as fp4
from dsv4c.ops import triton_fp8_mma as fp8

E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6])


def _e4m3_codes(v: np.ndarray) -> np.ndarray:
    """fp32 values already on the e4m3 grid -> their bytes."""
    return torch.from_numpy(v.astype(np.float32)).to(torch.float8_e4m3fn).view(torch.uint8).numpy()


def _act(rng, shape, scale):
    """Activation codes: e4m3 values of x / scale, returned as (values, bytes)."""
    x = torch.from_numpy(rng.standard_normal(shape).astype(np.float32) * 40).to(torch.float8_e4m3fn)
    return x.float().numpy().astype(np.float64), x.view(torch.uint8).numpy()


@pytest.mark.parametrize("warp", [0, 1, 3])
def test_fp4_tile_per_lane(warp):
    rng = np.random.default_rng(warp)
    wbytes = rng.integers(0, 256, size=(128, 64), dtype=np.uint8)  # one packed tile: 128 rows x 128 K
    sbytes = rng.integers(118, 133, size=(4, 128), dtype=np.uint8)  # ue8m0 per (group, row)
    xv, xb = _act(rng, 128, 1)
    sx = 0.125
    w = np.zeros((128, 128))
    w[:, 0::2], w[:, 1::2] = E2M1[wbytes & 15], E2M1[wbytes >> 4]
    w *= np.repeat(2.0 ** (sbytes.T.astype(np.float64) - 127), 32, axis=1)
    ref = w @ xv * sx
    j = np.arange(128)
    frag = np.zeros(128, np.uint8)
    frag[(j // 8) * 8 + (j % 2) * 4 + (j % 8) // 2] = xb  # the kernel's scratch order
    mem = Memory()
    wbase, sbase = mem.alloc(wbytes.tobytes()), mem.alloc(sbytes.tobytes())
    xbase, xsbase = mem.alloc(frag.tobytes()), mem.alloc(np.float32(sx).tobytes())
    ow, os_, ox = run_warp(fp4._lane_offsets_asm(), [[0] * 32], 3, mem, warp)
    wl = run_warp(fp4._w_load_asm(), [[wbase + o for o in ow], [sbase + o for o in os_]], 10, mem, warp)
    xl = run_warp(fp4._x_load_asm(), [[xbase + o for o in ox], [xsbase] * 32], 9, mem, warp)
    acc = run_warp(fp4._mma_step_asm(), [*wl[:8], *xl[:8], wl[8], wl[9], xl[8], [0.0] * 32, [0.0] * 32], 2, mem, warp)
    tg, th, row, t = run_warp(fp4._quad_sum_asm(), acc, 4, mem, warp)
    got = {}
    for lane in range(32):
        if t[lane] == 0:
            got[row[lane]], got[row[lane] + 8] = f32(tg[lane]), f32(th[lane])
    assert sorted(got) == list(range(16 * warp, 16 * warp + 16))
    out = np.array([got[r] for r in sorted(got)], dtype=np.float64)
    want = ref[16 * warp:16 * warp + 16]
    assert np.abs(out - want).max() <= 1e-5 * np.abs(want).max()


@pytest.mark.parametrize("m,warp", [(1, 0), (3, 1), (8, 2)])
def test_fp8_tiles_per_lane(m, warp):
    rng = np.random.default_rng(10 + m)
    n_rows, k = 16 * (warp + 1), 256
    kb = k // 128
    wv, wb = _act(rng, (n_rows, k), 1)
    xv, xb = _act(rng, (m, k), 1)
    sw = np.array([0.5, 0.0625])  # weight block scale per K tile
    sx = 2.0 ** rng.integers(-6, 3, size=(m, kb)).astype(np.float64)
    ref = sum((wv[:, 128 * i:128 * i + 128] @ xv[:, 128 * i:128 * i + 128].T) * sw[i] * sx[:, i][None, :]
              for i in range(kb))  # [rows, m]
    mem = Memory()
    wbase, qbase = mem.alloc(wb.tobytes()), mem.alloc(xb.tobytes())
    sbase = mem.alloc(sx.astype(np.float32).tobytes())
    ow, ox, o0, o1 = run_warp(fp8._lane_offsets_asm(), [[k] * 32, [m - 1] * 32, [kb * 4] * 32], 4, mem, warp)
    acc = [[0.0] * 32 for _ in range(4)]
    for kt in range(kb):
        wg = [wbase + o + 128 * kt for o in ow]
        wl = run_warp(fp8._w_load_asm(), [wg, [a + 8 * k for a in wg]], 16, mem, warp)
        xl = run_warp(fp8._x_load_asm(), [[qbase + o + 128 * kt for o in ox], [sbase + o + 4 * kt for o in o0],
                                          [sbase + o + 4 * kt for o in o1]], 10, mem, warp)
        acc = run_warp(fp8._mma_step_asm(), [*wl, *xl, [float(sw[kt])] * 32, *acc], 4, mem, warp)
    row, t = run_warp(fp8._lane_rows_asm(), [[0] * 32], 2, mem, warp)
    got = np.full((n_rows, 8), np.nan)
    for lane in range(32):
        r, c = row[lane], 2 * t[lane]
        for (dr, dc), a in zip(((0, 0), (0, 1), (8, 0), (8, 1)), acc):
            got[r + dr, c + dc] = f32(a[lane])
    blk = slice(16 * warp, 16 * warp + 16)
    assert not np.isnan(got[blk]).any()
    want = ref[blk]
    assert np.abs(got[blk, :m] - want).max() <= 1e-5 * np.abs(want).max()
