"""Programmatic dependent launch (TUNE ``pdl`` for the decode GEMVs, ``inductor_pdl`` for Inductor's own
kernels) is chosen only for compiled CUDA on sm_90+; the kernels' PTX under it is checked in
tests/ops/test_hopper_compile.py and the speed and bitwise logits on the GPU (gpu_suite.py --ab)."""

from __future__ import annotations

import torch
import torch._inductor.config as icfg

from dsv4c.ops import triton_kernels as tk
from dsv4c.runtime.inductor_executor import inductor_pdl_options

CUDA = torch.device("cuda", 0)


def _capability(monkeypatch, cap: tuple[int, int]) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cap)


def test_gemv_pdl_only_compiled_cuda_sm90(monkeypatch):
    monkeypatch.setattr(tk, "INTERPRET", False)
    monkeypatch.setitem(tk.TUNE, "pdl", True)
    _capability(monkeypatch, (9, 0))
    assert tk.pdl_launch(CUDA) is True
    assert tk.pdl_kwargs(CUDA) == {"PDL": True, "launch_pdl": True}
    assert tk.pdl_launch(torch.device("cpu")) is False and tk.pdl_kwargs(torch.device("cpu")) == {}
    _capability(monkeypatch, (8, 9))
    assert tk.pdl_launch(CUDA) is False
    _capability(monkeypatch, (9, 0))
    monkeypatch.setattr(tk, "INTERPRET", True)  # the interpreter cannot run griddepcontrol
    assert tk.pdl_launch(CUDA) is False
    monkeypatch.setattr(tk, "INTERPRET", False)
    monkeypatch.setitem(tk.TUNE, "pdl", False)
    assert tk.pdl_launch(CUDA) is False


def test_inductor_pdl_option(monkeypatch):
    assert hasattr(icfg.triton, "enable_pdl")  # this torch's Inductor has it (the option name below)
    monkeypatch.setitem(tk.TUNE, "inductor_pdl", True)
    _capability(monkeypatch, (9, 0))
    assert inductor_pdl_options(CUDA) == {"triton.enable_pdl": True}
    with icfg.patch(inductor_pdl_options(CUDA)):  # a real config key
        assert icfg.triton.enable_pdl is True
    assert inductor_pdl_options(torch.device("cpu")) == {}
    _capability(monkeypatch, (8, 0))
    assert inductor_pdl_options(CUDA) == {}
    _capability(monkeypatch, (9, 0))
    monkeypatch.setitem(tk.TUNE, "inductor_pdl", False)
    assert inductor_pdl_options(CUDA) == {}
