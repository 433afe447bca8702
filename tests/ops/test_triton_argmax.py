"""The greedy tail's argmax (dsv4c.ops.triton_argmax) under Triton's interpreter: exactly torch.argmax,
ties across and inside slices included."""

from __future__ import annotations

import pytest
import torch

from kernel_checks import gen, interpreted_triton_kernels

tk = interpreted_triton_kernels()

from dsv4c.ops.triton_argmax import CHUNK, argmax_rows, use_triton_argmax  # noqa: E402


@pytest.fixture(autouse=True)
def _on(monkeypatch):
    monkeypatch.setitem(tk.TUNE, "triton_argmax", True)


def test_equals_torch_argmax_with_ties():
    V = 2 * CHUNK + 901  # three slices, the last one partial
    x = torch.randn(4, V, generator=gen(0))
    x[1, 5] = x[1, CHUNK + 7] = x[1, 2 * CHUNK + 3] = 50.0  # a tie across slices: the first one wins
    x[2, CHUNK + 11] = x[2, CHUNK + 10] = 40.0  # a tie inside one slice
    x[3] = -3.0  # all equal
    x[0, V - 1] = 60.0  # the very last entry
    assert use_triton_argmax(x)
    got = argmax_rows(x)
    assert got.dtype == torch.long and got.shape == (4, 1)
    assert torch.equal(got, torch.argmax(x, dim=-1, keepdim=True))
    assert got[:, 0].tolist() == [V - 1, 5, CHUNK + 10, 0]


def test_writes_into_out_and_leaves_counters_at_zero():
    x = torch.randn(2, 300, generator=gen(1)).to(torch.bfloat16)
    out = torch.full((2, 1), -1, dtype=torch.long)
    assert argmax_rows(x, out=out) is out
    assert torch.equal(out, torch.argmax(x.float(), dim=-1, keepdim=True))
    assert int(tk._counters(x.device)[:2].abs().sum()) == 0  # the next launch starts from zero
    assert torch.equal(argmax_rows(x), out)  # and gives the same again


def test_nan_counts_as_largest_and_shapes_are_checked():
    x = torch.randn(1, 50, generator=gen(2))
    x[0, 17] = float("nan")
    assert int(argmax_rows(x)) == 17
    with pytest.raises(ValueError, match=r"\[rows, vocab\]"):
        argmax_rows(x[0])
    with pytest.raises(ValueError, match="int64"):
        argmax_rows(x, out=torch.empty((1, 1), dtype=torch.int32))
