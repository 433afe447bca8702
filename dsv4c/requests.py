"""Validation of serving requests (token ids, batch, context, sampling), shared by the engine and the CLI.

Torch-free on purpose: ``dsv4c run`` checks a request against the artifact's manifest before importing
torch or loading any weight, so bad input fails in a fraction of a second even for a huge artifact.
Every refusal is an ``InputError`` naming the parameter and the fix.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from .errors import InputError, show

INT_DTYPES = ("torch.int64", "torch.int32", "torch.int16", "torch.uint8", "torch.int8")
MAX_SEED = 2**64


def is_tensor(x: Any) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "dtype") and hasattr(x, "tolist")


def as_id_list(ids: Any, what: str) -> list[int]:
    """Token ids as a flat list of ints, refusing floats, booleans, strings and out-of-int64 values."""
    if is_tensor(ids):
        if str(ids.dtype) not in INT_DTYPES:
            raise InputError(f"{what} must be integer token ids, got dtype {ids.dtype}.", "pass a LongTensor of token ids.")
        return ids.reshape(-1).tolist()
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
        raise InputError(f"{what} must be a list of token ids, got {type(ids).__name__}.", "pass e.g. [1, 2, 3].")
    bad = [t for t in ids if isinstance(t, bool) or not isinstance(t, int)]
    if bad:
        raise InputError(f"{what} holds {show(bad[0])}, which is not an integer token id.",
                         "pass whole-number token ids from this model's tokenizer.")
    big = [t for t in ids if not -2**63 <= t < 2**63]
    if big:
        raise InputError(f"{what} holds token id {show(big[0])}, far outside any vocabulary.",
                         "tokenize with this model's tokenizer.")
    return list(ids)


def check_ids_in_vocab(ids: list[int], what: str, vocab_size: int) -> None:
    if ids and (min(ids) < 0 or max(ids) >= vocab_size):
        bad = max(ids) if max(ids) >= vocab_size else min(ids)
        raise InputError(f"{what} holds token id {bad}, outside the vocabulary 0..{vocab_size - 1}.",
                         "tokenize with this model's tokenizer.")


def check_sampling(max_new_tokens: Any, temperature: Any, top_k: Any, top_p: Any, vocab: int) -> None:
    def is_int(v: object) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    def is_num(v: object) -> bool:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            return False
        try:
            return math.isfinite(v)
        except OverflowError:  # an int too large for a float
            return False

    if not is_int(max_new_tokens) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be a positive integer, got {show(max_new_tokens)}.", "ask for >= 1 new token.")
    if not is_num(temperature) or temperature < 0:
        raise InputError(f"temperature must be a finite number >= 0, got {show(temperature)}.", "use 0 for greedy decoding.")
    if not is_int(top_k) or not 0 <= top_k <= vocab:
        raise InputError(f"top_k must be an integer in 0..{vocab} (the vocabulary size), got {show(top_k)}.",
                         "use 0 to disable top-k.")
    if not is_num(top_p) or not 0 < top_p <= 1:
        raise InputError(f"top_p must be in (0, 1], got {show(top_p)}.", "use 1.0 to disable nucleus sampling.")


def check_seed(seed: Any) -> None:
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < MAX_SEED):
        raise InputError(f"seed must be an integer in 0..2**64-1, got {show(seed)}.", "pass a non-negative integer seed.")


def check_generate_request(prompts: Any, max_new_tokens: Any, temperature: Any, top_k: Any, top_p: Any, seed: Any, *,
                           vocab_size: int, max_seq_len: int, max_batch: int) -> list[list[int]]:
    """Validate a whole generation request against an artifact's limits; return the prompts as lists."""
    check_sampling(max_new_tokens, temperature, top_k, top_p, vocab_size)
    check_seed(seed)
    if is_tensor(prompts):
        if prompts.dim() != 2:
            raise InputError(f"prompts must have shape [batch, seq], got {list(prompts.shape)}.",
                             "pass a 2-D LongTensor or a list of token-id lists.")
        rows: Sequence = list(prompts)
    elif isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
        raise InputError(f"prompts must be a list of token-id lists, got {type(prompts).__name__}.", "pass e.g. [[1, 2, 3]].")
    else:
        rows = prompts
    if not 1 <= len(rows) <= max_batch:
        raise InputError(f"batch of {len(rows)} sequences; this artifact serves 1..{max_batch}.",
                         f"split the batch, or rebuild with --max-batch {max(len(rows), 1)}.")
    plist = []
    for k, p in enumerate(rows):
        ids = as_id_list(p, f"prompt {k}")
        if not ids:
            raise InputError(f"prompt {k} is empty.", "give every sequence >= 1 token.")
        check_ids_in_vocab(ids, f"prompt {k}", vocab_size)
        if len(ids) > max_seq_len:
            raise InputError(f"a prompt of {len(ids)} tokens exceeds this artifact's context of {max_seq_len}.",
                             f"shorten the prompt, or rebuild with --max-seq-len {len(ids) + max_new_tokens - 1}.")
        plist.append(ids)
    longest = max(len(p) for p in plist)
    if longest + max_new_tokens - 1 > max_seq_len:
        raise InputError(f"a {longest}-token prompt plus {max_new_tokens} new tokens exceeds the context of "
                         f"{max_seq_len}.", f"ask for at most {max_seq_len - longest + 1} new tokens, "
                         f"or rebuild with --max-seq-len {longest + max_new_tokens - 1}.")
    return plist
