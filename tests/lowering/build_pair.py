"""Test helper (run as a script by conftest.py): build the eager and the onnx artifact of one
(variant, numerics) from ONE trace, then run the eager artifact through the comparison scenario and
save what it produced.

    python tests/lowering/build_pair.py OUT VARIANT NUMERICS [LAYERS]

Writes OUT/eager and OUT/onnx (ordinary ``lowering.build.build`` artifacts, same spec, same seed) and
OUT/eager_run.safetensors: the prompts, the greedy tokens the eager artifact chose and its logits for the
prefill and every decode step. Tracing dominates a build, so the second build reuses the first one's
traced programs (a fresh copy each time: passes rewrite programs in place).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

MAX_SEQ_LEN = 256
DECODE_STEPS = 32
# Two ragged prompts per variant: long enough to wrap the sliding window and complete compressor
# windows of every ratio during prefill and again during the decode steps.
PROMPTS = {"tiny": (40, 23), "mini": (150, 61)}


def copy_program(prog):
    from dsv4c.program import Program

    g = torch.fx.Graph()
    g.output(g.graph_copy(prog.graph_module.graph, {}))
    g._codegen = torch.fx.graph.CodeGen()
    out = Program(prog.entry, torch.fx.GraphModule(torch.nn.Module(), g), list(prog.input_names), dict(prog.meta))
    out.recompile()
    return out


def share_traces() -> None:
    """The second build reuses the first one's weights (the pipeline returns a new dict and leaves its
    input alone) and traced programs (copied: passes rewrite programs in place)."""
    import dsv4c.lowering.build as build_mod

    orig = getattr(build_mod, "trace_program", None)
    if orig is not None:  # else the build traces some other way now: no sharing, just slower
        memo = {}

        def trace_program(ctx, entry, cfg, log=None):  # noqa: ANN001, ANN202
            key = (ctx, entry, cfg)
            if key not in memo:
                memo[key] = orig(ctx, entry, cfg, log=log)
            return copy_program(memo[key])

        build_mod.trace_program = trace_program
    load = getattr(build_mod, "_load_weights", None)
    if load is not None:
        wmemo = {}

        def _load_weights(req, spec, dtype, progress, scratch=None):  # noqa: ANN001, ANN202
            key = (spec, dtype, req.seed, str(req.checkpoint))
            if key not in wmemo:
                wmemo[key] = load(req, spec, dtype, progress, scratch)
            return dict(wmemo[key])

        build_mod._load_weights = _load_weights


def eager_run(path: Path, variant: str) -> dict[str, torch.Tensor]:
    from dsv4c.runtime import Engine

    eng = Engine.load(path)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, eng.vocab_size, (n,), generator=g) for n in PROMPTS[variant]]
    logits = eng.prefill([p.tolist() for p in prompts])
    out = {f"prompt{i}": p for i, p in enumerate(prompts)}
    out["prefill_logits"] = logits
    tokens, steps = [], []
    for _ in range(DECODE_STEPS):
        nxt = logits.argmax(-1)
        tokens.append(nxt)
        logits = eng.decode(nxt)
        steps.append(logits)
    out["decode_tokens"] = torch.stack(tokens)
    out["decode_logits"] = torch.stack(steps)
    return out


def main(argv: list[str]) -> int:
    from safetensors.torch import save_file

    from dsv4c.lowering.build import BuildRequest, build

    # Two of these run side by side on a 2-core machine: one thread each. (Small ops with intra-op threads
    # on a busy machine wait for descheduled workers: 10x slower eager decode steps were measured.)
    torch.set_num_threads(1)
    out, variant, numerics = Path(argv[0]), argv[1], argv[2]
    layers = int(argv[3]) if len(argv) > 3 and argv[3] != "-" else None
    share_traces()
    t0 = time.perf_counter()
    for backend in ("eager", "onnx"):
        build(BuildRequest(output=out / backend, variant=variant, backend=backend, numerics=numerics, dtype="fp32",
                           max_seq_len=MAX_SEQ_LEN, max_batch=4, layers=layers, seed=0), progress=print)
    t1 = time.perf_counter()
    save_file({k: v.contiguous() for k, v in eager_run(out / "eager", variant).items()},
              str(out / "eager_run.safetensors"))
    print(f"builds {t1 - t0:.1f} s, eager run {time.perf_counter() - t1:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
