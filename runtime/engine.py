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
from dsv4c.errors import ArtifactError, BackendUnavailableError, InputError
from dsv4c.requests import as_id_list, check_generate_request
from dsv4c.spec import ModelSpec

from .executors import Executor, make_executor

_DTYPES = {str(d).removeprefix("torch."): d for d in (torch.bfloat16, torch.float32, torch.float16, torch.float8_e4m3fn,
                                                     torch.uint8, torch.int8, torch.int32, torch.int64)}


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
        layout = m["cache_layout"]
        nbytes = sum(self.max_batch * math.prod(e["shape"]) * _DTYPES[e["dtype"]].itemsize for e in layout.values())
        try:
            self.cache = {name: torch.zeros((self.max_batch, *ent["shape"]), dtype=_DTYPES[ent["dtype"]], device=device)
                          for name, ent in layout.items()}
        except (RuntimeError, MemoryError, OverflowError) as e:
            raise InputError(f"cannot allocate the KV cache of {artifact.path} ({nbytes / 2**30:.2f} GiB for "
                             f"{self.max_batch} x {self.max_seq_len} tokens) on {device}: {str(e).splitlines()[0][:120]}",
                             "free memory, or rebuild with a smaller --max-batch / --max-seq-len.") from None
        self._check_program_inputs()
        self.lengths: list[int] = []

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu", full_check: bool = False,
             target: str | None = None, backend: str | None = None) -> "Engine":
        """Open and check an artifact (``dsv4c.artifact.open_artifact``), then load it onto ``device``.
        ``target``/``backend``, when given, must match the manifest's."""
        dev = _parse_device(device)
        art = open_artifact(path, target=target, backend=backend, full_check=full_check)
        built_for = art.manifest["target"]
        if (built_for == "cpu") != (dev.type == "cpu"):
            want = "cpu" if dev.type == "cpu" else "h100"
            raise ArtifactError(f"{path} was built for target {built_for!r} but was asked to run on {dev.type!r}.",
                                f"rebuild it for this device: `dsv4c build ... --target {want} -o {path}`, or load it "
                                f"on {'cpu' if built_for == 'cpu' else 'a cuda device'}.")
        return cls(art, make_executor(art, dev), dev)

    def _check_program_inputs(self) -> None:
        """Every input a program takes must be provided by the artifact's tables or the engine."""
        progs = getattr(self._executor, "programs", None)
        if not isinstance(progs, dict):
            return
        have = set(self._static) | {f"cache.{k}" for k in self.cache} | {"input_ids", "start_pos"}
        for entry, prog in progs.items():
            lacking = [n for n in getattr(prog, "input_names", []) if n not in have]
            if lacking:
                raise ArtifactError(f"{self.artifact.path}: program {entry!r} takes inputs the manifest does not provide: "
                                    f"{lacking[:6]}.", "rebuild the artifact; its manifest was modified.")

    # ---- validation ---------------------------------------------------------------------------
    def _check_ids(self, ids: torch.Tensor, what: str) -> None:
        if ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
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
    def _inputs(self, ids: torch.Tensor, start: torch.Tensor, rows: slice) -> dict[str, torch.Tensor]:
        """A program's inputs: weights and constants, the cache rows of these sequences, ids, positions."""
        inputs = dict(self._static)
        inputs.update({f"cache.{k}": v[rows] for k, v in self.cache.items()})
        inputs["input_ids"] = ids.to(self.device, torch.long)
        inputs["start_pos"] = start.to(self.device, torch.long)
        return inputs

    def _run(self, entry: str, ids: torch.Tensor, start: torch.Tensor, rows: slice) -> torch.Tensor:
        with torch.no_grad():
            return self._executor.run(entry, self._inputs(ids, start, rows))

    def _live_next_ids(self, next_ids: torch.Tensor | Sequence[int], what: str) -> torch.Tensor:
        """``next_ids`` as one checked id per live sequence ([B]), for :meth:`decode` / :meth:`decode_greedy`."""
        if not self.lengths:
            raise InputError(f"{what} called before prefill.", "call prefill(prompts) first.")
        ids = _as_id_tensor(next_ids, "next_ids").reshape(-1)
        if ids.numel() != len(self.lengths):
            raise InputError(f"{what} got {ids.numel()} ids for {len(self.lengths)} live sequences.",
                             "pass exactly one next token per sequence.")
        self._check_ids(ids, "next_ids")
        return ids

    def prefill(self, ids: torch.Tensor | Sequence[Sequence[int]]) -> torch.Tensor:
        """Start new sequences: ``ids`` [B, S] or a list of B prompts of any lengths. Returns the last
        position's logits [B, vocab] (fp32)."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 2 or ids.shape[1] == 0:
                raise InputError(f"prefill ids must have shape [batch, seq] with seq >= 1, got {list(ids.shape)}.",
                                 "pass a 2-D LongTensor (or a list of token-id lists).")
            prompts = None
        else:
            if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
                raise InputError(f"prefill takes a [batch, seq] tensor or a list of token-id lists, got {type(ids).__name__}.",
                                 "pass e.g. [[1, 2, 3], [4, 5]].")
            if not 1 <= len(ids) <= self.max_batch:
                self._check_batch(len(ids))
            prompts = [_as_id_tensor(p, f"prompt {k}") for k, p in enumerate(ids)]
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
        ids = self._live_next_ids(next_ids, "decode")
        full = [b for b, L in enumerate(self.lengths) if L >= self.max_seq_len]
        if full:
            raise InputError(f"sequence {full[0]} is at the context limit of {self.max_seq_len} tokens.",
                             f"stop generating, or rebuild with a larger --max-seq-len.")
        start = torch.tensor(self.lengths, dtype=torch.long)
        logits = self._run("decode", ids[:, None], start, slice(0, len(self.lengths)))
        self.lengths = [L + 1 for L in self.lengths]
        return logits

    def decode_greedy(self, next_ids: torch.Tensor | Sequence[int], steps: int) -> torch.Tensor:
        """``steps`` greedy decode steps for the live sequences from ``next_ids`` ([B]): each step's input is
        the previous step's argmax. Returns the chosen ids [B, steps]. On the inductor backend with CUDA
        graphs the steps are chained on the device (no host round trip between steps); elsewhere it is a
        loop of :meth:`decode`."""
        ids = self._live_next_ids(next_ids, "decode_greedy")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise InputError(f"steps must be a non-negative int, got {steps!r}.", "pass e.g. steps=16.")
        over = [b for b, L in enumerate(self.lengths) if L + steps > self.max_seq_len]
        if over:
            room = self.max_seq_len - self.lengths[over[0]]
            raise InputError(f"{steps} steps would take sequence {over[0]} past the context limit of "
                             f"{self.max_seq_len} tokens ({room} left).",
                             f"ask for at most {room} steps, or rebuild with a larger --max-seq-len.")
        chained = getattr(self._executor, "decode_greedy", None)
        out = None
        if chained is not None:
            inputs = self._inputs(ids[:, None], torch.tensor(self.lengths), slice(0, len(self.lengths)))
            with torch.no_grad():
                out = chained(inputs, steps)
        if out is not None:
            self.lengths = [L + steps for L in self.lengths]
            return out.cpu()
        cols = []
        for _ in range(steps):
            ids = self.decode(ids).argmax(-1)
            cols.append(ids.cpu())
        return torch.stack(cols, dim=1) if cols else torch.empty((len(self.lengths), 0), dtype=torch.long)

    def generate(self, prompts: Sequence[Sequence[int]] | torch.Tensor, max_new_tokens: int = 16,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                 stop_at_eos: bool = False) -> GenerationResult:
        """Greedy (temperature 0) or sampled generation for a batch of prompts of any lengths."""
        plist = check_generate_request(prompts, max_new_tokens, temperature, top_k, top_p, seed,
                                       vocab_size=self.vocab_size, max_seq_len=self.max_seq_len, max_batch=self.max_batch)
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        t0 = time.perf_counter()
        logits = self.prefill(plist)
        t1 = time.perf_counter()
        out: list[list[int]] = [[] for _ in plist]
        if temperature == 0 and not stop_at_eos:  # greedy to a fixed length: the steps chain on the device
            first = logits.float().argmax(-1).cpu()
            rest = self.decode_greedy(first, max_new_tokens - 1)
            for b in range(len(plist)):
                out[b] = [int(first[b]), *rest[b].tolist()]
            return GenerationResult(out, t1 - t0, time.perf_counter() - t1, max_new_tokens - 1)
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


def _parse_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise InputError(f"{str(device)[:40]!r} is not a torch device.", "use cpu, cuda or cuda:N.") from None
    if dev.type not in ("cpu", "cuda"):
        raise InputError(f"device {str(dev)!r} is not supported by dsv4c.", "use cpu, cuda or cuda:N.")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise BackendUnavailableError(f"device {str(dev)!r} was asked for but this machine has no usable CUDA GPU.",
                                          "run on --device cpu with a --target cpu artifact.")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"device {str(dev)!r} does not exist ({torch.cuda.device_count()} GPU(s) visible).",
                             "pick an existing cuda:N.")
    return dev


def _as_id_tensor(ids: object, what: str) -> torch.Tensor:
    """Token ids as a LongTensor (see ``dsv4c.requests.as_id_list`` for what is refused)."""
    if isinstance(ids, torch.Tensor):
        as_id_list(ids[:0], what)  # dtype check only
        return ids.to(torch.long)
    return torch.tensor(as_id_list(ids, what), dtype=torch.long)


def _sample(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
            gen: torch.Generator | None) -> torch.Tensor:
    logits = logits.float().cpu()
    if temperature == 0:
        return logits.argmax(-1)
    # In float64 and shifted by the max before scaling, so that any tiny positive temperature gives
    # 0 / -inf (greedy), never inf - inf = nan.
    logits = (logits.double() - logits.double().max(-1, keepdim=True).values) / temperature
    if top_k:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:
        srt, idx = torch.sort(logits, descending=True, dim=-1)
        cum = torch.softmax(srt, -1).cumsum(-1)
        drop = cum - torch.softmax(srt, -1) > top_p
        logits = logits.scatter(-1, idx, srt.masked_fill(drop, float("-inf")))
    return torch.multinomial(torch.softmax(logits, -1), 1, generator=gen).squeeze(-1)
