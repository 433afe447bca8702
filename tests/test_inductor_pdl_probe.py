"""benchmarks/inductor_pdl_probe.py: counting the generated kernels that touch memory before their wait."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))

import inductor_pdl_probe as probe  # noqa: E402

CODE = """
@triton.jit
def triton_poi_a(in_ptr0, out_ptr0, xnumel, XBLOCK : tl.constexpr):
    x0 = xindex
    tmp0 = tl.load(in_ptr0 + (x0), xmask)
    tl.extra.cuda.gdc_wait()
    tl.store(out_ptr0 + (x0), tmp0, xmask)
''', device_str='cuda')

@triton.jit
def triton_poi_b(in_ptr0, out_ptr0, xnumel, XBLOCK : tl.constexpr):
    tl.extra.cuda.gdc_wait()
    tmp0 = tl.load(in_ptr0 + (x0), xmask)
    tl.extra.cuda.gdc_launch_dependents()
    tl.store(out_ptr0 + (x0), tmp0, xmask)
''', device_str='cuda')

@triton.jit
def triton_poi_zeros(out_ptr0, xnumel, XBLOCK : tl.constexpr):
    tl.store(out_ptr0 + (x0), 0.0, xmask)
''', device_str='cuda')

@triton.jit
def triton_poi_nothing(xnumel, XBLOCK : tl.constexpr):
    x0 = xindex
"""


def test_early_accesses_counts_loads_or_stores_ahead_of_the_wait_and_kernels_without_one():
    # a: loads before its wait; b: waits first; zeros: stores and never waits; nothing: no memory access
    assert probe.early_accesses(CODE) == (2, 3)
