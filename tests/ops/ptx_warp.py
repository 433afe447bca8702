"""A lockstep interpreter for the few PTX instructions the register-fed MMA GEMVs use, one warp at a time.

The MMA GEMVs (dsv4c.ops.triton_fp4_mma, triton_fp8_mma) do their lane-level work in inline PTX, which the
Triton interpreter cannot run. This runs those PTX blocks on the CPU with the semantics of the PTX ISA:
32 lanes execute each instruction together (``mma.sync`` and ``shfl.sync`` read the other lanes'
registers), registers hold 32/64-bit patterns, memory is a little-endian byte array at a base address.
``mma.sync.m16n8k32 .e4m3`` takes its fragments as the ISA lays them out: A a0 / a1 rows g / g + 8 at
K 4t + i, a2 / a3 at K 16 + 4t + i; B b0 at K 4t + i, b1 at K 16 + 4t + i, column g; D d0 / d1 row g
columns 2t / 2t + 1, d2 / d3 row g + 8.
"""

from __future__ import annotations

import re
import struct

import numpy as np

M32 = 0xFFFFFFFF
M64 = (1 << 64) - 1


def f32(bits: int) -> np.float32:
    return np.frombuffer(struct.pack("<I", bits & M32), dtype=np.float32)[0]


def bits32(v) -> int:
    return struct.unpack("<I", struct.pack("<f", np.float32(v)))[0]


def e4m3(byte: int) -> float:
    s = -1.0 if byte & 0x80 else 1.0
    e, m = (byte >> 3) & 15, byte & 7
    if e == 15 and m == 7:
        return float("nan")
    return s * (m / 8 * 2.0 ** -6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7))


class Memory:
    """Bytes at ``base``..: ``alloc`` hands out aligned regions with unmapped gaps between them, and a load
    that is not inside one region fails (as an out-of-bounds read would fault or read garbage)."""

    GAP = 1 << 16

    def __init__(self, size: int = 1 << 21, base: int = 0x10000):
        self.base, self.buf, self.top, self.regions = base, bytearray(size), 0, []

    def alloc(self, data: bytes, align: int = 256) -> int:
        self.top = -(-self.top // align) * align
        addr = self.base + self.top
        self.buf[self.top:self.top + len(data)] = data
        self.regions.append((addr, addr + len(data)))
        self.top += len(data) + self.GAP
        return addr

    def read(self, addr: int, n: int) -> int:
        if not any(lo <= addr and addr + n <= hi for lo, hi in self.regions):
            raise IndexError(f"load of {n} bytes at {addr:#x} outside every allocation")
        off = addr - self.base
        return int.from_bytes(self.buf[off:off + n], "little")


def _lines(asm: str) -> list[str]:
    body = asm.strip()
    assert body[0] == "{" and body[-1] == "}", "a PTX block in braces"
    return [ln.strip().rstrip(";") for ln in body[1:-1].split("\n") if ln.strip() and not ln.strip().startswith(".reg")]


def run_warp(asm: str, inputs: list[list], n_out: int, mem: Memory, warp: int = 0) -> list[list[int]]:
    """Run ``asm`` on the 32 lanes of ``warp``. inputs[k][lane]: the value of operand $(n_out + k) (int bit
    pattern, or float for an f32 operand). Returns the n_out output bit patterns per lane."""
    regs = [dict() for _ in range(32)]
    for k, vals in enumerate(inputs):
        for lane in range(32):
            v = vals[lane]
            regs[lane][f"${n_out + k}"] = bits32(v) if isinstance(v, float) else int(v)
    for line in _lines(asm):
        op, _, rest = line.partition(" ")
        args = _split_args(rest)
        _exec(op, args, regs, mem, warp)
    return [[regs[lane][f"${k}"] for lane in range(32)] for k in range(n_out)]


def _split_args(rest: str) -> list[str]:
    out, depth, cur = [], 0, ""
    for ch in rest:
        if ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        out.append(cur.strip())
    return out


def _val(r: dict, a: str, lane: int, warp: int) -> int:
    if a == "%laneid":
        return lane
    if a == "%tid.x":
        return warp * 32 + lane
    if a.startswith("0f"):
        return int(a[2:], 16)
    if re.fullmatch(r"-?(0x[0-9a-fA-F]+|\d+)", a):
        return int(a, 0) & M64
    return r[a]


def _addr(r: dict, a: str, lane: int, warp: int) -> int:
    m = re.fullmatch(r"\[(\S+?)(?:\+(\d+))?\]", a.replace(" ", ""))
    return _val(r, m[1], lane, warp) + int(m[2] or 0)


def _vec(a: str) -> list[str]:
    return [x.strip() for x in a.strip("{}").split(",")]


def _exec(op: str, args: list[str], regs: list[dict], mem: Memory, warp: int) -> None:
    parts = op.split(".")
    base = parts[0]
    if base == "mma":
        return _mma(args, regs)
    if base == "shfl":  # shfl.sync.bfly.b32 d, a, lanemask, clamp, membermask
        src = [regs[lane][args[1]] for lane in range(32)]
        m = int(args[2], 0)
        for lane in range(32):
            regs[lane][args[0]] = src[lane ^ m]
        return
    for lane in range(32):
        r = regs[lane]
        v = lambda a: _val(r, a, lane, warp)  # noqa: E731
        if base == "ld":
            size = {"u8": 1, "b32": 4, "f32": 4}[parts[-1]]
            dests = _vec(args[0]) if args[0].startswith("{") else [args[0]]
            addr = _addr(r, args[1], lane, warp)
            if len(dests) > 1:
                assert addr % (4 * len(dests)) == 0, f"misaligned vector load at {addr:#x}"
            for i, d in enumerate(dests):
                r[d] = mem.read(addr + size * i, size)
        elif base == "mov":
            r[args[0]] = v(args[1])
        elif base == "cvt":
            r[args[0]] = v(args[1]) & M32
        elif base in ("and", "or"):
            a, b = v(args[1]), v(args[2])
            r[args[0]] = (a & b) if base == "and" else (a | b)
        elif base == "shl":
            r[args[0]] = (v(args[1]) << v(args[2])) & M32
        elif base == "shr":
            r[args[0]] = (v(args[1]) & M32) >> v(args[2])
        elif base == "add" and parts[1] in ("u32", "u64"):
            r[args[0]] = (v(args[1]) + v(args[2])) & (M32 if parts[1] == "u32" else M64)
        elif base == "mad":
            r[args[0]] = (v(args[1]) * v(args[2]) + v(args[3])) & M32
        elif base == "mul" and parts[1] == "lo":
            r[args[0]] = (v(args[1]) * v(args[2])) & M32
        elif base == "min":
            r[args[0]] = min(v(args[1]), v(args[2]))
        elif base == "setp":
            r[args[0]] = int(v(args[1]) == v(args[2]))
        elif base == "selp":
            r[args[0]] = v(args[1]) if r[args[3]] else v(args[2])
        elif base in ("add", "mul") and parts[1] == "f32":
            a, b = f32(v(args[1])), f32(v(args[2]))
            r[args[0]] = bits32(a + b if base == "add" else a * b)
        elif base == "fma":
            a, b, c = (np.float64(f32(v(x))) for x in args[1:4])
            r[args[0]] = bits32(np.float32(a * b + c))  # one rounding, as fma does
        else:
            raise NotImplementedError(op)


def _mma(args: list[str], regs: list[dict]) -> None:
    d, a, b, c = (_vec(x) for x in args)
    A = np.zeros((16, 32))
    B = np.zeros((32, 8))
    C = np.zeros((16, 8))
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        r = regs[lane]
        av = [_val(r, x, lane, 0) for x in a]
        bv = [_val(r, x, lane, 0) for x in b]
        for i in range(4):
            A[g, 4 * t + i] = e4m3((av[0] >> 8 * i) & 255)
            A[g + 8, 4 * t + i] = e4m3((av[1] >> 8 * i) & 255)
            A[g, 16 + 4 * t + i] = e4m3((av[2] >> 8 * i) & 255)
            A[g + 8, 16 + 4 * t + i] = e4m3((av[3] >> 8 * i) & 255)
            B[4 * t + i, g] = e4m3((bv[0] >> 8 * i) & 255)
            B[16 + 4 * t + i, g] = e4m3((bv[1] >> 8 * i) & 255)
        cv = [f32(_val(r, x, lane, 0)) for x in c]
        C[g, 2 * t], C[g, 2 * t + 1], C[g + 8, 2 * t], C[g + 8, 2 * t + 1] = cv
    D = A @ B + C
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        for name, val in zip(d, (D[g, 2 * t], D[g, 2 * t + 1], D[g + 8, 2 * t], D[g + 8, 2 * t + 1])):
            regs[lane][name] = bits32(np.float32(val))
