"""FP8/FP4 codecs: bit-exact against torch's float8_e4m3fn and a table-driven e2m1 decode."""

import torch

from dsv4c import quant


def test_fp8_weight_roundtrip_is_bit_exact_against_torch_e4m3():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, 260, generator=g) * 3
    q, s = quant.quantize_fp8_weight(w)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (3, 3)
    # scales are powers of two (ue8m0)
    assert torch.equal(torch.exp2(torch.log2(s).round()), s)
    # every stored value is exactly torch's e4m3 rounding of w / scale
    sf = s.repeat_interleave(128, 0)[:300].repeat_interleave(128, 1)[:, :260]
    expect = torch.clamp(w / sf, -448, 448).to(torch.float8_e4m3fn)
    assert torch.equal(q.view(torch.uint8), expect.view(torch.uint8))
    assert torch.equal(quant.dequantize_fp8_weight(q, s), expect.float() * sf)


def test_fp8_qdq_scale_rule_and_values():
    x = torch.tensor([[0.0] * 63 + [896.0], [1e-9] * 64])
    y = quant.fp8_qdq(x, 64)
    # amax 896 -> scale 2^ceil(log2(896/448)) = 2 -> 896 representable exactly
    assert y[0, -1].item() == 896.0
    # tiny block: amax floored at 1e-4 -> values round to 0 or a tiny e4m3 multiple
    assert torch.all(y[1].abs() <= 1e-4)
    z = torch.randn(4, 128, generator=torch.Generator().manual_seed(1))
    s = torch.exp2(torch.ceil(torch.log2(z.abs().amax(-1, keepdim=True).clamp(min=1e-4) / 448)))
    assert torch.equal(quant.fp8_qdq(z, 128), (z / s).to(torch.float8_e4m3fn).float() * s)


def test_e2m1_table_decode_and_round_to_nearest_even():
    codes = torch.arange(16)
    table = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    expect = torch.tensor(table + [-v for v in table])
    assert torch.equal(quant.e2m1_decode(codes), expect)
    # ties go to the even code: 0.25->0, 0.75->1, 1.25->1, 1.75->2, 2.5->2, 3.5->4, 5->4
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -5.0, 0.26, 5.01])
    assert quant.e2m1_round(x).tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -0.0, -4.0, 0.5, 6.0]
    # the arithmetic rounding equals decode(code) everywhere on a fine grid
    grid = torch.linspace(-6, 6, 4801)
    assert torch.equal(quant.e2m1_round(grid), quant.e2m1_decode(quant.e2m1_code(grid)))


def test_fp4_packing_roundtrips_and_low_nibble_is_even_element():
    codes = torch.randint(0, 16, (5, 64), generator=torch.Generator().manual_seed(2))
    packed = quant.pack_fp4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 32)
    assert torch.equal(packed[:, 0] & 0xF, codes[:, 0].to(torch.uint8))
    assert torch.equal(quant.unpack_fp4(packed), codes)
    assert torch.equal(quant.unpack_fp4(packed.view(torch.int8)), codes)


def test_fp4_weight_quantization_matches_fp4_qdq():
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(3))
    packed, s = quant.quantize_fp4_weight(w)
    assert torch.equal(quant.dequantize_fp4_weight(packed, s), quant.fp4_qdq(w, 32))
    assert torch.equal(torch.exp2(torch.log2(s).round()), s)


def test_hadamard_is_orthonormal_and_symmetric():
    h = quant.hadamard_matrix(128)
    assert torch.allclose(h @ h, torch.eye(128), atol=1e-6)
    assert torch.equal(h, h.t())
