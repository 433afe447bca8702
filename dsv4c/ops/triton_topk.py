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

A long row at decode (the indexer at a 64k context: 16384 entries, ~78 us in one CTA on an H100, streamed 5
times) is split instead (``TUNE["topk_split_seg"]``, a few rows only; ``_topk_split_kernel``): program
``(r, p)`` selects the top k of its segment (in registers, steps 1-3) and parks them, in id order, as packed
64-bit values in a scratch row; the row's last program to arrive (an arrival counter) runs the same
selection over the candidates, whose scan order is the global id order, so ties resolve as in the one-CTA
kernel, then step 4. A row whose visible length fits one segment is finished by its first program directly
(in a block half as wide when it fits that). Rows whose candidates would not fit one block (a 1M context:
262144 entries) go through levels of ``_topk_level_kernel`` instead, each keeping k of every segment of the
previous level's candidates (still in id order), until one block holds them.
"""

from __future__ import annotations

import torch
from torch import Tensor

# importing triton_kernels also applies its interpreter fix (runtime loop bounds under numpy >= 2.4)
from . import library
from .triton_kernels import HAVE_TRITON, TUNE, _counters, _np2, pdl_kwargs

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from .triton_kernels import _pdl_begin

MAX_KERNEL_TOPK = 8192  # the final sort holds next_power_of_2(topk) 64-bit values in registers of one CTA
DEFAULT_CHUNK = 4096  # rows up to this wide stay in registers
SPLIT_MAX_ROWS = 64  # the split kernel's scratch is rows x segments x k packed values: decode batches only


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
    def _row_length(len_ptr, r, NE, HAS_LEN: tl.constexpr):
        """Entries of row ``r`` that can be selected: NE, or its length clamped to [0, NE] (only the row's
        prefix: the kernels read no further)."""
        n = tl.zeros([], tl.int32) + NE
        if HAS_LEN:
            n = tl.minimum(tl.maximum(tl.load(len_ptr + r), 0), NE).to(tl.int32)
        return n

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
    def _block_threshold(key, present, K):
        """The radix select (step 2) over one register block: the k-th largest present key ``thr`` and how
        many keys equal to it belong to the top k; ``thr`` is below every key when all present ones fit."""
        prefix = tl.zeros([], tl.int32)
        rem = tl.zeros([], tl.int32) + K
        for p in tl.static_range(4):
            hist = _digit_hist(key, present, prefix, 24 - 8 * p)
            if p == 0:
                n_present = tl.sum(hist, 0)
                take_all = n_present <= K
                rem = tl.minimum(rem, n_present)
            d, rem = _pick_digit(hist, rem)
            prefix = prefix | (d << (24 - 8 * p))
        return tl.where(take_all, -2147483648, prefix ^ -2147483648), rem

    @triton.jit
    def _write_sorted_ids(out, taken, K, KP: tl.constexpr):
        """Step 4: the ``taken`` packed values at ``out`` (written by other threads) sorted, decoded to ids in
        place, -1 past them."""
        tl.debug_barrier()
        j = tl.arange(0, KP)
        taken = tl.minimum(taken, K)
        packed = tl.load(out + j, mask=j < taken, other=-9223372036854775808)
        packed = tl.sort(packed, descending=True)
        ids = tl.where(j < taken, 2147483647 - (packed & 0x7FFFFFFF), -1)
        tl.debug_barrier()  # every thread has read its slots before any is overwritten
        tl.store(out + j, ids, mask=j < K)

    @triton.jit
    def _topk_ids_kernel(s_ptr, len_ptr, o_ptr, NE, s_row_stride, K,
                         CHUNK: tl.constexpr, KP: tl.constexpr, SINGLE: tl.constexpr, HAS_LEN: tl.constexpr,
                         PDL: tl.constexpr = False):
        _pdl_begin(PDL)
        r = tl.program_id(0).to(tl.int64)
        row = s_ptr + r * s_row_stride
        out = o_ptr + r * K
        offs = tl.arange(0, CHUNK)
        n = _row_length(len_ptr, r, NE, HAS_LEN)  # entries of this row that can be selected
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

        _write_sorted_ids(out, taken, K, KP)

    @triton.jit
    def _select_sorted(key, present, ids, K, out, KP: tl.constexpr):
        """Steps 2-4 over one register block of keys (with their ids, in id order): the sorted ids of its top
        k at ``out``."""
        thr, rem = _block_threshold(key, present, K)
        zero = tl.zeros([], tl.int32)
        _, taken = _compact(key, present, ids, thr, rem, zero, zero, out, K)
        _write_sorted_ids(out, taken, K, KP)

    @triton.jit
    def _park_candidates(key, present, ids, K, cand, KP: tl.constexpr):
        """Steps 2-3 over one register block: its top k as packed values at ``cand`` in id order, the slots
        after them absent (below every real value)."""
        thr, rem = _block_threshold(key, present, K)
        zero = tl.zeros([], tl.int32)
        _, taken = _compact(key, present, ids, thr, rem, zero, zero, cand, K)
        j = tl.arange(0, KP)
        tl.store(cand + j, tl.full([KP], -9223372036854775808, tl.int64), mask=j >= taken)

    @triton.jit
    def _unpack_candidates(packed):
        """(key, present, id) of packed candidate values (absent: the int64 minimum)."""
        key = (packed >> 32).to(tl.int32)
        present = packed != -9223372036854775808
        return key, present, 2147483647 - (packed & 0x7FFFFFFF).to(tl.int32)

    @triton.jit
    def _select_prefix(row, n, K, out, W: tl.constexpr, KP: tl.constexpr):
        """The whole selection (steps 1-4) of a row's first ``n`` <= W entries in one W-wide block."""
        offs = tl.arange(0, W)
        key, present = _order_keys(row, offs, n)
        _select_sorted(key, present, offs, K, out, KP)

    @triton.jit
    def _topk_split_kernel(s_ptr, len_ptr, c_ptr, o_ptr, cnt_ptr, NE, s_row_stride, K, NSEG,
                           SEG: tl.constexpr, KP: tl.constexpr, CP: tl.constexpr, HAS_LEN: tl.constexpr,
                           HALF: tl.constexpr, PDL: tl.constexpr = False):
        _pdl_begin(PDL)
        r = tl.program_id(0).to(tl.int64)
        p = tl.program_id(1)
        row = s_ptr + r * s_row_stride
        out = o_ptr + r * K
        n = _row_length(len_ptr, r, NE, HAS_LEN)
        offs = p * SEG + tl.arange(0, SEG)
        if n <= SEG:  # the visible row is one segment: its first program finishes it, the rest idle
            if p == 0:
                # a short visible prefix (early in a long context): a block half as wide, when that still
                # gives every thread an element (HALF; replicated lanes would feed the histograms twice)
                if HALF and n <= SEG // 2:
                    _select_prefix(row, n, K, out, SEG // 2, KP)
                else:
                    _select_prefix(row, n, K, out, SEG, KP)
        else:
            # 1. this segment's top k, in id order, as packed values; absent slots below every real value
            key, present = _order_keys(row, offs, n)
            _park_candidates(key, present, offs, K, c_ptr + (r * NSEG + p) * KP, KP)
            tl.debug_barrier()
            prev = tl.atomic_add(cnt_ptr + r, 1, sem="acq_rel", scope="gpu")
            if prev == NSEG - 1:
                # 2. the row's last program: the same selection over every segment's candidates, scanned in
                # segment order (= id order), then sorted
                c = tl.arange(0, CP)
                live = tl.cdiv(n, SEG) * KP  # segments past the visible length parked nothing
                packed = tl.load(c_ptr + r * NSEG * KP + c, mask=c < live, other=-9223372036854775808,
                                 cache_modifier=".cg")
                c_key, c_present, c_ids = _unpack_candidates(packed)
                _select_sorted(c_key, c_present, c_ids, K, out, KP)
                tl.atomic_xchg(cnt_ptr + r, 0)


if HAVE_TRITON:

    @triton.jit
    def _topk_level_kernel(in_ptr, len_ptr, c_ptr, o_ptr, NIN, in_row_stride, K, NSEG,
                           SEG: tl.constexpr, KP: tl.constexpr, PACKED_IN: tl.constexpr, HAS_LEN: tl.constexpr,
                           FINAL: tl.constexpr):
        """One level of the multi-level selection (rows too long for one split): program ``(r, p)`` keeps the
        top k of segment ``p`` of its row, in id order, as packed values at ``c[r, p]``. The first level reads
        the scores (and the row's length), later ones the previous level's packed candidates. FINAL (one
        segment): the selection's ids, sorted, at ``o[r]`` instead."""
        r = tl.program_id(0).to(tl.int64)
        p = tl.program_id(1)
        offs = p * SEG + tl.arange(0, SEG)
        if PACKED_IN:
            packed = tl.load(in_ptr + r * in_row_stride + offs, mask=offs < NIN, other=-9223372036854775808)
            key, present, ids = _unpack_candidates(packed)
        else:
            key, present = _order_keys(in_ptr + r * in_row_stride, offs, _row_length(len_ptr, r, NIN, HAS_LEN))
            ids = offs
        if FINAL:
            _select_sorted(key, present, ids, K, o_ptr + r * K, KP)
        else:
            _park_candidates(key, present, ids, K, c_ptr + (r * NSEG + p) * KP, KP)


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
    seg = split_segment(NE, topk, rows, num_warps)
    if seg:
        nseg = triton.cdiv(NE, seg)
        kp = _np2(topk)
        cand = torch.empty((rows, nseg, kp), dtype=torch.int64, device=scores.device)
        _topk_split_kernel[(rows, nseg)](s, ln, cand, out, _counters(scores.device), NE, s.stride(0), topk, nseg,
                                         SEG=seg, KP=kp, CP=_np2(nseg * kp), HAS_LEN=lengths is not None,
                                         HALF=seg // 2 >= 32 * num_warps, num_warps=num_warps,
                                         **pdl_kwargs(s.device))
        return out.reshape(*lead, topk)
    seg = multi_level_segment(NE, topk, rows, num_warps)
    if seg:
        _multi_level(s, lengths is not None, ln, out, topk, seg, num_warps)
        return out.reshape(*lead, topk)
    _topk_ids_kernel[(rows,)](s, ln, out, NE, s.stride(0), topk, CHUNK=CHUNK, KP=_np2(topk), SINGLE=NE <= CHUNK,
                              HAS_LEN=lengths is not None, num_warps=num_warps, **pdl_kwargs(s.device))
    return out.reshape(*lead, topk)


def split_segment(NE: int, topk: int, rows: int, num_warps: int) -> int | None:
    """Segment width of the split kernel for rows of ``NE`` entries, or None to use one CTA per row:
    ``TUNE["topk_split_seg"]`` (None: off) when a row spans at least two segments, each segment can hold
    k candidates, all of them fit one block (``TUNE["topk_split_max"]``) and the rows are few."""
    seg = TUNE["topk_split_seg"]
    if not seg:
        return None
    seg = _np2(max(int(seg), topk), lo=32 * num_warps)
    nseg = -(-NE // seg)
    if nseg < 2 or rows > SPLIT_MAX_ROWS or nseg * _np2(topk) > TUNE["topk_split_max"]:
        return None
    return seg


def multi_level_segment(NE: int, topk: int, rows: int, num_warps: int) -> int | None:
    """Segment width of the multi-level selection for rows too long for one split (their candidates would
    exceed ``TUNE["topk_split_max"]``, e.g. the indexer at a 1M context: 262144 entries), or None. Each
    level keeps k of every segment, so a segment must hold at least 2k for the levels to shrink."""
    seg = TUNE["topk_split_seg"]
    if not seg or rows > SPLIT_MAX_ROWS:
        return None
    seg = _np2(max(int(seg), 2 * topk), lo=32 * num_warps)
    if 2 * seg > TUNE["topk_split_max"] or -(-NE // seg) * _np2(topk) <= TUNE["topk_split_max"]:
        return None  # candidates of one level would not shrink, or one split does
    return seg


def _multi_level(s: Tensor, has_len: bool, ln: Tensor, out: Tensor, topk: int, seg: int, num_warps: int) -> None:
    """Levels of ``_topk_level_kernel`` over ``seg``-wide segments until the candidates fit one block, then
    the final selection."""
    rows, width = s.shape
    kp = _np2(topk)
    src, packed = s, False
    while True:
        if packed and width <= TUNE["topk_split_max"]:  # the last level: one block, ids out
            blk = _np2(width, lo=32 * num_warps)  # every thread an element: no lane counted twice
            _topk_level_kernel[(rows, 1)](src, ln, src, out, width, src.stride(0), topk, 1, SEG=blk, KP=kp,
                                          PACKED_IN=True, HAS_LEN=False, FINAL=True, num_warps=num_warps)
            return
        nseg = -(-width // seg)
        cand = torch.empty((rows, nseg * kp), dtype=torch.int64, device=s.device)
        _topk_level_kernel[(rows, nseg)](src, ln, cand, out, width, src.stride(0), topk, nseg, SEG=seg, KP=kp,
                                         PACKED_IN=packed, HAS_LEN=has_len and not packed, FINAL=False,
                                         num_warps=num_warps)
        src, packed, width = cand, True, nseg * kp


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
