"""The reference's indexer selection (``dsv4c.ops.library.select_visible_topk``): descending score, the lower
id first on ties, -1 past the visible entries, whatever the row length; the same ids as the compiled paths'
``select_topk_ids``."""

from __future__ import annotations

import torch

from dsv4c.ops.library import select_topk_ids, select_visible_topk


def _tied_scores(rows: int, n: int, seed: int) -> torch.Tensor:
    """Indexer-like scores: many exact zeros (every head's ReLU zero) and a few positive values."""
    g = torch.Generator().manual_seed(seed)
    s = torch.rand(rows, n, generator=g)
    s[torch.rand(rows, n, generator=g) < 0.8] = 0.0
    return s


def test_ties_go_to_the_lower_id_whatever_the_row_length():
    """The entries a row may see are the same in a 26-entry and a 128-entry cache (the rest hidden), so
    the selection must be too; torch.topk's tie order changes with the length (26: id 19, 128: id 83 for
    the same row), which made the eager reference disagree with the compiled paths on exact ties."""
    s = torch.zeros(1, 1, 26)
    s[..., [3, 7, 11]] = torch.tensor([0.46, 0.35, 0.2])
    for cap in (26, 32, 128):
        scores = torch.cat([s, torch.randn(1, 1, cap - 26)], -1)  # the entries past 26 are not visible
        ids = select_visible_topk(scores, torch.tensor([[26]]), 4)
        assert ids.tolist() == [[[3, 7, 11, 0]]], cap


def test_same_ids_as_the_compiled_selection():
    scores = _tied_scores(40, 96, 0).view(2, 20, 96)
    visible = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(1))
    visible[0, 0] = 0  # nothing visible: all -1
    for k in (1, 4, 16, 96):
        got = select_visible_topk(scores, visible, k)
        assert torch.equal(got, select_topk_ids(scores, k, visible)), k
    assert (select_visible_topk(scores, visible, 4)[0, 0] == -1).all()
