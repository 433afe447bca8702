"""The serving engine: load an artifact, hold the heterogeneous KV cache, run prefill/decode/generate.

The cache has one slot per sequence (``max_batch`` slots, ``max_seq_len`` tokens each): per block a
window ring buffer, compressed KV entries, indexer keys (CSA) and the compressors' open-window state.
A batch of sequences of different lengths is prefilled slot by slot and then decoded together, each
sequence at its own position.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from dsv4c.artifact import Artifact, open_artifact
from dsv4c.errors import InputError
from dsv4c.spec import ModelSpec

from .executors import Executor, make_executor

_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class GenerationResult:
    tokens: list[list[int]]
    prefill_s: float
    decode_s: float
    decode_steps: int
    stats: dict = field(default_factory=dict)


class Engine:
    """``Engine.load(path)``; ``prefill(ids)``; ``decode(next_ids)``; ``generate(prompts, ...)``."""

    def __init__(self, artifact: Artifact, executor: Executor, device: torch.device) -> None:
        m = artifact.manifest
        self.artifact = artifact
        self.spec = ModelSpec.from_dict(m["spec"])
        self.device = device
        self.max_seq_len: int = int(m["max_seq_len"])
        self.max_batch: int = int(m["max_batch"])
        self.vocab_size = self.spec.vocab_size
        self._executor = executor
        self._static = {f"params.{k}": v for k, v in artifact.load_tensors("params", device).items()}
        self._static.update({f"consts.{k}": v for k, v in artifact.load_tensors("consts", device).items()})
        self.cache = {name: torch.zeros((self.max_batch, *ent["shape"]), dtype=_DTYPES[ent["dtype"]], device=device)
                      for name, ent in m["cache_layout"].items()}
        self.lengths: list[int] = []

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu", full_check: bool = False) -> "Engine":
        dev = torch.device(device)
        art = open_artifact(path, full_check=full_check)
        target = art.manifest["target"]
        if (target == "cpu") != (dev.type == "cpu"):
            raise InputError(f"{path} was built for target {target!r} but was asked to run on {dev.type!r}.",
                             f"rebuild with --target {'cpu' if dev.type == 'cpu' else 'h100'}, or load it on "
                             f"{'cpu' if target == 'cpu' else 'cuda'}.")
        return cls(art, make_executor(art, dev), dev)

    # ---- validation ---------------------------------------------------------------------------
    def _check_ids(self, ids: torch.Tensor, what: str) -> None:
        if ids.dtype not in (torch.int64, torch.int32):
            raise InputError(f"{what} must be integer token ids, got dtype {ids.dtype}.", "pass a LongTensor of token ids.")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            bad = int(ids.max()) if int(ids.max()) >= self.vocab_size else int(ids.min())
            raise InputError(f"{what} holds token id {bad}, outside the vocabulary 0..{self.vocab_size - 1}.",
                             "tokenize with this model's tokenizer.")

    def _check_batch(self, b: int) -> None:
        if not 1 <= b <= self.max_batch:
            raise InputError(f"batch of {b} sequences; this artifact serves 1..{self.max_batch}.",
                             f"split the batch, or rebuild with --max-batch {b}.")

    # ---- serving ------------------------------------------------------------------------------
    def _run(self, entry: str, ids: torch.Tensor, start: torch.Tensor, rows: slice) -> torch.Tensor:
        inputs = dict(self._static)
        inputs.update({f"cache.{k}": v[rows] for k, v in self.cache.items()})
        inputs["input_ids"] = ids.to(self.device, torch.long)
        inputs["start_pos"] = start.to(self.device, torch.long)
        with torch.no_grad():
            return self._executor.run(entry, inputs)

    def prefill(self, ids: torch.Tensor | Sequence[Sequence[int]]) -> torch.Tensor:
        """Start new sequences: ``ids`` [B, S] or a list of B prompts of any lengths. Returns the last
        position's logits [B, vocab] (fp32)."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 2 or ids.shape[1] == 0:
                raise InputError(f"prefill ids must have shape [batch, seq] with seq >= 1, got {list(ids.shape)}.",
                                 "pass a 2-D LongTensor (or a list of token-id lists).")
            prompts = None
        else:
            prompts = [torch.as_tensor(list(p), dtype=torch.long) for p in ids]
            if not prompts or any(p.numel() == 0 for p in prompts):
                raise InputError("prefill needs at least one prompt and no empty prompt.", "give every sequence >= 1 token.")
        n = ids.shape[0] if prompts is None else len(prompts)
        self._check_batch(n)
        lens = [ids.shape[1]] * n if prompts is None else [p.numel() for p in prompts]
        too_long = [L for L in lens if L > self.max_seq_len]
        if too_long:
            raise InputError(f"a prompt of {max(too_long)} tokens exceeds this artifact's context of {self.max_seq_len}.",
                             f"shorten the prompt, or rebuild with --max-seq-len {max(too_long)}.")
        for k, p in enumerate([ids] if prompts is None else prompts):
            self._check_ids(p, "prompt" if prompts is None else f"prompt {k}")
        rows = list(ids) if prompts is None else prompts
        # One sequence per prefill call: each lands in its own cache slot.
        logits = torch.cat([self._run("prefill", p[None], torch.zeros(1, dtype=torch.long), slice(b, b + 1))
                            for b, p in enumerate(rows)])
        self.lengths = lens
        return logits

    def decode(self, next_ids: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """One token per live sequence ([B]); returns logits [B, vocab]."""
        ids = torch.as_tensor(next_ids, dtype=torch.long).reshape(-1)
        if not self.lengths:
            raise InputError("decode called before prefill.", "call prefill(prompts) first.")
        if ids.numel() != len(self.lengths):
            raise InputError(f"decode got {ids.numel()} ids for {len(self.lengths)} live sequences.",
                             "pass exactly one next token per sequence.")
        self._check_ids(ids, "next_ids")
        full = [b for b, L in enumerate(self.lengths) if L >= self.max_seq_len]
        if full:
            raise InputError(f"sequence {full[0]} is at the context limit of {self.max_seq_len} tokens.",
                             f"stop generating, or rebuild with a larger --max-seq-len.")
        start = torch.tensor(self.lengths, dtype=torch.long)
        logits = self._run("decode", ids[:, None], start, slice(0, len(self.lengths)))
        self.lengths = [L + 1 for L in self.lengths]
        return logits

    def generate(self, prompts: Sequence[Sequence[int]] | torch.Tensor, max_new_tokens: int = 16,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                 stop_at_eos: bool = False) -> GenerationResult:
        """Greedy (temperature 0) or sampled generation for a batch of prompts of any lengths."""
        _check_sampling(max_new_tokens, temperature, top_k, top_p, self.vocab_size)
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        plist = prompts.tolist() if isinstance(prompts, torch.Tensor) else [list(p) for p in prompts]
        longest = max((len(p) for p in plist), default=0)
        if longest + max_new_tokens - 1 > self.max_seq_len:
            raise InputError(f"a {longest}-token prompt plus {max_new_tokens} new tokens exceeds the context of "
                             f"{self.max_seq_len}.", f"ask for at most {max(self.max_seq_len - longest + 1, 0)} new tokens "
                             "or rebuild with a larger --max-seq-len.")
        t0 = time.perf_counter()
        logits = self.prefill(plist)
        t1 = time.perf_counter()
        out: list[list[int]] = [[] for _ in plist]
        done = [False] * len(plist)
        steps = 0
        for i in range(max_new_tokens):
            nxt = _sample(logits, temperature, top_k, top_p, gen)
            for b, t in enumerate(nxt.tolist()):
                if not done[b]:
                    out[b].append(t)
                    done[b] = stop_at_eos and t == self.spec.eos_token_id
            if i == max_new_tokens - 1 or all(done):
                break
            logits = self.decode(nxt)
            steps += 1
        t2 = time.perf_counter()
        return GenerationResult(out, t1 - t0, t2 - t1, steps)


def _check_sampling(max_new_tokens: int, temperature: float, top_k: int, top_p: float, vocab: int) -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}.", "ask for >= 1 new token.")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise InputError(f"temperature must be a finite number >= 0, got {temperature!r}.", "use 0 for greedy decoding.")
    if not isinstance(top_k, int) or not 0 <= top_k <= vocab:
        raise InputError(f"top_k must be an integer in 0..{vocab}, got {top_k!r}.", "use 0 to disable top-k.")
    if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise InputError(f"top_p must be in (0, 1], got {top_p!r}.", "use 1.0 to disable nucleus sampling.")


def _sample(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
            gen: torch.Generator | None) -> torch.Tensor:
    logits = logits.float().cpu()
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:
        srt, idx = torch.sort(logits, descending=True, dim=-1)
        cum = torch.softmax(srt, -1).cumsum(-1)
        drop = cum - torch.softmax(srt, -1) > top_p
        logits = logits.scatter(-1, idx, srt.masked_fill(drop, float("-inf")))
    return torch.multinomial(torch.softmax(logits, -1), 1, generator=gen).squeeze(-1)
