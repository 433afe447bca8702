"""Triton top-k selection: ids of the ``topk`` largest scores of each row, in one program per row.

Used at decode by the lightning indexer in place of ``torch.topk``, which on an H100 costs ~60-80 us for a
2048-wide row with k=512 (a gather-top-k kernel plus a radix sort of the result). Here one CTA per row:

1. scores map to order-preserving int32 keys (-0.0 as +0.0; -inf and NaN marked absent);
2. a radix select finds the k-th largest key ``T`` in four passes of 8-bit digit histograms (MSB first,
   each over the keys that match the digits found so far); the first pass also counts the present keys,
   so rows with fewer than k present keys select all of them;
3. a compaction pass writes the keys > T, plus the first (k - #greater) keys == T in id order, as
   64-bit ``(key << 32) | (2^31 - 1 - id)`` values into the output row (positions from ``tl.cumsum``);
4. those are read back as one block, sorted descending (``tl.sort``; larger key first, smaller id first on
   ties) and decoded to ids; slots past the selection get -1.

The first ``chunk`` entries of a row are loaded once and kept in registers for all passes (the whole row when
it is no wider, or its visible prefix when ``lengths`` are that short); the rest of a wider row is streamed in
``chunk``-wide pieces per pass (5 reads). :func:`topk_ids_reference` is the plain-torch
contract the tests compare against.
"""

from __future__ import annotations

import torch
from torch import Tensor

# importing triton_kernels also applies its interpreter fix (runtime loop bounds under numpy >= 2.4)
from . import library
from .triton_kernels import HAVE_TRITON, TUNE, _np2

if HAVE_TRITON:
    import triton
    import triton.language as tl

MAX_KERNEL_TOPK = 8192  # the final sort holds next_power_of_2(topk) 64-bit values in registers of one CTA
DEFAULT_CHUNK = 4096  # rows up to this wide stay in registers


def topk_ids_reference(scores: Tensor, topk: int, lengths: Tensor | None = None) -> Tensor:
    """The plain-torch contract of :func:`topk_ids` (the CPU impl of ``dsv4::topk_ids``)."""
    return library.select_topk_ids(scores, int(topk), lengths)


if HAVE_TRITON:

    @triton.jit
    def _order_keys(row_ptr, offs, NE):
        """int32 keys of scores ``row_ptr[offs]`` whose signed order is the float order, and a mask of the
        present ones (in range, not -inf, not NaN). Integer-only, so no float fast-math can fold it."""
        x = tl.load(row_ptr + offs, mask=offs < NE, other=float("-inf"))
        bits = x.to(tl.int32, bitcast=True)
        bits = tl.where(bits == -2147483648, 0, bits)  # -0.0 -> +0.0
        present = ((bits & 0x7FFFFFFF) <= 0x7F800000) & (bits != -8388608)  # not NaN, not -inf (0xFF800000)
        key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # negative floats: flip magnitude bits
        return key, present

    @triton.jit
    def _digit_hist(key, present, prefix, SHIFT: tl.constexpr):
        """Histogram of the 8-bit digit at SHIFT of the present keys whose higher digits equal ``prefix``'s
        (digits taken from the unsigned form of the key, ``key ^ 0x80000000``)."""
        u = key ^ -2147483648
        m = present
        if SHIFT < 24:
            m = m & ((u >> (SHIFT + 8)) == (prefix >> (SHIFT + 8)))
        return tl.histogram((u >> SHIFT) & 0xFF, 256, mask=m)

    @triton.jit
    def _pick_digit(hist, rem):
        """Largest digit d with at least ``rem`` keys at digits >= d, and how many of the ``rem`` are still
        to be found among keys with digit exactly d."""
        bins = tl.arange(0, 256)
        at_or_above = tl.sum(hist, 0) - tl.cumsum(hist, 0) + hist
        d = tl.max(tl.where(at_or_above >= rem, bins, 0), 0)
        above = tl.sum(tl.where(bins > d, hist, 0), 0)
        return d, rem - above

    @triton.jit
    def _compact(key, present, idx, thr, need_eq, seen_eq, taken, out_row, K):
        """Store the chunk's keys > thr and its share of the first ``need_eq`` keys == thr (in id order) as
        sortable 64-bit values at out_row[taken:]; returns the updated (seen_eq, taken). At most K are
        taken by construction; the pos < K mask only keeps a broken threshold from writing past the row."""
        gt = present & (key > thr)
        eq = (present & (key == thr)).to(tl.int32)
        eq_rank = seen_eq + tl.cumsum(eq, 0) - eq
        take = (gt | ((eq != 0) & (eq_rank < need_eq))).to(tl.int32)
        pos = taken + tl.cumsum(take, 0) - take
        packed = (key.to(tl.int64) << 32) | (2147483647 - idx).to(tl.int64)
        tl.store(out_row + pos, packed, mask=(take != 0) & (pos < K))
        return seen_eq + tl.sum(eq, 0), taken + tl.sum(take, 0)

    @triton.jit
    def _topk_ids_kernel(s_ptr, len_ptr, o_ptr, NE, s_row_stride, K,
                         CHUNK: tl.constexpr, KP: tl.constexpr, SINGLE: tl.constexpr, HAS_LEN: tl.constexpr):
        r = tl.program_id(0).to(tl.int64)
        row = s_ptr + r * s_row_stride
        out = o_ptr + r * K
        offs = tl.arange(0, CHUNK)
        n = tl.zeros([], tl.int32) + NE  # entries of this row that can be selected
        if HAS_LEN:  # only the row's prefix: read no further
            n = tl.minimum(tl.maximum(tl.load(len_ptr + r), 0), NE).to(tl.int32)
        # the first chunk stays in registers for every pass (the whole row when it fits: SINGLE, or a
        # short visible prefix); only the rest of a long row is streamed again per pass
        key0, present0 = _order_keys(row, offs, n)

        # radix select of the k-th largest present key, 8 bits per pass
        prefix = tl.zeros([], tl.int32)
        rem = tl.zeros([], tl.int32) + K
        scan_end = n
        for p in tl.static_range(4):  # digit at bit 24 - 8p (a constexpr: the loop is unrolled)
            hist = _digit_hist(key0, present0, prefix, 24 - 8 * p)
            if not SINGLE:
                for start in range(CHUNK, scan_end, CHUNK):
                    key, present = _order_keys(row, start + offs, n)
                    hist += _digit_hist(key, present, prefix, 24 - 8 * p)
            if p == 0:
                n_present = tl.sum(hist, 0)
                take_all = n_present <= K  # no more present keys than k: later passes need not read the row
                rem = tl.minimum(rem, n_present)
                scan_end = tl.where(take_all, 0, n)
            d, rem = _pick_digit(hist, rem)
            prefix = prefix | (d << (24 - 8 * p))
        # back to the signed key; below every present key when all of them are selected
        thr = tl.where(take_all, -2147483648, prefix ^ -2147483648)
        # otherwise rem = how many of the keys equal to thr belong to the top k

        seen_eq = tl.zeros([], tl.int32)
        taken = tl.zeros([], tl.int32)
        seen_eq, taken = _compact(key0, present0, offs, thr, rem, seen_eq, taken, out, K)
        if not SINGLE:
            for start in range(CHUNK, n, CHUNK):
                key, present = _order_keys(row, start + offs, n)
                seen_eq, taken = _compact(key, present, start + offs, thr, rem, seen_eq, taken, out, K)

        # order the selection: read the packed values back (written by other threads), sort, decode
        tl.debug_barrier()
        j = tl.arange(0, KP)
        taken = tl.minimum(taken, K)
        packed = tl.load(out + j, mask=j < taken, other=-9223372036854775808)
        packed = tl.sort(packed, descending=True)
        ids = tl.where(j < taken, 2147483647 - (packed & 0x7FFFFFFF), -1)
        tl.debug_barrier()  # every thread has read its slots before any is overwritten
        tl.store(out + j, ids, mask=j < K)


def topk_ids(scores: Tensor, topk: int, lengths: Tensor | None = None, *, chunk: int | None = None,
             num_warps: int | None = None) -> Tensor:
    """int64 [..., topk] ids of the ``topk`` largest scores of each row of fp32 ``scores`` [..., NE], by
    descending score and ascending id on ties (the k-th value's ties go to the smallest ids); entries that
    are -inf (or NaN) are never selected and the slots they leave (also all past NE) are -1. Equal to
    :func:`topk_ids_reference`. ``chunk``: elements per step along a row (rounded up to a power of two and
    to at least one per thread, 32 * num_warps; rows up to this wide stay in registers for all passes);
    ``num_warps``: of each row's program. ``lengths`` (integers broadcastable to the rows): entries at or
    past a row's length count as -inf and are not read. ``topk`` above MAX_KERNEL_TOPK falls back to the
    reference."""
    topk = int(topk)
    lead, NE = scores.shape[:-1], scores.shape[-1]
    rows = scores.numel() // NE if NE else 0
    if topk == 0 or NE == 0 or rows == 0:  # nothing to select: no launch
        return torch.full((*lead, topk), -1, dtype=torch.int64, device=scores.device)
    if topk > MAX_KERNEL_TOPK or not HAVE_TRITON:
        return topk_ids_reference(scores, topk, lengths)
    if not TUNE["triton_topk"] and scores.device.type == "cuda":  # torch.topk, then the same tie order
        return _torch_topk_ids(scores, topk, lengths)
    s = scores.reshape(rows, NE)
    if s.dtype != torch.float32:
        s = s.float()
    if s.stride(-1) != 1:
        s = s.contiguous()
    out = torch.empty((rows, topk), dtype=torch.int64, device=scores.device)
    if num_warps is None:
        num_warps = TUNE["topk_warps"] or (4 if NE <= 1024 else 8)
    # at least one element per thread: no replicated lanes feeding the histograms
    CHUNK = _np2(min(NE, chunk or TUNE["topk_chunk"] or DEFAULT_CHUNK), lo=32 * num_warps)
    ln = out if lengths is None else lengths.expand(lead).reshape(rows).to(torch.int64).contiguous()
    _topk_ids_kernel[(rows,)](s, ln, out, NE, s.stride(0), topk, CHUNK=CHUNK, KP=_np2(topk), SINGLE=NE <= CHUNK,
                              HAS_LEN=lengths is not None, num_warps=num_warps)
    return out.reshape(*lead, topk)


def _torch_topk_ids(scores: Tensor, topk: int, lengths: Tensor | None = None) -> Tensor:
    """``torch.topk`` of the scores, -inf picks as -1 (what the GPU ran before this kernel; kept behind
    ``TUNE["triton_topk"]`` for comparison). The same set; equal scores in whatever order torch returns."""
    if lengths is not None:
        scores = library.mask_past_lengths(scores, lengths)
    kk = min(topk, scores.shape[-1])
    vals, idx = torch.topk(scores.float(), kk, dim=-1)
    idx = torch.where(torch.isneginf(vals), torch.full_like(idx, -1), idx)
    if kk < topk:
        idx = torch.cat((idx, idx.new_full((*idx.shape[:-1], topk - kk), -1)), dim=-1)
    return idx


__all__ = ["topk_ids", "topk_ids_reference", "MAX_KERNEL_TOPK"]
