"""``pack_fp4_experts``: routed-expert FP4 weights into the tiled layout the target's expert kernel reads.

Every ``dsv4::fp4_grouped_linear(x, expert, W, S, ...)`` whose ``W`` ([E, N, K/2] uint8 nibbles) and ``S``
([E, N, K/32] fp32 ue8m0 scales) are parameters becomes ``dsv4::fp4_grouped_linear_packed`` on

- ``<name>.packed_weight``: uint8 [E, N/bn, K/bk, bn, bk/2], tile-contiguous, and
- ``<name>.packed_scale``:  uint8 [E, N/bn, K/32, bn], one exponent byte per block (2^(b-127)),

(``dsv4c.ops.fused`` documents the layout and holds the exact inverse, ``unpack_fp4_tiled``). The
tile (bn, bk) is the target's: small on CPU, 128x128 on Hopper, where the Triton kernel dequantizes a
tile of nibbles to FP8/bf16 in registers. The nibbles keep their bytes; the scales shrink from four bytes
to one. The old parameters leave the table; the record carries the layout and the weight bytes
before/after, and lands in the artifact manifest.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsv4c.ops.fused import PACKED_FP4_LAYOUT, pack_fp4_tiled
from dsv4c.program import Program

from .fxutil import call, calls, drop_replaced_params, dsv4, param_input, params, replace
from .manager import PassResult, WeightPass, register


@dataclass(frozen=True)
class PackConfig:
    bn: int = 16   # output rows per tile
    bk: int = 64   # reduction elements per tile (bk/2 bytes)


def _fit(tile: int, dim: int, floor: int) -> int | None:
    """The largest power-of-two fraction of ``tile`` (>= floor) that divides ``dim``."""
    t = tile
    while t >= floor:
        if dim % t == 0:
            return t
        t //= 2
    return None


@register
class PackFp4Experts(WeightPass):
    name = "pack_fp4_experts"
    Config = PackConfig
    uses_modules = ("dsv4c.passes.fxutil", "dsv4c.ops.fused")

    def run_all(self, programs: dict[str, Program], weights: dict[str, torch.Tensor], ctx) -> PassResult:
        cfg: PackConfig = self.config
        matches: dict[str, int] = {}
        packed: dict[str, dict] = {}  # old weight name -> layout entry
        problems: list[str] = []
        replaced: set[str] = set()
        for entry, prog in programs.items():
            g = prog.graph_module.graph
            pnames = params(prog)
            n = 0
            for node in calls(g, dsv4.fp4_grouped_linear.default):
                if len(node.args) != 6 or node.kwargs:
                    problems.append(f"{node.name}: unexpected call form")
                    continue
                x, expert, w, s, act_quant, ue8m0 = node.args
                wn, sn = pnames.get(w), pnames.get(s)
                if wn is None or sn is None or wn not in weights or sn not in weights:
                    problems.append(f"{node.name}: weight or scale is not a parameter")
                    continue
                if wn not in packed:
                    entry_or_err = self._pack(wn, sn, weights)
                    if isinstance(entry_or_err, str):
                        problems.append(entry_or_err)
                        continue
                    packed[wn] = entry_or_err
                lay = packed[wn]
                w_node, s_node = (param_input(prog, lay[k], weights[lay[k]]) for k in ("weight", "scale"))
                with g.inserting_before(node):
                    new = call(g, dsv4.fp4_grouped_linear_packed.default, x, expert, w_node, s_node, act_quant, ue8m0,
                               like=node)
                replace(node, new)
                replaced.update((wn, sn))
                n += 1
            matches[entry] = n
        before = sum(v["bytes_before"] for v in packed.values())
        after = sum(v["bytes_after"] for v in packed.values())
        drop_replaced_params(programs, weights, replaced)
        tiles = sorted({(v["bn"], v["bk"]) for v in packed.values()})
        notes = (f"{len(packed)} expert weights packed ({PACKED_FP4_LAYOUT}, tiles {tiles}); "
                 f"{before / 2**20:.2f} MiB -> {after / 2**20:.2f} MiB")
        if problems:
            notes += "; not packed: " + "; ".join(sorted(set(problems))[:5])
        record = {"layout": {"name": PACKED_FP4_LAYOUT, "bn": cfg.bn, "bk": cfg.bk,
                             "weight": "uint8 [E, N/bn, K/bk, bn, bk/2], low nibble = even k",
                             "scale": "uint8 ue8m0 [E, N/bn, K/32, bn], value 2^(byte-127)",
                             "tensors": packed},
                  "bytes_before": before, "bytes_after": after}
        return PassResult(matches, skipped=not packed, notes=notes, record=record)

    def _pack(self, wn: str, sn: str, weights: dict[str, torch.Tensor]) -> dict | str:
        w, s = weights[wn], weights[sn]
        if w.dim() != 3 or s.dim() != 3 or w.dtype not in (torch.uint8, torch.int8):
            return f"{wn}: not a stacked [E, N, K/2] FP4 tensor"
        E, N, K2 = w.shape
        bn, bk = _fit(self.config.bn, N, 1), _fit(self.config.bk, 2 * K2, 2)
        if bn is None or bk is None:
            return f"{wn}: no tile divides [{N}, {2 * K2}]"
        try:
            pw, ps = pack_fp4_tiled(w, s, bn, bk)
        except ValueError as e:
            return f"{wn}: {e}"
        base = wn.removesuffix(".weight")
        names = {"weight": f"{base}.packed_weight", "scale": f"{base}.packed_scale"}
        weights[names["weight"]], weights[names["scale"]] = pw, ps
        nbytes = lambda t: t.numel() * t.element_size()  # noqa: E731
        return {**names, "from": [wn, sn], "bn": bn, "bk": bk, "E": E, "N": N, "K": 2 * K2,
                "weight_shape": list(pw.shape), "scale_shape": list(ps.shape),
                "bytes_before": nbytes(w) + nbytes(s), "bytes_after": nbytes(pw) + nbytes(ps)}

