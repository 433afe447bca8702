"""Session fixtures of the pass tests: every graph is traced once per session (tracing dominates the
run time), parameters are converted once per dtype, and each combination's pass-free baseline is run
once."""

from __future__ import annotations

import sys
import zlib
from pathlib import Path

import pytest
import torch

from dsv4c.checkpoint import load_checkpoint, to_model_params
from dsv4c.frontend.model import StepContext
from dsv4c.spec import get_variant

sys.path.insert(0, str(Path(__file__).parent))  # passes_helpers.py (tests/ has no packages)

from passes_helpers import DTYPES, combo_id, passes_only, random_inputs, run, trace  # noqa: E402


@pytest.fixture(scope="session")
def tiny_ckpt_tensors(tiny_ckpt, tiny_spec):
    return load_checkpoint(tiny_ckpt, tiny_spec)


@pytest.fixture(scope="session")
def tiny_params(tiny_ckpt_tensors, tiny_spec):
    cache: dict[str, dict] = {}

    def get(dtype: str) -> dict[str, torch.Tensor]:
        if dtype not in cache:
            cache[dtype] = to_model_params(tiny_spec, tiny_ckpt_tensors, DTYPES[dtype])
        return cache[dtype]

    return get


@pytest.fixture(scope="session")
def traced():
    """traced(numerics, dtype, entry, variant="tiny") -> the Program, traced once per session."""
    cache: dict[tuple, object] = {}

    def get(numerics: str, dtype: str, entry: str, variant: str = "tiny"):
        key = (variant, numerics, dtype, entry)
        if key not in cache:
            ctx = StepContext(get_variant(variant), numerics, DTYPES[dtype])
            cache[key] = trace(ctx, entry, 64 if variant == "tiny" else 512)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def baseline(traced, tiny_params, tiny_spec):
    """baseline(combo) -> (ctx, inputs, logits, cache after) with every product pass disabled."""
    cache: dict[tuple, tuple] = {}

    def get(combo: tuple):
        if combo not in cache:
            numerics, dtype, entry = combo
            ctx = StepContext(tiny_spec, numerics, DTYPES[dtype])
            progs, w, _ = passes_only({entry: traced(*combo)}, tiny_params(dtype), ctx, set())
            inputs = random_inputs(ctx, entry, seed=zlib.crc32(combo_id(combo).encode()))
            logits, after = run(progs[entry], w, ctx, inputs)
            cache[combo] = (ctx, inputs, logits, after)
        return cache[combo]

    return get
