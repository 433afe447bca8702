"""The KV storage-format codecs are lossless against the reference quant-dequant simulations, and the
packed attention / indexer ops equal the dense ones on the unpacked entries (bitwise)."""

from __future__ import annotations

import torch

import dsv4c.ops  # noqa: F401
from dsv4c.ops.kv_storage import kv_scale_bytes

dsv4 = torch.ops.dsv4


def _values(shape, seed: int) -> torch.Tensor:
    """bf16 values spanning many magnitudes, with zero blocks, exact zeros, negatives and huge values."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.exp2(torch.randint(-30, 30, shape, generator=g).float())
    x[..., :64] = 0.0  # a zero block (amax floor)
    x[..., 64:70] = -x[..., 64:70].abs()
    flat = x.view(-1)
    flat[7::13] = 0.0
    flat[11::97] = 3.0e38 * torch.sign(torch.randn(flat[11::97].shape, generator=g))
    flat[5::101] = 1e-30
    return x.to(torch.bfloat16)


def test_kv_pack_roundtrip_equals_fp8_qdq_bitwise():
    for c, r in ((128, 64), (512, 64), (256, 64)):
        e = _values((3, 5, c), seed=c)
        nope, scale, rope = dsv4.kv_pack(e, r)
        assert nope.dtype == torch.float8_e4m3fn and nope.shape == (3, 5, c - r)
        assert scale.dtype == torch.uint8 and scale.shape == (3, 5, kv_scale_bytes(c - r))
        assert rope.dtype == torch.bfloat16 and rope.shape == (3, 5, r)
        nb = (c - r) // 64
        assert bool((scale[..., nb:] == 127).all())  # padding bytes
        back = dsv4.kv_unpack(nope, scale, rope)
        want = torch.cat((dsv4.fp8_qdq(e[..., :-r], 64, True), e[..., -r:]), dim=-1)
        assert back.dtype == torch.bfloat16
        assert torch.equal(back.view(torch.int16), want.view(torch.int16))  # bitwise, sign of zero included


def test_kv_pack_of_a_qdq_value_is_the_same_value():
    e = _values((4, 512), seed=3)
    q = dsv4.kv_unpack(*dsv4.kv_pack(e, 64))
    assert torch.equal(dsv4.kv_unpack(*dsv4.kv_pack(q, 64)), q)


def test_kv_entry_bytes_flash_dims():
    e = torch.zeros(1, 512, dtype=torch.bfloat16)
    parts = dsv4.kv_pack(e, 64)
    assert sum(p.shape[-1] * p.element_size() for p in parts) == 584


def test_fp4_pack_roundtrip_equals_fp4_qdq_bitwise():
    for d in (32, 128, 256):
        e = _values((2, 7, d), seed=d) if d >= 128 else torch.randn(2, 7, d).to(torch.bfloat16)
        codes, scale = dsv4.fp4_pack(e, 32)
        assert codes.dtype == torch.uint8 and codes.shape == (2, 7, d // 2)
        assert scale.dtype == torch.uint8 and scale.shape == (2, 7, d // 32)
        back = dsv4.fp4_unpack(codes, scale, 32)
        want = dsv4.fp4_qdq(e, 32)
        assert back.dtype == torch.bfloat16
        assert torch.equal(back, want)
        assert torch.equal(back.view(torch.int16) & 0x7FFF, want.view(torch.int16) & 0x7FFF)
    assert sum(p.shape[-1] for p in dsv4.fp4_pack(torch.ones(1, 128, dtype=torch.bfloat16), 32)) == 68


def test_fp4_nibble_order():
    e = torch.tensor([[1.0, -6.0] + [0.0] * 30], dtype=torch.bfloat16)  # amax 6 -> scale 1
    codes, scale = dsv4.fp4_pack(e, 32)
    assert int(scale[0, 0]) == 127
    assert int(codes[0, 0]) == (2 | (15 << 4))  # low nibble = element 0 (1.0 -> code 2), high = -6 (code 15)


def test_packed_attention_and_indexer_equal_dense():
    g = torch.Generator().manual_seed(0)
    B, S, H, c, r, E, Nw, K = 2, 3, 4, 128, 64, 9, 5, 4
    q = torch.randn(B, S, H, c, generator=g).to(torch.bfloat16)
    win = torch.randn(B, Nw, c, generator=g).to(torch.bfloat16)
    win_mask = torch.rand(B, S, Nw, generator=g) > 0.3
    comp = torch.randn(B, E, c, generator=g).to(torch.bfloat16)
    idx = torch.randint(-1, E, (B, S, K), generator=g)
    sink = torch.randn(H, generator=g)
    packed = dsv4.kv_pack(comp, r)
    dense = dsv4.kv_unpack(*packed)
    got = dsv4.sparse_attn_packed(q, win, win_mask, *packed, idx, sink, c ** -0.5)
    assert torch.equal(got, dsv4.sparse_attn(q, win, win_mask, dense, idx, sink, c ** -0.5))

    nI, dI = 3, 128
    qi = dsv4.fp4_qdq(torch.randn(B, S, nI, dI, generator=g).to(torch.bfloat16), 32)
    keys = torch.randn(B, E, dI, generator=g).to(torch.bfloat16)
    w = torch.randn(B, S, nI, generator=g)
    kc, ks = dsv4.fp4_pack(keys, 32)
    kd = dsv4.fp4_unpack(kc, ks, 32)
    assert torch.equal(dsv4.indexer_score_packed(qi, kc, ks, w), dsv4.indexer_score(qi, kd, w))
    visible = torch.randint(0, E + 1, (B, S), generator=g)
    assert torch.equal(dsv4.indexer_topk_packed(qi, kc, ks, w, visible, 4), dsv4.indexer_topk(qi, kd, w, visible, 4))


def test_fake_impls_trace():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        e = torch.empty(2, 6, 512, dtype=torch.bfloat16)
        n, s, r = dsv4.kv_pack(e, 64)
        assert (n.shape, s.shape, r.shape) == ((2, 6, 448), (2, 6, 8), (2, 6, 64))
        assert dsv4.kv_unpack(n, s, r).shape == (2, 6, 512)
        c, sc = dsv4.fp4_pack(torch.empty(2, 6, 128, dtype=torch.bfloat16), 32)
        assert (c.shape, sc.shape) == ((2, 6, 64), (2, 6, 4))
        assert dsv4.fp4_unpack(c, sc, 32).shape == (2, 6, 128)
