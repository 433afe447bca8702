"""dsv4c.ops.triton_fp4_mma and triton_fp8_mma on the CPU: their inline PTX is well formed against the
operands Triton passes, and off the GPU (the interpreter cannot run PTX) the decode rows keep to the
tensor-core GEMVs. The kernels' numbers are checked on the GPU (benchmarks/decode_gemv_gpu.py) and their
sm_90 compile in test_hopper_compile.py."""

from __future__ import annotations

import re

import pytest
import torch

from kernel_checks import check, gen, interpreted_triton_kernels

tk = interpreted_triton_kernels()

from dsv4c import quant  # noqa: E402
from dsv4c.ops import fused, triton_fp4_mma, triton_fp8_mma, triton_gemv  # noqa: E402

ops = torch.ops.dsv4


@pytest.mark.parametrize("make,outputs,inputs", [(triton_fp4_mma._lane_offsets_asm, 3, 1),
                                                 (triton_fp4_mma._w_load_asm, 10, 2),
                                                 (triton_fp4_mma._x_load_asm, 9, 2),
                                                 (triton_fp4_mma._mma_step_asm, 2, 21),
                                                 (triton_fp4_mma._quad_sum_asm, 4, 2),
                                                 (triton_fp8_mma._lane_offsets_asm, 4, 3),
                                                 (triton_fp8_mma._w_load_asm, 16, 2),
                                                 (triton_fp8_mma._x_load_asm, 10, 3),
                                                 (triton_fp8_mma._mma_step_asm, 4, 31),
                                                 (triton_fp8_mma._lane_rows_asm, 2, 1)])
def test_asm_uses_every_operand_and_writes_outputs_last(make, outputs, inputs):
    """Each $n of the constraint list appears; no input is read after the first output is written (Triton
    may give an output the register of an input)."""
    asm = make()
    lines = asm.splitlines()
    assert {int(n) for n in re.findall(r"\$(\d+)", asm)} == set(range(outputs + inputs))
    first_write = min(i for i, line in enumerate(lines)
                      if re.match(r"\s*[\w.:]+\s+(\{?\$(\d+))", line) and int(re.search(r"\$(\d+)", line)[1]) < outputs)
    later_inputs = {int(n) for line in lines[first_write:] for n in re.findall(r"\$(\d+)", line) if int(n) >= outputs}
    assert not later_inputs, (make.__name__, later_inputs)
    assert asm.count("{") == asm.count("}")


@pytest.mark.parametrize("module", [triton_fp4_mma, triton_fp8_mma])
def test_mma_step_covers_one_k_tile(module):
    """4 MMAs of K 32 = one 128-wide tile (FP4: one per scale group; FP8: chained)."""
    assert module._mma_step_asm().count("mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32") == 4


def test_not_supported_off_the_gpu():
    w = torch.zeros(1, 1, 1, 128, 64, dtype=torch.uint8)
    assert not triton_fp4_mma.mma_supported(w, torch.zeros(1, 128))


def _calls_to(monkeypatch, name: str) -> list:
    """Route ``triton_gemv.<name>`` through a wrapper that records each call (the list it returns)."""
    calls = []
    fn = getattr(triton_gemv, name)
    monkeypatch.setattr(triton_gemv, name, lambda *a, **k: (calls.append(1), fn(*a, **k))[1])
    return calls


def test_fp4_rows_keep_to_the_tensor_core_gemv_off_the_gpu(monkeypatch):
    monkeypatch.setitem(tk.TUNE, "fp4_mma", True)
    monkeypatch.setitem(tk.TUNE, "fp4_tc_bn", 64)
    calls = _calls_to(monkeypatch, "fp4_gemv_tc")
    w, s = quant.quantize_fp4_weight(torch.randn(2, 128, 256, generator=gen(20)) * 0.05)
    pw, ps = fused.pack_fp4_tiled(w, s, 128, 128)
    x = (torch.randn(3, 256, generator=gen(21))).to(torch.bfloat16)
    expert = torch.tensor([1, 0, 1])
    check(tk.fp4_grouped_linear_packed(x, expert, pw, ps, True, True),
          ops.fp4_grouped_linear_packed(x, expert, pw, ps, True, True))
    assert calls == [1]


def test_fp8_rows_keep_to_the_tensor_core_gemv_off_the_gpu(monkeypatch):
    monkeypatch.setitem(tk.TUNE, "fp8_mma", True)
    monkeypatch.setitem(tk.TUNE, "tc_bn", 64)
    calls = _calls_to(monkeypatch, "fp8_gemv_tc")
    w, s = quant.quantize_fp8_weight(torch.randn(128, 256, generator=gen(22)) * 0.05)
    x = torch.randn(2, 256, generator=gen(23)).to(torch.bfloat16)
    assert not triton_fp8_mma.mma_supported(x, w)
    check(tk.fp8_linear(x, w, s, True, True), ops.fp8_linear(x, w, s, True, True))
    assert calls == [1]
