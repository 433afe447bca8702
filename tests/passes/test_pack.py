"""pack_fp4_experts: the packed tensors unpack to the checkpoint's bytes; layout and bytes are recorded."""

from __future__ import annotations

import pytest
import torch

from dsv4c.frontend.model import StepContext
from dsv4c.ops.fused import pack_fp4_tiled, ue8m0_encode, unpack_fp4_tiled
from passes_helpers import passes_only, run

COMBO = ("reference", "bf16", "prefill")


@pytest.mark.parametrize("target,tile", [("cpu", (16, 64)), ("h100", (128, 128))])
def test_unpacking_gives_back_the_checkpoint_bytes(target, tile, traced, tiny_params, tiny_ckpt_tensors, tiny_spec):
    ctx = StepContext(tiny_spec, "reference", torch.bfloat16)
    progs, w, records = passes_only({"prefill": traced(*COMBO)}, tiny_params("bf16"), ctx, {"pack_fp4_experts"},
                                    target=target)
    rec = next(r for r in records if r["name"] == "pack_fp4_experts")
    tensors = rec["layout"]["tensors"]
    E = tiny_spec.n_routed_experts
    assert len(tensors) == 3 * tiny_spec.num_layers
    before = after = 0
    for old, lay in tensors.items():
        assert (lay["bn"], lay["bk"]) == tile
        pw, ps = w[lay["weight"]], w[lay["scale"]]
        assert pw.dtype == ps.dtype == torch.uint8
        assert list(pw.shape) == lay["weight_shape"] and list(ps.shape) == lay["scale_shape"]
        assert old not in w and lay["from"][1] not in w  # the checkpoint-layout tensors left the table
        uw, us = unpack_fp4_tiled(pw, ps)
        block, mat = old.split(".ffn.experts.")  # "layers.N", "w1.weight"
        for e in range(E):
            ck_w = tiny_ckpt_tensors[f"{block}.ffn.experts.{e}.{mat}"]
            ck_s = tiny_ckpt_tensors[f"{block}.ffn.experts.{e}.{mat.replace('weight', 'scale')}"]
            assert torch.equal(uw[e].view(torch.uint8), ck_w.view(torch.uint8))
            assert torch.equal(us[e], ck_s.float())
        before += lay["bytes_before"]
        after += lay["bytes_after"]
        n = E * lay["N"] * lay["K"]
        assert lay["bytes_before"] == n // 2 + n // 32 * 4 and lay["bytes_after"] == n // 2 + n // 32
    assert (rec["bytes_before"], rec["bytes_after"]) == (before, after)
    # the graph reads only the packed parameters
    names = progs["prefill"].param_names
    assert not any(n.endswith((".ffn.experts.w1.weight", ".ffn.experts.w1.scale")) for n in names)
    assert sum(n.endswith(".packed_weight") for n in names) == 3 * tiny_spec.num_layers


def test_pack_roundtrip_every_byte_and_exponent():
    gen = torch.Generator().manual_seed(0)
    E, N, K = 3, 32, 256
    w = torch.randint(0, 256, (E, N, K // 2), generator=gen, dtype=torch.uint8)
    w[0, 0, :] = torch.arange(128, dtype=torch.uint8)
    w[0, 1, :] = torch.arange(128, 256, dtype=torch.uint8)
    exps = torch.randint(-127, 128, (E, N, K // 32), generator=gen)
    exps[0, 0, :2] = torch.tensor([-127, 127])
    s = torch.exp2(exps.float())
    for bn, bk in [(1, 2), (8, 64), (32, 256), (16, 128)]:
        pw, ps = pack_fp4_tiled(w, s, bn, bk)
        assert pw.shape == (E, N // bn, K // bk, bn, bk // 2)
        uw, us = unpack_fp4_tiled(pw, ps)
        assert torch.equal(uw, w) and torch.equal(us, s)


def test_scales_that_are_not_powers_of_two_are_refused():
    with pytest.raises(ValueError):
        ue8m0_encode(torch.tensor([1.0, 0.75]))
    with pytest.raises(ValueError):
        ue8m0_encode(torch.tensor([2.0**-130]))
    with pytest.raises(ValueError):
        pack_fp4_tiled(torch.zeros(1, 16, 32, dtype=torch.uint8), torch.zeros(1, 16, 2), 16, 48)


def test_pass_leaves_a_weight_with_bad_scales_unpacked(traced, tiny_params, tiny_spec, baseline):
    ctx, inputs, ref, _ = baseline(COMBO)
    weights = dict(tiny_params("bf16"))
    bad = "layers.2.ffn.experts.w2.scale"
    weights[bad] = weights[bad] * 0.75
    ref_progs, w_ref, _ = passes_only({"prefill": traced(*COMBO)}, weights, ctx, set())
    progs, w, records = passes_only({"prefill": traced(*COMBO)}, weights, ctx, {"pack_fp4_experts"})
    rec = next(r for r in records if r["name"] == "pack_fp4_experts")
    assert rec["matches"]["prefill"] == 3 * tiny_spec.num_layers - 1
    assert "layers.2.ffn.experts.w2.weight" in rec["notes"] and bad in w
    got, _ = run(progs["prefill"], w, ctx, inputs)
    want, _ = run(ref_progs["prefill"], w_ref, ctx, inputs)
    assert torch.equal(got, want)
