"""Validate a safetensors file's header before any tensor is read, and read tensors only after that.

The rules are the format's own (and those of the ``safetensors`` library, so that a header accepted
here never makes the library fail): an 8-byte little-endian header length that fits the file and a
100 MB cap, a UTF-8 JSON object of {name: {dtype, shape, data_offsets}} plus an optional
``__metadata__`` map of strings, known dtypes, non-negative integer shapes, byte counts equal to
shape x dtype size, and offsets that are in bounds, contiguous, non-overlapping and cover the whole
data section.

Nothing here allocates tensor memory: ``inspect_header`` reads only the header, and
``load_tensors_checked`` opens the file (memory-mapped) only after the header passed.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path

from .errors import CheckpointError, DSV4CError

MAX_HEADER_BYTES = 100 * 1024 * 1024
# Bits per element of every safetensors dtype.
DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64,
}
# Dtypes torch can hold (safetensors' torch backend maps these); the others are refused before loading.
TORCH_DTYPES = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    "F8_E8M0": "float8_e8m0fnu", "F4": "float4_e2m1fn_x2", "I16": "int16", "U16": "uint16", "F16": "float16",
    "BF16": "bfloat16", "I32": "int32", "U32": "uint32", "F32": "float32", "I64": "int64", "U64": "uint64",
    "F64": "float64",
}
MAX_PROBLEMS_SHOWN = 10


@dataclass
class HeaderReport:
    """A parsed header: every entry (valid or not) by name, and the problems found in it."""

    path: Path
    entries: dict[str, dict] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _damaged_fix(p: Path) -> str:
    return f"re-download or re-write {p.name}; the file is damaged or not a safetensors file."


def inspect_header(path: str | Path, error_cls: type[DSV4CError] = CheckpointError, fix: str | None = None) -> HeaderReport:
    """Parse the header of ``path`` and check every entry against the file.

    Raises ``error_cls`` when the header cannot be read at all (too short, bad length, not JSON, not an
    object); otherwise returns a report whose ``problems`` list every bad entry (empty when valid)."""
    p = Path(path)
    fix = fix or _damaged_fix(p)
    try:
        size = p.stat().st_size
        with open(p, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise error_cls(f"{p}: file is {size} bytes, too short for a safetensors header (truncated?).", fix)
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise error_cls(f"{p}: header length {n} exceeds the file size ({size} bytes) or the "
                                f"{MAX_HEADER_BYTES}-byte cap (truncated or corrupt file).", fix)
            raw = f.read(n)
    except OSError as e:
        raise error_cls(f"{p}: cannot read ({e.strerror or e}).", "check the path and file permissions.") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, nesting or number limits
        raise error_cls(f"{p}: header is not valid JSON ({type(e).__name__}: {str(e)[:120]}).", fix) from None
    if not isinstance(header, dict):
        raise error_cls(f"{p}: header is a JSON {type(header).__name__}, not an object.", fix)
    report = HeaderReport(p)
    problems = report.problems
    meta = header.pop("__metadata__", None)
    if meta is not None and (not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values())):
        problems.append("__metadata__ must be a map of strings")
    report.entries = header
    data_len = size - 8 - n
    spans: list[tuple[int, int, str]] = []
    cut: list[tuple[int, str]] = []
    for name, e in header.items():
        if not isinstance(e, dict) or not {"dtype", "shape", "data_offsets"} <= set(e):
            problems.append(f"{name}: entry lacks dtype/shape/data_offsets")
            continue
        dt, shape, offs = e["dtype"], e["shape"], e["data_offsets"]
        if not isinstance(dt, str) or dt not in DTYPE_BITS:
            problems.append(f"{name}: unknown dtype {str(dt)[:40]!r}")
            continue
        if not isinstance(shape, list) or any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in shape):
            problems.append(f"{name}: bad shape {str(shape)[:60]}")
            continue
        if (not isinstance(offs, list) or len(offs) != 2
                or any(isinstance(o, bool) or not isinstance(o, int) for o in offs) or not 0 <= offs[0] <= offs[1]):
            problems.append(f"{name}: bad data_offsets {str(offs)[:60]}")
            continue
        nbits = math.prod(shape) * DTYPE_BITS[dt]
        if nbits % 8 or offs[1] - offs[0] != nbits // 8:
            problems.append(f"{name}: {offs[1] - offs[0]} data bytes for shape {shape} of {dt} (needs {nbits / 8:g})")
            continue
        if dt == "F4" and shape and shape[-1] % 2:
            problems.append(f"{name}: F4 tensor with an odd last dimension {shape[-1]} (two values per byte)")
            continue
        if offs[1] > data_len:
            cut.append((offs[1], name))
            continue
        spans.append((offs[0], offs[1], name))
    if cut:
        end, name = max(cut)
        problems.append(f"the file is truncated: its tensors need {end} data bytes but it holds {data_len} "
                        f"({len(cut)} tensor(s) cut off, e.g. {name})")
    if not problems:  # layout checks only make sense when every entry parsed
        spans.sort()
        cursor = 0
        for a, b, name in spans:
            if a != cursor:
                problems.append(f"{name}: data starts at {a}, expected {cursor} (gap or overlap)")
            cursor = max(cursor, b)
        if cursor != data_len:
            problems.append(f"data section is {data_len} bytes but tensors cover {cursor} (truncated or padded file)")
    return report


def format_problems(problems: list[str], limit: int = MAX_PROBLEMS_SHOWN) -> str:
    shown = "; ".join(problems[:limit])
    return shown + (f"; ... ({len(problems) - limit} more)" if len(problems) > limit else "")


def read_header_checked(path: str | Path, error_cls: type[DSV4CError] = CheckpointError,
                        fix: str | None = None) -> dict[str, dict]:
    """Parse and validate the header of ``path``; return {tensor name: entry} (no ``__metadata__``).
    Raises ``error_cls`` listing every problem of the file."""
    r = inspect_header(path, error_cls, fix)
    if r.problems:
        raise error_cls(f"{r.path}: damaged safetensors file: {format_problems(r.problems)}.",
                        fix or _damaged_fix(r.path))
    return r.entries


def load_tensors_checked(path: str | Path, names: list[str] | None = None, device: str = "cpu",
                         error_cls: type[DSV4CError] = CheckpointError, fix: str | None = None,
                         header: dict[str, dict] | None = None) -> dict:
    """Read ``names`` (all when None) from a safetensors file whose header is validated first (pass
    ``header`` when the caller already validated it). Errors from the library become ``error_cls``."""
    from safetensors import SafetensorError, safe_open  # noqa: PLC0415 - keep the header checks import-light

    p = Path(path)
    fix = fix or _damaged_fix(p)
    if header is None:
        header = read_header_checked(p, error_cls, fix)
    names = list(header) if names is None else names
    absent = [n for n in names if n not in header]
    if absent:
        raise error_cls(f"{p} lacks tensor(s) {format_problems(absent, 8)}.", fix)
    unsupported = sorted({header[n]["dtype"] for n in names if header[n]["dtype"] not in TORCH_DTYPES})
    if unsupported:
        raise error_cls(f"{p}: dtype(s) {unsupported} cannot be loaded into torch.", fix)
    out = {}
    try:
        with safe_open(str(p), framework="pt", device=str(device)) as f:
            for n in names:
                out[n] = f.get_tensor(n)
    except (SafetensorError, OSError, RuntimeError, TypeError, ValueError) as e:
        raise error_cls(f"{p}: cannot read tensors ({type(e).__name__}: {str(e)[:160]}).", fix) from None
    return out
