"""Hub-format checkpoints: a synthetic writer and a strict, memory-mapped reader.

The writer produces what a published DeepSeek-V4 checkpoint looks like: ``config.json``, sharded
``*.safetensors`` with ``model.safetensors.index.json``, FP8 e4m3 weights with 128x128 ue8m0 block
scales, FP4 (e2m1) routed experts with 1x32 ue8m0 scales, and a ``tid2eid`` table with distinct experts
per row. The reader accepts the spellings other tools use (a ``model.`` prefix, ``weight_scale_inv``,
``e_score_correction_bias``, FP4 stored as int8/uint8 bytes, scales as fp32/bf16/e8m0) and is strict:
every missing, unexpected or mis-shaped tensor is reported in one error.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable

import torch
from safetensors.torch import save_file

from . import quant
from .errors import CheckpointError
from .layout import F8, U8, TensorSpec, checkpoint_tensors, model_tensors
from .safetensors_header import format_problems, inspect_header, load_tensors_checked
from .spec import FP4_BLOCK, ModelSpec

Progress = Callable[[str], None]
INDEX_NAME = "model.safetensors.index.json"


# ---- synthesis ------------------------------------------------------------------------------------

# Projections whose output is added to the residual streams.
_RESIDUAL_WRITERS = (".attn.wo_b.weight", ".w2.weight")


def residual_write_scale(name: str, depth: int | None) -> float:
    """1/sqrt(2 * depth) for a projection that writes into the residual streams (attention ``wo_b``, each
    routed and shared expert's ``w2``), else 1 (and 1 everywhere when ``depth`` is None): the depth-scaled
    initialization of GPT-2 and Megatron-LM.

    Why: with every matrix at N(0, 1/fan_in), each sub-layer adds as much as the streams already hold, and
    the random model turns a one-ulp bf16 change of its input into 10-30 % of its logits (the FP8/FP4
    activation roundings and routing choices amplify it at every block). With the writes scaled down, as
    in a trained model, the streams are mostly carried through and a rounding difference stays small, so
    two bf16 implementations can be compared at all (the GPU suite's bf16 check)."""
    if depth is None or not name.endswith(_RESIDUAL_WRITERS):
        return 1.0
    return 1.0 / math.sqrt(2 * depth)


def _init_value(name: str, ts: TensorSpec, spec: ModelSpec, gen: torch.Generator, depth: int | None) -> torch.Tensor:
    """A random fp32 value for one tensor: activations stay O(1) through the stack, and the residual
    writes are scaled by :func:`residual_write_scale`."""
    shape = ts.shape
    leaf = name.rsplit(".", 1)[-1]

    def randn(std: float, mean: float = 0.0) -> torch.Tensor:
        return torch.randn(shape, generator=gen) * std + mean

    if name.endswith("norm.weight"):
        return randn(0.1, 1.0)
    if "hc_" in name and name.endswith("_fn"):
        return randn(0.5 / math.sqrt(shape[-1]))
    if "hc_" in name and name.endswith("_base"):
        return randn(0.5)
    if "hc_" in name and name.endswith("_scale"):
        return torch.rand(shape, generator=gen) + 0.5
    if leaf == "attn_sink":
        return randn(1.0)
    if leaf == "ape":
        return randn(0.5)
    if name.endswith("gate.bias"):
        return randn(0.1)
    if name == "embed.weight":
        return randn(1.0)
    fan_in = shape[-1]
    return randn(residual_write_scale(name, depth) / math.sqrt(fan_in))


def _tid2eid(spec: ModelSpec, gen: torch.Generator) -> torch.Tensor:
    """[vocab, top_k] expert ids, distinct within each row."""
    scores = torch.rand(spec.vocab_size, spec.n_routed_experts, generator=gen)
    return scores.argsort(dim=-1)[:, : spec.num_experts_per_tok].to(torch.int64).contiguous()


def synthesize_tensors(spec: ModelSpec, seed: int = 0, progress: Progress | None = None,
                       depth: int | None = None) -> Iterable[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) in hub storage format for every checkpoint tensor, deterministically.
    ``depth``: scale the residual writes for a model of that many blocks (:func:`residual_write_scale`;
    a truncated slice passes its full model's depth); None: every matrix at N(0, 1/fan_in)."""
    gen = torch.Generator().manual_seed(seed)
    table = checkpoint_tensors(spec)
    ue8m0 = spec.scale_fmt == "ue8m0"
    for name, ts in table.items():
        if name.endswith(".scale"):
            continue  # written with its weight
        if name.endswith("tid2eid"):
            yield name, _tid2eid(spec, gen)
            continue
        scale_name = name[: -len("weight")] + "scale"
        if ts.dtype == F8:
            w = _init_value(name, ts, spec, gen, depth)
            q, s = quant.quantize_fp8_weight(w, ue8m0=ue8m0)
            yield name, q
            yield scale_name, s.to(torch.float8_e8m0fnu) if ue8m0 else s
        elif ts.dtype == U8:
            n, k2 = ts.shape
            w = _init_value(name, TensorSpec((n, 2 * k2), torch.float32), spec, gen, depth)
            packed, s = quant.quantize_fp4_weight(w, FP4_BLOCK)
            yield name, packed.view(torch.float4_e2m1fn_x2)
            yield scale_name, s.to(torch.float8_e8m0fnu)
        elif ts.dtype == torch.int64:
            raise AssertionError(name)
        else:
            yield name, _init_value(name, ts, spec, gen, depth).to(ts.dtype)


def synthesize_checkpoint(spec: ModelSpec, out_dir: str | Path, seed: int = 0, shard_bytes: int = 64 << 20,
                          progress: Progress | None = None, depth: int | None = None) -> Path:
    """Write a hub-format checkpoint of random weights; atomic (temp dir renamed into place)."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"{out} already exists and is not empty.", "choose a new output directory or remove it.")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for name, t in synthesize_tensors(spec, seed, progress, depth):
            nbytes = t.numel() * t.element_size()
            if size and size + nbytes > shard_bytes:
                shards.append({})
                size = 0
            shards[-1][name] = t.contiguous()
            size += nbytes
        weight_map: dict[str, str] = {}
        total = 0
        for k, shard in enumerate(shards):
            fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(tmp / fname), metadata={"format": "pt"})
            for name, t in shard.items():
                weight_map[name] = fname
                total += t.numel() * t.element_size()
            if progress:
                progress(f"wrote {fname} ({len(shard)} tensors)")
        (tmp / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
        (tmp / "config.json").write_text(json.dumps(spec.to_hub_config(), indent=2))
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# ---- reading --------------------------------------------------------------------------------------

def _canonical_name(name: str) -> str:
    if name.startswith("model."):
        name = name[len("model."):]
    if name.endswith(".weight_scale_inv"):
        name = name[: -len("weight_scale_inv")] + "scale"
    if name.endswith(".e_score_correction_bias"):
        name = name[: -len("e_score_correction_bias")] + "bias"
    return name


def _is_file(p: Path) -> bool:
    try:
        return p.is_file()
    except (OSError, ValueError):  # a name too long for the file system, or with a NUL byte
        return False


def _shard_files(ckpt: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The shard files of a checkpoint and, when it has an index, its weight map."""
    if not ckpt.is_dir():
        raise CheckpointError(f"Checkpoint directory {ckpt} does not exist.", "point --checkpoint at a hub checkpoint directory.")
    index = ckpt / INDEX_NAME
    if index.is_file():
        fix = f"regenerate {INDEX_NAME} or remove it (then every *.safetensors file is read)."
        try:
            doc = json.loads(index.read_text())
        except (OSError, ValueError, RecursionError) as e:
            raise CheckpointError(f"{index} is not readable JSON ({type(e).__name__}: {str(e)[:120]}).", fix) from None
        wm = doc.get("weight_map") if isinstance(doc, dict) else None
        if not isinstance(wm, dict) or not all(isinstance(f, str) for f in wm.values()):
            raise CheckpointError(f"{index} has no `weight_map` object of tensor name -> shard file name.", fix)
        files = sorted(set(wm.values()))
        bad = [f for f in files if Path(f).name != f or f in ("", ".", "..") or "\\" in f or "\x00" in f]
        if bad:
            raise CheckpointError(f"{index} names shard files outside the checkpoint directory: {bad[:8]}.",
                                  "the index may only name files in its own directory.")
        missing = [f for f in files if not _is_file(ckpt / f)]
        if missing:
            raise CheckpointError(f"{index} names shard files that do not exist: {missing[:8]}"
                                  f"{f' ... ({len(missing) - 8} more)' if len(missing) > 8 else ''}.",
                                  "re-download the missing shards.")
        return [ckpt / f for f in files], wm
    files = sorted(ckpt.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"No *.safetensors files in {ckpt}.", "point --checkpoint at a hub checkpoint directory.")
    return files, None


# Stored dtypes accepted for each canonical dtype, and how the stored shape relates to the canonical one.
_FLOATS = ("F32", "BF16", "F16")


def _check_stored(name: str, stored: str, entry: dict, want: TensorSpec) -> str | None:
    """Check one header entry against the expected tensor, before anything is read. None when fine."""
    dt, shape = entry["dtype"], tuple(entry["shape"])
    if want.dtype == U8:  # packed FP4: F4 [..., K] (two values per byte) or I8/U8 bytes [..., K/2]
        if dt == "F4":
            shape = (*shape[:-1], shape[-1] // 2) if shape else shape
        elif dt not in ("I8", "U8"):
            return f"{stored}: dtype {dt} where packed FP4 (F4, I8 or U8) was expected"
    elif want.dtype == F8:
        if dt != "F8_E4M3":
            return f"{stored}: dtype {dt} where F8_E4M3 was expected"
    elif want.dtype == torch.float32 and name.endswith(".scale"):
        if dt not in ("F32", "BF16", "F8_E8M0"):
            return f"{stored}: dtype {dt} where a scale (F32, BF16 or F8_E8M0) was expected"
    elif want.dtype == torch.int64:
        if dt not in ("I64", "I32", "I16"):
            return f"{stored}: dtype {dt} where an integer table (I64, I32 or I16) was expected"
    elif dt not in _FLOATS:
        return f"{stored}: dtype {dt} where a float tensor (F32, BF16 or F16) was expected"
    if shape != want.shape:
        return f"{stored}: shape {list(entry['shape'])} where {list(want.shape)} was expected"
    return None


def _to_canonical(name: str, t: torch.Tensor, want: TensorSpec) -> torch.Tensor:
    """Convert one stored tensor (already checked by ``_check_stored``) to the canonical in-memory form."""
    if want.dtype == U8:
        return t.view(torch.uint8) if t.dtype != torch.uint8 else t
    if want.dtype == F8:
        return t
    if want.dtype == torch.float32 and name.endswith(".scale"):
        return t.float()
    if want.dtype == torch.int64:
        return t.long()
    return t.to(want.dtype)


def load_checkpoint(ckpt_dir: str | Path, spec: ModelSpec, progress: Progress | None = None) -> dict[str, torch.Tensor]:
    """Read every tensor of a hub checkpoint into canonical form (names without ``model.``; FP4 as uint8
    [N, K/2]; scales fp32).

    Every shard's header is validated first (size cap, offsets, dtype x shape = bytes), then every
    tensor's name, dtype and shape is checked against the spec from the headers alone; only a
    checkpoint without problems is read. Raises one ``CheckpointError`` listing every problem found:
    damaged or truncated files, missing, unexpected, duplicated, mis-typed and mis-shaped tensors."""
    ckpt = Path(ckpt_dir)
    want = checkpoint_tensors(spec)
    problems: list[str] = []
    located: dict[str, tuple[Path, str, dict]] = {}
    files, weight_map = _shard_files(ckpt)
    damaged: list[Path] = []
    for f in files:
        try:
            rep = inspect_header(f)
        except CheckpointError as e:
            problems.append(e.problem.rstrip("."))
            damaged.append(f)
            continue
        if rep.problems:
            problems.append(f"{f.name}: damaged safetensors file: {format_problems(rep.problems, 6)}")
            damaged.append(f)
        for stored, entry in rep.entries.items():
            canon = _canonical_name(stored)
            if canon in located:
                problems.append(f"{stored} appears twice (in {located[canon][0].name} and {f.name})")
            located[canon] = (f, stored, entry)
    if weight_map is not None:
        wrong = [f"{n} (index: {fn})" for n, fn in weight_map.items()
                 if _canonical_name(n) in located and located[_canonical_name(n)][0].name != fn]
        if wrong:
            problems.append(f"{len(wrong)} tensor(s) not in the shard the index names: {_names(wrong)}")
    # Tensors of a damaged file are reported with the file, not again as "missing" or mis-shaped.
    unreadable = {n for n, (f, _, _) in located.items() if f in damaged}
    if weight_map is not None and damaged:
        damaged_names = {f.name for f in damaged}
        unreadable |= {_canonical_name(k) for k, v in weight_map.items() if v in damaged_names}
    missing = [n for n in want if n not in located and n not in unreadable]
    extra = [n for n in located if n not in want]
    if missing:
        problems.append(f"{len(missing)} missing tensor(s): {_names(missing)}")
    if extra:
        problems.append(f"{len(extra)} unexpected tensor(s): {_names(extra)}")
    mismatched = []
    for canon, (f, stored, entry) in located.items():
        if canon in want and canon not in unreadable:
            r = _check_stored(canon, stored, entry, want[canon])
            if r is not None:
                mismatched.append(r)
    if mismatched:
        problems.append(f"{len(mismatched)} tensor(s) with the wrong dtype or shape: {_names(mismatched, 12)}")
    if problems:
        raise CheckpointError(f"Checkpoint {ckpt} has {len(problems)} problem(s) for the {spec.name!r} spec: "
                              + "; ".join(problems) + ".",
                              "re-download or re-write damaged shards, and use a checkpoint written for this config.json "
                              "(or `dsv4c synth` for a synthetic one).")
    out: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for canon, (f, _, _) in located.items():
        by_file.setdefault(f, []).append(canon)
    for f, names in by_file.items():
        tensors = load_tensors_checked(f, [located[c][1] for c in names])
        for canon in names:
            out[canon] = _to_canonical(canon, tensors[located[canon][1]], want[canon])
        if progress:
            progress(f"read {f.name} ({len(names)} tensors)")
    return out


def _names(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


# ---- checkpoint -> program parameters ---------------------------------------------------------------

def to_model_params(spec: ModelSpec, ckpt: dict[str, torch.Tensor], act_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Stack per-expert tensors per block and dequantize wo_a: the parameter table of the traced step."""
    table = model_tensors(spec, act_dtype)
    out: dict[str, torch.Tensor] = {}
    for name, ts in table.items():
        if ".experts.w" in name:
            head, tail = name.split(".experts.")
            proj, leaf = tail.split(".")
            out[name] = torch.stack([ckpt[f"{head}.experts.{e}.{proj}.{leaf}"] for e in range(spec.n_routed_experts)])
        elif name.endswith(".wo_a.weight"):
            scale = ckpt[name[: -len("weight")] + "scale"]
            out[name] = quant.dequantize_fp8_weight(ckpt[name], scale).to(act_dtype)
        else:
            out[name] = ckpt[name]
        assert tuple(out[name].shape) == ts.shape and out[name].dtype == ts.dtype, (name, out[name].shape, ts)
    return out


def export_dequantized(ckpt_dir: str | Path, spec: ModelSpec, out_dir: str | Path) -> Path:
    """Write an fp32, fully dequantized copy of a checkpoint (hub names, no quantization_config):
    what the transformers library loads for the exact-numerics cross-check."""
    ckpt = load_checkpoint(ckpt_dir, spec)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dense: dict[str, torch.Tensor] = {}
    for name, t in ckpt.items():
        if name.endswith(".scale"):
            continue
        scale = ckpt.get(name[: -len("weight")] + "scale") if name.endswith(".weight") else None
        if t.dtype == F8:
            dense[name] = quant.dequantize_fp8_weight(t, scale)
        elif t.dtype == U8:
            dense[name] = quant.dequantize_fp4_weight(t, scale)
        elif t.dtype == torch.int64:
            dense[name] = t
        else:
            dense[name] = t.float()
    save_file(dense, str(out / "model.safetensors"))
    cfg = spec.to_hub_config()
    cfg.pop("quantization_config")
    cfg["torch_dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out
