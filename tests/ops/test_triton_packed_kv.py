"""The Triton kernels that read the KV cache in its storage format, under Triton's interpreter.

``sparse_attn_packed`` (compressed entries as e4m3 nope bytes + ue8m0 scale bytes + bf16 rope) and
``indexer_score_packed`` / ``indexer_topk_packed`` (indexer keys as e2m1 nibbles + ue8m0 scale bytes) against
the dense reference ops applied to the dequantized cache. The storage format is built here from its
definition (MODEL-SEMANTICS section 7; ``dsv4c.ops.kv_storage``), so these tests do not depend on that
module; where its ops are defined, the packing and the reference ops are checked against it as well.

Runs on CPU tensors with TRITON_INTERPRET=1 (set here when no GPU is present, before triton is imported).
"""

from __future__ import annotations

import math

import pytest
import torch

from kernel_checks import check, gen, interpreted_triton_kernels

tk = interpreted_triton_kernels()

from dsv4c import quant  # noqa: E402

try:
    from dsv4c.ops import kv_storage  # noqa: F401  (the storage-format ops, where they exist)
except ModuleNotFoundError:
    kv_storage = None


ops = torch.ops.dsv4
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")


def _has_op(name: str) -> bool:
    return tk._op_defined(name)


# ---- the storage format, from its definition ---------------------------------------------------------

def _ue8m0_byte(s: torch.Tensor) -> torch.Tensor:
    return (torch.log2(s).round().to(torch.int64) + 127).to(torch.uint8)


def _byte_scale(b: torch.Tensor) -> torch.Tensor:
    return torch.exp2(b.to(torch.float32) - 127)


def kv_pack(e: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """bf16 [..., c] -> (e4m3 [..., c-r], ue8m0 bytes [..., S8] (one per 64, padding 127), bf16 rope [..., r])."""
    nope = e[..., :-r].float()
    nb = nope.shape[-1] // 64
    blk = nope.unflatten(-1, (nb, 64))
    s = quant.block_scale(blk.abs().amax(-1, keepdim=True), 448.0, 1e-4, True)
    codes = torch.clamp(blk / s, -448.0, 448.0).to(torch.float8_e4m3fn).flatten(-2)
    s8 = math.ceil(nb / 8) * 8
    sc = torch.full((*e.shape[:-1], s8), 127, dtype=torch.uint8)
    sc[..., :nb] = _ue8m0_byte(s.squeeze(-1))
    return codes, sc, e[..., -r:].to(torch.bfloat16).clone()


def kv_unpack(nope: torch.Tensor, sc: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    nb = nope.shape[-1] // 64
    vals = nope.float().unflatten(-1, (nb, 64)) * _byte_scale(sc[..., :nb])[..., None]
    return torch.cat((vals.flatten(-2), rope.float()), dim=-1).to(torch.bfloat16)


def fp4_pack(e: torch.Tensor, block: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 [..., d] -> (uint8 [..., d/2] two e2m1 codes per byte, low nibble = even; ue8m0 bytes [..., d/block])."""
    blk = e.float().unflatten(-1, (e.shape[-1] // block, block))
    s = quant.block_scale(blk.abs().amax(-1, keepdim=True), 6.0, quant.FP4_AMAX_FLOOR, True)
    codes = quant.e2m1_code(torch.clamp(blk / s, -6.0, 6.0)).flatten(-2)
    return quant.pack_fp4(codes), _ue8m0_byte(s.squeeze(-1))


def fp4_unpack(codes: torch.Tensor, sc: torch.Tensor, block: int = 32) -> torch.Tensor:
    return quant.dequantize_fp4_weight(codes, _byte_scale(sc), block).to(torch.bfloat16)


def _entries(B, E, C, seed):
    """bf16 entries with magnitudes spread over the 64-blocks (different scales per block and entry)."""
    g = gen(seed)
    e = torch.randn(B, E, C, generator=g)
    e = e * torch.exp2(torch.randint(-6, 4, (B, E, C // 64, 1), generator=g).float()).repeat_interleave(64, -2)[..., 0]
    e[0, 1] = 0.0  # all-zero entry: amax floor
    return e.bfloat16()


def test_pack_helpers_match_kv_storage():
    """The packing built here is the one of dsv4c.ops.kv_storage (when that module has landed)."""
    e = _entries(2, 7, 512, 1)  # Flash dims: 448 nope (7 scale bytes, padded to 8) + 64 rope
    nope, sc, rope = kv_pack(e, 64)
    assert nope.shape[-1] == 448 and sc.shape[-1] == 8 and bool((sc[..., 7] == 127).all())
    assert nope.numel() + sc.numel() + 2 * rope.numel() == 2 * 7 * 584
    assert torch.equal(kv_unpack(nope, sc, rope),
                       torch.cat((quant.fp8_qdq(e[..., :-64], 64, True), e[..., -64:]), dim=-1))
    k = _entries(2, 7, 128, 2)
    codes, ks = fp4_pack(k)
    assert codes.shape[-1] + ks.shape[-1] == 68
    assert torch.equal(fp4_unpack(codes, ks), quant.fp4_qdq(k, 32))
    if not _has_op("kv_pack"):
        pytest.skip("dsv4::kv_pack is not defined yet (dsv4c.ops.kv_storage)")
    for mine, theirs in zip((nope, sc, rope), ops.kv_pack(e, 64)):
        assert mine.dtype == theirs.dtype and torch.equal(mine.view(torch.uint8), theirs.view(torch.uint8))
    assert torch.equal(ops.kv_unpack(nope, sc, rope), kv_unpack(nope, sc, rope))
    if _has_op("fp4_pack"):
        for mine, theirs in zip((codes, ks), ops.fp4_pack(k, 32)):
            assert torch.equal(mine, theirs)
        assert torch.equal(ops.fp4_unpack(codes, ks, 32), fp4_unpack(codes, ks))


# ---- sparse attention over packed compressed entries ------------------------------------------------------

def _attn_case(B, S, seed, dtype, H=2, C=128, R=64, NW=16, E=40, KC=8):
    g = gen(seed)
    q = torch.randn(B, S, H, C, generator=g).to(dtype)
    win = (torch.randn(B, NW, C, generator=g) * 2).to(dtype)
    mask = torch.rand(B, S, NW, generator=g) < 0.6
    comp = _entries(B, E, C, seed + 1)
    idx = torch.randint(-1, E, (B, S, KC), generator=g)  # -1 = none
    idx[0, 0] = -1  # this row sees no compressed entry
    if S > 1:
        mask[-1, 1] = False
        idx[-1, 1] = -1  # nothing visible at all: output 0
    else:
        mask[-1, 0, : NW // 2] = False
    sink = torch.randn(H, generator=g)
    return q, win, mask, comp, idx, sink, C**-0.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("S,kv_split", [(1, 1), (1, 3), (5, None)])
def test_sparse_attn_packed(dtype, S, kv_split):
    q, win, mask, comp, idx, sink, scale = _attn_case(2, S, 40 + S, dtype)
    nope, sc, rope = kv_pack(comp, 64)
    ref = ops.sparse_attn(q, win, mask, kv_unpack(nope, sc, rope), idx, sink, scale)
    out = tk.sparse_attn_packed(q, win, mask, nope, sc, rope, idx, sink, scale, block_n=8, kv_split=kv_split)
    check(out, ref)
    if S > 1:
        assert not out[1, 1].float().any()
    if _has_op("sparse_attn_packed"):
        check(out, ops.sparse_attn_packed(q, win, mask, nope, sc, rope, idx, sink, scale))


def test_sparse_attn_packed_strided_cache_and_nope_blocks():
    """Cache tensors as slices of a larger buffer (no copy), two 64-blocks of nope dims (c = 192, r = 64)."""
    B, S, H, C, R, E, EMAX = 2, 2, 3, 192, 64, 24, 32
    q, win, mask, _, idx, sink, scale = _attn_case(B, S, 50, torch.bfloat16, H=H, C=C, R=R, E=E, KC=6)
    comp = _entries(B, EMAX, C, 51)
    nope_all, sc_all, rope_all = kv_pack(comp, R)
    nope, sc, rope = nope_all[:, :E], sc_all[:, :E], rope_all[:, :E]
    assert not nope.is_contiguous()
    ref = ops.sparse_attn(q, win, mask, kv_unpack(nope, sc, rope), idx, sink, scale)
    check(tk.sparse_attn_packed(q, win, mask, nope, sc, rope, idx, sink, scale, block_n=8), ref)


def test_sparse_attn_packed_no_compressed_entries():
    q, win, mask, _, _, sink, scale = _attn_case(1, 2, 60, torch.float32)
    nope = torch.zeros(1, 0, 64, dtype=torch.float8_e4m3fn)
    sc = torch.zeros(1, 0, 8, dtype=torch.uint8)
    rope = torch.zeros(1, 0, 64, dtype=torch.bfloat16)
    idx = torch.full((1, 2, 0), -1, dtype=torch.int64)
    ref = ops.sparse_attn(q, win, mask, torch.zeros(1, 0, 128), idx, sink, scale)
    check(tk.sparse_attn_packed(q, win, mask, nope, sc, rope, idx, sink, scale), ref)


def test_dense_sparse_attn_unchanged():
    """The dense path of the shared kernel still matches the reference (PACKED is a compile-time switch)."""
    q, win, mask, comp, idx, sink, scale = _attn_case(2, 1, 70, torch.bfloat16)
    ref = ops.sparse_attn(q, win, mask, comp, idx, sink, scale)
    check(tk.sparse_attn(q, win, mask, comp, idx, sink, scale, block_n=8, kv_split=2), ref)


# ---- lightning indexer over FP4 keys -----------------------------------------------------------------------

def _indexer_case(B, S, seed, dtype, nI=4, dI=128, E=40):
    g = gen(seed)
    q = torch.randn(B, S, nI, dI, generator=g)
    k = torch.randn(B, E, dI, generator=g)
    k = k * torch.exp2(torch.randint(-4, 3, (B, E, dI // 32, 1), generator=g).float()).repeat_interleave(32, -2)[..., 0]
    q[..., 0] += 3.0  # mostly positive dots: few scores clamp to exactly 0 (no ties in the top-k)
    k[..., 0] += 3.0
    w = torch.rand(B, S, nI, generator=g) + 0.1
    codes, ks = fp4_pack(k.bfloat16())
    return q.to(dtype), codes, ks, w


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("S", [1, 5])
def test_indexer_score_packed(dtype, S):
    q, codes, ks, w = _indexer_case(2, S, 80 + S, dtype)
    w[0, 0, 1] = -0.5  # a negative head weight
    ref = ops.indexer_score(q, fp4_unpack(codes, ks), w)
    out = tk.indexer_score_packed(q, codes, ks, w, block_e=16)
    check(out, ref)
    if _has_op("indexer_score_packed"):
        check(out, ops.indexer_score_packed(q, codes, ks, w))


@pytest.mark.parametrize("S", [1, 5])
def test_indexer_score_packed_visible(S):
    """The op's optional visible counts: -inf past each token's count, the rest as without them."""
    q, codes, ks, w = _indexer_case(2, S, 160 + S, torch.bfloat16, E=40)
    visible = torch.tensor([[17], [3]]) if S == 1 else torch.tensor([[0, 1, 8, 33, 40], [3, 20, 33, 17, 0]])
    ref = ops.indexer_score(q, fp4_unpack(codes, ks), w).masked_fill(torch.arange(40) >= visible[..., None],
                                                                     float("-inf"))
    check(tk.indexer_score_packed(q, codes, ks, w, visible, block_e=16), ref)
    if _has_op("indexer_score_packed"):
        check(ops.indexer_score_packed(q, codes, ks, w, visible), ref)


def test_indexer_score_packed_strided_keys():
    q, codes_all, ks_all, w = _indexer_case(2, 3, 90, torch.bfloat16, E=48)
    codes, ks = codes_all[:, :33], ks_all[:, :33]
    check(tk.indexer_score_packed(q, codes, ks, w), ops.indexer_score(q, fp4_unpack(codes, ks), w))


@pytest.fixture
def token_kernel(monkeypatch):
    """The prefill indexer's token-block kernel on (``TUNE["indexer_prefill_tokens"]``)."""
    monkeypatch.setitem(tk.TUNE, "indexer_prefill_tokens", True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("S,bt", [(5, 2), (9, 4), (3, 1)])
def test_indexer_score_packed_token_kernel(token_kernel, dtype, S, bt):
    """BT tokens x all heads per dot (S not a multiple of BT, E not a multiple of the key step, 5 heads padded
    to 16 rows each): the reference's scores, and the decode-shaped kernel's (the switch off)."""
    q, codes, ks, w = _indexer_case(2, S, 140 + S, dtype, nI=5, E=45)
    w[1, -1, 3] = -0.75  # a negative head weight in the last (partial) token block
    ref = ops.indexer_score(q, fp4_unpack(codes, ks), w)
    out = tk.indexer_score_packed(q, codes, ks, w, block_s=bt, block_e=16)
    check(out, ref)
    tk.TUNE["indexer_prefill_tokens"] = False
    check(out, tk.indexer_score_packed(q, codes, ks, w, block_e=16))


def test_indexer_score_packed_token_kernel_visible(token_kernel):
    """With visible counts: -inf past each token's count, key steps past the block's last visible entry never
    read (garbage bytes there), and the top-k over these scores as the reference's."""
    q, codes, ks, w = _indexer_case(2, 5, 150, torch.bfloat16, E=48)
    visible = torch.tensor([[0, 1, 9, 16, 3], [30, 2, 31, 7, 0]])
    codes[0, 16:] = 0x77  # batch 0 sees at most 16 entries: its key steps 16.. are never decoded
    ks[0, 16:] = 255
    out = tk._indexer_score_packed_launch(q, codes, ks, w, visible, 2, 16, None)
    clean = ks.clone()
    clean[0, 16:] = 127
    ref = ops.indexer_score(q, fp4_unpack(codes, clean), w)
    ref = ref.masked_fill(torch.arange(48) >= visible[..., None], float("-inf"))
    check(out, ref)
    want, _ = _topk_ref(q, codes, clean, w, visible, 8)
    assert torch.equal(tk.indexer_topk_packed(q, codes, ks, w, visible, 8, block_s=2, block_e=16), want)


def _topk_ref(q, codes, ks, w, visible, topk):
    scores = ops.indexer_score(q, fp4_unpack(codes, ks), w)
    ent = torch.arange(codes.shape[1])
    scores = scores.masked_fill(ent >= visible[..., None], float("-inf"))
    vals, idx = torch.topk(scores, topk, dim=-1)
    return torch.where(torch.isinf(vals), torch.full_like(idx, -1), idx), vals


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("S", [1, 5])
def test_indexer_topk_packed(dtype, S):
    B, E, topk = 2, 40, 8
    q, codes, ks, w = _indexer_case(B, S, 100 + S, dtype, E=E)
    if S == 1:
        visible = torch.tensor([[5], [37]])  # fewer than topk visible; most visible
    else:
        visible = torch.tensor([[0, 1, 8, 9, 40], [3, 20, 33, 17, 0]])  # none, one, exactly topk, ...
    ref, vals = _topk_ref(q, codes, ks, w, visible, topk)
    out = tk.indexer_topk_packed(q, codes, ks, w, visible, topk, block_e=16)
    assert out.shape == ref.shape and out.dtype == torch.int64
    assert torch.equal(out == -1, ref == -1)
    fin = vals[torch.isfinite(vals)]
    assert fin.numel() and bool((fin > 0).all()) and fin.unique().numel() == fin.numel()  # no ties
    assert torch.equal(out, ref)
    if _has_op("indexer_topk_packed"):
        assert torch.equal(out, ops.indexer_topk_packed(q, codes, ks, w, visible, topk))


def test_indexer_topk_packed_skips_invisible_tiles_and_short_cache():
    """Entries past every visible count are -inf without being read (garbage bytes there), and topk > E pads -1."""
    q, codes, ks, w = _indexer_case(1, 2, 110, torch.bfloat16, E=48)
    visible = torch.tensor([[10, 14]])
    codes[:, 16:] = 0x77  # tiles 16.. (block_e = 16) are past every visible count: never decoded
    ks[:, 16:] = 255  # would decode to inf / nan
    ref, _ = _topk_ref(q, codes[:, :16], ks[:, :16], w, visible, 8)
    out = tk.indexer_topk_packed(q, codes, ks, w, visible, 8, block_e=16)
    assert torch.equal(out, ref)
    short = tk.indexer_topk_packed(q, codes[:, :6], ks[:, :6], w, visible, 8, block_e=16)
    assert short.shape == (1, 2, 8) and bool((short[..., 6:] == -1).all())
    assert torch.equal(short[..., :6].sort(-1).values, torch.arange(6).expand(1, 2, 6))


def test_register_packed_ops():
    """Registration never fails; the packed ops get CUDA impls exactly when dsv4c.ops.kv_storage defines them."""
    assert tk.register_cuda_kernels() is True
    for name in tk._OPTIONAL_OPS:
        if _has_op(name):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"dsv4::{name}", "CUDA"), name
