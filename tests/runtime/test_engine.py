"""The runtime serves an eager artifact exactly like the project's eager reference."""

import pytest
import torch

from dsv4c.frontend.model import StepContext, constants, step
from dsv4c.lowering.build import BuildRequest, build
from dsv4c.runtime import Engine
from dsv4c.testing import new_cache, rel_err

MAX_SEQ = 256


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("art") / "tiny"
    build(BuildRequest(output=out, variant="tiny", numerics="reference", dtype="fp32", max_seq_len=MAX_SEQ,
                       max_batch=4), progress=lambda m: None)
    return out


def test_artifact_prefill_and_decode_equal_the_eager_reference(artifact, tiny_spec, tiny_params_fp32):
    eng = Engine.load(artifact)
    ids = torch.randint(0, tiny_spec.vocab_size, (1, 60), generator=torch.Generator().manual_seed(0))
    ctx = StepContext(tiny_spec, "reference", torch.float32)
    consts = constants(tiny_spec)
    cache = new_cache(tiny_spec, 1, MAX_SEQ, torch.float32)
    ref = step(ctx, tiny_params_fp32, consts, cache, ids[:, :30], torch.tensor([0]))
    got = eng.prefill(ids[:, :30])
    assert rel_err(got, ref) <= 1e-6
    for t in range(30, 60):
        ref = step(ctx, tiny_params_fp32, consts, cache, ids[:, t:t + 1], torch.tensor([t]))
        got = eng.decode(ids[:, t])
        assert rel_err(got, ref) <= 1e-6, t
    assert eng.lengths == [60]


def test_ragged_batch_generation_equals_one_by_one(artifact):
    eng = Engine.load(artifact)
    prompts = [[1, 2, 3], list(range(10, 40)), [7] * 17]
    together = eng.generate(prompts, max_new_tokens=12).tokens
    alone = [eng.generate([p], max_new_tokens=12).tokens[0] for p in prompts]
    assert together == alone
    assert all(len(t) == 12 for t in together)


def test_sampling_is_reproducible_with_a_seed(artifact):
    eng = Engine.load(artifact)
    a = eng.generate([[5, 6, 7]], max_new_tokens=10, temperature=0.8, top_k=50, top_p=0.9, seed=3).tokens
    b = eng.generate([[5, 6, 7]], max_new_tokens=10, temperature=0.8, top_k=50, top_p=0.9, seed=3).tokens
    c = eng.generate([[5, 6, 7]], max_new_tokens=10, temperature=0.8, top_k=50, top_p=0.9, seed=4).tokens
    assert a == b and a != c


def test_decode_greedy_equals_a_loop_of_decode_and_argmax(artifact):
    prompts = [[1, 2, 3], list(range(10, 40))]
    eng = Engine.load(artifact)
    first = eng.prefill(prompts).argmax(-1)
    chained = eng.decode_greedy(first, 9)
    assert chained.shape == (2, 9) and chained.dtype == torch.long
    assert eng.lengths == [3 + 9, 30 + 9]
    eng.prefill(prompts)
    ids, looped = first, []
    for _ in range(9):
        ids = eng.decode(ids).argmax(-1)
        looped.append(ids)
    assert torch.equal(chained, torch.stack(looped, dim=1))
    # generate's greedy path (the chain) and its step-by-step path (stop_at_eos, no EOS in this range)
    fixed = eng.generate(prompts, max_new_tokens=10).tokens
    assert fixed == [[int(first[b]), *chained[b].tolist()] for b in range(2)]
    eos = eng.spec.eos_token_id
    if all(eos not in t for t in fixed):
        assert eng.generate(prompts, max_new_tokens=10, stop_at_eos=True).tokens == fixed


def test_decode_greedy_refuses_bad_requests(artifact):
    from dsv4c.errors import InputError

    eng = Engine.load(artifact)
    with pytest.raises(InputError, match="before prefill"):
        eng.decode_greedy([1], 2)
    eng.prefill([[1, 2, 3]])
    with pytest.raises(InputError, match="non-negative int"):
        eng.decode_greedy([1], -1)
    with pytest.raises(InputError, match="1 live sequences"):
        eng.decode_greedy([1, 2], 2)
    with pytest.raises(InputError, match=r"context limit of 256 tokens \(253 left\)"):
        eng.decode_greedy([1], 254)
    assert eng.lengths == [3]  # nothing ran
    assert eng.decode_greedy([1], 0).shape == (1, 0) and eng.lengths == [3]
