"""The fused mHC sub-layer input (dsv4c.ops.triton_mhc) against its plain-torch reference, under Triton's
interpreter: fp32 to summation-order rounding, bf16 to one rounding of the collapsed stream."""

from __future__ import annotations

import pytest
import torch

from kernel_checks import gen, interpreted_triton_kernels

tk = interpreted_triton_kernels()

from dsv4c.ops.triton_mhc import hc_pre, hc_pre_reference  # noqa: E402
from dsv4c.testing import rel_err  # noqa: E402

N, ITERS, HC_EPS, EPS = 4, 20, 1e-6, 1e-6


def _inputs(lead, D, dtype, seed, expanded=False):
    g = gen(seed)
    if expanded:  # the first block's input: the embedding repeated over the streams (stride 0)
        x = torch.randn(*lead, 1, D, generator=g).to(dtype).expand(*lead, N, D)
    else:
        x = torch.randn(*lead, N, D, generator=g).to(dtype)
    M = (2 + N) * N
    fn = torch.randn(M, N * D, generator=g) * 0.02
    base = torch.randn(M, generator=g) * 0.1
    scale = torch.rand(3, generator=g) + 0.5
    w = (1 + 0.1 * torch.randn(D, generator=g)).to(dtype)
    return x, fn, base, scale, w


def _both(args, **kw):
    got = hc_pre(*args, N, ITERS, HC_EPS, EPS, EPS, **kw)
    want = hc_pre_reference(*args, N, ITERS, HC_EPS, EPS, EPS)
    for a, b in zip(got, want):
        assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
    return got, want


@pytest.mark.parametrize("lead,D,chunk,expanded,warps,bd", [
    ((1, 1), 64, 128, False, 4, 4096), ((1, 1), 64, 32, False, 4, 4096), ((3, 1), 96, 64, False, 4, 4096),
    ((2, 3), 64, 128, True, 4, 4096),
    ((1, 1), 64, 128, False, 4, None), ((2, 3), 64, 128, True, 4, None),  # two passes over the streams
    ((1, 1), 320, 256, False, 1, None),  # one warp: the collapse walks D in two 256-wide steps, the last one partial
])
def test_fp32_matches_the_reference(lead, D, chunk, expanded, warps, bd, monkeypatch):
    """Several chunks per row (arrival counter), a D that is not a power of two, expanded streams; the row
    loaded once (``hc_pre_bd`` >= D, the default) and the two-pass collapse."""
    monkeypatch.setitem(tk.TUNE, "hc_pre_bd", bd)
    (u, post, comb), (ru, rpost, rcomb) = _both(_inputs(lead, D, torch.float32, 1, expanded), chunk=chunk,
                                                num_warps=warps)
    assert rel_err(u, ru) <= 1e-5
    assert rel_err(post, rpost) <= 1e-5
    assert rel_err(comb, rcomb) <= 1e-5
    # doubly stochastic up to the Sinkhorn tolerance, as the reference
    assert torch.allclose(comb.sum(-1), torch.ones(()), atol=1e-3)


def test_bf16_rounds_like_the_reference():
    """bf16 streams: post and comb in fp32 as the reference; u differs from it by at most one bf16 step in
    the few elements where the fp32 sums (other order) land on the other side of a rounding boundary."""
    (u, post, comb), (ru, rpost, rcomb) = _both(_inputs((2, 1), 128, torch.bfloat16, 2))
    assert rel_err(post, rpost) <= 1e-5 and rel_err(comb, rcomb) <= 1e-5
    diff = (u.float() - ru.float()).abs()
    assert (diff <= ru.float().abs() * 2 ** -7 + 1e-6).all()
    assert (diff > 0).float().mean() <= 0.05


def test_counters_are_left_at_zero():
    """The next launch (another shape, same counters) still computes the right thing."""
    for lead, D in (((2, 1), 64), ((1, 1), 32), ((2, 1), 64)):
        (u, _, _), (ru, _, _) = _both(_inputs(lead, D, torch.float32, 3), chunk=32)
        assert rel_err(u, ru) <= 1e-5
    assert int(tk._counters(torch.device("cpu")).abs().sum()) == 0


def test_wrong_shapes_are_refused():
    x, fn, base, scale, w = _inputs((1, 1), 64, torch.float32, 4)
    with pytest.raises(ValueError, match="fn shape"):
        hc_pre(x, fn[:, :-1], base, scale, w, N, ITERS, HC_EPS, EPS, EPS)
    with pytest.raises(ValueError, match="streams"):
        hc_pre(x[..., :3, :], fn, base, scale, w, N, ITERS, HC_EPS, EPS, EPS)
