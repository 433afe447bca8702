"""Runtime input validation: token ids, batch size, context length, call order and sampling parameters.

Each bad request raises InputError naming the parameter and the fix, and leaves the engine's state as
it was (a valid call afterwards still works).
"""

from __future__ import annotations

import math

import pytest
import torch

from dsv4c.errors import InputError
from dsv4c.runtime import Engine

VOCAB, MAX_SEQ, MAX_BATCH = 256, 256, 2


@pytest.fixture(scope="module")
def loaded(artifact) -> Engine:
    return Engine.load(artifact)


@pytest.fixture
def eng(loaded) -> Engine:
    """A fresh engine (empty cache, no live sequences) that shares the loaded weights and programs."""
    return Engine(loaded.artifact, loaded._executor, loaded.device)


def _err(fn, *args, **kwargs) -> str:
    with pytest.raises(InputError) as e:
        fn(*args, **kwargs)
    msg = str(e.value)
    assert "Fix:" in msg and e.value.fix, msg
    return msg


# ---- token ids -----------------------------------------------------------------------------------

@pytest.mark.parametrize("ids, text", [
    (torch.tensor([[1, 2, VOCAB]]), f"prompt holds token id {VOCAB}, outside the vocabulary 0..{VOCAB - 1}"),
    (torch.tensor([[1, -1, 3]]), "prompt holds token id -1, outside the vocabulary"),
    ([[1, 2], [3, 10**6]], "prompt 1 holds token id 1000000, outside the vocabulary"),
    ([[1, 2**70]], "prompt 0 holds token id 1180591620717411303424, far outside any vocabulary"),
    ([[1, 2.5]], "prompt 0 holds 2.5, which is not an integer token id"),
    ([[True, 2]], "prompt 0 holds True, which is not an integer token id"),
    ([["1", 2]], "prompt 0 holds '1', which is not an integer token id"),
    (torch.tensor([[1.0, 2.0]]), "prompt must be integer token ids, got dtype torch.float32"),
    ("hello", "prefill takes a [batch, seq] tensor or a list of token-id lists, got str"),
    (torch.tensor([1, 2, 3]), "prefill ids must have shape [batch, seq] with seq >= 1, got [3]"),
    ([[1, 2], []], "prefill needs at least one prompt and no empty prompt"),
])
def test_bad_token_ids_in_prefill(eng, ids, text):
    assert text in _err(eng.prefill, ids)
    assert eng.lengths == []


def test_bad_token_ids_in_decode_leave_the_sequences_untouched(eng):
    eng.prefill([[1, 2, 3]])
    assert "next_ids holds token id 256, outside the vocabulary 0..255" in _err(eng.decode, [VOCAB])
    assert "next_ids holds token id -5" in _err(eng.decode, torch.tensor([-5]))
    assert "next_ids must be integer token ids, got dtype torch.float32" in _err(eng.decode, torch.tensor([1.7]))
    assert "decode got 2 ids for 1 live sequences" in _err(eng.decode, [1, 2])
    assert eng.lengths == [3]
    logits = eng.decode([4])  # still serves after the refusals
    assert logits.shape == (1, VOCAB) and torch.isfinite(logits).all() and eng.lengths == [4]


# ---- batch, context, call order --------------------------------------------------------------------

def test_batch_larger_than_max_batch(eng):
    for ids in (torch.ones(MAX_BATCH + 1, 4, dtype=torch.long), [[1]] * (MAX_BATCH + 1)):
        msg = _err(eng.prefill, ids)
        assert f"batch of {MAX_BATCH + 1} sequences; this artifact serves 1..{MAX_BATCH}" in msg
        assert f"rebuild with --max-batch {MAX_BATCH + 1}" in msg
    assert "batch of 3 sequences" in _err(eng.generate, [[1]] * 3)


def test_prompt_longer_than_the_cache(eng):
    msg = _err(eng.prefill, torch.ones(1, MAX_SEQ + 1, dtype=torch.long))
    assert f"a prompt of {MAX_SEQ + 1} tokens exceeds this artifact's context of {MAX_SEQ}" in msg
    assert f"rebuild with --max-seq-len {MAX_SEQ + 1}" in msg
    msg = _err(eng.generate, [[7] * (MAX_SEQ + 1)])
    assert f"a prompt of {MAX_SEQ + 1} tokens exceeds this artifact's context of {MAX_SEQ}" in msg


def test_generation_that_would_run_past_the_context(eng):
    msg = _err(eng.generate, [[1] * 200], max_new_tokens=100)
    assert f"a 200-token prompt plus 100 new tokens exceeds the context of {MAX_SEQ}" in msg
    assert "ask for at most 57 new tokens, or rebuild with --max-seq-len 299" in msg


def test_decode_past_the_context_limit(eng):
    eng.lengths = [MAX_SEQ, 5]  # two live sequences, the first with a full cache (a real 256-token prefill takes seconds)
    msg = _err(eng.decode, [1, 2])
    assert f"sequence 0 is at the context limit of {MAX_SEQ} tokens" in msg and "larger --max-seq-len" in msg
    assert eng.lengths == [MAX_SEQ, 5]


def test_decode_before_prefill(eng):
    assert "decode called before prefill. Fix: call prefill(prompts) first." in _err(eng.decode, [1])


# ---- sampling parameters ---------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, text", [
    ({"temperature": -0.5}, "temperature must be a finite number >= 0, got -0.5"),
    ({"temperature": math.nan}, "temperature must be a finite number >= 0, got nan"),
    ({"temperature": math.inf}, "temperature must be a finite number >= 0, got inf"),
    ({"temperature": "hot"}, "temperature must be a finite number >= 0, got 'hot'"),
    ({"top_p": 0.0}, "top_p must be in (0, 1], got 0.0"),
    ({"top_p": 1.5}, "top_p must be in (0, 1], got 1.5"),
    ({"top_p": -0.1}, "top_p must be in (0, 1], got -0.1"),
    ({"top_p": math.nan}, "top_p must be in (0, 1], got nan"),
    ({"top_k": -1}, f"top_k must be an integer in 0..{VOCAB} (the vocabulary size), got -1"),
    ({"top_k": VOCAB + 1}, f"top_k must be an integer in 0..{VOCAB} (the vocabulary size), got {VOCAB + 1}"),
    ({"top_k": 2.5}, "top_k must be an integer"),
    ({"max_new_tokens": 0}, "max_new_tokens must be a positive integer, got 0"),
    ({"max_new_tokens": -3}, "max_new_tokens must be a positive integer, got -3"),
    ({"max_new_tokens": 2.0}, "max_new_tokens must be a positive integer, got 2.0"),
    ({"max_new_tokens": True}, "max_new_tokens must be a positive integer, got True"),
    ({"seed": -1}, "seed must be an integer in 0..2**64-1, got -1"),
    ({"seed": 2**64}, "seed must be an integer in 0..2**64-1"),
    ({"seed": "s"}, "seed must be an integer in 0..2**64-1, got 's'"),
])
def test_bad_sampling_parameters(eng, kwargs, text):
    msg = _err(eng.generate, [[1, 2, 3]], **kwargs)
    assert text in msg, msg
    assert eng.lengths == []  # refused before any prefill


def test_tiny_temperature_samples_like_greedy_instead_of_failing():
    from dsv4c.runtime.engine import _sample

    logits = torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(0)) * 30
    for temperature in (1e-30, 1e-300, 5e-324):
        for top_k, top_p in ((0, 1.0), (5, 1.0), (0, 0.5)):
            got = _sample(logits, temperature, top_k, top_p, torch.Generator().manual_seed(0))
            assert torch.equal(got, logits.argmax(-1)), (temperature, top_k, top_p)


# ---- devices ---------------------------------------------------------------------------------------

def test_bad_device_strings(artifact):
    assert "'gpu0' is not a torch device" in _err(Engine.load, artifact, device="gpu0")
    assert "device 'meta' is not supported by dsv4c" in _err(Engine.load, artifact, device="meta")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_cuda_device_without_a_gpu(artifact):
    from dsv4c.errors import BackendUnavailableError

    with pytest.raises(BackendUnavailableError) as e:
        Engine.load(artifact, device="cuda")
    assert "device 'cuda' was asked for but this machine has no usable CUDA GPU" in str(e.value)
