"""Validate a safetensors file's header before any tensor is read.

The rules are the format's own: an 8-byte little-endian header length that fits the file and a cap,
a JSON object of {name: {dtype, shape, data_offsets}}, offsets that are in bounds, contiguous and
non-overlapping, and byte counts equal to shape x dtype size.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

from .errors import CheckpointError

MAX_HEADER_BYTES = 100 * 1024 * 1024
# Bits per element of every safetensors dtype.
DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64,
}


def read_header_checked(path: str | Path) -> dict[str, dict]:
    """Parse and validate the header of ``path``; return {tensor name: entry} (no ``__metadata__``)."""
    p = Path(path)
    fix = f"re-download or re-write {p.name}; the file is damaged or not a safetensors file."
    try:
        size = p.stat().st_size
        with open(p, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{p}: file is {size} bytes, too short for a safetensors header.", fix)
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise CheckpointError(f"{p}: header length {n} exceeds the file size ({size} bytes) or the "
                                      f"{MAX_HEADER_BYTES}-byte cap (truncated or corrupt file).", fix)
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{p}: cannot read ({e.strerror}).", "check the path and file permissions.") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{p}: header is not valid JSON ({e}).", fix) from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{p}: header is not a JSON object.", fix)
    header.pop("__metadata__", None)
    data_len = size - 8 - n
    spans: list[tuple[int, int, str]] = []
    problems: list[str] = []
    for name, e in header.items():
        if not isinstance(e, dict) or not {"dtype", "shape", "data_offsets"} <= set(e):
            problems.append(f"{name}: entry lacks dtype/shape/data_offsets")
            continue
        dt, shape, offs = e["dtype"], e["shape"], e["data_offsets"]
        if dt not in DTYPE_BITS:
            problems.append(f"{name}: unknown dtype {dt!r}")
            continue
        if (not isinstance(shape, list) or any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in shape)):
            problems.append(f"{name}: bad shape {shape!r}")
            continue
        if (not isinstance(offs, list) or len(offs) != 2
                or any(isinstance(o, bool) or not isinstance(o, int) for o in offs) or not 0 <= offs[0] <= offs[1]):
            problems.append(f"{name}: bad data_offsets {offs!r}")
            continue
        nbits = math.prod(shape) * DTYPE_BITS[dt]
        if nbits % 8 or offs[1] - offs[0] != nbits // 8:
            problems.append(f"{name}: {offs[1] - offs[0]} data bytes for shape {shape} of {dt} "
                            f"(needs {nbits / 8:g})")
            continue
        if offs[1] > data_len:
            problems.append(f"{name}: data ends at byte {offs[1]} but the file holds {data_len} data bytes (truncated)")
            continue
        spans.append((offs[0], offs[1], name))
    spans.sort()
    cursor = 0
    for a, b, name in spans:
        if a != cursor:
            problems.append(f"{name}: data starts at {a}, expected {cursor} (gap or overlap)")
        cursor = max(cursor, b)
    if spans and cursor != data_len:
        problems.append(f"data section is {data_len} bytes but tensors cover {cursor}")
    if problems:
        raise CheckpointError(f"{p}: invalid safetensors header: " + "; ".join(problems[:10])
                              + (f"; ... ({len(problems) - 10} more)" if len(problems) > 10 else "") + ".", fix)
    return header
