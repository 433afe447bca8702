"""Inductor's generated kernels as programmatic dependents that always wait before touching memory.

With ``triton.enable_pdl`` Inductor launches each generated Triton kernel as a programmatic dependent of
the kernel before it on the stream: the kernel may start while its predecessor still runs, and
``gdc_wait`` (``griddepcontrol.wait``) holds it until the predecessor has finished. Inductor writes that
wait only before an access to a buffer its scheduler's previous node writes (or reads, for a store), and
a kernel that touches nothing of the previous node's waits nowhere. That is sound only if every kernel on
the stream is one of Inductor's and the previous scheduler node is the previous kernel. A decode step is
not like that: a custom op (a dsv4 GEMV, the shared-expert fork) launches kernels of its own, several
per op, on two streams. A kernel without the wait can then read a buffer an older kernel is still
writing, or write a reused buffer an older kernel is still reading, and one that never waits can finish
before its predecessor, so that the kernel after it starts too early as well.

:func:`install_wait_first` makes every generated kernel wait before its first global access (its first
load or store), as the dsv4c kernels do. What PDL buys is kept: the kernel is launched, and its programs
are resident, while the previous kernel runs; its release of the next kernel comes after its first load,
as Inductor places it, which is after the wait.
"""

from __future__ import annotations

_PATCHED = False


def _wait_first(self, wait_buffer, *dependencies, **options):  # noqa: ANN001, ANN202, ARG001
    """``TritonKernel._handle_pdl_before_access`` that waits whatever the dependencies (the original's
    code path for a kernel with no previous scheduler node); any keyword (``consider_reads``) is moot."""
    if not self._enable_pdl_codegen():
        return
    trees = getattr(self, "range_trees", None)
    if getattr(self, "inside_reduction", False) and trees and getattr(trees[-1], "is_loop", False):
        wait_buffer = self.body  # hoisted before the reduction loop, as the original does
    wait_buffer.writeline(self.GDC_WAIT)


def install_wait_first() -> bool:
    """Patch this torch's Inductor so that every generated kernel waits before its first global access
    under ``triton.enable_pdl``; False (nothing patched) when its code generator does not have the pieces
    this relies on, and Inductor's kernels must then not be launched with PDL."""
    global _PATCHED
    if _PATCHED:
        return True
    try:
        from torch._inductor.codegen.triton import TritonKernel  # noqa: PLC0415
    except ImportError:  # pragma: no cover - an Inductor without Triton code generation
        return False
    needed = ("_handle_pdl_before_access", "_handle_pdl_after_load", "_enable_pdl_codegen", "GDC_WAIT")
    if not all(hasattr(TritonKernel, n) for n in needed):
        return False
    TritonKernel._handle_pdl_before_access = _wait_first
    _PATCHED = True
    return True


__all__ = ["install_wait_first"]
