"""Reference numerics: token-by-token decode reproduces a fresh prefill over the same tokens."""

import torch

from dsv4c.frontend.model import StepContext, constants, step

from dsv4c.testing import new_cache, rel_err

# Positions past the window wrap (16), CSA completions (every 4), HCA completions (every 16).
CHECK_AT = [3, 15, 16, 17, 31, 47, 63, 64, 95, 99]


def test_token_by_token_decode_equals_prefill(tiny_spec, tiny_params_fp32):
    """100 single-token steps reproduce a fresh prefill over the same tokens (exact numerics: the cache
    state carried across every step). In reference numerics a long run is not comparable this tightly: the
    FP8/FP4 roundings and the top-k choices (indexer entries, experts) are discrete, so a last-ulp difference
    between the GEMV and GEMM summation orders (which varies with the CPU's vector ISA) can flip one and
    the flip persists in the cache; the test below checks reference numerics one step at a time."""
    spec = tiny_spec
    ctx = StepContext(spec, "exact", torch.float32)
    consts = constants(spec)
    ids = torch.randint(0, spec.vocab_size, (1, 100), generator=torch.Generator().manual_seed(1))
    cache = new_cache(spec, 1, 256, torch.float32)
    decoded = {}
    for t in range(100):
        logits = step(ctx, tiny_params_fp32, consts, cache, ids[:, t:t + 1], torch.tensor([t]))
        decoded[t] = logits
    for t in CHECK_AT:
        fresh = step(ctx, tiny_params_fp32, consts, new_cache(spec, 1, 256, torch.float32), ids[:, :t + 1],
                     torch.tensor([0]))
        assert rel_err(decoded[t], fresh) <= 1e-5, f"position {t}"


def test_decode_step_equals_prefill_in_reference_numerics(tiny_spec, tiny_params_fp32):
    """Reference numerics: decoding token t into the cache a prefill of tokens [0, t) wrote gives the logits
    of a prefill of tokens [0, t] (window wrap, CSA and HCA completions among the positions)."""
    spec = tiny_spec
    ctx = StepContext(spec, "reference", torch.float32)
    consts = constants(spec)
    ids = torch.randint(0, spec.vocab_size, (1, 100), generator=torch.Generator().manual_seed(1))
    for t in CHECK_AT:
        cache = new_cache(spec, 1, 256, torch.float32)
        step(ctx, tiny_params_fp32, consts, cache, ids[:, :t], torch.tensor([0]))
        decoded = step(ctx, tiny_params_fp32, consts, cache, ids[:, t:t + 1], torch.tensor([t]))
        fresh = step(ctx, tiny_params_fp32, consts, new_cache(spec, 1, 256, torch.float32), ids[:, :t + 1],
                     torch.tensor([0]))
        assert rel_err(decoded, fresh) <= 1e-5, f"position {t}"


def test_chunked_prefill_and_batched_ragged_decode(tiny_spec, tiny_params_fp32):
    """Two sequences at different positions decode together; a prompt prefilled in two chunks equals one."""
    spec = tiny_spec
    ctx = StepContext(spec, "reference", torch.float32)
    consts = constants(spec)
    g = torch.Generator().manual_seed(2)
    a = torch.randint(0, spec.vocab_size, (1, 40), generator=g)
    b = torch.randint(0, spec.vocab_size, (1, 23), generator=g)
    cache = new_cache(spec, 2, 128, torch.float32)
    rows = lambda i: {k: v[i:i + 1] for k, v in cache.items()}  # noqa: E731
    step(ctx, tiny_params_fp32, consts, rows(0), a[:, :17], torch.tensor([0]))
    step(ctx, tiny_params_fp32, consts, rows(0), a[:, 17:39], torch.tensor([17]))  # second chunk
    step(ctx, tiny_params_fp32, consts, rows(1), b[:, :22], torch.tensor([0]))
    both = step(ctx, tiny_params_fp32, consts, cache, torch.cat([a[:, 39:40], b[:, 22:23]]), torch.tensor([39, 22]))
    for row, seq in ((0, a), (1, b)):
        fresh = step(ctx, tiny_params_fp32, consts, new_cache(spec, 1, 128, torch.float32), seq, torch.tensor([0]))
        assert rel_err(both[row:row + 1], fresh) <= 1e-3
