"""The artifact directory: schema, atomic writing, and checked reading.

Layout::

    ARTIFACT/
      manifest.json                 schema version, versions, target, backend, spec, pipeline, cache layout,
                                    parameter table, and sha256 + size of every other file
      weights/params-NNNNN.safetensors   program parameters (packed layout) and constants
      programs/<entry>.json         serialized graphs (see dsv4c.program)
      debug/                        optional: pass dumps

The manifest is written last, into a temporary sibling directory that is renamed into place only when
complete, under a lock file beside the target path; a failed or killed build leaves no directory at
the target path. Reading refuses a wrong schema, version, target or backend, files that are missing,
resized or tampered with, and any manifest path that leaves the artifact directory. Nothing on the
load path unpickles.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import __version__
from .errors import ArtifactError
from .safetensors_header import read_header_checked

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
HEAD_BYTES = 1 << 16  # the fast check hashes each file's first 64 KiB
SHARD_BYTES = 1 << 30
Progress = Callable[[str], None]
ALLOWED_SUFFIXES = (".json", ".safetensors", ".onnx", ".data", ".py", ".diff", ".dot", ".txt", ".md", ".so", ".engine",
                    ".plan", ".cubin", ".ptx", ".bin", ".wrapper.cpp", ".cpp", ".h")
FORBIDDEN_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".pt2", ".ckpt", ".npy", ".npz")


def sha256_file(path: Path, limit: int | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        remaining = limit
        while remaining is None or remaining > 0:
            chunk = f.read(1 << 20 if remaining is None else min(1 << 20, remaining))
            if not chunk:
                break
            h.update(chunk)
            if remaining is not None:
                remaining -= len(chunk)
    return h.hexdigest()


@dataclass
class ArtifactWriter:
    """Collects files in a temporary directory; ``commit`` writes the manifest and renames into place."""

    out: Path
    tmp: Path
    files: dict[str, dict[str, Any]] = field(default_factory=dict)

    def path(self, rel: str) -> Path:
        p = self.tmp / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def write_text(self, rel: str, text: str) -> None:
        self.path(rel).write_text(text)

    def write_bytes(self, rel: str, data: bytes) -> None:
        self.path(rel).write_bytes(data)

    def write_tensors(self, prefix: str, tensors: dict[str, torch.Tensor], progress: Progress | None = None) -> dict[str, str]:
        """Shard ``tensors`` into ``weights/<prefix>-NNNNN.safetensors``; return {name: relative file}."""
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for name, t in tensors.items():
            nbytes = t.numel() * t.element_size()
            if size and size + nbytes > SHARD_BYTES:
                shards.append({})
                size = 0
            shards[-1][name] = t.contiguous()
            size += nbytes
        where: dict[str, str] = {}
        for k, shard in enumerate(shards):
            rel = f"weights/{prefix}-{k + 1:05d}.safetensors"
            save_file(shard, str(self.path(rel)))
            where.update({n: rel for n in shard})
            if progress:
                progress(f"wrote {rel} ({len(shard)} tensors, {sum(t.numel() * t.element_size() for t in shard.values()) / 2**20:.1f} MiB)")
        return where

    def commit(self, manifest: dict[str, Any]) -> Path:
        files = {}
        for p in sorted(self.tmp.rglob("*")):
            if p.is_file():
                rel = p.relative_to(self.tmp).as_posix()
                files[rel] = {"size": p.stat().st_size, "sha256": sha256_file(p), "head_sha256": sha256_file(p, HEAD_BYTES)}
        manifest = dict(manifest, files=files)
        (self.tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        old = None
        if self.out.exists():
            old = self.out.with_name(f".{self.out.name}.old-{os.getpid()}")
            os.replace(self.out, old)
        os.replace(self.tmp, self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.out


@contextmanager
def artifact_writer(out_dir: str | Path) -> Iterator[ArtifactWriter]:
    """Open a temporary sibling of ``out_dir`` under an exclusive lock; remove it on any failure."""
    out = Path(out_dir).absolute()
    if out.exists() and not (out / MANIFEST).is_file():
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        else:
            raise ArtifactError(f"{out} exists and is not a dsv4c artifact.",
                                "choose another output path (dsv4c only replaces its own artifacts).")
    out.parent.mkdir(parents=True, exist_ok=True)
    lock_path = out.with_name(f".{out.name}.lock")
    with open(lock_path, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ArtifactError(f"another dsv4c build is writing {out} right now.",
                                "wait for it to finish, or build into another directory.") from None
        _remove_stale_temps(out)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            yield ArtifactWriter(out, tmp)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def _remove_stale_temps(out: Path) -> None:
    """Temp dirs of builds that were killed (we hold the lock, so no live build owns them)."""
    for p in out.parent.glob(f".{out.name}.tmp-*"):
        shutil.rmtree(p, ignore_errors=True)
    for p in out.parent.glob(f".{out.name}.old-*"):
        shutil.rmtree(p, ignore_errors=True)


# ---- reading -------------------------------------------------------------------------------------

@dataclass
class Artifact:
    path: Path
    manifest: dict[str, Any]

    @property
    def spec_dict(self) -> dict[str, Any]:
        return self.manifest["spec"]

    def file(self, rel: str) -> Path:
        return _inside(self.path, rel)

    def read_text(self, rel: str) -> str:
        return self.file(rel).read_text()

    def load_tensors(self, table_key: str = "params", device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """Load the tensors listed in ``manifest[table_key]`` (name -> {file, shape, dtype})."""
        table = self.manifest[table_key]
        by_file: dict[str, list[str]] = {}
        for name, ent in table.items():
            by_file.setdefault(ent["file"], []).append(name)
        out: dict[str, torch.Tensor] = {}
        for rel, names in by_file.items():
            path = self.file(rel)
            header = read_header_checked(path)
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                for name in names:
                    if name not in header:
                        raise ArtifactError(f"{rel} lacks tensor {name!r} listed in the manifest.",
                                            "rebuild the artifact; it was modified after the build.")
                    t = f.get_tensor(name)
                    want = table[name]
                    if list(t.shape) != want["shape"] or str(t.dtype).removeprefix("torch.") != want["dtype"]:
                        raise ArtifactError(f"{rel}: tensor {name!r} is {t.dtype} {list(t.shape)}, the manifest says "
                                            f"{want['dtype']} {want['shape']}.", "rebuild the artifact.")
                    out[name] = t
        return out


def _inside(root: Path, rel: str) -> Path:
    if not isinstance(rel, str) or not rel or rel.startswith("/") or "\\" in rel or "\x00" in rel:
        raise ArtifactError(f"manifest path {rel!r} is not a relative path inside the artifact.",
                            "the manifest is corrupt or hostile; rebuild the artifact.")
    p = (root / rel).resolve()
    if not p.is_relative_to(root.resolve()):
        raise ArtifactError(f"manifest path {rel!r} points outside the artifact directory {root}.",
                            "the manifest is corrupt or hostile; rebuild the artifact.")
    return p


def open_artifact(path: str | Path, target: str | None = None, backend: str | None = None,
                  full_check: bool = False) -> Artifact:
    """Read and check an artifact's manifest and files (sizes + fast head hash; every byte if full_check)."""
    root = Path(path)
    mpath = root / MANIFEST
    rebuild = f"rebuild it: dsv4c build ... -o {root}"
    if not mpath.is_file():
        raise ArtifactError(f"{root} is not a dsv4c artifact (no {MANIFEST}).", "point at a directory written by `dsv4c build`.")
    try:
        m = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{mpath} is not valid JSON ({e}).", rebuild) from None
    if not isinstance(m, dict):
        raise ArtifactError(f"{mpath} is not a JSON object.", rebuild)
    sv = m.get("schema_version")
    if sv != SCHEMA_VERSION:
        raise ArtifactError(f"{root} has artifact schema version {sv!r}; this dsv4c {__version__} reads version {SCHEMA_VERSION}.", rebuild)
    if m.get("dsv4c_version") != __version__:
        raise ArtifactError(f"{root} was built by dsv4c {m.get('dsv4c_version')!r}; this is dsv4c {__version__}.", rebuild)
    if m.get("torch_version") != torch.__version__.split("+")[0]:
        raise ArtifactError(f"{root} was built with torch {m.get('torch_version')!r}; this runtime has torch "
                            f"{torch.__version__.split('+')[0]}.", rebuild + " with the torch you run it with")
    if target is not None and m.get("target") != target:
        raise ArtifactError(f"{root} was built for target {m.get('target')!r}, not {target!r}.",
                            f"rebuild with --target {target}, or run it on {m.get('target')!r}.")
    if backend is not None and m.get("backend") != backend:
        raise ArtifactError(f"{root} was built for backend {m.get('backend')!r}, not {backend!r}.", f"rebuild with --backend {backend}.")
    files = m.get("files")
    required = ("spec", "params", "programs", "cache_layout", "numerics", "dtype", "max_seq_len", "max_batch")
    missing = [k for k in required if k not in m]
    if not isinstance(files, dict) or missing:
        raise ArtifactError(f"{mpath} lacks {missing or ['files']}.", rebuild)
    problems: list[str] = []
    for rel, ent in files.items():
        p = _inside(root, rel)
        if rel.endswith(FORBIDDEN_SUFFIXES):
            problems.append(f"{rel}: pickle-format files are never loaded")
            continue
        if not isinstance(ent, dict) or not p.is_file():
            problems.append(f"{rel}: missing")
            continue
        if p.stat().st_size != ent.get("size"):
            problems.append(f"{rel}: {p.stat().st_size} bytes, manifest says {ent.get('size')} (truncated or modified)")
            continue
        if sha256_file(p, HEAD_BYTES) != ent.get("head_sha256") or (full_check and sha256_file(p) != ent.get("sha256")):
            problems.append(f"{rel}: checksum mismatch (modified or corrupted)")
    for p in root.rglob("*"):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel != MANIFEST and rel not in files:
            problems.append(f"{rel}: not listed in the manifest (files may not be slipped into an artifact)")
    for ent in list(m["params"].values()) + list(m.get("consts", {}).values()):
        if not isinstance(ent, dict) or ent.get("file") not in files:
            problems.append(f"a tensor table entry names a file not in the manifest: {ent!r}"[:200])
            break
    for entry, ent in m["programs"].items():
        if not isinstance(ent, dict) or ent.get("file") not in files:
            problems.append(f"program {entry!r} names a file not in the manifest")
    if problems:
        raise ArtifactError(f"artifact {root} failed its integrity check: " + "; ".join(problems[:10]) + ".", rebuild)
    return Artifact(root, m)
