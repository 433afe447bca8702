"""The KV cache in storage format is lossless: bf16 reference numerics with the packed cache give
bitwise the logits of the same model forced to the dense cache, over a prefill that wraps the window
and completes several compressor windows, then decode steps. Allocated bytes match the formula."""

from __future__ import annotations

import pytest
import torch

from dsv4c.checkpoint import load_checkpoint, to_model_params
from dsv4c.frontend.model import StepContext, constants, step
from dsv4c.layout import (allocated_entry_bytes, cache_tensors, entry_capacity, indexer_entry_bytes,
                          kv_bytes_per_token, main_entry_bytes, window_bytes)
from dsv4c.spec import get_variant
from dsv4c.testing import new_cache


@pytest.fixture(scope="module")
def tiny_params_bf16(tiny_ckpt, tiny_spec):
    return to_model_params(tiny_spec, load_checkpoint(tiny_ckpt, tiny_spec), torch.bfloat16)


def test_storage_decision(tiny_spec):
    assert StepContext(tiny_spec, "reference", torch.bfloat16).kv_storage == "packed"
    assert StepContext(tiny_spec, "reference", torch.float32).kv_storage == "dense"
    assert StepContext(tiny_spec, "exact", torch.bfloat16).kv_storage == "dense"
    assert StepContext(tiny_spec, "reference", torch.bfloat16, kv_storage="dense").kv_storage == "dense"
    with pytest.raises(ValueError, match="packed KV storage needs"):
        StepContext(tiny_spec, "exact", torch.float32, kv_storage="packed")


def test_packed_cache_equals_dense_bitwise(tiny_spec, tiny_params_bf16):
    spec = tiny_spec  # window 16, CSA every 4, HCA every 16
    packed = StepContext(spec, "reference", torch.bfloat16)
    dense = StepContext(spec, "reference", torch.bfloat16, kv_storage="dense")
    assert packed.kv_storage == "packed"
    consts = constants(spec)
    g = torch.Generator().manual_seed(7)
    n_prompt, n_decode, cap = 37, 20, 64
    ids = torch.randint(0, spec.vocab_size, (2, n_prompt + n_decode), generator=g)
    caches = {ctx.kv_storage: new_cache(spec, 2, cap, torch.bfloat16, ctx.kv_storage) for ctx in (packed, dense)}
    assert "b1.ckv_nope" in caches["packed"] and "b1.ikv_codes" in caches["packed"] and "b1.ckv" in caches["dense"]
    out = {}
    for ctx in (packed, dense):
        cache = caches[ctx.kv_storage]
        rows = lambda b: {k: v[b:b + 1] for k, v in cache.items()}  # noqa: E731
        # ragged: sequence 1 starts 5 tokens shorter; prefill slot by slot as the engine does
        lens = [n_prompt, n_prompt - 5]
        logits = [torch.cat([step(ctx, tiny_params_bf16, consts, rows(b), ids[b:b + 1, :lens[b]], torch.tensor([0]))
                             for b in range(2)])]
        for t in range(n_decode):
            nxt = torch.stack([ids[b, lens[b] + t] for b in range(2)])[:, None]
            start = torch.tensor([lens[b] + t for b in range(2)])
            logits.append(step(ctx, tiny_params_bf16, consts, cache, nxt, start))
        out[ctx.kv_storage] = torch.stack(logits)
    assert torch.isfinite(out["dense"]).all()
    assert torch.equal(out["packed"], out["dense"])
    # the packed cache holds exactly the dense cache's entries
    from dsv4c.ops.kv_storage import unpack_fp4_keys, unpack_kv_entries

    cp, cd = caches["packed"], caches["dense"]
    for i in range(spec.num_layers):
        assert torch.equal(unpack_kv_entries(cp[f"b{i}.win_nope"], cp[f"b{i}.win_scale"], cp[f"b{i}.win_rope"]), cd[f"b{i}.win"])
        if f"b{i}.ckv" in cd:
            got = unpack_kv_entries(cp[f"b{i}.ckv_nope"], cp[f"b{i}.ckv_scale"], cp[f"b{i}.ckv_rope"])
            n = (n_prompt - 5 + n_decode) // spec.compress_ratios[i]  # complete windows of the shorter row
            assert torch.equal(got[:, :n], cd[f"b{i}.ckv"][:, :n]) and bool(cd[f"b{i}.ckv"][:, :n].abs().sum() > 0)
        if f"b{i}.ikv" in cd:
            got = unpack_fp4_keys(cp[f"b{i}.ikv_codes"], cp[f"b{i}.ikv_scale"], 32)
            n = (n_prompt - 5 + n_decode) // spec.compress_ratios[i]
            assert torch.equal(got[:, :n], cd[f"b{i}.ikv"][:, :n])


@pytest.mark.parametrize("variant", ["tiny", "flash"])
def test_allocated_bytes_per_token_equal_the_formula(variant):
    spec = get_variant(variant)
    max_seq = 4096
    lay = cache_tensors(spec, 1, max_seq, torch.bfloat16, storage="packed")  # shapes only, nothing allocated
    per_entry = allocated_entry_bytes(lay)
    per_tok = 0.0
    for i in range(spec.num_layers):
        assert per_entry[f"b{i}.win"] == main_entry_bytes(spec)
        m = spec.compress_ratios[i]
        if f"b{i}.ckv" in per_entry:
            assert per_entry[f"b{i}.ckv"] == main_entry_bytes(spec)
            per_tok += per_entry[f"b{i}.ckv"] / m
            # capacity: every complete window plus one open slot
            assert lay[f"b{i}.ckv_nope"].shape[1] == entry_capacity(max_seq, m)
        if f"b{i}.ikv" in per_entry:
            assert per_entry[f"b{i}.ikv"] == indexer_entry_bytes(spec)
            per_tok += per_entry[f"b{i}.ikv"] / m
    assert per_tok == kv_bytes_per_token(spec)
    win = sum(t.nbytes for k, t in lay.items() if ".win_" in k)
    assert win == window_bytes(spec)
    if variant == "flash":
        assert main_entry_bytes(spec) == 584 and indexer_entry_bytes(spec) == 68
    if variant == "tiny":  # allocate it too
        cache = new_cache(spec, 1, max_seq, torch.bfloat16, "packed")
        assert sum(t.nbytes for k, t in cache.items() if ".win_" in k) == window_bytes(spec)
