"""Shared helpers of the pass tests: trace once, clone programs, run a program on fresh random inputs."""

from __future__ import annotations

import copy

import torch
import torch.fx as fx

from dsv4c.frontend.export import TraceConfig, trace_program
from dsv4c.frontend.model import StepContext, constants
from dsv4c.layout import cache_tensors
from dsv4c.passes import run_pipeline
from dsv4c.program import Program

MAX_SEQ = 64
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# (numerics, dtype, entry): both numerics modes, both activation dtypes and both entry points in three
# traces (tracing dominates the run time): reference numerics in bf16, what `dsv4c build` makes by default
# (prefill and decode), and exact numerics in fp32, the transformers cross-check setting (prefill).
COMBOS = [("reference", "bf16", "prefill"), ("reference", "bf16", "decode"), ("exact", "fp32", "prefill")]


def combo_id(c) -> str:
    return "-".join(c)


def trace(ctx: StepContext, entry: str, max_seq_len: int = MAX_SEQ) -> Program:
    """The entry point as the build traces it."""
    return trace_program(ctx, entry, TraceConfig(max_seq_len))


def clone_program(prog: Program) -> Program:
    """A copy of the graph (node meta, incl. fake values, shallow-copied) that passes may rewrite."""
    g = fx.Graph()
    out = g.graph_copy(prog.graph_module.graph, {})
    g.output(out)
    g._codegen = copy.copy(prog.graph_module.graph._codegen)
    return Program(prog.entry, fx.GraphModule(torch.nn.Module(), g), list(prog.input_names), copy.deepcopy(prog.meta))


def passes_only(programs: dict[str, Program], weights, ctx, keep: set[str], target: str = "cpu", config=None):
    """Run the target pipeline on clones with every product pass outside ``keep`` disabled."""
    from dsv4c.passes.pipeline import PIPELINES

    product = set(PRODUCT_PASSES)
    disable = sorted(n for n, _ in PIPELINES[target] if n in product and n not in keep)
    progs = {e: clone_program(p) for e, p in programs.items()}
    logs: list[str] = []
    w, records = run_pipeline(progs, weights, ctx, target, disable, None, logs.append, config)
    return progs, w, records


def random_inputs(ctx: StepContext, entry: str, seed: int, max_seq_len: int = MAX_SEQ):
    """(cache, input_ids, start_pos): a random cache state, random tokens at random positions."""
    gen = torch.Generator().manual_seed(seed)
    spec = ctx.spec
    batch, seq = (1, 11) if entry == "prefill" else (3, 1)
    cache = {}
    for k, t in cache_tensors(spec, batch, max_seq_len, ctx.dtype, storage=ctx.kv_storage).items():
        if t.dtype == torch.uint8:  # packed storage: ue8m0 scale bytes near 2^0, random e2m1 code pairs
            lo, hi = (120, 128) if k.endswith("_scale") else (0, 256)
            cache[k] = torch.randint(lo, hi, t.shape, generator=gen, dtype=torch.uint8)
        else:
            cache[k] = torch.randn(t.shape, generator=gen).to(t.dtype)
    ids = torch.randint(0, spec.vocab_size, (batch, seq), generator=gen)
    start = torch.randint(0, max_seq_len - seq, (batch,), generator=gen)
    return cache, ids, start


def run(prog: Program, weights, ctx: StepContext, inputs):
    """Logits and the updated cache of one call (inputs are cloned: runs do not disturb each other)."""
    cache, ids, start = inputs
    cache = {k: v.clone() for k, v in cache.items()}
    consts = constants(ctx.spec)
    flat = []
    for name in prog.input_names:
        kind, _, key = name.partition(".")
        if kind == "params":
            flat.append(weights[key])
        elif kind == "consts":
            flat.append(consts[key])
        elif kind == "cache":
            flat.append(cache[key])
        else:
            flat.append({"input_ids": ids, "start_pos": start}[name])
    with torch.no_grad():
        logits = prog(*flat)
    return logits, cache


PRODUCT_PASSES = ("fuse_compress_indexer", "rewrite_swiglu_clamp", "pack_fp4_experts", "fuse_shared_input_gemms",
                  "schedule_expert_waves")


def h100_program(spec, ckpt, entry: str, numerics: str = "reference", dtype: torch.dtype = torch.bfloat16):
    """(program, weights, ctx): one entry point after the h100 pipeline with every product pass, as a GPU
    build makes it, and the checkpoint's weights as that pipeline leaves them."""
    from dsv4c.checkpoint import load_checkpoint, to_model_params

    ctx = StepContext(spec, numerics, dtype)
    w = to_model_params(spec, load_checkpoint(ckpt, spec), dtype)
    progs, w, _ = passes_only({entry: trace(ctx, entry)}, w, ctx, set(PRODUCT_PASSES), target="h100")
    return progs[entry], w, ctx


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bits (FP8 tensors compared as their bytes: torch.equal has no float8 kernel)."""
    as_bytes = (lambda t: t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t)  # noqa: E731
    return a.dtype == b.dtype and torch.equal(as_bytes(a), as_bytes(b))


def assert_same_step(ref: Program, new: Program, weights, ctx: StepContext, entry: str, seed: int) -> None:
    """One step of both programs on the same random inputs: logits and written cache bit for bit equal."""
    inputs = random_inputs(ctx, entry, seed=seed)
    want, want_cache = run(ref, weights, ctx, inputs)
    got, got_cache = run(new, weights, ctx, inputs)
    assert torch.equal(got, want)
    for k in want_cache:
        assert bitwise_equal(got_cache[k], want_cache[k]), k


def call_positions(prog: Program, target) -> list[int]:
    """Graph positions of the nodes calling ``target``."""
    return [i for i, n in enumerate(prog.graph_module.graph.nodes) if n.op == "call_function" and n.target == target]


def expected_sites(spec, dtype: torch.dtype = torch.bfloat16) -> dict[str, dict[str, int]]:
    """Exact rewrite sites per entry point, from the spec and the model dtype (the traced step runs the main
    blocks): the compressor's 16-bit projections share a launch only in a bf16 model, where each is a cast
    weight applied in fp32."""
    L = spec.num_layers
    kinds = [spec.attn_kind(i) for i in range(L)]
    csa, hca = kinds.count("csa"), kinds.count("hca")
    return {
        "fuse_compress_indexer": {"projection": csa, "finish_pair": csa, "finish": hca, "indexer_topk": csa},
        "rewrite_swiglu_clamp": {"routed": L, "shared": L * spec.n_shared_experts},
        "pack_fp4_experts": {"grouped_gemms": 3 * L},
        "fuse_shared_input_gemms": {"wq_a+wkv": L, "wq_b+indexer.wq_b": csa, "routed w1+w3": L,
                                    "shared w1+w3": L * -(-2 * spec.n_shared_experts // 4),
                                    "compressor (+ indexer weights_proj)": (csa + hca) * (dtype == torch.bfloat16)},
        "schedule_expert_waves": {"moe_blocks": L},
    }


def check_counts(records: list[dict], spec, entries, no_waves=(), dtype: torch.dtype = torch.bfloat16) -> None:
    """Assert every product pass matched exactly as often as the spec (and model dtype) says, per entry
    point (``no_waves``: entry points the pipeline does not give expert waves, 0 matches there)."""
    want = expected_sites(spec, dtype)
    by_name = {r["name"]: r for r in records}
    for name, sites in want.items():
        rec = by_name[name]
        for e in entries:
            n = 0 if name == "schedule_expert_waves" and e in no_waves else sum(sites.values())
            assert rec["matches"][e] == n, (name, e, rec["matches"], sites)
    for e in entries:
        assert by_name["fuse_compress_indexer"]["sites"][e] == want["fuse_compress_indexer"]
        assert by_name["rewrite_swiglu_clamp"]["sites"][e] == want["rewrite_swiglu_clamp"]
