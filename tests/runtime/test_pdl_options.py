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


class _Lines:
    def __init__(self):
        self.lines = []

    def writeline(self, line):
        self.lines.append(line)


class _Kernel:
    """The attributes of Inductor's TritonKernel that the patched method uses."""

    GDC_WAIT = "tl.extra.cuda.gdc_wait()"

    def __init__(self, pdl: bool, looped_reduction: bool = False):
        self.pdl, self.inside_reduction, self.body = pdl, looped_reduction, _Lines()
        self.range_trees = [type("Tree", (), {"is_loop": looped_reduction})()]

    def _enable_pdl_codegen(self):
        return self.pdl


def test_inductor_kernels_wait_before_every_first_access(monkeypatch):
    """With Inductor PDL on, its kernels wait before any access, whatever the scheduler's previous node
    wrote: the decode step's custom ops launch kernels Inductor does not see (session 12's H100 run b:
    a greedy chain that left the step loop after 15 of 32 steps with the selective waits)."""
    from torch._inductor.codegen.triton import TritonKernel

    from dsv4c.runtime import inductor_pdl

    monkeypatch.setitem(tk.TUNE, "inductor_pdl", True)
    _capability(monkeypatch, (9, 0))
    assert inductor_pdl_options(CUDA) == {"triton.enable_pdl": True}
    assert TritonKernel._handle_pdl_before_access is inductor_pdl._wait_first  # installed with the option
    loads = _Lines()
    inductor_pdl._wait_first(_Kernel(pdl=True), loads, "buf_of_an_older_kernel")
    assert loads.lines == [_Kernel.GDC_WAIT]
    stores = _Lines()
    inductor_pdl._wait_first(_Kernel(pdl=True), stores, "buf", consider_reads=True)
    assert stores.lines == [_Kernel.GDC_WAIT]
    k = _Kernel(pdl=True, looped_reduction=True)  # hoisted out of the reduction loop, into the body
    inductor_pdl._wait_first(k, loads, "buf")
    assert k.body.lines == [_Kernel.GDC_WAIT] and len(loads.lines) == 1
    off = _Lines()
    inductor_pdl._wait_first(_Kernel(pdl=False), off, "buf")
    assert off.lines == []


def test_no_inductor_pdl_without_the_wait_first_patch(monkeypatch):
    from dsv4c.runtime import inductor_pdl

    monkeypatch.setitem(tk.TUNE, "inductor_pdl", True)
    _capability(monkeypatch, (9, 0))
    monkeypatch.setattr(inductor_pdl, "install_wait_first", lambda: False)
    assert inductor_pdl_options(CUDA) == {}
