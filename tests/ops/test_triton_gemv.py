"""The tensor-core decode GEMVs (dsv4c.ops.triton_gemv) against the CPU reference ops, under Triton's
interpreter: reached through the public launchers with their TUNE switches on, as the GPU runs them."""

from __future__ import annotations


import pytest
import torch

from kernel_checks import check, gen, interpreted_triton_kernels

tk = interpreted_triton_kernels()

from dsv4c import quant  # noqa: E402
from dsv4c.ops import fused  # noqa: E402
from dsv4c.ops import triton_gemv  # noqa: E402

ops = torch.ops.dsv4


@pytest.fixture
def tc(monkeypatch):
    """Route the decode launchers to the tensor-core kernels (64-row tiles keep the interpreter quick)."""
    for key, val in (("gemv_tc", True), ("w16_gemv_tc", True), ("fp4_tc", True), ("tc_bn", 64), ("fp4_tc_bn", 64)):
        monkeypatch.setitem(tk.TUNE, key, val)
    calls = []
    for name in ("fp8_gemv_tc", "w16_gemv_tc", "fp4_gemv_tc"):
        fn = getattr(triton_gemv, name)
        monkeypatch.setattr(triton_gemv, name, lambda *a, _fn=fn, _n=name, **k: (calls.append(_n), _fn(*a, **k))[1])
    return calls


def _act(M, K, seed, dtype):
    x = torch.randn(M, K, generator=gen(seed)) * torch.logspace(-2, 1, M)[:, None]
    return x.to(dtype)


def _fp8_weight(N, K, seed):
    w = torch.randn(N, K, generator=gen(seed)) * 0.05
    return quant.quantize_fp8_weight(w)


@pytest.mark.parametrize("M", [1, 3, 16])
@pytest.mark.parametrize("dtype,act_quant,ue8m0", [(torch.bfloat16, True, True), (torch.bfloat16, False, True),
                                                   (torch.float32, True, True), (torch.float32, True, False)])
def test_fp8_gemv_tc(tc, M, dtype, act_quant, ue8m0):
    N, K = 192, 384  # a partial 128-row scale block and a partial 64-row tile
    w, s = _fp8_weight(N, K, 1)
    x = _act(M, K, 2, dtype)
    ref = ops.fp8_linear(x, w, s, act_quant, ue8m0)
    for split in (1, 2):
        check(tk.fp8_linear(x, w, s, act_quant, ue8m0, split_k=split), ref)
    assert tc == ["fp8_gemv_tc", "fp8_gemv_tc"]


@pytest.mark.parametrize("M,split", [(1, 1), (3, 2)])
def test_fp8_grouped_gemv_tc(tc, M, split):
    """The grouped projection (wo_a's shape: each group's rows read their own slice of x) on bf16 activations
    and e4m3 weights: the bf16 einsum of the dequantized weight (exact products, fp32 sums)."""
    G, R, K = 3, 128, 256  # two 64-row tiles per group, two 128-wide blocks
    w, s = _fp8_weight(G * R, K, 5)
    x = _act(M, G * K, 6, torch.bfloat16)
    deq = quant.dequantize_fp8_weight(w, s).to(torch.bfloat16).view(G, R, K)
    ref = torch.einsum("bsgk,gdk->bsgd", x.view(M, 1, G, K).float(), deq.float()).reshape(M, G * R)
    out = triton_gemv.fp8_grouped_gemv_tc(x, w, s, G, split_k=split)
    assert out.dtype == torch.bfloat16
    check(out, ref.to(torch.bfloat16))
    with pytest.raises(ValueError, match="do not fit"):
        triton_gemv.fp8_grouped_gemv_tc(x, w, s, 2)  # 3 K-slices of x for 2 groups
    with pytest.raises(ValueError, match="do not fit"):
        triton_gemv.fp8_grouped_gemv_tc(x.float(), w, s, G)


def test_fp8_gemv_tc_leaves_exact_fp32_to_the_fma_kernel(tc):
    """fp32 activations without quantization are not exact in a bf16/fp8 dot: the FMA GEMV keeps them."""
    w, s = _fp8_weight(128, 256, 3)
    x = _act(2, 256, 4, torch.float32)
    check(tk.fp8_linear(x, w, s, False, True), ops.fp8_linear(x, w, s, False, True))
    assert tc == []


@pytest.mark.parametrize("M", [1, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_w16_gemv_tc(tc, M, dtype):
    N, K = 200, 300  # partial tiles on both sides
    w = (torch.randn(N, K, generator=gen(10)) * 0.05).to(torch.bfloat16)
    x = _act(M, K, 11, dtype)
    ref = x.float() @ w.float().t()
    for split in (1, 3):
        check(tk.linear_w16(x, w, split_k=split), ref, tol=1e-6)
    assert tc == ["w16_gemv_tc", "w16_gemv_tc"]


@pytest.mark.parametrize("dtype,ue8m0,bn,bk,kblocks", [(torch.bfloat16, True, 128, 128, 1),
                                                        (torch.float32, False, 64, 256, 2),
                                                        (torch.bfloat16, True, 128, 128, 4)])
def test_fp4_gemv_tc(tc, monkeypatch, dtype, ue8m0, bn, bk, kblocks):
    """Packed e2m1 experts, one row per program: rows of several experts (and ids outside [0, E): zeros),
    spread ue8m0 scales, K split or not, unsorted and expert-sorted row order, 1-4 K blocks per step."""
    monkeypatch.setitem(tk.TUNE, "fp4_tc_kblocks", kblocks)
    E, N, K = 3, 128, 512
    w, s = quant.quantize_fp4_weight(torch.randn(E, N, K, generator=gen(12)) * 0.05)
    s = s * torch.exp2(torch.randint(-3, 4, s.shape, generator=gen(13)).float())
    pw, ps = fused.pack_fp4_tiled(w, s, bn, bk)
    for rows in (5, 20):  # more than TUNE['fp4_order_rows'] (16): programs in expert order
        expert = torch.tensor([2, 0, -1, 2, 1, 3, 0, 0, 2, 1] * 2)[:rows]
        x = _act(rows, K, 14, dtype)
        ref = ops.fp4_grouped_linear_packed(x, expert, pw, ps, True, ue8m0)
        for split in (1, 3):
            out = tk.fp4_grouped_linear_packed(x, expert, pw, ps, True, ue8m0, split_k=split)
            check(out, ref)
            assert not out[(expert < 0) | (expert >= E)].float().any()
    assert tc == ["fp4_gemv_tc"] * 4


def test_fp4_gemv_tc_leaves_unquantized_rows_to_the_fma_kernel(tc):
    """Without activation quantization the rows are not exact in an e4m3 dot: the FMA GEMV keeps them."""
    w, s = quant.quantize_fp4_weight(torch.randn(2, 128, 256, generator=gen(15)) * 0.05)
    pw, ps = fused.pack_fp4_tiled(w, s, 128, 128)
    x = _act(3, 256, 16, torch.bfloat16)
    expert = torch.tensor([1, 0, 1])
    check(tk.fp4_grouped_linear_packed(x, expert, pw, ps, False, True),
          ops.fp4_grouped_linear_packed(x, expert, pw, ps, False, True))
    assert tc == []
