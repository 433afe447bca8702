"""The attention output's grouped projection (``wo_a``) read as FP8 at decode (TUNE ``wo_a_fp8``).

The checkpoint stores ``wo_a`` as e4m3 with one ue8m0 scale per 128 x 128 block, and the reference applies
it as a bf16 grouped matmul of the dequantized weight (MODEL-SEMANTICS section 7), which is what the
artifact holds: 2 bytes a weight. At batch 1 that matmul is a GEMV that streams the whole weight, 268 MB a
step in the 4-block Flash slice (cuBLAS: 103 us of a 1.36 ms step on the H100, session 14).

:func:`rewrite_wo_a_fp8` (a load-time rewrite of the decode graph, CUDA only) replaces its
``einsum("bsgk,gdk->bsgd", o, wo_a)`` with ``dsv4c_rt::grouped_proj(o, wo_a)``. On CUDA that op uses the
e4m3 codes and block scales whose products are the bf16 weight (:func:`fp8_blocks_exact`), which the
executor finds for each such graph input before the graph runs (:func:`register_weight`, once per weight,
kept while the weight lives), and runs ``triton_gemv.fp8_grouped_gemv_tc``: e4m3 bytes turned into bf16 in
the kernel, bf16 dots summed in fp32 per 128-wide block, the block scale (a power of two) applied to the
block's sum. The products are the reference's exactly; only the fp32 summation order differs from
cuBLAS's. A weight that is not exactly e4m3 times power-of-two block scales (a non-ue8m0 checkpoint),
a weight nobody registered, more rows than the GEMV takes, or other dtypes run the einsum as before.
"""

from __future__ import annotations

import weakref

import torch
import torch.fx as fx

from dsv4c.runtime.load_rewrites import rewrite_einsums

WO_A_EQUATION = "bsgk,gdk->bsgd"  # frontend/model.py's grouped output projection
BLOCK = 128  # the checkpoint's FP8 weight blocks (rows and columns)
_VIEWS = (torch.ops.aten.view.default, torch.ops.aten.reshape.default, torch.ops.aten._unsafe_view.default)


@torch.library.custom_op("dsv4c_rt::grouped_proj", mutates_args=())
def grouped_proj(o: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``einsum("bsgk,gdk->bsgd", o, w)``: each group's slice of ``o`` [B, S, G, K] times its [R, K] weight."""
    return torch.einsum(WO_A_EQUATION, o, w)


@grouped_proj.register_fake
def _(o, w):
    return o.new_empty((*o.shape[:3], w.shape[1]))


def fp8_blocks_exact(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(e4m3 codes [N, K], fp32 scales [N / 128, K / 128]) whose products are exactly ``w`` [N, K], with
    ue8m0 block scales as the checkpoint's quantizer picks them (``dsv4c.quant.quantize_fp8_weight``); None
    when ``w`` is not such a product (or N, K are not multiples of 128). A bf16 weight dequantized from the
    checkpoint always is: its block scale can only be smaller here, which shifts each code's exponent up
    without losing a bit."""
    from dsv4c.quant import dequantize_fp8_weight, quantize_fp8_weight  # noqa: PLC0415

    N, K = w.shape
    if N % BLOCK or K % BLOCK:
        return None
    codes, scale = quantize_fp8_weight(w, BLOCK)
    return (codes, scale) if torch.equal(dequantize_fp8_weight(codes, scale, BLOCK), w.float()) else None


# (device, data pointer, element count, dtype, K) of a registered weight -> (a weak reference to it, its
# version when its codes were found, (codes, scales) or None where it is not e4m3 x 2^k)
_CODES: dict[tuple, tuple] = {}


def _key(w: torch.Tensor) -> tuple:
    return (w.device, w.data_ptr(), w.numel(), w.dtype, w.shape[-1])


def _drop(key: tuple, ref: weakref.ref) -> None:
    """Forget ``key`` if its entry is still the one for the weight just freed."""
    if _CODES.get(key, (None,))[0] is ref:
        del _CODES[key]


def register_weight(w: torch.Tensor) -> bool:
    """Find the e4m3 codes of a ``wo_a`` graph input [..., K] (:func:`fp8_blocks_exact` of it as [N, K]) before
    the graph runs; whether it has them. A compiled graph hands the op an alias of its input (the same
    memory in a new tensor object, no view of it, with a version counter of its own), so the op finds the
    codes by the memory it is given. The executor calls this for every such input before every call, outside
    CUDA graph capture (where finding codes would synchronize): a weight already registered costs a lookup;
    one changed in place since (its version) is looked at again. The entry keeps only a weak reference and
    goes with the weight. A CUDA graph captured before an in-place change keeps the codes it was captured
    with (the engine does not change weights after load)."""
    key = _key(w)
    hit = _CODES.get(key)
    if hit is not None and hit[0]() is w and hit[1] == w._version:
        return hit[2] is not None
    found = fp8_blocks_exact(w.reshape(-1, w.shape[-1])) if w.is_contiguous() else None
    ref = weakref.ref(w)
    _CODES[key] = (ref, w._version, found)
    weakref.finalize(w, _drop, key, ref)
    return found is not None


def _fp8_of(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The codes registered for the memory of ``w`` (contiguous, a view or alias of a registered weight of
    the same size), None if there are none or the weight has changed in place since."""
    hit = _CODES.get(_key(w)) if w.is_contiguous() else None
    if hit is None:
        return None
    orig = hit[0]()
    return hit[2] if orig is not None and orig._version == hit[1] else None


def weight_inputs(prog) -> list[str]:  # noqa: ANN001  (dsv4c.program.Program; imported lazily elsewhere)
    """Input names of the weights the graph's ``grouped_proj`` calls read (through views), which the executor
    registers (:func:`register_weight`) before each call."""
    from dsv4c.passes.fxutil import input_names  # noqa: PLC0415

    names = input_names(prog)
    found = []
    for n in prog.graph_module.graph.find_nodes(op="call_function", target=torch.ops.dsv4c_rt.grouped_proj.default):
        w = n.args[1]
        while isinstance(w, fx.Node) and w.op == "call_function" and w.target in _VIEWS:
            w = w.args[0]
        if w in names and names[w] not in found:
            found.append(names[w])
    return found


def _grouped_proj_cuda(o: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    from dsv4c.ops import triton_gemv  # noqa: PLC0415

    B, S, G, K = o.shape
    R = w.shape[1]
    fits = (B * S <= triton_gemv.ROWS and o.dtype == w.dtype == torch.bfloat16
            and R % triton_gemv.TUNE["tc_bn"] == 0 and K % BLOCK == 0)
    found = _fp8_of(w) if fits else None
    if found is None:
        return torch.einsum(WO_A_EQUATION, o, w)
    codes, scale = found
    return triton_gemv.fp8_grouped_gemv_tc(o.reshape(B * S, G * K), codes, scale, G).view(B, S, G, R)


grouped_proj.register_kernel("cuda")(_grouped_proj_cuda)


def rewrite_wo_a_fp8(gm: fx.GraphModule) -> int:
    """Every ``einsum("bsgk,gdk->bsgd", o, w)`` (the attention output's grouped projection) ->
    ``dsv4c_rt::grouped_proj(o, w)``; the number rewritten."""
    return rewrite_einsums(gm, WO_A_EQUATION,
                           lambda g, o, w: g.call_function(torch.ops.dsv4c_rt.grouped_proj.default, (o, w)))


__all__ = ["grouped_proj", "fp8_blocks_exact", "register_weight", "rewrite_wo_a_fp8", "weight_inputs",
           "WO_A_EQUATION"]
