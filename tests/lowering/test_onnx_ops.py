"""Every ``dsv4`` op's ONNX translation against its CPU reference impl, in onnxruntime.

One module calls every op (plus the aten ops the fast path translates itself) on crafted inputs:
FP8/FP4 rounding ties, blocks whose scale is an exact power of two, all-zero blocks, rows routed to no
expert (-1) or past the last one, queries that see no key, the overlap compressor's -inf slots. It is
exported once through the public ``torch.onnx.export`` with the backend's translation table and run
once; each test compares one output.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import dsv4c.ops  # noqa: E402, F401
from dsv4c import quant  # noqa: E402
from dsv4c.lowering import onnx_ops  # noqa: E402
from dsv4c.ops.fused import pack_fp4_tiled  # noqa: E402

dsv4 = torch.ops.dsv4
aten = torch.ops.aten


def _fp8_ties() -> torch.Tensor:
    """[4, 64]: random; e4m3 ties at scale 1 (amax 448); an exact power-of-two scale; all zeros."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 64, generator=g) * 3
    ties = torch.tensor([1.0625, 1.1875, 17.0, 19.0, 208.0, 216.0, 0.0029296875, -1.0625, -17.0, 448.0])
    x[1] = torch.linspace(-400, 400, 64)
    x[1, :10] = ties
    x[2] = torch.randn(64, generator=g).clamp(-1, 1) * 56.0 / 1.0
    x[2, 0] = 56.0  # amax / 448 = 2^-3 exactly
    x[3] = 0.0
    return x


def _fp4_ties() -> torch.Tensor:
    """[3, 32]: random; every e2m1 rounding boundary (ties) at scale 1 (amax 6); zeros."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 32, generator=g)
    b = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, 0.2, 0.3, 0.7, 0.8, 1.3, 4.9, 5.1, 0.0])
    x[1] = torch.cat((b, -b))
    x[2] = 0.0
    return x


class AllOps(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(2)
        # FP8 weights: N not a multiple of 128 (gathered scales) and a whole number of blocks (reshaped).
        for name, (n, k) in {"w_odd": (200, 256), "w_even": (256, 128)}.items():
            q, s = quant.quantize_fp8_weight(torch.randn(n, k, generator=g) * 0.05)
            self.register_buffer(name, q)
            self.register_buffer(name + "_s", s)
        w4, s4 = quant.quantize_fp4_weight(torch.randn(4, 64, 128, generator=g) * 0.05)  # E=4, N=64, K=128
        self.register_buffer("w4", w4)
        self.register_buffer("s4", s4)
        pw, ps = pack_fp4_tiled(w4, s4, 16, 64)
        self.register_buffer("pw4", pw)
        self.register_buffer("ps4", ps)

    def forward(self, x8, x4, xa, xb, expert, mix, base, scale, a, z, a_prev, z_prev, q, k, w, q_attn, win, win_mask,
                comp, comp_idx, sink, visible, norm_w, pos, freqs, had, idx_add, src_add, flags):
        return {
            "fp8_qdq_ue8m0": dsv4.fp8_qdq(x8, 64, True),
            "fp8_qdq_float": dsv4.fp8_qdq(x8, 64, False),
            "fp4_qdq": dsv4.fp4_qdq(x4, 32),
            "fp8_linear_act": dsv4.fp8_linear(xa, self.w_odd, self.w_odd_s, True, True),
            "fp8_linear_plain": dsv4.fp8_linear(xb, self.w_even, self.w_even_s, False, True),
            "fp4_grouped": dsv4.fp4_grouped_linear(xb, expert, self.w4, self.s4, True, True),
            "fp4_grouped_plain": dsv4.fp4_grouped_linear(xb, expert, self.w4, self.s4, False, True),
            "fp4_grouped_packed": dsv4.fp4_grouped_linear_packed(xb, expert, self.pw4, self.ps4, True, True),
            "hc_split": dsv4.hc_split(mix, base, scale, 4, 20, 1e-6),
            "pool": dsv4.compress_pool(a[..., :64], z[..., :64], a_prev[..., :0, :0], z_prev[..., :0, :0], False),
            "pool_overlap": dsv4.compress_pool(a, z, a_prev, z_prev, True),
            "indexer_score": dsv4.indexer_score(q, k, w),
            "indexer_topk": dsv4.indexer_topk(q, k, w, visible, 3),
            "sparse_attn": dsv4.sparse_attn(q_attn, win, win_mask, comp, comp_idx, sink, 0.125),
            "sparse_attn_window": dsv4.sparse_attn(q_attn, win, win_mask, comp[:, :0], comp_idx[..., :0], sink, 0.125),
            "swiglu_w": dsv4.swiglu_clamp(xa[:, :64], xa[:, 64:128], xa[:, 0], 1.5, True),
            "swiglu": dsv4.swiglu_clamp(xa[:, :64], xa[:, 64:128], xa[:, 0], 1.5, False),
            **{f"finish{m}": dsv4.compress_finish(a, z, a_prev, z_prev, norm_w, pos, freqs, had, True, 1e-6, 0, m, True)
               for m in range(4)},
            "finish_pair": dsv4.compress_finish_pair(a, z, a_prev, z_prev, norm_w, pos, a, z, a_prev, z_prev, norm_w,
                                                     pos, freqs, had, True, 1e-6, 0, 1, 2, True),
            "index_add": torch.zeros(5, 3).index_add(0, idx_add, src_add),
            "index_add_dim1": torch.zeros(3, 5).index_add(1, idx_add, src_add.t()),
            "argsort_stable": torch.argsort(flags, stable=True),
            "topk_ids": dsv4.topk_ids(_with_ties(w), 5),
            "topk_ids_short": dsv4.topk_ids(_with_ties(w)[..., :2], 3),
            "topk_ids_lengths": dsv4.topk_ids(_with_ties(w), 4, visible[:, 1:2]),  # lengths 2 and 4 of 5
            "and": (flags > 0) & (flags < 2),
        }


def _with_ties(w):
    """[B, S, 4] scores with an exact tie, a -inf, a NaN and a -0.0 / +0.0 pair."""
    s = torch.cat([w, w[..., :1]], dim=-1)  # entry 4 ties entry 0
    s[0, 0, 1] = float("-inf")
    s[1, 2, 2] = float("nan")
    s[1, 1, 0], s[1, 1, 4] = -0.0, 0.0
    return s


def _inputs() -> tuple:
    g = torch.Generator().manual_seed(3)
    B, W, m, d = 2, 3, 4, 128
    T = 7
    a = torch.randn(B, W, m, 2 * d, generator=g)
    z = torch.randn(B, W, m, 2 * d, generator=g)
    a_prev = torch.randn(B, W, m, d, generator=g)
    z_prev = torch.randn(B, W, m, d, generator=g)
    z_prev[:, 0] = float("-inf")  # window 0 has no previous window
    S, H, c, nI, dI, E, nw = 3, 2, 128, 4, 128, 6, 5
    q = torch.randn(B, S, nI, dI, generator=g)
    k = torch.randn(B, E, dI, generator=g)
    w = torch.randn(B, S, nI, generator=g)
    q_attn = torch.randn(B, S, H, c, generator=g)
    win = torch.randn(B, nw, c, generator=g)
    win_mask = torch.rand(B, S, nw, generator=g) < 0.6
    win_mask[0, 0] = False  # this query sees no window key...
    comp = torch.randn(B, E, c, generator=g)
    comp_idx = torch.randint(0, E, (B, S, 3), generator=g)
    comp_idx[0, 0] = -1  # ...and no compressed entry: only the sink remains
    comp_idx[1, 1, 2] = -1
    visible = torch.tensor([[0, 2, 6], [1, 4, 5]])
    pos = torch.arange(W)[None].repeat(B, 1) * m + torch.tensor([[0], [8]])
    freqs = 1.0 / (10000 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64))
    return (_fp8_ties(), _fp4_ties(), torch.randn(T, 256, generator=g), torch.randn(T, 128, generator=g),
            torch.tensor([0, 3, -1, 2, 4, 1, 3]), torch.randn(2, 3, 24, generator=g), torch.randn(24, generator=g),
            torch.rand(3, generator=g) + 0.5, a, z, a_prev, z_prev, q, k, w, q_attn, win, win_mask, comp, comp_idx,
            torch.randn(H, generator=g), visible, torch.rand(d, generator=g) + 0.5, pos, freqs,
            quant.hadamard_matrix(d), torch.tensor([0, 2, 2, 4, 0]), torch.randn(5, 3, generator=g),
            torch.tensor([1, 0, 1, 1, 0, 0, 1, 0]))


@pytest.fixture(scope="module")
def results():
    mod, args = AllOps().eval(), _inputs()
    with torch.no_grad():
        want = mod(*args)
    onnx_program = torch.onnx.export(mod, args, dynamo=True, custom_translation_table=onnx_ops.translation_table(aten=True),
                                     opset_version=21, optimize=False, verbose=False)
    sess = ort.InferenceSession(onnx_program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {i.name: a.numpy() for i, a in zip(sess.get_inputs(), args)}
    got = sess.run(None, feeds)
    names = []
    for key, val in want.items():
        names += [f"{key}.{i}" for i in range(len(val))] if isinstance(val, tuple) else [key]
    flat_want = [t for v in want.values() for t in (v if isinstance(v, tuple) else (v,))]
    assert len(got) == len(flat_want)
    return {n: (torch.from_numpy(np.asarray(g)), w) for n, g, w in zip(names, got, flat_want)}


# Exact: quant-dequant, selections and integer results must be bit-identical.
EXACT = {"fp8_qdq_ue8m0", "fp8_qdq_float", "fp4_qdq", "indexer_topk", "argsort_stable", "and", "topk_ids",
         "topk_ids_short", "topk_ids_lengths"}
OUTPUTS = ["fp8_qdq_ue8m0", "fp8_qdq_float", "fp4_qdq", "fp8_linear_act", "fp8_linear_plain", "fp4_grouped",
           "fp4_grouped_plain", "fp4_grouped_packed", "hc_split.0", "hc_split.1", "hc_split.2", "pool", "pool_overlap",
           "indexer_score", "indexer_topk", "sparse_attn", "sparse_attn_window", "swiglu_w", "swiglu", "finish0",
           "finish1", "finish2", "finish3", "finish_pair.0", "finish_pair.1", "index_add", "index_add_dim1",
           "argsort_stable", "and", "topk_ids", "topk_ids_short", "topk_ids_lengths"]


@pytest.mark.parametrize("name", OUTPUTS)
def test_translation_matches_the_reference(results, name):
    got, want = results[name]
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, want.shape, got.dtype, want.dtype)
    if name in EXACT:
        assert torch.equal(got, want), (got - want).abs().max() if got.is_floating_point() else (got, want)
    else:
        err = (got.double() - want.double()).abs().max().item() / max(want.abs().max().item(), 1e-30)
        assert err <= 2e-6, f"{name}: rel err {err:.2e}"


def test_fp4_rounding_hits_every_tie_the_reference_way(results):
    got, want = results["fp4_qdq"]
    assert torch.equal(got[1], want[1])
    assert got[1, :8].tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0]  # ties to the even code


def test_every_dsv4_op_has_a_translation():
    # the packed-KV ops only occur in packed-cache graphs, which the onnx backend refuses
    assert onnx_ops.PACKED_KV_OPS <= onnx_ops.dsv4_ops()
    need = onnx_ops.dsv4_ops() - onnx_ops.PACKED_KV_OPS
    assert need <= onnx_ops.covered_ops(), need - onnx_ops.covered_ops()


def test_onnx_backend_refuses_a_packed_cache():
    from dsv4c.errors import ConfigError
    from dsv4c.lowering.onnx_backend import check_kv_storage

    check_kv_storage("dense")
    with pytest.raises(ConfigError, match="dense KV cache"):
        check_kv_storage("packed")
