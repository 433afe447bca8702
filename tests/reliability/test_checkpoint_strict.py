"""The strict checkpoint loader: every header validated before any tensor is read, and every problem
of a checkpoint (missing, unexpected, duplicated, mis-shaped, mis-typed tensors, damaged or truncated
files, a broken index) reported in one CheckpointError that names the files and the fix."""

from __future__ import annotations

import json
import re
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

import dsv4c.checkpoint as ckpt_mod
from dsv4c.checkpoint import INDEX_NAME, load_checkpoint, synthesize_checkpoint
from dsv4c.errors import CheckpointError
from dsv4c.spec import get_variant

TINY = get_variant("tiny")
FIX = "Fix: re-download or re-write damaged shards, and use a checkpoint written for this config.json"


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A tiny checkpoint in several shards (so that one error can span files)."""
    return synthesize_checkpoint(TINY, tmp_path_factory.mktemp("sharded") / "ckpt", shard_bytes=1 << 20)


@pytest.fixture
def sharded_copy(sharded, tmp_path):
    import shutil

    dst = tmp_path / "ckpt"
    shutil.copytree(sharded, dst)
    return dst


def _shards(d):
    return sorted(d.glob("*.safetensors"))


def _load_error(d) -> str:
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(d, TINY)
    return str(e.value)


def test_every_problem_of_a_checkpoint_is_reported_in_one_error_before_any_tensor_is_read(sharded_copy, monkeypatch):
    a, b, *_ = _shards(sharded_copy)
    t = load_file(a)
    missing = sorted(t)[0]
    misshaped = next(k for k in sorted(t) if k != missing and t[k].dim() == 2 and t[k].dtype == torch.bfloat16)
    mistyped = next(k for k in sorted(t) if k not in (missing, misshaped) and t[k].dtype == torch.float32
                    and not k.endswith("scale"))
    del t[missing]
    t["bogus.extra.weight"] = torch.zeros(3)
    t[misshaped] = torch.zeros(5, 5, dtype=torch.bfloat16)
    t[mistyped] = t[mistyped].to(torch.int32)
    save_file(t, a, metadata={"format": "pt"})
    b.write_bytes(b.read_bytes()[:-1000])  # truncated second shard

    def no_reading(*args, **kwargs):
        raise AssertionError("a tensor was read although the headers already showed problems")

    monkeypatch.setattr(ckpt_mod, "load_tensors_checked", no_reading)
    msg = _load_error(sharded_copy)
    assert msg.startswith(f"Checkpoint {sharded_copy} has 4 problem(s) for the 'tiny' spec: ")
    assert f"{b.name}: damaged safetensors file: the file is truncated: its tensors need" in msg
    assert f"1 missing tensor(s): {missing}" in msg
    assert "1 unexpected tensor(s): bogus.extra.weight" in msg
    assert "2 tensor(s) with the wrong dtype or shape: " in msg
    assert re.search(rf"{re.escape(misshaped)}: shape \[5, 5\] where \[\d+, \d+\] was expected", msg)
    assert f"{mistyped}: dtype I32 where a float tensor (F32, BF16 or F16) was expected" in msg
    assert FIX in msg
    # Tensors of the truncated shard are not also reported as missing.
    assert msg.count("missing tensor") == 1


def test_truncated_single_shard(ckpt_copy):
    (shard,) = _shards(ckpt_copy)
    raw = shard.read_bytes()
    shard.write_bytes(raw[: len(raw) // 3])
    msg = _load_error(ckpt_copy)
    assert f"{shard.name}: damaged safetensors file: the file is truncated" in msg and FIX in msg


@pytest.mark.parametrize("cut", [0, 5, 8, 100])
def test_shard_cut_inside_its_header(ckpt_copy, cut):
    (shard,) = _shards(ckpt_copy)
    shard.write_bytes(shard.read_bytes()[:cut])
    msg = _load_error(ckpt_copy)
    assert str(shard) in msg and ("too short for a safetensors header" in msg or "exceeds the file size" in msg), msg


def test_header_claiming_a_huge_tensor_is_refused_without_allocating(ckpt_copy):
    (shard,) = _shards(ckpt_copy)
    raw = shard.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header["embed.weight"]["shape"] = [2**40, 2**20]
    text = json.dumps(header).encode()
    shard.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])
    msg = _load_error(ckpt_copy)
    assert "embed.weight: " in msg and "data bytes for shape [1099511627776, 1048576] of BF16" in msg


def test_duplicate_tensor_across_shards(sharded_copy):
    a, b, *_ = _shards(sharded_copy)
    ta, tb = load_file(a), load_file(b)
    name = sorted(ta)[0]
    tb[name] = ta[name]
    save_file(tb, b)
    msg = _load_error(sharded_copy)
    assert f"{name} appears twice (in {a.name} and {b.name})" in msg


def test_index_that_disagrees_with_the_shards(sharded_copy):
    a, b, *_ = _shards(sharded_copy)
    idx = json.loads((sharded_copy / INDEX_NAME).read_text())
    name = next(k for k, v in idx["weight_map"].items() if v == a.name)
    idx["weight_map"][name] = b.name
    (sharded_copy / INDEX_NAME).write_text(json.dumps(idx))
    msg = _load_error(sharded_copy)
    assert f"1 tensor(s) not in the shard the index names: {name} (index: {b.name})" in msg


@pytest.mark.parametrize("index, text", [
    ("{not json", "is not readable JSON"),
    ('{"weight_map": [1, 2]}', "has no `weight_map` object"),
    ('{"weight_map": {"embed.weight": "../../etc/passwd"}}', "names shard files outside the checkpoint directory"),
    ('{"weight_map": {"embed.weight": "model-99999-of-99999.safetensors"}}', "names shard files that do not exist"),
    ("[" * 100000, "is not readable JSON"),
])
def test_broken_index(ckpt_copy, index, text):
    (ckpt_copy / INDEX_NAME).write_text(index)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(ckpt_copy, TINY)
    assert str(ckpt_copy / INDEX_NAME) in str(e.value) and text in str(e.value) and "Fix:" in str(e.value)


def test_missing_checkpoint_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist. Fix: point --checkpoint at a hub checkpoint"):
        load_checkpoint(tmp_path / "nope", TINY)


def test_other_tools_spellings_are_still_accepted(ckpt_copy, tiny_ckpt_dir):
    """Strictness must not reject valid spellings: a `model.` prefix, weight_scale_inv, FP4 as int8 bytes."""
    (shard,) = _shards(ckpt_copy)
    t = load_file(shard)
    renamed = {}
    for k, v in t.items():
        k2 = "model." + (k[: -len("scale")] + "weight_scale_inv" if k.endswith(".scale") else k)
        renamed[k2] = v.view(torch.int8) if v.dtype == torch.float4_e2m1fn_x2 else v
    (ckpt_copy / INDEX_NAME).unlink()
    shard.unlink()
    save_file(renamed, ckpt_copy / "model.safetensors")
    out, ref = load_checkpoint(ckpt_copy, TINY), load_checkpoint(tiny_ckpt_dir, TINY)
    assert sorted(out) == sorted(ref)
    for k in ref:
        assert out[k].dtype == ref[k].dtype and torch.equal(out[k].view(torch.uint8), ref[k].view(torch.uint8)), k
