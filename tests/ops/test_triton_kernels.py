"""The Triton kernels of dsv4c.ops.triton_kernels against the CPU reference ops, under Triton's interpreter.

Runs on CPU tensors with TRITON_INTERPRET=1 (set here when no GPU is present, before triton is imported).
On a GPU machine run ``TRITON_INTERPRET=1 pytest tests/ops/test_triton_kernels.py`` for these checks, and
``python benchmarks/kernels_gpu.py`` for the compiled kernels at full size.
"""

from __future__ import annotations


import pytest
import torch

from kernel_checks import check, gen, interpreted_triton_kernels

tk = interpreted_triton_kernels()

from dsv4c import quant  # noqa: E402
from dsv4c.ops import kv_storage  # noqa: E402

ops = torch.ops.dsv4
# rows with no visible key: exp(sink - (-1e30)) overflows to inf on purpose (output 0, as in the reference)
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")


def _act(shape, seed, dtype, spread=True):
    x = torch.randn(shape, generator=gen(seed))
    if spread:  # rows with very different magnitudes, including one all-zero row (amax floor)
        x = x * torch.logspace(-3, 2, shape[-2])[:, None]
        x[..., 0, :] = 0.0
    return x.to(dtype)


# ---- quantization ---------------------------------------------------------------------------------

def _tie_row(k: int) -> torch.Tensor:
    """A row whose ue8m0 scale is exactly 2^-3 and whose scaled values sit on e4m3 rounding ties."""
    ties = torch.tensor([448.0, 1.0625, 1.1875, -1.3125, 3 * 2.0**-10, 5 * 2.0**-10, 2.0**-10, 0.0, 17.0, 19.0, 2.5e-4])
    return (ties.repeat(k // len(ties) + 1)[:k] * 0.125)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ue8m0", [True, False])
@pytest.mark.parametrize("block", [64, 128])
def test_fp8_qdq(dtype, ue8m0, block):
    x = _act((6, 256), 0, torch.float32)
    x[1] = _tie_row(256)
    x = x.to(dtype)
    out = tk.fp8_qdq(x, block, ue8m0)
    ref = ops.fp8_qdq(x, block, ue8m0)
    if dtype == torch.float32 or ue8m0:  # values are exactly representable: bit-exact
        assert torch.equal(out, ref)
    else:
        check(out, ref)


def test_act_quant_codes():
    x = _act((5, 256), 1, torch.bfloat16)
    x[2] = _tie_row(256)
    q, s = tk.act_quant_fp8(x, True)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (5, 2)
    deq = (q.float().view(5, 2, 128) * s[..., None]).view(5, 256)
    assert torch.equal(deq, quant.fp8_qdq(x, 128, True).float())
    assert torch.equal(s, quant.block_scale(x.float().view(5, 2, 128).abs().amax(-1), 448.0, 1e-4, True))


def test_fp4_qdq():
    x = _act((5, 128), 2, torch.float32)
    x[1] = torch.tensor([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -2.5] * 13)[:128]
    assert torch.equal(tk.fp4_qdq(x, 32), ops.fp4_qdq(x, 32))
    xb = x.bfloat16()
    assert torch.equal(tk.fp4_qdq(xb, 32), ops.fp4_qdq(xb, 32))


# ---- linears ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("act_quant,ue8m0", [(True, True), (True, False), (False, True)])
def test_fp8_linear(dtype, act_quant, ue8m0):
    N, K = 192, 256  # N is not a multiple of the 128 weight block
    w, s = quant.quantize_fp8_weight(torch.randn(N, K, generator=gen(3)) * 0.05, ue8m0=ue8m0)
    x = _act((2, 3, K), 4, dtype, spread=False)
    ref = ops.fp8_linear(x, w, s, act_quant, ue8m0)
    check(tk.fp8_linear(x, w, s, act_quant, ue8m0), ref)


def test_fp8_linear_split_k_and_tiles():
    N, K = 160, 384
    w, s = quant.quantize_fp8_weight(torch.randn(N, K, generator=gen(5)) * 0.05)
    x = _act((20, K), 6, torch.float32)
    ref = ops.fp8_linear(x, w, s, True, True)
    check(tk.fp8_linear(x, w, s, True, True, split_k=3), ref)
    check(tk.fp8_linear(x, w, s, True, True, block_m=16, block_n=64, split_k=2), ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("act_quant,ue8m0", [(True, True), (True, False), (False, True)])
def test_fp4_grouped_linear(dtype, act_quant, ue8m0):
    E, N, K, A = 3, 48, 256, 11
    packed, sc = quant.quantize_fp4_weight(torch.randn(E, N, K, generator=gen(7)) * 0.05)
    x = _act((A, K), 8, dtype)
    expert = torch.tensor([2, 0, -1, 2, 1, 3, 0, 0, 2, 1, 7])  # -1, 3 and 7 are outside [0, E): zero rows
    ref = ops.fp4_grouped_linear(x, expert, packed, sc, act_quant, ue8m0)
    out = tk.fp4_grouped_linear(x, expert, packed, sc, act_quant, ue8m0)
    check(out, ref)
    assert not out[[2, 5, 10]].any()


def test_fp4_grouped_linear_multi_tile():
    E, N, K, A = 4, 40, 128, 45  # expert 1 gets 30 rows: two 16-row tiles; expert 2 none
    packed, sc = quant.quantize_fp4_weight(torch.randn(E, N, K, generator=gen(9)) * 0.05)
    x = _act((A, K), 10, torch.bfloat16, spread=False)
    expert = torch.cat([torch.ones(30, dtype=torch.int64), torch.tensor([0, 3] * 7 + [0])])
    expert = expert[torch.randperm(A, generator=gen(11))]
    ref = ops.fp4_grouped_linear(x, expert, packed.view(torch.int8), sc, True, True)
    check(tk.fp4_grouped_linear(x, expert, packed.view(torch.int8), sc, True, True, block_m=16), ref)


def test_prefill_narrow_mix_on_linear_w16():
    """The CUDA form of the prefill's mHC mix (runtime/load_rewrites.py: ``weight @ x^T`` through linear_w16,
    the fp32 weight as three exact bf16 terms) against the fp32 matmul: the same products, fp32 sums."""
    from dsv4c.runtime.load_rewrites import _narrow_mix_cuda

    x = (torch.randn(2, 37, 512, generator=gen(40)) * 3).to(torch.bfloat16)  # rows: 2 x 37 tokens, 4 streams x 128
    w = torch.randn(24, 512, generator=gen(41)) * torch.logspace(-3, 1, 512)  # mantissas that need all 3 terms
    out = _narrow_mix_cuda(x, w)
    assert out.shape == (2, 37, 24) and out.is_contiguous()
    check(out, x.float() @ w.t(), 1e-6)


# ---- attention --------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_attn(dtype):
    B, S, H, C, NW, E, KC = 2, 3, 4, 64, 40, 10, 37
    g = gen(12)
    q = torch.randn(B, S, H, C, generator=g).to(dtype)
    win = (torch.randn(B, NW, C, generator=g) * 2).to(dtype)
    comp = (torch.randn(B, E, C, generator=g) * 2).to(dtype)
    mask = torch.rand(B, S, NW, generator=g) < 0.5
    idx = torch.randint(-1, E, (B, S, KC), generator=g)
    mask[0, 1] = False  # window part empty
    mask[1, 2] = False
    idx[1, 2] = -1  # nothing visible at all: output 0
    idx[0, 0] = -1  # compressed part empty
    sink = torch.randn(H, generator=g)
    scale = C**-0.5
    ref = ops.sparse_attn(q, win, mask, comp, idx, sink, scale)
    out = tk.sparse_attn(q, win, mask, comp, idx, sink, scale)
    check(out, ref)
    assert not out[1, 2].float().any()


def test_sparse_attn_no_compressed_entries():
    B, S, H, C, NW = 1, 2, 3, 32, 5
    g = gen(13)
    q = torch.randn(B, S, H, C, generator=g)
    win = torch.randn(B, NW, C, generator=g)
    mask = torch.rand(B, S, NW, generator=g) < 0.7
    comp = torch.zeros(B, 0, C)
    idx = torch.full((B, S, 0), -1, dtype=torch.int64)
    sink = torch.randn(H, generator=g)
    check(tk.sparse_attn(q, win, mask, comp, idx, sink, 0.2), ops.sparse_attn(q, win, mask, comp, idx, sink, 0.2))


@pytest.mark.parametrize("packed", [False, True])
def test_sparse_attn_prefill_window_scan(monkeypatch, packed):
    """Prefill's window keys are the ring plus every token of the call; each token's visible span is found
    by scanning its mask row (in steps of 16 here, several per row) and only those key blocks run: the
    output is bit for bit the full loop's, and matches the reference."""
    B, S, H, C, nw, E, KC = 2, 37, 4, 128, 8, 6, 5
    g = gen(30)
    q = torch.randn(B, S, H, C, generator=g).to(torch.bfloat16)
    keys = (torch.randn(B, nw + S, C, generator=g) * 2).to(torch.bfloat16)
    start = torch.tensor([0, 5])  # batch 1 continues after 5 tokens: 5 ring slots hold earlier keys
    slot = torch.arange(nw)
    ring_pos = (start[:, None] - 1) - torch.remainder(start[:, None] - 1 - slot, nw)
    pos = start[:, None] + torch.arange(S)
    key_pos = torch.cat((ring_pos, pos), dim=1)
    key_ok = torch.cat((ring_pos >= 0, torch.ones_like(pos, dtype=torch.bool)), dim=1)
    qp = pos[:, :, None]
    mask = key_ok[:, None, :] & (key_pos[:, None, :] <= qp) & (key_pos[:, None, :] > qp - nw)
    idx = torch.randint(-1, E, (B, S, KC), generator=g)
    sink = torch.randn(H, generator=g)
    monkeypatch.setattr(tk, "WIN_SCAN_KEYS", 16)
    if packed:
        comp = kv_storage.pack_kv_entries(torch.randn(B, E, C, generator=g) * 2, 64)
        run = lambda: tk.sparse_attn_packed(q, keys, mask, *comp, idx, sink, C**-0.5, block_n=8, kv_split=1)  # noqa: E731
        ref = ops.sparse_attn(q, keys, mask, kv_storage.unpack_kv_entries(*comp).to(q.dtype), idx, sink, C**-0.5)
    else:
        comp = (torch.randn(B, E, C, generator=g) * 2).to(torch.bfloat16)
        run = lambda: tk.sparse_attn(q, keys, mask, comp, idx, sink, C**-0.5, block_n=8, kv_split=1)  # noqa: E731
        ref = ops.sparse_attn(q, keys, mask, comp, idx, sink, C**-0.5)
    scanned = run()
    monkeypatch.setitem(tk.TUNE, "attn_win_scan", False)
    full = run()
    assert torch.equal(scanned, full)
    check(scanned, ref)


def test_sparse_attn_prefill_tiles_from_tune(monkeypatch):
    """TUNE attn_prefill_* set a prefill's tiles (more than 64 query tokens) and leave a decode's alone; the
    prefill still matches the reference. (The interpreter computes in fp32, so P @ V's split shows only in
    the launch's arguments here; the GPU sweep, benchmarks/prefill_probe.py --attn-sweep, times it.)"""
    g = gen(31)
    launches = []
    kernel = tk._sparse_attn_kernel

    class Spy:
        def __getitem__(self, grid):  # noqa: ANN001, ANN204
            def launch(*args, **kw):  # noqa: ANN002, ANN003, ANN202
                launches.append({k: kw[k] for k in ("BH", "BN", "PV_SPLIT")} | {"warps": kw["num_warps"]})
                return kernel[grid](*args, **kw)
            return launch

    monkeypatch.setattr(tk, "_sparse_attn_kernel", Spy())

    def case(S):  # noqa: ANN001, ANN202
        q = torch.randn(1, S, 4, 64, generator=g).to(torch.bfloat16)
        keys = (torch.randn(1, 24, 64, generator=g) * 2).to(torch.bfloat16)
        mask = torch.rand(1, S, 24, generator=g) < 0.6
        comp = (torch.randn(1, 6, 64, generator=g) * 2).to(torch.bfloat16)
        idx = torch.randint(-1, 6, (1, S, 5), generator=g)
        sink = torch.randn(4, generator=g)
        return (q, keys, mask, comp, idx, sink, 0.125)

    prefill, decode = case(70), case(3)
    tk.sparse_attn(*prefill)
    tk.sparse_attn(*decode)
    monkeypatch.setitem(tk.TUNE, "attn_prefill_pv_split", True)
    monkeypatch.setitem(tk.TUNE, "attn_prefill_bh", 32)
    monkeypatch.setitem(tk.TUNE, "attn_prefill_bn", 16)
    monkeypatch.setitem(tk.TUNE, "attn_prefill_warps", 4)
    check(tk.sparse_attn(*prefill), ops.sparse_attn(*prefill))
    tk.sparse_attn(*decode)
    # the shipped prefill tiles, heads capped at the 4 there are (a 16-row block)
    assert launches[0] == {"BH": 16, "BN": 64, "PV_SPLIT": False, "warps": 8}
    assert launches[2] == {"BH": 16, "BN": 16, "PV_SPLIT": True, "warps": 4}
    assert launches[3] == launches[1] and launches[1]["PV_SPLIT"] and launches[1]["BN"] != 64
    # fp32 queries keep the launcher's own tiles (the fp32 tiles of the bf16 choice would not fit)
    q32 = (prefill[0].float(), *prefill[1:])
    check(tk.sparse_attn(*q32), ops.sparse_attn(*q32))
    assert launches[4]["BN"] == 32


# ---- small fused ops --------------------------------------------------------------------------------

@pytest.mark.parametrize("n,lead", [(4, (2, 3)), (3, (5,))])
def test_hc_split(n, lead):
    g = gen(14)
    mix = torch.randn(*lead, (2 + n) * n, generator=g) * 3
    base = torch.randn((2 + n) * n, generator=g)
    scale = torch.rand(3, generator=g) + 0.5
    for out, ref in zip(tk.hc_split(mix, base, scale, n, 20, 1e-6), ops.hc_split(mix, base, scale, n, 20, 1e-6)):
        check(out, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("has_weight", [True, False])
def test_swiglu_clamp(dtype, has_weight):
    g = gen(15)
    gate = (torch.randn(7, 300, generator=g) * 8).to(dtype)
    up = (torch.randn(7, 300, generator=g) * 8).to(dtype)
    w = torch.rand(7, generator=g)
    check(tk.swiglu_clamp(gate, up, w, 10.0, has_weight), ops.swiglu_clamp(gate, up, w, 10.0, has_weight))


def test_swiglu_clamp_reads_column_views_of_a_stacked_output():
    """g and v as the two halves of one w1+w3 output (row stride 2N): read in place, same result."""
    both = (torch.randn(5, 2, 300, generator=gen(16)) * 8).to(torch.bfloat16)
    gate, up = both.flatten(1).split(300, dim=-1)
    assert gate.stride(0) == 600 and not gate.is_contiguous()
    w = torch.rand(5, generator=gen(17))
    out = tk.swiglu_clamp(gate, up, w, 10.0, True)
    assert torch.equal(out, tk.swiglu_clamp(gate.contiguous(), up.contiguous(), w, 10.0, True))
    check(out, ops.swiglu_clamp(gate, up, w, 10.0, True))


def test_swiglu_clamp_writes_bf16_as_the_cast_of_its_fp32_result():
    """out_dtype (the shared-expert fork's SwiGLU, TUNE fork_join_triton): the bits of ``.to(bfloat16)``,
    ties to even included (values on the bf16 midpoints are forced through the weight-free path)."""
    g = gen(18)
    gate = (torch.randn(6, 256, generator=g) * 8).to(torch.bfloat16)
    up = (torch.randn(6, 256, generator=g) * 8).to(torch.bfloat16)
    ref = tk.swiglu_clamp(gate, up, gate, 10.0, False)
    out = tk.swiglu_clamp(gate, up, gate, 10.0, False, out_dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref.to(torch.bfloat16))
    assert (ref.to(torch.bfloat16).float() != ref).sum() > 1000  # the rounding was really exercised


def test_add_f32_is_the_promoted_add():
    g = gen(19)
    routed = torch.randn(3, 4100, generator=g)  # more than one block, a partial last one
    h = torch.randn(3, 4100, generator=g).to(torch.bfloat16)
    out = tk.add_f32(routed, h)
    assert out.dtype == torch.float32 and torch.equal(out, routed + h)
    assert torch.equal(tk.add_f32(h, h), h.float() + h.float())
    col = torch.randn(4100, 3, generator=g).t()  # strided: torch's add
    assert torch.equal(tk.add_f32(routed, col), routed + col)
    assert tk.add_f32(routed[:0], h[:0]).shape == (0, 4100)
    hc = torch.randn(4100, 3, generator=g).to(torch.bfloat16).t()  # strided bf16 + bf16: still added in fp32
    assert torch.equal(tk.add_f32(hc, hc + 1), hc.float() + (hc + 1).float())


def test_gather_rows_is_indexing():
    g = gen(20)
    x = torch.randn(5, 4100, generator=g).to(torch.bfloat16)  # more than one block a row, a partial last one
    rows = torch.tensor([3, 0, 3, 4, 1, 3])
    assert torch.equal(tk.gather_rows(x, rows), x[rows])
    x3 = torch.randn(2, 3, 7, generator=g)  # rows of several dims
    assert torch.equal(tk.gather_rows(x3, torch.tensor([1, 1, 0])), x3[torch.tensor([1, 1, 0])])
    assert tk.gather_rows(x, rows[:0]).shape == (0, 4100)
    xt = torch.randn(4100, 5, generator=g).t()  # strided: torch's indexing
    assert torch.equal(tk.gather_rows(xt, rows), xt[rows])


def test_shared_expert_chain_with_the_fused_cast_gives_the_same_bits():
    """runtime/shared_expert_stream.py under TUNE fork_join_triton: the SwiGLU writing bf16 itself leaves the
    shared expert's output unchanged (the CPU ops around it, the SwiGLU launch under the interpreter)."""
    from dsv4c.runtime import shared_expert_stream as ses

    K, F = 256, 128
    w13, s13 = quant.quantize_fp8_weight(torch.randn(2 * F, K, generator=gen(20)) * 0.1)
    w2, s2 = quant.quantize_fp8_weight(torch.randn(K, F, generator=gen(21)) * 0.1)
    x = torch.randn(1, K, generator=gen(22)).to(torch.bfloat16)
    args = (x, w13, s13, w2, s2, True, True, 10.0, torch.bfloat16)
    plain, fused = ses._shared_chain(*args), ses._shared_chain(*args, fused_cast=True)
    assert fused.dtype == plain.dtype and torch.equal(fused, plain)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_indexer_score(dtype):
    g = gen(16)
    B, S, NH, D, E = 2, 5, 8, 32, 70
    q = torch.randn(B, S, NH, D, generator=g).to(dtype)
    k = torch.randn(B, E, D, generator=g).to(dtype)
    w = torch.randn(B, S, NH, generator=g)
    check(tk.indexer_score(q, k, w), ops.indexer_score(q, k, w))


@pytest.mark.parametrize("overlap,m", [(False, 4), (True, 4), (False, 128)])
def test_compress_pool(overlap, m):
    g = gen(17)
    B, W, d = 2, 3, 40
    kd = 2 * d if overlap else d
    a = torch.randn(B, W, m, kd, generator=g)
    z = torch.randn(B, W, m, kd, generator=g) * 3
    if overlap:  # previous window's first halves; absent (z = -inf) for window 0
        a_prev = torch.cat((torch.zeros(B, 1, m, d), a[:, :-1, :, :d]), dim=1)
        z_prev = torch.cat((torch.full((B, 1, m, d), float("-inf")), z[:, :-1, :, :d]), dim=1)
    else:
        a_prev = z_prev = torch.zeros(0)
    check(tk.compress_pool(a, z, a_prev, z_prev, overlap), ops.compress_pool(a, z, a_prev, z_prev, overlap))


def test_register_cuda_kernels_idempotent():
    assert tk.register_cuda_kernels() is True
    assert tk.register_cuda_kernels() is True
    x = torch.randn(2, 128)
    assert torch.equal(ops.fp8_qdq(x, 128, True), quant.fp8_qdq(x, 128, True))  # CPU still the reference
