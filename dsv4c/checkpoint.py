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
from safetensors import safe_open
from safetensors.torch import save_file

from . import quant
from .errors import CheckpointError
from .layout import F8, U8, TensorSpec, checkpoint_tensors, model_tensors
from .safetensors_header import read_header_checked
from .spec import FP4_BLOCK, ModelSpec

Progress = Callable[[str], None]
INDEX_NAME = "model.safetensors.index.json"


# ---- synthesis ------------------------------------------------------------------------------------

def _init_value(name: str, ts: TensorSpec, spec: ModelSpec, gen: torch.Generator) -> torch.Tensor:
    """A random fp32 value for one tensor, scaled so activations stay O(1) through the stack."""
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
    return randn(1.0 / math.sqrt(fan_in))


def _tid2eid(spec: ModelSpec, gen: torch.Generator) -> torch.Tensor:
    """[vocab, top_k] expert ids, distinct within each row."""
    scores = torch.rand(spec.vocab_size, spec.n_routed_experts, generator=gen)
    return scores.argsort(dim=-1)[:, : spec.num_experts_per_tok].to(torch.int64).contiguous()


def synthesize_tensors(spec: ModelSpec, seed: int = 0, progress: Progress | None = None) -> Iterable[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) in hub storage format for every checkpoint tensor, deterministically."""
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
            w = _init_value(name, ts, spec, gen)
            q, s = quant.quantize_fp8_weight(w, ue8m0=ue8m0)
            yield name, q
            yield scale_name, s.to(torch.float8_e8m0fnu) if ue8m0 else s
        elif ts.dtype == U8:
            n, k2 = ts.shape
            w = _init_value(name, TensorSpec((n, 2 * k2), torch.float32), spec, gen)
            packed, s = quant.quantize_fp4_weight(w, FP4_BLOCK)
            yield name, packed.view(torch.float4_e2m1fn_x2)
            yield scale_name, s.to(torch.float8_e8m0fnu)
        elif ts.dtype == torch.int64:
            raise AssertionError(name)
        else:
            yield name, _init_value(name, ts, spec, gen).to(ts.dtype)


def synthesize_checkpoint(spec: ModelSpec, out_dir: str | Path, seed: int = 0, shard_bytes: int = 64 << 20,
                          progress: Progress | None = None) -> Path:
    """Write a hub-format checkpoint of random weights; atomic (temp dir renamed into place)."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"{out} already exists and is not empty.", "choose a new output directory or remove it.")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for name, t in synthesize_tensors(spec, seed, progress):
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


def _shard_files(ckpt: Path) -> list[Path]:
    index = ckpt / INDEX_NAME
    if index.is_file():
        try:
            wm = json.loads(index.read_text())["weight_map"]
            files = sorted(set(wm.values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index} is malformed ({e!r}).", "regenerate the index or remove it to scan *.safetensors.") from None
        bad = [f for f in files if not isinstance(f, str) or Path(f).name != f]
        if bad:
            raise CheckpointError(f"{index} names shard files outside the checkpoint directory: {bad}.",
                                  "the index may only name files in its own directory.")
        missing = [f for f in files if not (ckpt / f).is_file()]
        if missing:
            raise CheckpointError(f"{index} names shard files that do not exist: {missing}.",
                                  "re-download the missing shards.")
        return [ckpt / f for f in files]
    files = sorted(ckpt.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"No *.safetensors files in {ckpt}.", "point --checkpoint at a hub checkpoint directory.")
    return files


def _to_canonical(name: str, t: torch.Tensor, want: TensorSpec) -> torch.Tensor | str:
    """Convert one stored tensor to the canonical in-memory form, or return a problem description."""
    shape = tuple(t.shape)
    if want.dtype == U8:  # packed FP4: F4 [N, K] or int8/uint8 bytes [N, K/2]
        if t.dtype == torch.float4_e2m1fn_x2:
            t = t.view(torch.uint8)
        elif t.dtype == torch.int8:
            t = t.view(torch.uint8)
        elif t.dtype != torch.uint8:
            return f"{name}: dtype {t.dtype} where packed FP4 (F4, I8 or U8) was expected"
    elif want.dtype == F8:
        if t.dtype != F8:
            return f"{name}: dtype {t.dtype} where float8_e4m3fn was expected"
    elif want.dtype == torch.float32 and name.endswith(".scale"):
        if t.dtype not in (torch.float32, torch.bfloat16, torch.float8_e8m0fnu):
            return f"{name}: dtype {t.dtype} where a scale (F32, BF16 or F8_E8M0) was expected"
        t = t.float()
    elif want.dtype == torch.int64:
        if t.dtype not in (torch.int64, torch.int32, torch.int16):
            return f"{name}: dtype {t.dtype} where an integer table was expected"
        t = t.long()
    elif t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"{name}: dtype {t.dtype} where a float tensor was expected"
    else:
        t = t.to(want.dtype)
    if tuple(t.shape) != want.shape:
        return f"{name}: shape {list(shape)} where {list(want.shape)} was expected"
    return t


def load_checkpoint(ckpt_dir: str | Path, spec: ModelSpec, progress: Progress | None = None) -> dict[str, torch.Tensor]:
    """Read every tensor of a hub checkpoint into canonical form (names without ``model.``; FP4 as uint8
    [N, K/2]; scales fp32). Raises one ``CheckpointError`` listing every problem found."""
    ckpt = Path(ckpt_dir)
    want = checkpoint_tensors(spec)
    problems: list[str] = []
    located: dict[str, tuple[Path, str]] = {}
    files = _shard_files(ckpt)
    for f in files:
        try:
            header = read_header_checked(f)
        except CheckpointError as e:
            problems.append(str(e.problem))
            continue
        for stored in header:
            canon = _canonical_name(stored)
            if canon in located:
                problems.append(f"{stored} appears twice (in {located[canon][0].name} and {f.name})")
            located[canon] = (f, stored)
    missing = [n for n in want if n not in located]
    extra = [n for n in located if n not in want]
    if missing:
        problems.append(f"{len(missing)} missing tensor(s): {_names(missing)}")
    if extra:
        problems.append(f"{len(extra)} unexpected tensor(s): {_names(extra)}")
    out: dict[str, torch.Tensor] = {}
    if not problems:
        by_file: dict[Path, list[str]] = {}
        for canon, (f, _) in located.items():
            by_file.setdefault(f, []).append(canon)
        for f, names in by_file.items():
            with safe_open(str(f), framework="pt") as h:
                for canon in names:
                    r = _to_canonical(canon, h.get_tensor(located[canon][1]), want[canon])
                    if isinstance(r, str):
                        problems.append(r)
                    else:
                        out[canon] = r
            if progress:
                progress(f"read {f.name} ({len(names)} tensors)")
    if problems:
        raise CheckpointError(f"Checkpoint {ckpt} does not match the {spec.name!r} spec: " + "; ".join(problems) + ".",
                              "use a checkpoint written for this config (or `dsv4c synth` for a synthetic one).")
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
