"""Shared fixtures: synthesized checkpoints and their parameter tables, made once per session."""

from __future__ import annotations

import os

import pytest
import torch

# Without a GPU the Triton kernels run under Triton's interpreter, which must be switched on before triton
# is first imported anywhere in the process (any test module may import it first, e.g. through the runtime's
# compile-cache key); tests/ops/kernel_checks.py relies on it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tests that call torch.compile directly use Inductor's default on-disk cache, whose keys do not cover the
# dsv4 ops' schemas or decompositions: an entry left by older code can be reused and crash (a segfault in
# a C++ wrapper calling an op with its old arguments). Each test session compiles into a fresh folder.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="dsv4c-tests-inductor-")

from dsv4c.checkpoint import load_checkpoint, synthesize_checkpoint, to_model_params
from dsv4c.spec import ModelSpec, get_variant


@pytest.fixture(scope="session")
def tiny_spec() -> ModelSpec:
    return get_variant("tiny")


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory, tiny_spec):
    """A synthesized hub-format tiny checkpoint directory (seed 0)."""
    return synthesize_checkpoint(tiny_spec, tmp_path_factory.mktemp("ckpt") / "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_params_fp32(tiny_ckpt, tiny_spec):
    return to_model_params(tiny_spec, load_checkpoint(tiny_ckpt, tiny_spec), torch.float32)
