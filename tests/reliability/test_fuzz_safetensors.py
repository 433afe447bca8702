"""Fuzz safetensors headers: every mutated file ends in a CheckpointError or loads correctly.

Two targets. The file target mutates a small multi-dtype file (header length field, JSON text,
entries' dtype/shape/offsets, metadata, truncation) and reads it through the header check and the
checked loader: a header the check accepts must never make the safetensors library fail. The
checkpoint target mutates one entry of a real synthesized tiny checkpoint's shard and loads it with
the strict loader against the tiny spec.
"""

from __future__ import annotations

import json
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from dsv4c.checkpoint import load_checkpoint
from dsv4c.errors import CheckpointError, DSV4CError
from dsv4c.safetensors_header import DTYPE_BITS, load_tensors_checked
from dsv4c.spec import get_variant

from rel_fuzzing import EXAMPLES, FUZZ, json_values, junk_bytes, no_hang

DTYPE_NAMES = sorted(DTYPE_BITS) + ["F32 ", "f32", "", "I128", "OBJECT"]


def _split(raw: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _join(header: object, data: bytes, length: int | None = None) -> bytes:
    text = json.dumps(header, allow_nan=True).encode("utf-8", "surrogatepass")
    return struct.pack("<Q", len(text) if length is None else length) + text + data


@st.composite
def entry_edit(draw, header: dict) -> dict:
    """Change one tensor entry (or the metadata) of a parsed header."""
    h = json.loads(json.dumps(header))  # a deep copy, several times faster than copy.deepcopy
    names = sorted(k for k in h if k != "__metadata__")
    if not names:
        return h
    name = draw(st.sampled_from(names))
    if not isinstance(h[name], dict):
        h[name] = {}
    e = h[name]
    what = draw(st.sampled_from(["dtype", "shape", "offsets", "drop_key", "entry", "metadata", "rename", "dup_span",
                                 "same_size_dtype", "reshape"]))
    if what == "same_size_dtype" and isinstance(e.get("dtype"), str) and e["dtype"] in DTYPE_BITS:
        # Consistent edits get past the header check and exercise the library and torch.
        e["dtype"] = draw(st.sampled_from(sorted(k for k, v in DTYPE_BITS.items() if v == DTYPE_BITS[e["dtype"]])))
    elif what == "reshape" and isinstance(e.get("shape"), list) and all(type(d) is int and d > 0 for d in e["shape"]):
        n = 1
        for d in e["shape"]:
            n *= d
        e["shape"] = draw(st.sampled_from([[n], [1, n], [n, 1], [1, 1, n], [n, 0]]))
    elif what == "dtype":
        e["dtype"] = draw(st.one_of(st.sampled_from(DTYPE_NAMES), json_values))
    elif what == "shape":
        e["shape"] = draw(st.one_of(
            st.lists(st.integers(-2, 300), max_size=4),
            st.lists(st.sampled_from([0, 1, 2, 3, 2**31, 2**62, 2**64, -1]), max_size=4),
            json_values))
    elif what == "offsets":
        offs = e.get("data_offsets")
        a, b = offs if isinstance(offs, list) and len(offs) == 2 and all(type(o) is int for o in offs) else (0, 8)
        e["data_offsets"] = draw(st.one_of(
            st.tuples(st.integers(-5, b + 64), st.integers(-5, b + 64)).map(list),
            st.sampled_from([[b, a], [a, b + 1], [a + 1, b], [a - 1, b - 1], [a, a], [0, 2**64], [a, b, 0], [a]]),
            json_values))
    elif what == "drop_key" and e:
        e.pop(draw(st.sampled_from(sorted(e))))
    elif what == "entry":
        h[name] = draw(json_values)
    elif what == "metadata":
        h["__metadata__"] = draw(json_values)
    elif what == "rename":
        h[draw(st.text(max_size=12))] = h.pop(name)
    else:  # a second entry over the same bytes
        h[name + ".copy"] = json.loads(json.dumps(e))
    return h


@st.composite
def mutated_file(draw, raw: bytes) -> bytes:
    header, data = _split(raw)
    kind = draw(st.sampled_from(["entries", "entries", "entries", "length", "json_text", "truncate", "append", "junk"]))
    if kind == "entries":
        h = header
        for _ in range(draw(st.integers(1, 3))):
            h = draw(entry_edit(h))
        return _join(h, data)
    if kind == "length":
        n = len(_join(header, b"")) - 8
        length = draw(st.one_of(st.integers(0, 2**64 - 1), st.integers(max(n - 16, 0), n + 16),
                                st.sampled_from([0, 1, 2, 100 * 1024 * 1024, 100 * 1024 * 1024 + 1, 2**63])))
        return _join(header, data, length)
    if kind == "json_text":
        text = json.dumps(header).encode()
        i = draw(st.integers(0, len(text)))
        text = draw(st.sampled_from([text[:i], text[:i] + draw(st.binary(max_size=8)) + text[i:], text[i:]]))
        return struct.pack("<Q", len(text)) + text + data
    if kind == "truncate":
        return raw[: draw(st.integers(0, len(raw) - 1))]
    if kind == "append":
        return raw + draw(st.binary(min_size=1, max_size=64))
    body = draw(junk_bytes())
    return struct.pack("<Q", len(body)) + body if draw(st.booleans()) else body


# ---- target 1: a small file with every dtype the checkpoints use -----------------------------------

def _small_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "w.f32": torch.randn(3, 4, generator=g),
        "w.bf16": torch.randn(5, generator=g).bfloat16(),
        "w.fp8": torch.randn(4, 4, generator=g).to(torch.float8_e4m3fn),
        "w.fp4": torch.randint(0, 255, (2, 4), dtype=torch.uint8, generator=g).view(torch.float4_e2m1fn_x2),
        "s.e8m0": torch.ones(2, 1).to(torch.float8_e8m0fnu),
        "t.i64": torch.arange(6).reshape(3, 2),
        "b.u8": torch.arange(7, dtype=torch.uint8),
        "empty": torch.zeros(0, 3),
    }


@pytest.fixture(scope="module")
def small_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("stfuzz")
    src = d / "src.safetensors"
    save_file(_small_tensors(), str(src), metadata={"format": "pt"})
    return src.read_bytes(), d / "fuzzed.safetensors"


def test_unmutated_small_file_loads(small_file):
    raw, path = small_file
    path.write_bytes(raw)
    got = load_tensors_checked(path)
    for k, t in _small_tensors().items():
        assert got[k].dtype == t.dtype and torch.equal(got[k].view(torch.uint8), t.view(torch.uint8)), k


@FUZZ
@given(data=st.data())
def test_fuzzed_safetensors_file_ends_in_checkpoint_error_or_loads(small_file, data):
    raw, path = small_file
    blob = data.draw(mutated_file(raw))
    path.write_bytes(blob)
    try:
        with no_hang():
            tensors = load_tensors_checked(path)
    except DSV4CError as e:
        assert isinstance(e, CheckpointError), type(e)
        assert str(path) in str(e) and "Fix:" in str(e), str(e)
        event("CheckpointError")
        return
    # Accepted: then every tensor is fully backed by the file's bytes.
    header, _ = _split(blob)
    header.pop("__metadata__", None)
    assert sorted(tensors) == sorted(header)
    for name, t in tensors.items():
        assert t.numel() * t.element_size() == header[name]["data_offsets"][1] - header[name]["data_offsets"][0]
    event("loaded")


# ---- target 2: one shard of a real checkpoint, through the strict loader ---------------------------

@dataclass
class ShardCase:
    dir: Path
    shard: Path
    raw: bytes = field(repr=False)
    header: dict = field(repr=False)
    body: bytes = field(repr=False)


@pytest.fixture(scope="module")
def ckpt_case(tiny_ckpt_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("ckfuzz") / "ckpt"
    shutil.copytree(tiny_ckpt_dir, d)
    (shard,) = sorted(d.glob("*.safetensors"))
    raw = shard.read_bytes()
    header, body = _split(raw)
    return ShardCase(d, shard, raw, header, body)


@settings(FUZZ, max_examples=max(EXAMPLES * 3 // 10, 1))
@given(data=st.data())
def test_fuzzed_checkpoint_shard_header_ends_in_checkpoint_error_or_loads(ckpt_case, data):
    d, shard, raw, header, body = ckpt_case.dir, ckpt_case.shard, ckpt_case.raw, ckpt_case.header, ckpt_case.body
    kind = data.draw(st.sampled_from(["entry", "entry", "truncate", "length"]))
    if kind == "entry":
        blob = _join(data.draw(entry_edit(header)), body)
    elif kind == "truncate":
        blob = raw[: data.draw(st.integers(0, len(raw) - 1))]
    else:
        blob = _join(header, body, data.draw(st.integers(0, 2**64 - 1)))
    shard.write_bytes(blob)
    try:
        with no_hang():
            out = load_checkpoint(d, get_variant("tiny"))
    except DSV4CError as e:
        assert isinstance(e, CheckpointError), type(e)
        assert str(d) in str(e) and "Fix:" in str(e), str(e)
        event("CheckpointError")
        return
    assert len(out) > 0
    event("loaded")
