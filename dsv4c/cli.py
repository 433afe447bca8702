"""The ``dsv4c`` command line: synth, build, run, inspect, verify, bench.

Errors raised as ``DSV4CError`` print as one paragraph (problem + fix) and exit with status 2; no
traceback. Progress goes to stderr, results to stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable

from .errors import DSV4CError, InputError


def _progress(quiet: bool) -> Callable[[str], None]:
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        if not quiet:
            print(f"[dsv4c {time.perf_counter() - t0:6.1f}s] {msg}", file=sys.stderr, flush=True)

    return log


def _parse_ids(text: str) -> list[int]:
    try:
        ids = [int(x) for x in text.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise InputError(f"--prompt-ids {text!r} is not a comma-separated list of integers.",
                         "write it like --prompt-ids 1,2,3.") from None
    if not ids:
        raise InputError("--prompt-ids is empty.", "give at least one token id, e.g. --prompt-ids 1,2,3.")
    return ids


def cmd_synth(a: argparse.Namespace) -> int:
    from .checkpoint import synthesize_checkpoint
    from .spec import get_variant

    spec = get_variant(a.variant)
    out = synthesize_checkpoint(spec, a.output, seed=a.seed, progress=_progress(a.quiet))
    print(f"wrote synthetic {spec.name} checkpoint to {out}")
    return 0


def cmd_build(a: argparse.Namespace) -> int:
    from .spec import ModelSpec, get_variant

    # A bad config or variant fails before the compiler (and torch) is imported.
    if a.checkpoint:
        ModelSpec.from_config(a.checkpoint)
    elif a.variant:
        get_variant(a.variant)
    from .lowering.build import BuildRequest, build

    req = BuildRequest(output=Path(a.output) if a.output else None, variant=a.variant,
                       checkpoint=Path(a.checkpoint) if a.checkpoint else None, target=a.target, backend=a.backend,
                       numerics=a.numerics, dtype=a.dtype, max_seq_len=a.max_seq_len, max_batch=a.max_batch,
                       layers=a.layers, seed=a.seed, dry_run=a.dry_run, dump_passes=Path(a.dump_passes) if a.dump_passes else None,
                       disable_passes=a.disable_pass or [],
                       kv_storage=None if a.kv_storage in (None, "auto") else a.kv_storage)
    res = build(req, _progress(a.quiet))
    if a.dry_run:
        print(res.plan_text)
        print(f"\ndry run finished in {res.seconds:.1f} s; nothing written")
    else:
        print(f"built {res.output} in {res.seconds:.1f} s")
    return 0


def cmd_run(a: argparse.Namespace) -> int:
    from .artifact import open_artifact
    from .requests import check_generate_request

    # Bad input fails before torch is imported or any weight is loaded (loading a large artifact takes minutes).
    ids = _parse_ids(a.prompt_ids)
    m = open_artifact(a.artifact).manifest
    check_generate_request([ids], a.max_new_tokens, a.temperature, a.top_k, a.top_p, a.seed,
                           vocab_size=m["spec"]["vocab_size"], max_seq_len=m["max_seq_len"], max_batch=m["max_batch"])
    from .runtime import Engine

    eng = Engine.load(a.artifact, device=a.device)
    res = eng.generate([ids], max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k,
                       top_p=a.top_p, seed=a.seed, stop_at_eos=a.stop_at_eos)
    toks = res.tokens[0]
    per_tok = res.decode_s / res.decode_steps * 1e3 if res.decode_steps else 0.0
    if a.json:
        print(json.dumps({"prompt_ids": ids, "generated_ids": toks, "prefill_ms": round(res.prefill_s * 1e3, 3),
                          "decode_ms_per_token": round(per_tok, 3), "decode_steps": res.decode_steps}))
    else:
        print(f"prompt ({len(ids)} tokens): {ids}")
        print(f"generated ({len(toks)} tokens): {toks}")
        print(f"prefill {res.prefill_s * 1e3:.1f} ms, decode {per_tok:.1f} ms/token")
    return 0


def cmd_inspect(a: argparse.Namespace) -> int:
    from .inspect_artifact import inspect_artifact

    print(inspect_artifact(a.artifact, graph=a.graph, stage=a.stage, diff=a.diff, as_json=a.json))
    return 0


def cmd_verify(a: argparse.Namespace) -> int:
    from .artifact import open_artifact

    art = open_artifact(a.artifact, full_check=True)
    n = len(art.manifest["files"])
    size = sum(f["size"] for f in art.manifest["files"].values())
    print(f"ok: {a.artifact}: {n} files, {size / 2**20:.1f} MiB, every byte matches its sha256")
    return 0


def cmd_bench(a: argparse.Namespace) -> int:
    try:
        from .bench import run_bench
    except ModuleNotFoundError:
        raise DSV4CError("benchmarks are not available in this installation.", "install dsv4c from the repository.") from None
    print(run_bench(a))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dsv4c", description="A compiler for DeepSeek-V4 models.")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("synth", help="write a hub-format checkpoint of random weights")
    s.add_argument("--variant", default="mini")
    s.add_argument("-o", "--output", required=True)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=cmd_synth)

    b = sub.add_parser("build", help="compile a model into an artifact directory")
    src = b.add_mutually_exclusive_group(required=True)
    src.add_argument("--variant", help="pro, flash, mini or tiny (weights synthesized when no checkpoint)")
    src.add_argument("--checkpoint", help="a hub checkpoint directory (config.json + safetensors)")
    b.add_argument("--target", default="cpu", help="cpu, h100 or h200")
    b.add_argument("--backend", default="eager", help="eager, inductor, onnx or tensorrt")
    b.add_argument("--numerics", default="reference", help="reference (the contract) or exact (no quant simulation)")
    b.add_argument("--dtype", default="bf16", help="activation dtype: bf16 or fp32")
    b.add_argument("--kv-storage", default="auto", choices=("auto", "packed", "dense"),
                   help="KV cache layout: packed = entries in storage format (FP8/FP4 + ue8m0; needs reference "
                        "numerics, bf16); dense = activation dtype; auto = packed where lossless")
    b.add_argument("--max-seq-len", type=int, default=4096, help="context capacity per sequence")
    b.add_argument("--max-batch", type=int, default=8, help="sequences served at once")
    b.add_argument("--layers", type=int, default=None, help="keep only the first N blocks (benchmark slices)")
    b.add_argument("--seed", type=int, default=0, help="seed of synthesized weights")
    b.add_argument("--dry-run", action="store_true", help="print the plan; allocate no weights, write nothing")
    b.add_argument("--dump-passes", metavar="DIR", help="write each pass's graph before/after, a diff and a DOT picture")
    b.add_argument("--disable-pass", action="append", metavar="NAME", help="skip one pass (repeatable)")
    b.add_argument("-o", "--output")
    b.set_defaults(fn=cmd_build)

    r = sub.add_parser("run", help="generate tokens with an artifact")
    r.add_argument("artifact")
    r.add_argument("--prompt-ids", required=True, help="comma-separated token ids")
    r.add_argument("--max-new-tokens", type=int, default=16)
    r.add_argument("--temperature", type=float, default=0.0)
    r.add_argument("--top-k", type=int, default=0)
    r.add_argument("--top-p", type=float, default=1.0)
    r.add_argument("--seed", type=int, default=None)
    r.add_argument("--stop-at-eos", action="store_true")
    r.add_argument("--device", default="cpu")
    r.add_argument("--json", action="store_true")
    r.set_defaults(fn=cmd_run)

    i = sub.add_parser("inspect", help="show an artifact's pass pipeline, memory plan and graphs")
    i.add_argument("artifact")
    i.add_argument("--graph", metavar="ENTRY", help="print the graph of prefill or decode")
    i.add_argument("--stage", metavar="PASS", help="with --graph and a dump: the graph after this pass")
    i.add_argument("--diff", nargs=2, metavar=("STAGE_A", "STAGE_B"), help="diff two dumped stages")
    i.add_argument("--json", action="store_true")
    i.set_defaults(fn=cmd_inspect)

    v = sub.add_parser("verify", help="check every byte of an artifact against its manifest")
    v.add_argument("artifact")
    v.set_defaults(fn=cmd_verify)

    be = sub.add_parser("bench", help="benchmark an artifact (GPU targets), JSON output")
    be.add_argument("artifact")
    be.add_argument("--json", metavar="PATH")
    be.set_defaults(fn=cmd_bench)
    return p


def _paragraph(text: str) -> str:
    """One paragraph: newlines and runs of blanks collapsed, so an error is a single readable line."""
    return " ".join(str(text).split())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except DSV4CError as e:
        print(_paragraph(f"dsv4c {args.cmd}: error: {e}"), file=sys.stderr)
        return 2
    except OSError as e:  # the environment, not the input: disk full, permissions, a vanished file
        where = f" ({e.filename})" if e.filename else ""
        print(_paragraph(f"dsv4c {args.cmd}: error: {e.strerror or e}{where}. Fix: check the path, its permissions "
                         f"and the free disk space, then retry."), file=sys.stderr)
        return 2
    except MemoryError:
        print(f"dsv4c {args.cmd}: error: out of memory. Fix: use a smaller variant, --max-batch or --max-seq-len, "
              "or a machine with more memory.", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dsv4c {args.cmd}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
