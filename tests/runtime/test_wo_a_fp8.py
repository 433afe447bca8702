"""runtime/wo_a_fp8.py: the decode graph's wo_a projection read as FP8 (TUNE wo_a_fp8). The e4m3 codes found
for a dequantized weight, the dispatch of the op's CUDA implementation (the kernel itself:
tests/ops/test_triton_gemv.py), the weight cache, and the rewrite on the tiny decode graph (CPU, fixed seeds)."""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "passes"))  # passes_helpers.py (tests/ has no packages)

from passes_helpers import assert_same_step, call_positions, h100_program  # noqa: E402

from dsv4c import quant  # noqa: E402
from dsv4c.program import Program  # noqa: E402
from dsv4c.runtime import wo_a_fp8  # noqa: E402

aten = torch.ops.aten


def _dequantized(G: int, R: int, K: int, seed: int) -> torch.Tensor:
    """A grouped weight [G, R, K] as a checkpoint's FP8 wo_a dequantized to bf16 (per-block scales spread)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(G * R, K, generator=g) * torch.logspace(-3, 1, G * R)[:, None]
    q, s = quant.quantize_fp8_weight(w)
    return quant.dequantize_fp8_weight(q, s).to(torch.bfloat16).view(G, R, K)


def test_codes_of_a_dequantized_weight_are_exact():
    w = _dequantized(2, 256, 384, 0).reshape(512, 384)
    codes, scale = wo_a_fp8.fp8_blocks_exact(w)
    assert codes.dtype == torch.float8_e4m3fn and codes.shape == (512, 384) and scale.shape == (4, 3)
    assert torch.equal(quant.dequantize_fp8_weight(codes, scale), w.float())
    assert bool((torch.log2(scale) == torch.log2(scale).round()).all())  # ue8m0: powers of two
    g = torch.Generator().manual_seed(1)
    assert wo_a_fp8.fp8_blocks_exact(torch.randn(256, 256, generator=g).to(torch.bfloat16)) is None  # not e4m3 x 2^k
    assert wo_a_fp8.fp8_blocks_exact(w[:200]) is None  # rows not whole blocks


def _gemv_spy(monkeypatch):
    """Route the op's CUDA path to a reference GEMV on the CPU: the dequantized codes, fp32 sums."""
    from dsv4c.ops import triton_gemv

    calls = []

    def gemv(x2, codes, scale, groups):  # noqa: ANN001, ANN202
        calls.append(groups)
        w = quant.dequantize_fp8_weight(codes, scale).view(groups, -1, codes.shape[1])
        return torch.einsum("mgk,gdk->mgd", x2.float().view(x2.shape[0], groups, -1), w).flatten(1).to(x2.dtype)

    monkeypatch.setattr(triton_gemv, "fp8_grouped_gemv_tc", gemv)
    monkeypatch.setitem(triton_gemv.TUNE, "tc_bn", 128)
    return calls


def _alias(w: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """What a compiled graph hands the op for its input: the same memory in a new tensor object, no view of
    it (no ``_base``, a version counter of its own), as Inductor's ``reinterpret_tensor`` makes it."""
    from torch._C._dynamo.guards import _reinterpret_tensor

    strides = [1]
    for n in reversed(shape[1:]):
        strides.insert(0, strides[0] * n)
    a = _reinterpret_tensor(w, shape, tuple(strides), 0)
    assert a._base is None and a.data_ptr() == w.data_ptr()
    return a


def test_registered_weight_found_through_an_alias(monkeypatch):
    """Session 15's GPU run: the op saw a new alias object every call, missed a cache keyed by the tensor,
    and looked for codes inside CUDA graph capture. Codes are now found when the executor registers the
    graph input and looked up by memory."""
    calls = _gemv_spy(monkeypatch)
    found = []
    real = wo_a_fp8.fp8_blocks_exact
    monkeypatch.setattr(wo_a_fp8, "fp8_blocks_exact", lambda w: (found.append(w.shape), real(w))[1])
    param = _dequantized(2, 128, 256, 2).reshape(256, 256).clone()  # the graph input
    o = torch.randn(1, 1, 2, 256, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    want = torch.einsum(wo_a_fp8.WO_A_EQUATION, o.float(), param.view(2, 128, 256).float()).to(torch.bfloat16)
    # not registered: the einsum, no search for codes inside the op
    assert torch.equal(wo_a_fp8._grouped_proj_cuda(o, _alias(param, (2, 128, 256))), want)
    assert calls == [] and found == []
    for _ in range(2):
        assert wo_a_fp8.register_weight(param) is True
        got = wo_a_fp8._grouped_proj_cuda(o, _alias(param, (2, 128, 256)))
        assert got.shape == (1, 1, 2, 128) and got.dtype == torch.bfloat16
        assert torch.equal(got, want)
    assert calls == [2, 2] and found == [(256, 256)]  # codes found once for the weight, kept
    del param
    gc.collect()
    assert not wo_a_fp8._CODES  # dropped with the weight

    # not exactly e4m3 x 2^k, or too many rows: the einsum, as the graph had it
    rough = torch.randn(2, 128, 256, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    assert wo_a_fp8.register_weight(rough) is False
    assert torch.equal(wo_a_fp8._grouped_proj_cuda(o, rough), torch.einsum(wo_a_fp8.WO_A_EQUATION, o, rough))
    exact = _dequantized(2, 128, 256, 5)
    assert wo_a_fp8.register_weight(exact) is True
    many = torch.randn(2, 9, 2, 256, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)  # 18 rows
    assert torch.equal(wo_a_fp8._grouped_proj_cuda(many, exact), torch.einsum(wo_a_fp8.WO_A_EQUATION, many, exact))
    assert calls == [2, 2]


def test_weights_sharing_one_buffer_are_told_apart(monkeypatch):
    """Two blocks' weights as views of one buffer (as a loader may hand them out): each its own codes."""
    _gemv_spy(monkeypatch)
    buf = torch.cat([_dequantized(1, 128, 128, 9).flatten(), _dequantized(1, 128, 128, 10).flatten()])
    o = torch.randn(1, 1, 1, 128, generator=torch.Generator().manual_seed(11)).to(torch.bfloat16)
    ws = [buf[i * 128 * 128:(i + 1) * 128 * 128].view(128, 128) for i in (0, 1)]
    for w in ws:
        assert wo_a_fp8.register_weight(w)
    for i in (0, 1, 0):
        want = torch.einsum(wo_a_fp8.WO_A_EQUATION, o.float(), ws[i].view(1, 128, 128).float()).to(torch.bfloat16)
        assert torch.equal(wo_a_fp8._grouped_proj_cuda(o, _alias(ws[i], (1, 128, 128))), want)
    assert len(wo_a_fp8._CODES) == 2


def test_an_in_place_change_is_seen(monkeypatch):
    _gemv_spy(monkeypatch)
    w = _dequantized(1, 128, 128, 7)
    o = torch.randn(1, 1, 1, 128, generator=torch.Generator().manual_seed(8)).to(torch.bfloat16)
    assert wo_a_fp8.register_weight(w)
    first = wo_a_fp8._grouped_proj_cuda(o, _alias(w, (1, 128, 128)))
    w.mul_(2)  # still e4m3 x 2^k; the codes found before are stale
    want = torch.einsum(wo_a_fp8.WO_A_EQUATION, o.float(), w.float()).to(torch.bfloat16)
    assert torch.equal(wo_a_fp8._grouped_proj_cuda(o, _alias(w, (1, 128, 128))), want)  # einsum until registered
    assert wo_a_fp8.register_weight(w)  # found again
    again = wo_a_fp8._grouped_proj_cuda(o, _alias(w, (1, 128, 128)))
    assert torch.equal(again, want) and not torch.equal(first, again)


def test_rewrite_of_the_h100_decode_graph(tiny_spec, tiny_ckpt):
    """Reference numerics in bf16 after the h100 pipeline: each block's wo_a einsum becomes one grouped_proj
    call (the mHC post-mix einsums stay), and the step is bit for bit the one before on the CPU (where the
    op is the einsum)."""
    ref, w, ctx = h100_program(tiny_spec, tiny_ckpt, "decode")
    new = Program.from_json(ref.to_json())
    L = tiny_spec.num_layers
    assert len(call_positions(new, aten.einsum.default)) == 3 * L
    assert wo_a_fp8.rewrite_wo_a_fp8(new.graph_module) == L
    assert wo_a_fp8.rewrite_wo_a_fp8(new.graph_module) == 0
    assert len(call_positions(new, aten.einsum.default)) == 2 * L
    assert len(call_positions(new, torch.ops.dsv4c_rt.grouped_proj.default)) == L
    # the executor registers exactly the blocks' wo_a inputs
    assert wo_a_fp8.weight_inputs(new) == [f"params.layers.{i}.attn.wo_a.weight" for i in range(L)]
    for seed in (11, 12):
        assert_same_step(ref, new, w, ctx, "decode", seed=seed)


def test_the_frontend_projection_is_the_one_rewritten():
    src = (Path(__file__).parents[2] / "frontend" / "model.py").read_text()
    assert f'torch.einsum("{wo_a_fp8.WO_A_EQUATION}"' in src


@pytest.fixture(autouse=True)
def _clear_cache():
    yield
    wo_a_fp8._CODES.clear()
