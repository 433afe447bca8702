"""The Triton top-k selection (dsv4c.ops.triton_topk) against its plain-torch reference, under Triton's
interpreter: ids must match exactly (descending score, ascending id on ties, -1 past the present entries)."""

from __future__ import annotations

import pytest
import torch

from kernel_checks import gen, interpreted_triton_kernels

tk = interpreted_triton_kernels()

from dsv4c.ops import triton_topk  # noqa: E402
from dsv4c.ops.triton_topk import topk_ids, topk_ids_reference  # noqa: E402

NINF = float("-inf")


def _same(scores, topk, lengths=None, **kw):
    out = topk_ids(scores, topk, lengths, **kw)
    ref = topk_ids_reference(scores, topk, lengths)
    assert out.dtype == torch.int64 and out.shape == (*scores.shape[:-1], topk), (out.dtype, out.shape)
    assert torch.equal(out, ref), (out, ref)
    return out


def _ties(rows, NE, levels, seed):
    """Scores with only ``levels`` distinct values: many entries tie at the k-th value."""
    return torch.randint(0, levels, (rows, NE), generator=gen(seed)).float() - levels / 2


def _visible_prefix(scores, visible):
    ent = torch.arange(scores.shape[-1])
    return scores.masked_fill(ent >= torch.tensor(visible)[:, None], NINF)


@pytest.mark.parametrize("rows,NE,topk", [
    (3, 1, 1), (2, 1, 6), (3, 7, 1), (3, 7, 6), (2, 7, 8), (4, 64, 6), (2, 64, 8), (2, 64, 64),
    (3, 300, 8), (2, 300, 64), (1, 300, 512), (2, 2048, 8), (1, 2048, 512),
])
def test_random_rows(rows, NE, topk):
    _same(torch.randn(rows, NE, generator=gen(NE * 31 + topk)), topk)


def test_matches_torch_topk_without_ties():
    """On distinct scores the selection is exactly torch.topk's (as a set, and also its sorted order)."""
    for NE, topk, chunk in ((64, 8, None), (300, 64, None), (300, 64, 128), (2048, 6, 256)):
        s = torch.stack([torch.randperm(NE, generator=gen(NE + r)).float() * 0.37 - 20 for r in range(2)])
        out = _same(s, topk, chunk=chunk)
        ref = torch.topk(s, topk, dim=-1).indices
        assert all(set(o.tolist()) == set(r.tolist()) for o, r in zip(out, ref))
        assert torch.equal(out, ref)


@pytest.mark.parametrize("chunk", [None, 32])
def test_masked_rows(chunk):
    """Prefix visibility as the indexer masks it: none visible, fewer than k, exactly k, more than k."""
    s = _visible_prefix(torch.randn(6, 100, generator=gen(1)), [0, 1, 5, 8, 9, 100])
    out = _same(s, 8, chunk=chunk, num_warps=1)
    assert out[0].eq(-1).all() and out[2, 5:].eq(-1).all() and out[3].ge(0).all()
    # scattered -inf, fewer visible than k in some rows
    s = torch.randn(4, 300, generator=gen(2))
    s[torch.rand(4, 300, generator=gen(3)) < torch.tensor([[0.5], [0.9], [0.99], [1.0]])] = NINF
    _same(s, 64, chunk=chunk, num_warps=1)


@pytest.mark.parametrize("chunk", [None, 32])
def test_heavy_ties(chunk):
    """Ties at the k-th value go to the smallest ids; also ties among the ones strictly above it."""
    _same(_ties(4, 300, 3, 4), 64, chunk=chunk, num_warps=1)
    _same(_ties(4, 300, 40, 5), 8, chunk=chunk, num_warps=1)
    _same(torch.zeros(2, 64), 6, chunk=chunk, num_warps=1)  # all equal: ids 0..5
    s = _ties(3, 200, 4, 6)
    s[:, ::3] = NINF
    _same(s, 64, chunk=chunk, num_warps=1)


def test_multi_chunk_wide_row():
    """A 2048-wide row streamed in 128-element chunks (radix passes re-read the row)."""
    s = torch.randn(2, 2048, generator=gen(7))
    s[1, 1500:] = NINF
    _same(s, 64, chunk=128)
    _same(_visible_prefix(torch.randn(2, 1000, generator=gen(8)), [40, 1000]), 64, chunk=128)  # 40 < k


def test_special_values():
    """Order over the whole fp32 range: +-0 tie, subnormals, +-max, +inf first; -inf and NaN never chosen."""
    v = [0.0, -0.0, 1e-45, -1e-45, 3.4e38, -3.4e38, float("inf"), NINF, float("nan"), 1.0, -1.0, -0.0, 0.0]
    s = torch.tensor([v, v[::-1]])
    out = _same(s, 16)
    assert out[0, :11].ge(0).all() and out[0, 11:].eq(-1).all()
    assert out[0, :3].tolist() == [6, 4, 9]  # inf, 3.4e38, 1.0


def test_leading_dims_and_strides():
    x = torch.randn(2, 3, 64, generator=gen(9))
    out = _same(x, 8)
    assert out.shape == (2, 3, 8)
    _same(x.transpose(0, 1), 8)  # non-contiguous rows
    _same(torch.randn(64, 6, generator=gen(10)).t(), 4)  # non-unit last stride
    _same(torch.randn(2, 3, 64, generator=gen(11), dtype=torch.float64), 8)  # other float dtypes -> fp32


def test_empty_cases_do_not_launch(monkeypatch):
    class NoLaunch:
        def __getitem__(self, grid):
            raise AssertionError("launched")

    monkeypatch.setattr(triton_topk, "_topk_ids_kernel", NoLaunch())
    for shape, topk in (((3, 0), 4), ((3, 5), 0), ((0, 5), 4), ((2, 0, 7), 3)):
        out = topk_ids(torch.zeros(shape), topk)
        assert out.shape == (*shape[:-1], topk) and out.dtype == torch.int64 and out.eq(-1).all()
        assert torch.equal(out, topk_ids_reference(torch.zeros(shape), topk))


def test_large_topk_falls_back_to_reference(monkeypatch):
    monkeypatch.setattr(triton_topk, "MAX_KERNEL_TOPK", 4)
    _same(_ties(3, 20, 5, 12), 6)


def test_reference_is_torch_topk_as_a_set():
    """The reference itself: torch.topk's set with -inf ids replaced by -1, padded to topk, ordered."""
    s = torch.stack([torch.randperm(50, generator=gen(13 + r)).float() for r in range(3)])
    s[1, 10:] = NINF
    s[2] = NINF
    for topk in (1, 8, 50, 64):
        vals, idx = torch.topk(s, min(topk, 50), dim=-1)
        idx = torch.where(vals == NINF, -1, idx)
        ref = topk_ids_reference(s, topk)
        for r in range(3):
            want = set(idx[r].tolist()) - {-1}
            got = ref[r].tolist()
            assert set(got) - {-1} == want and got[len(want):] == [-1] * (topk - len(want))
            assert torch.equal(s[r, got[:len(want)]], s[r].sort(descending=True).values[:len(want)])


@pytest.mark.parametrize("chunk", [None, 32])
def test_row_lengths(chunk):
    """Lengths bound what a row may select (and what the kernel reads): the same ids as masking the scores
    past them; lengths of 0, below k, past the row and negative; broadcast over the query axis."""
    s = torch.randn(2, 3, 100, generator=gen(4))
    lengths = torch.tensor([[0], [150]])  # [B, 1] against rows [B, S]
    out = _same(s, 8, lengths, chunk=chunk, num_warps=1)
    assert out[0].eq(-1).all() and out[1].ge(0).all()
    lengths = torch.tensor([[5, 8, 9], [-3, 100, 64]])
    out = _same(s, 8, lengths, chunk=chunk, num_warps=1)
    masked = _visible_prefix(s.reshape(6, 100), lengths.clamp(min=0).reshape(-1).tolist())
    assert torch.equal(out.reshape(6, 8), topk_ids_reference(masked, 8))


class _Counting:
    """Wraps a kernel and counts its launches."""

    def __init__(self, kernel):  # noqa: ANN001
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):  # noqa: ANN001, ANN204
        self.launches += 1
        return self.kernel[grid]


@pytest.mark.parametrize("rows,NE,topk,lengths", [
    (2, 300, 8, None),  # 5 segments of 64, many ties at the k-th value
    (3, 1000, 64, [5, 70, 1000]),  # one row within the first segment (finished there), two split
    (1, 257, 32, [300]),  # a last segment of one entry
    (2, 640, 64, [0, 129]),  # nothing visible; fewer than k present in all but one segment
    (3, 640, 16, [40, 64, 300]),  # visible within half a segment, within one, and split
])
def test_split_rows(monkeypatch, rows, NE, topk, lengths):
    """The split kernel (segments of 64 entries here, the last program selecting among their candidates)
    gives exactly the reference's ids, tie order included, and leaves the arrival counters at zero."""
    monkeypatch.setitem(tk.TUNE, "topk_split_seg", 64)
    spy = _Counting(triton_topk._topk_split_kernel)
    monkeypatch.setattr(triton_topk, "_topk_split_kernel", spy)
    lens = None if lengths is None else torch.tensor(lengths)
    for scores in (_ties(rows, NE, 12, NE + topk), torch.randn(rows, NE, generator=gen(NE))):
        _same(scores, topk, lens, num_warps=1)  # 32 threads: a 32-wide half segment keeps one key each
    assert spy.launches == 2
    assert not tk._counters(torch.device("cpu")).any()


def test_split_only_for_few_long_rows(monkeypatch):
    monkeypatch.setitem(tk.TUNE, "topk_split_seg", 2048)
    assert triton_topk.split_segment(16384, 512, 1, 8) == 2048
    assert triton_topk.split_segment(2048, 512, 1, 8) is None  # one segment
    assert triton_topk.split_segment(16384, 512, triton_topk.SPLIT_MAX_ROWS + 1, 8) is None  # prefill rows
    assert triton_topk.split_segment(65536, 512, 1, 8) is None  # 32 x 512 candidates > topk_split_max
    assert triton_topk.split_segment(8192, 4096, 1, 8) == 4096  # a segment holds k candidates
    monkeypatch.setitem(tk.TUNE, "topk_split_seg", None)
    assert triton_topk.split_segment(16384, 512, 1, 8) is None


@pytest.mark.parametrize("rows,NE,topk,lengths", [
    (2, 3000, 16, None),  # 47 segments of 64 -> 752 candidates -> 192 -> the final block
    (3, 2500, 8, [2500, 700, 3]),  # lengths: a long row, a shorter one, one inside the first segment
    (2, 20000, 1, None),  # k = 1: the levels shrink to a final block narrower than the 32 threads
])
def test_multi_level_rows(monkeypatch, rows, NE, topk, lengths):
    """Rows whose candidates exceed one block (topk_split_max 256 here) go through levels that each keep k
    of every 64-entry segment of the previous level's candidates: exactly the reference's ids, ties too."""
    monkeypatch.setitem(tk.TUNE, "topk_split_seg", 64)
    monkeypatch.setitem(tk.TUNE, "topk_split_max", 256)
    spy = _Counting(triton_topk._topk_level_kernel)
    monkeypatch.setattr(triton_topk, "_topk_level_kernel", spy)
    assert triton_topk.split_segment(NE, topk, rows, 1) is None
    assert triton_topk.multi_level_segment(NE, topk, rows, 1) == 64
    lens = None if lengths is None else torch.tensor(lengths)
    for scores in (_ties(rows, NE, 40, NE + topk), torch.randn(rows, NE, generator=gen(NE + 1))):
        _same(scores, topk, lens, num_warps=1)
    assert spy.launches >= 2 * 3  # at least two reducing levels and the final one, per call


def test_multi_level_only_when_one_split_cannot_hold_the_candidates(monkeypatch):
    monkeypatch.setitem(tk.TUNE, "topk_split_seg", 4096)
    assert triton_topk.multi_level_segment(262144, 512, 1, 8) == 4096  # 1M context: 64 segments
    assert triton_topk.multi_level_segment(16512, 512, 1, 8) is None  # 5 segments: one split
    assert triton_topk.multi_level_segment(262144, 512, triton_topk.SPLIT_MAX_ROWS + 1, 8) is None
    assert triton_topk.multi_level_segment(262144, 4096, 1, 8) is None  # a segment of 2k would not fit a block
