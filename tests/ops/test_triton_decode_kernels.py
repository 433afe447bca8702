"""The decode/packed-layout Triton kernels against the CPU reference ops, under Triton's interpreter.

Covers the kernels added for the inductor backend: the FP4 expert GEMM on the packed tiled layout
(one-row-per-tile decode path with in-kernel activation quantization and split-K, and the sorted
prefill path), the small-M FP8 GEMM with fused activation quantization and split-K, the bf16-weight
fp32 linear (head / gate / compressor projections) and split-KV decode attention.
"""

from __future__ import annotations


import pytest
import torch

from kernel_checks import check, gen, interpreted_triton_kernels

tk = interpreted_triton_kernels()

from dsv4c import quant  # noqa: E402
from dsv4c.ops import fused  # noqa: E402

ops = torch.ops.dsv4


@pytest.fixture(autouse=True)
def fma_kernels(monkeypatch):
    """These tests check the FMA GEMVs and the skinny tensor-core GEMM; the decode launchers would
    otherwise take the swap-AB kernels of triton_gemv (FP8 and bf16 weights up to 16 rows, FP4 decode rows) (tests/ops/test_triton_gemv.py)."""
    monkeypatch.setitem(tk.TUNE, "gemv_tc", False)
    monkeypatch.setitem(tk.TUNE, "w16_gemv_tc", False)
    monkeypatch.setitem(tk.TUNE, "fp4_tc", False)


pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")


def _act(shape, seed, dtype, spread=True):
    x = torch.randn(shape, generator=gen(seed))
    if spread and shape[-2] > 1:
        x = x * torch.logspace(-3, 2, shape[-2])[:, None]
        x[..., 0, :] = 0.0
    return x.to(dtype)


def _packed_experts(E, N, K, bn, bk, seed):
    w, s = quant.quantize_fp4_weight(torch.randn(E, N, K, generator=gen(seed)) * 0.05)
    s = s * torch.exp2(torch.randint(-3, 4, s.shape, generator=gen(seed + 1)).float())  # spread the scales
    pw, ps = fused.pack_fp4_tiled(w, s, bn, bk)
    return pw, ps


# ---- FP4 experts, packed layout -----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("act_quant,ue8m0", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("path", ["gemv", "direct_dot", "sorted"])
def test_fp4_packed(dtype, act_quant, ue8m0, path, monkeypatch):
    E, N, K, A = 3, 64, 256, 9
    pw, ps = _packed_experts(E, N, K, 32, 64, 20)
    x = _act((A, K), 21, dtype)
    expert = torch.tensor([2, 0, -1, 2, 1, 3, 0, 0, 2])  # -1 and 3 are outside [0, E): zero rows
    ref = ops.fp4_grouped_linear_packed(x, expert, pw, ps, act_quant, ue8m0)
    empty = torch.empty

    def poisoned(*shape, **kw):  # uninitialized memory made visible: the kernels must write every output
        t = empty(*shape, **kw)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", poisoned)
    out = tk.fp4_grouped_linear_packed(x, expert, pw, ps, act_quant, ue8m0, direct=path != "sorted", block_n=16,
                                       block_m=16 if path == "direct_dot" else None,
                                       split_k=2 if path != "sorted" else None)
    check(out, ref)
    assert not out[[2, 5]].float().any()


@pytest.mark.parametrize("bn,bk", [(128, 128), (16, 256)])
def test_fp4_packed_tiles_and_splits(bn, bk):
    E, N, K, A = 3, 128, 512, 20  # 20 rows: the GEMV runs them in expert order
    pw, ps = _packed_experts(E, N, K, bn, bk, 22)
    x = _act((A, K), 23, torch.bfloat16, spread=False)
    expert = torch.tensor([1, 0, 1, 1, 0, 2, -1, 2, 0, 1] * 2)
    ref = ops.fp4_grouped_linear_packed(x, expert, pw, ps, True, True)
    for split in (1, 3):
        for bm in (None, 16):
            check(tk.fp4_grouped_linear_packed(x, expert, pw, ps, True, True, direct=True, block_n=32,
                                                split_k=split, block_m=bm), ref)
    check(tk.fp4_grouped_linear_packed(x, expert, pw, ps, True, True, direct=False, block_m=16), ref)


@pytest.mark.parametrize("act_quant,ue8m0", [(True, True), (False, True), (True, False)])
def test_fp4_packed_prefill_swap(monkeypatch, act_quant, ue8m0):
    """The swapped prefill product (TUNE fp4_prefill_swap: acc = w @ a^T on quant-dequantized bf16
    activations) matches the reference and the unswapped kernel, for ue8m0 and fp32 activation scales (the
    latter are quant-dequantized before either kernel) and unquantized activations."""
    E, N, K, A = 3, 64, 256, 40  # expert 1 gets two 16-row tiles
    pw, ps = _packed_experts(E, N, K, 32, 128, 24)
    x = _act((A, K), 25, torch.bfloat16, spread=False)
    expert = torch.tensor([1, 0, 1, 1, 2, -1, 1, 0] * 5)
    ref = ops.fp4_grouped_linear_packed(x, expert, pw, ps, act_quant, ue8m0)
    launches = []
    real = tk._fp4_packed_kernel

    class Spy:
        def __getitem__(self, grid):  # noqa: ANN001, ANN204
            def launch(*args, **kw):  # noqa: ANN002, ANN003, ANN202
                launches.append(kw["SWAP"])
                return real[grid](*args, **kw)
            return launch

    monkeypatch.setattr(tk, "_fp4_packed_kernel", Spy())
    monkeypatch.setitem(tk.TUNE, "fp4_prefill_swap", False)
    plain = tk.fp4_grouped_linear_packed(x, expert, pw, ps, act_quant, ue8m0, direct=False, block_m=16)
    monkeypatch.setitem(tk.TUNE, "fp4_prefill_swap", True)
    swapped = tk.fp4_grouped_linear_packed(x, expert, pw, ps, act_quant, ue8m0, direct=False, block_m=16)
    assert launches == [False, True]
    check(swapped, ref)
    check(swapped, plain)
    assert not swapped[expert == -1].float().any()


def test_fp4_packed_prefill_launch_knobs(monkeypatch):
    """TUNE fp4_prefill_warps / fp4_prefill_stages reach the prefill launch (None: the launcher's rule) and
    leave the numbers alone."""
    pw, ps = _packed_experts(3, 64, 256, 32, 128, 26)
    x = _act((40, 256), 27, torch.bfloat16, spread=False)
    expert = torch.tensor([1, 0, 1, 1, 2, 2, 1, 0] * 5)
    launches = []
    real = tk._fp4_packed_kernel

    class Spy:
        def __getitem__(self, grid):  # noqa: ANN001, ANN204
            def launch(*args, **kw):  # noqa: ANN002, ANN003, ANN202
                launches.append((kw["num_warps"], kw["num_stages"]))
                return real[grid](*args, **kw)
            return launch

    monkeypatch.setattr(tk, "_fp4_packed_kernel", Spy())
    first = tk.fp4_grouped_linear_packed(x, expert, pw, ps, True, True, direct=False, block_m=16)
    monkeypatch.setitem(tk.TUNE, "fp4_prefill_warps", 8)
    monkeypatch.setitem(tk.TUNE, "fp4_prefill_stages", 2)
    second = tk.fp4_grouped_linear_packed(x, expert, pw, ps, True, True, direct=False, block_m=16)
    assert launches == [(4, 3), (8, 2)]
    assert torch.equal(first, second)


# ---- FP8, few rows --------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("act_quant,ue8m0", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("split", [1, 3])
def test_fp8_skinny(dtype, act_quant, ue8m0, split):
    N, K = 192, 384  # N not a multiple of the 128 weight block
    w, s = quant.quantize_fp8_weight(torch.randn(N, K, generator=gen(24)) * 0.05, ue8m0=ue8m0)
    x = _act((2, 5, K), 25, dtype)  # 10 rows: the tensor-core kernel
    ref = ops.fp8_linear(x, w, s, act_quant, ue8m0)
    check(tk.fp8_linear(x, w, s, act_quant, ue8m0, block_n=64, split_k=split), ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("act_quant,ue8m0", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("M,split", [(1, 1), (1, 2), (3, 3)])
def test_fp8_gemv(dtype, act_quant, ue8m0, M, split):
    N, K = 200, 384
    w, s = quant.quantize_fp8_weight(torch.randn(N, K, generator=gen(26)) * 0.05, ue8m0=ue8m0)
    x = _act((M, K), 27, dtype, spread=M > 1)
    check(tk.fp8_linear(x, w, s, act_quant, ue8m0, split_k=split, block_n=32),
           ops.fp8_linear(x, w, s, act_quant, ue8m0))


def test_fp4_dequant_packed():
    pw, ps = _packed_experts(2, 64, 256, 32, 64, 33)
    w, sc = fused.unpack_fp4_tiled(pw, ps)
    assert torch.equal(tk.fp4_dequant_packed(pw, ps), quant.dequantize_fp4_weight(w, sc).bfloat16())


# ---- bf16 weight applied in fp32 ------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M,split", [(1, 2), (3, 1), (7, 2), (40, 3)])
def test_linear_w16(dtype, M, split):
    N, K = 100, 200
    w = (torch.randn(N, K, generator=gen(28)) * 0.05).bfloat16()
    x = _act((M, K), 29, dtype, spread=False)
    ref = x.float() @ w.float().t()
    check(tk.linear_w16(x, w, split_k=split), ref, tol=1e-6)


# ---- split-KV decode attention ------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kv_split", [2, 5])
@pytest.mark.parametrize("merge_launch", [False, True])
def test_sparse_attn_split(dtype, kv_split, merge_launch, monkeypatch):
    """Split keys merged by the last program of each head block, or by a merge launch of their own."""
    monkeypatch.setitem(tk.TUNE, "attn_merge_launch", merge_launch)
    B, S, H, C, NW, E, KC = 2, 1, 4, 160, 40, 30, 37  # C over one 128-wide merge block
    g = gen(30)
    q = torch.randn(B, S, H, C, generator=g).to(dtype)
    win = (torch.randn(B, NW, C, generator=g) * 2).to(dtype)
    comp = (torch.randn(B, E, C, generator=g) * 2).to(dtype)
    mask = torch.rand(B, S, NW, generator=g) < 0.5
    idx = torch.randint(-1, E, (B, S, KC), generator=g)
    mask[1] = False
    idx[1] = -1  # nothing visible at all: output 0
    idx[0, 0, :20] = -1  # one split sees nothing
    sink = torch.randn(H, generator=g)
    ref = ops.sparse_attn(q, win, mask, comp, idx, sink, C**-0.5)
    out = tk.sparse_attn(q, win, mask, comp, idx, sink, C**-0.5, block_n=8, kv_split=kv_split)
    check(out, ref)
    assert not out[1].float().any()


def test_split_counters_reset():
    """Every split-K launch leaves its arrival counters at zero (CUDA graph replays rely on it)."""
    N, K = 64, 256
    w, s = quant.quantize_fp8_weight(torch.randn(N, K, generator=gen(31)) * 0.05)
    x = _act((2, K), 32, torch.bfloat16, spread=False)
    tk.fp8_linear(x, w, s, True, True, split_k=2)
    assert not tk._counters(x.device).any()


def test_counter_sets_are_separate_buffers():
    """Split-K launches under counter_set("side") (the shared expert on its stream) count arrivals in a
    buffer of their own and leave it at zero; the main set is untouched; unknown sets are refused."""
    N, K = 64, 256
    w, s = quant.quantize_fp8_weight(torch.randn(N, K, generator=gen(32)) * 0.05)
    x = _act((2, K), 32, torch.bfloat16, spread=False)
    want = tk.fp8_linear(x, w, s, True, True, split_k=2)
    main = tk._counters(x.device)
    with tk.counter_set("side"):
        side = tk._counters(x.device)
        got = tk.fp8_linear(x, w, s, True, True, split_k=2)
    assert side.data_ptr() != main.data_ptr() and tk._counters(x.device) is main
    assert torch.equal(got, want) and not side.any() and not main.any()
    with pytest.raises(ValueError, match="counter set 'other'"):
        with tk.counter_set("other"):
            pass
