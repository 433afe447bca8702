"""Compile the decode-path Triton kernels for Hopper (sm_90) ahead of time, without a GPU.

The interpreter (TRITON_INTERPRET=1) runs kernel bodies as Python and accepts code that Triton's compiler
rejects (a return inside a branch, a constexpr assigned twice in an unrolled loop); such a kernel passes
every CPU test and fails at its first launch on the GPU. Here each kernel is compiled to a cubin at the
constexprs its launcher uses for a flash decode step, with Triton's bundled ptxas.

Run as a script with TRITON_INTERPRET unset (tests/ops/test_hopper_compile.py does, in a subprocess,
because the interpreter tests set it in their process). Prints one JSON line per kernel case.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from dsv4c.ops import triton_argmax as argmax  # noqa: E402
from dsv4c.ops import triton_fp4_mma as fp4mma  # noqa: E402
from dsv4c.ops import triton_fp8_mma as fp8mma  # noqa: E402
from dsv4c.ops import triton_gemv as gemv  # noqa: E402
from dsv4c.ops import triton_kernels as tk  # noqa: E402
from dsv4c.ops import triton_mhc as mhc  # noqa: E402
from dsv4c.ops import triton_topk as topk  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)


@dataclass
class Case:
    """One kernel specialization: pointer element types by parameter name (other runtime parameters are
    i32 unless named in ``floats``), the constexprs, launch options, and whether its PTX must hold
    tensor-core MMAs."""

    name: str
    kernel: object
    ptrs: dict[str, str]
    constexprs: dict[str, object]
    floats: tuple[str, ...] = ()
    num_warps: int = 4
    num_stages: int = 3
    wants_mma: bool = False
    extra: dict = field(default_factory=dict)


def _signature(case: Case) -> dict[str, str]:
    sig = {}
    for p in case.kernel.params:
        if p.is_constexpr:
            sig[p.name] = "constexpr"
        elif p.name in case.ptrs:
            sig[p.name] = "*" + case.ptrs[p.name]
        else:
            sig[p.name] = "fp32" if p.name in case.floats else "i32"
    return sig


def _cases() -> list[Case]:
    gemv_bufs = {"o_ptr": "fp32", "part_ptr": "fp32", "cnt_ptr": "i32"}
    fp4 = {"x_ptr": "bf16", "e_ptr": "i64", "order_ptr": "i64", "w_ptr": "u8", "sw_ptr": "u8", **gemv_bufs}
    fp4_const = dict(PBN=128, PBK=128, UE8M0=True, ASM=True, UPCAST=False, SPLIT=2, BN=128, ORDERED=False)
    attn_ptrs = {"q_ptr": "bf16", "wkv_ptr": "bf16", "wmask_ptr": "u8", "ckv_ptr": "bf16", "cidx_ptr": "i64",
                 "sink_ptr": "fp32", "o_ptr": "bf16", "pm_ptr": "fp32", "pl_ptr": "fp32", "pacc_ptr": "fp32",
                 "cnt_ptr": "i32", "cn_ptr": "u8", "cs_ptr": "u8", "cr_ptr": "bf16"}
    return [
        Case("fp8_gemv_tc", gemv._fp8_gemv_tc_kernel,
             {"x_ptr": "bf16", "w_ptr": "fp8e4nv", "sw_ptr": "fp32", **gemv_bufs},
             dict(ACT_Q=True, UE8M0=True, FP8_DOT=True, UPCAST=False, SPLIT=2, BN=128, BR=gemv.ROWS, ONE_ROW=True),
             wants_mma=True),
        # wo_a read as FP8 (TUNE wo_a_fp8): bf16 activations, e4m3 weights turned to bf16 for the dot, grouped
        Case("fp8_grouped_gemv_tc_bf16", gemv._fp8_gemv_tc_kernel,
             {"x_ptr": "bf16", "w_ptr": "fp8e4nv", "sw_ptr": "fp32", **gemv_bufs},
             dict(ACT_Q=False, UE8M0=True, FP8_DOT=False, UPCAST=False, SPLIT=2, BN=128, BR=gemv.ROWS, ONE_ROW=True),
             wants_mma=True),
        Case("w16_gemv_tc", tk._w16_linear_kernel,
             {"x_ptr": "fp32", "w_ptr": "bf16", **gemv_bufs},
             dict(X_SPLIT3=True, UPCAST=False, SPLIT=2, SWAP_AB=True, BM=gemv.ROWS, BN=128, BK=128, PDL=False),
             wants_mma=True),
        # the head's GEMV as a programmatic dependent (TUNE pdl): it waits before any access
        Case("w16_gemv_tc_pdl", tk._w16_linear_kernel,
             {"x_ptr": "bf16", "w_ptr": "bf16", **gemv_bufs},
             dict(X_SPLIT3=False, UPCAST=False, SPLIT=2, SWAP_AB=True, BM=gemv.ROWS, BN=128, BK=128, PDL=True),
             wants_mma=True, extra={"pdl": "wait_first"}),
        Case("w16_gemv_tc_pdl_prefetch", tk._w16_linear_kernel,
             {"x_ptr": "bf16", "w_ptr": "bf16", **gemv_bufs},
             dict(X_SPLIT3=False, UPCAST=False, SPLIT=2, SWAP_AB=True, BM=gemv.ROWS, BN=128, BK=128, PDL=True,
                  PREFETCH=True, PF_ROW_BYTES=512), wants_mma=True, extra={"pdl": "wait_first"}),
        # the prefill's mHC mixes (runtime/load_rewrites.py narrow_mix): 24 fp32 rows in three bf16 terms
        # against the bf16 streams, tiled, split-K
        Case("w16_tiled_mix", tk._w16_linear_kernel, {"x_ptr": "fp32", "w_ptr": "bf16", **gemv_bufs},
             dict(X_SPLIT3=True, UPCAST=False, SPLIT=3, SWAP_AB=False, BM=32, BN=64, BK=64, PDL=False), num_warps=4,
             wants_mma=True),
        *[Case(f"fp4_gemv_tc_nb{nb}", gemv._fp4_gemv_tc_kernel, fp4, dict(fp4_const, NB=nb), wants_mma=True)
          for nb in (1, 2, 4)],
        *[Case(f"fp4_gemv_mma_w{w}{'_pdl' if pdl else ''}", fp4mma._fp4_gemv_mma_kernel,
               {**fp4, "q_ptr": "u8", "qs_ptr": "fp32"},
               dict(UE8M0=True, SPLIT=2, ORDERED=False, NT=32 * w, TQ=16, PDL=pdl, UNROLL=1), num_warps=w,
               num_stages=1, wants_mma=True,
               extra={"lane_asm": True, "loop_copies": "some", **({"pdl": "wait_first"} if pdl else {})})
          for w, pdl in ((4, False), (8, False), (8, True))],
        # TUNE fp4_mma_l2_prefetch: the program's weight range asked into L2 once its expert is known (after
        # the wait), one predicated bulk prefetch a thread
        Case("fp4_gemv_mma_w8_pdl_l2", fp4mma._fp4_gemv_mma_kernel, {**fp4, "q_ptr": "u8", "qs_ptr": "fp32"},
             dict(UE8M0=True, SPLIT=2, ORDERED=False, NT=256, TQ=16, PDL=True, L2_PREFETCH=True, UNROLL=1),
             num_warps=8,
             num_stages=1, wants_mma=True, extra={"lane_asm": True, "pdl": "wait_first", "l2_prefetches": 1}),
        *[Case(f"fp4_gemv_mma_w8_pdl_unroll{u}", fp4mma._fp4_gemv_mma_kernel, {**fp4, "q_ptr": "u8", "qs_ptr": "fp32"},
               dict(UE8M0=True, SPLIT=2, ORDERED=False, NT=256, TQ=16, PDL=True, UNROLL=u), num_warps=8,
               num_stages=1, wants_mma=True,
               extra={"lane_asm": True, "pdl": "wait_first", "mma_steps": u, "loop_copies": "none"})
          for u in (2, 4)],
        *[Case(f"fp8_gemv_mma_m{m}{'_pdl' if pdl else ''}", fp8mma._fp8_gemv_mma_kernel,
               {"x_ptr": "bf16", "w_ptr": "fp8e4nv", "sw_ptr": "fp32", "q_ptr": "u8", "qs_ptr": "fp32", **gemv_bufs},
               dict(UE8M0=True, SPLIT=2, NT=128, MP=mp, QC=qc, PDL=pdl, UNROLL=1), num_stages=1, wants_mma=True,
               extra={"lane_asm": True, "loop_copies": "some", **({"pdl": "weights_first"} if pdl else {})})
          for m, mp, qc, pdl in ((1, 1, 8, False), (5, 8, 4, False), (1, 1, 8, True))],
        # TUNE fp8_mma_unroll: two register sets of weight tiles, both loaded before the wait
        Case("fp8_gemv_mma_m1_pdl_unroll2", fp8mma._fp8_gemv_mma_kernel,
             {"x_ptr": "bf16", "w_ptr": "fp8e4nv", "sw_ptr": "fp32", "q_ptr": "u8", "qs_ptr": "fp32", **gemv_bufs},
             dict(UE8M0=True, SPLIT=2, NT=128, MP=1, QC=8, PDL=True, UNROLL=2), num_stages=1, wants_mma=True,
             extra={"lane_asm": True, "pdl": "weights_first", "mma_steps": 2, "loop_copies": "none"}),
        Case("fp8_gemv_mma_m1_pdl_prefetch", fp8mma._fp8_gemv_mma_kernel,
             {"x_ptr": "bf16", "w_ptr": "fp8e4nv", "sw_ptr": "fp32", "q_ptr": "u8", "qs_ptr": "fp32", **gemv_bufs},
             dict(UE8M0=True, SPLIT=2, NT=128, MP=1, QC=8, PDL=True, PREFETCH=True, PF_TILES=8, UNROLL=1), num_stages=1,
             wants_mma=True,
             extra={"lane_asm": True, "pdl": "weights_first"}),
        # prefill: rows of one expert per tile; the weight tile and the activation codes arrive as 16-byte
        # copies (only the scale bytes are loaded one by one)
        Case("fp4_packed_prefill", tk._fp4_packed_kernel,
             {"x_ptr": "fp8e4nv", "sa_ptr": "fp32", "order_ptr": "i64", "t_exp_ptr": "i32", "t_row0_ptr": "i32",
              "t_row1_ptr": "i32", "w_ptr": "u8", "sw_ptr": "u8", "o_ptr": "bf16", "part_ptr": "bf16", "cnt_ptr": "i32"},
             dict(PBN=128, PBK=128, ACT_MODE=1, UE8M0=True, IEEE=False, UPCAST=False, ROWS_DIRECT=False, SPLIT=1,
                  BM=128, BN=128, SWAP=False), num_warps=8, num_stages=3, wants_mma=True,
             extra={"aligned": True, "max_byte_loads": 4}),
        # the swapped form (TUNE fp4_prefill_swap) as launched (64-row tiles, 4 warps): bf16 activations in
        # shared memory, the decoded weight as the register operand; its wgmmas stay in flight across K blocks
        Case("fp4_packed_prefill_swap", tk._fp4_packed_kernel,
             {"x_ptr": "bf16", "sa_ptr": "bf16", "order_ptr": "i64", "t_exp_ptr": "i32", "t_row0_ptr": "i32",
              "t_row1_ptr": "i32", "w_ptr": "u8", "sw_ptr": "u8", "o_ptr": "bf16", "part_ptr": "bf16", "cnt_ptr": "i32"},
             dict(PBN=128, PBK=128, ACT_MODE=0, UE8M0=True, IEEE=False, UPCAST=False, ROWS_DIRECT=False, SPLIT=1,
                  BM=64, BN=128, SWAP=True), num_warps=4, num_stages=3, wants_mma=True,
             extra={"aligned": True, "max_byte_loads": 4, "min_wgmma_pending": 1, "loop_mix": True}),
        Case("fp4_packed_prefill_swap_deq_f32", tk._fp4_packed_kernel,
             {"x_ptr": "bf16", "sa_ptr": "bf16", "order_ptr": "i64", "t_exp_ptr": "i32", "t_row0_ptr": "i32",
              "t_row1_ptr": "i32", "w_ptr": "u8", "sw_ptr": "u8", "o_ptr": "bf16", "part_ptr": "bf16", "cnt_ptr": "i32"},
             dict(PBN=128, PBK=128, ACT_MODE=0, UE8M0=True, IEEE=False, UPCAST=False, ROWS_DIRECT=False, SPLIT=1,
                  BM=64, BN=128, SWAP=True, DEQ_F32=True), num_warps=4, num_stages=3, wants_mma=True,
             extra={"aligned": True, "max_byte_loads": 4, "min_wgmma_pending": 1, "loop_mix": True}),
        Case("fp4_gemv_tc_bn64_nb2", gemv._fp4_gemv_tc_kernel, fp4, dict(fp4_const, BN=64, NB=2), wants_mma=True),
        Case("topk_ids_single", topk._topk_ids_kernel, {"s_ptr": "fp32", "len_ptr": "i64", "o_ptr": "i64"},
             dict(CHUNK=2048, KP=512, SINGLE=True, HAS_LEN=False), num_warps=8),
        Case("topk_ids_chunked", topk._topk_ids_kernel, {"s_ptr": "fp32", "len_ptr": "i64", "o_ptr": "i64"},
             dict(CHUNK=4096, KP=512, SINGLE=False, HAS_LEN=True), num_warps=8),
        # the indexer's top-512 at a 64k context, 9 segments of 2048 (4608 candidates in the last program)
        Case("topk_split", topk._topk_split_kernel,
             {"s_ptr": "fp32", "len_ptr": "i64", "c_ptr": "i64", "o_ptr": "i64", "cnt_ptr": "i32"},
             dict(SEG=2048, KP=512, CP=8192, HAS_LEN=True, HALF=True), num_warps=8),
        # the indexer's top-512 at a 1M context: a level over the scores, then the final block of candidates
        *[Case(f"topk_level_{name}", topk._topk_level_kernel,
               {"in_ptr": "i64" if packed else "fp32", "len_ptr": "i64", "c_ptr": "i64", "o_ptr": "i64"},
               dict(SEG=4096, KP=512, PACKED_IN=packed, HAS_LEN=not packed, FINAL=packed), num_warps=8)
          for name, packed in (("scores", False), ("final", True))],
        Case("hc_split_decode", tk._hc_split_kernel,
             {"mix_ptr": "fp32", "base_ptr": "fp32", "scale_ptr": "fp32", "pre_ptr": "fp32", "post_ptr": "fp32",
              "comb_ptr": "fp32"}, dict(N=4, NP=4, BR=1), floats=("eps",), num_warps=1),
        Case("hc_pre_decode", mhc._hc_pre_kernel,
             {"x_ptr": "bf16", "fn_ptr": "fp32", "base_ptr": "fp32", "scale_ptr": "fp32", "w_ptr": "bf16",
              "u_ptr": "bf16", "post_ptr": "fp32", "comb_ptr": "fp32", "part_ptr": "fp32", "mix_ptr": "fp32",
              "cnt_ptr": "i32"}, dict(N=4, NP=4, MP=32, CK=128, NCHP=128, BD=1024, ONE_PASS=False),
             floats=("hc_eps", "mix_eps", "norm_eps")),
        Case("hc_pre_decode_one_pass", mhc._hc_pre_kernel,
             {"x_ptr": "bf16", "fn_ptr": "fp32", "base_ptr": "fp32", "scale_ptr": "fp32", "w_ptr": "bf16",
              "u_ptr": "bf16", "post_ptr": "fp32", "comb_ptr": "fp32", "part_ptr": "fp32", "mix_ptr": "fp32",
              "cnt_ptr": "i32"}, dict(N=4, NP=4, MP=32, CK=128, NCHP=128, BD=4096, ONE_PASS=True),
             floats=("hc_eps", "mix_eps", "norm_eps"), num_warps=8),
        Case("sparse_attn_packed_decode", tk._sparse_attn_kernel, attn_ptrs,
             dict(BH=16, BN=16, BC=512, IEEE=False, UPCAST=False, PV_SPLIT=False, SPLIT=8, PACKED=True),
             floats=("scale",), num_stages=2, wants_mma=True),
        Case("attn_merge_decode", tk._attn_merge_kernel,
             {"sink_ptr": "fp32", "o_ptr": "bf16", "pm_ptr": "fp32", "pl_ptr": "fp32", "pacc_ptr": "fp32"},
             dict(SPLIT=16, BH=16, BCW=128)),
        Case("sparse_attn_packed_decode_no_merge", tk._sparse_attn_kernel, attn_ptrs,
             dict(BH=16, BN=16, BC=512, IEEE=False, UPCAST=False, PV_SPLIT=False, SPLIT=8, PACKED=True,
                  MERGE_LAST=False), floats=("scale",), num_stages=2, wants_mma=True),
        # prefill forms (one token per program, no split; dense and packed compressed entries)
        Case("sparse_attn_prefill", tk._sparse_attn_kernel, attn_ptrs,
             dict(BH=32, BN=32, BC=512, IEEE=False, UPCAST=False, PV_SPLIT=False, SPLIT=1, PACKED=False,
                  WIN_SCAN=True, SCAN_KEYS=1024), floats=("scale",), num_warps=8, num_stages=2, wants_mma=True),
        Case("indexer_score_packed_decode", tk._indexer_score_packed_kernel,
             {"q_ptr": "bf16", "kc_ptr": "u8", "ks_ptr": "u8", "w_ptr": "bf16", "vis_ptr": "i64", "o_ptr": "fp32"},
             dict(D=128, BS=1, BHI=64, BE=128, HAS_VIS=True, IEEE=False, UPCAST=False), num_stages=2,
             wants_mma=True),
        # prefill (TUNE indexer_prefill_tokens): 2 tokens x 64 heads per dot, 128 keys a step, causal counts
        Case("indexer_score_packed_prefill", tk._indexer_score_packed_tokens_kernel,
             {"q_ptr": "bf16", "kc_ptr": "u8", "ks_ptr": "u8", "w_ptr": "bf16", "vis_ptr": "i64", "o_ptr": "fp32"},
             dict(D=128, BT=2, BHI=64, BE=128, HAS_VIS=True, IEEE=False, UPCAST=False), num_warps=8, num_stages=2,
             wants_mma=True),
        # the greedy tail's argmax over the Flash vocabulary (32 slices per row)
        Case("argmax_rows", argmax._argmax_kernel,
             {"x_ptr": "fp32", "pv_ptr": "fp32", "pi_ptr": "i32", "cnt_ptr": "i32", "o_ptr": "i64"},
             dict(P=32, PP=32, CHUNK=argmax.CHUNK)),
        Case("swiglu_clamp", tk._swiglu_kernel, {"g_ptr": "bf16", "v_ptr": "bf16", "w_ptr": "fp32", "o_ptr": "bf16"},
             dict(HAS_W=True, BR=16, BN=128), floats=("limit",)),
        # the MoE join's add (TUNE fork_join_triton): routed fp32 + shared expert bf16
        Case("add_f32", tk._add_kernel, {"a_ptr": "fp32", "b_ptr": "bf16", "o_ptr": "fp32"}, dict(BLOCK=1024)),
        # the MoE fork's routed-expert input rows (TUNE gather_rows_triton)
        Case("gather_rows", tk._gather_rows_kernel, {"x_ptr": "bf16", "r_ptr": "i64", "o_ptr": "bf16"},
             dict(BLOCK=4096)),
    ]


# every other decode kernel under TUNE pdl (they wait first: their inputs come from the previous kernels)
PDL_TOO = ("hc_pre_decode_one_pass", "sparse_attn_packed_decode", "attn_merge_decode", "topk_split", "swiglu_clamp",
           "indexer_score_packed_decode", "argmax_rows", "add_f32", "gather_rows")


def _all_cases() -> list[Case]:
    cases = _cases()
    return cases + [dataclasses.replace(c, name=f"{c.name}_pdl", constexprs={**c.constexprs, "PDL": True},
                                        extra={**c.extra, "pdl": "wait_first"})
                    for c in cases if c.name in PDL_TOO]


def compile_case(case: Case, mix: bool = False) -> dict:
    t0 = time.perf_counter()
    sig = _signature(case)
    attrs = None
    if case.extra.get("aligned"):  # as launched at Flash sizes: every pointer and int divisible by 16
        attrs = {(i,): [["tt.divisibility", 16]] for i, t in enumerate(sig.values()) if t != "constexpr"}
    src = ASTSource(fn=case.kernel, signature=sig, constexprs=case.constexprs, attrs=attrs)
    compiled = triton.compile(src, target=HOPPER,
                              options={"num_warps": case.num_warps, "num_stages": case.num_stages})
    ptx = compiled.asm["ptx"]
    row = {"case": case.name, "seconds": round(time.perf_counter() - t0, 2),
           "cubin_bytes": len(compiled.asm["cubin"]), "mma": ("mma.sync" in ptx) or ("wgmma" in ptx),
           "wants_mma": case.wants_mma}
    if "max_byte_loads" in case.extra:  # byte-wise global loads left (the rest vectorized)
        row["byte_loads"] = len(re.findall(r"ld\.global(?:\.[\w:]+)*\.[bu]8 ", ptx))
        row["max_byte_loads"] = case.extra["max_byte_loads"]
    if "min_wgmma_pending" in case.extra:  # the fewest wgmma groups left in flight at a wait inside the loop
        row["wgmma_pending"] = _loop_wgmma_pending(ptx)
        row["min_wgmma_pending"] = case.extra["min_wgmma_pending"]
    if "pdl" in case.extra:
        row.update(_pdl_order(ptx))
    if "loop_copies" in case.extra:  # what the MMA loop does with the tiles it loads (see _mma_loop_copies)
        row["loop_copies"] = _mma_loop_copies(compiled.asm["cubin"])
        row["want_loop_copies"] = case.extra["loop_copies"]
    if "l2_prefetches" in case.extra:  # bulk L2 prefetches in the whole kernel, and how many the case wants
        row["l2_prefetches"] = ptx.count("cp.async.bulk.prefetch.L2.global")
        row["want_l2_prefetches"] = case.extra["l2_prefetches"]
    if mix or case.extra.get("loop_mix"):
        row["loop_mix"] = loop_mix(compiled.asm["cubin"])
    if case.extra.get("lane_asm"):
        row["asm_one_per_thread"] = _asm_one_per_thread(compiled.asm["ttgir"], case.num_warps)
        row["mma_sync_count"] = ptx.count("mma.sync")
        row["want_mma_sync"] = 4 * case.extra.get("mma_steps", 1)  # 4 scale groups a K tile, per unrolled tile
    return row


def _loop_wgmma_pending(ptx: str) -> int:
    """The smallest ``wgmma.wait_group`` count inside the kernel's loops (PTX between a loop header label and
    its back edge); -1 when no loop holds a wait."""
    counts = []
    for header in re.finditer(r"^(\$L__BB\d+_\d+):\s*// =>This Inner Loop Header", ptx, flags=re.M):
        label = header.group(1)
        back = ptx.find(f"bra \t{label};", header.end())
        if back < 0:
            back = ptx.find(f"bra.uni \t{label};", header.end())
        body = ptx[header.end():back if back > 0 else None]
        counts += [int(n) for n in re.findall(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", body)]
    return min(counts) if counts else -1


def _pdl_order(ptx: str) -> dict:
    """What a programmatic-dependent kernel does before it waits for the previous kernel: whether it lets
    the next kernel launch only after the wait (so that the next one may count on everything before this
    kernel being finished), and its global loads (non-coherent ``.nc`` ones: weights) and stores
    ahead of the first ``griddepcontrol.wait``."""
    wait = ptx.find("griddepcontrol.wait")
    release = ptx.find("griddepcontrol.launch_dependents")
    head = ptx[:wait] if wait >= 0 else ptx
    loads = re.findall(r"\bld\.global(?:\.[\w:]+)*", head)
    return {"pdl_wait": wait >= 0, "pdl_release_after_wait": 0 <= wait < release,
            "pdl_loads_before_wait": len(loads),
            "pdl_plain_loads_before_wait": sum(".nc" not in ld for ld in loads),
            "pdl_stores_before_wait": len(re.findall(r"\b(?:st|atom|red)\.global", head)),
            "pdl_l2_prefetches_before_wait": head.count("cp.async.bulk.prefetch.L2.global")}


def _sass(cubin: bytes) -> list[str] | None:
    """The cubin's SASS lines (Triton's bundled nvdisasm); None when the tool is missing."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    if not os.path.exists(tool):
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool, "-c", f.name], capture_output=True, text=True).stdout.splitlines()


def _loops(sass: list[str]) -> list[list[str]]:
    """The bodies of the SASS's loops (a label up to a backward branch to it), in program order."""
    labels = {m.group(1): i for i, line in enumerate(sass) if (m := re.match(r"^\.(L_x_\d+):", line))}
    out = []
    for i, line in enumerate(sass):
        m = re.search(r"BRA `\(\.(L_x_\d+)\)", line)
        if m and labels.get(m.group(1), i) < i:
            out.append(sass[labels[m.group(1)]:i + 1])
    return out


def loop_mix(cubin: bytes) -> dict[str, int] | None:
    """Instruction counts (by opcode, without modifiers) of the kernel's longest loop body: what one
    iteration of its main loop issues per thread. How a kernel spends its issue slots is readable here
    without a GPU (e.g. one F2F conversion per weight element in the prefill FP4 expert loop)."""
    sass = _sass(cubin)
    if sass is None:
        return None
    bodies = _loops(sass)
    if not bodies:
        return {}
    ops: dict[str, int] = {}
    for line in max(bodies, key=len):
        m = re.search(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line)
        if m:
            ops[m.group(1)] = ops.get(m.group(1), 0) + 1
    return dict(sorted(ops.items(), key=lambda kv: -kv[1]))


def _mma_loop_copies(cubin: bytes) -> int | None:
    """Register copies (MOV / IMAD.MOV) after the last global load of the kernel's MMA loop (the loop whose
    body holds the HMMAs), in the SASS of the cubin (Triton's bundled nvdisasm): a copy there reads a register
    that a load issued in the same iteration is still filling and waits for it. None: no nvdisasm, or no such
    loop."""
    sass = _sass(cubin)
    if sass is None:
        return None
    for body in _loops(sass):
        body = body[:-1]  # without the back edge
        if any("HMMA" in b for b in body):
            last = max(j for j, b in enumerate(body) if "LDG" in b)
            return sum(bool(re.search(r"\b(?:IMAD\.)?MOV(?:\.U32)? ", b)) for b in body[last:])
    return None


def _asm_one_per_thread(ttgir: str, num_warps: int) -> bool:
    """Every inline-asm op works on tensors that put element i in thread i (1-D, one element per thread):
    the lane-level PTX of dsv4c.ops.triton_fp4_mma relies on it."""
    layouts = dict(re.findall(r"^(#[\w.]+) = (#ttg\.blocked<[^\n]*>)", ttgir, flags=re.M))
    want = (f"sizePerThread = [1], threadsPerWarp = [32], warpsPerCTA = [{num_warps}], order = [0]")
    seen = 0
    for line in ttgir.splitlines():
        if "elementwise_inline_asm" not in line:
            continue
        for name in re.findall(r"tensor<\d+x\w+, (#[\w.]+)>", line):
            seen += 1
            if want not in layouts.get(name, ""):
                return False
    return seen > 0



def main(argv: list[str]) -> int:
    """``hopper_compile.py [--mix] [CASE ...]``: compile the cases (all without names); ``--mix`` adds each
    kernel's main-loop instruction mix (:func:`loop_mix`)."""
    mix = "--mix" in argv[1:]
    only = set(argv[1:]) - {"--mix"}
    failed = 0
    for case in _all_cases():
        if only and case.name not in only:
            continue
        try:
            row = compile_case(case, mix)
        except Exception as exc:  # report every case, then fail
            row = {"case": case.name, "error": f"{type(exc).__name__}: {exc}"[-2000:]}
            failed += 1
        print(json.dumps(row), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
