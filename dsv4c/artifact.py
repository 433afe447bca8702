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
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

if TYPE_CHECKING:  # torch is imported only where tensors are written or read: `dsv4c verify` runs without it
    import torch

from . import __version__
from .errors import ArtifactError, show
from .safetensors_header import TORCH_DTYPES, load_tensors_checked, read_header_checked

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
MANIFEST_DIGEST = "manifest_sha256"
HEAD_BYTES = 1 << 16  # the fast check hashes each file's first 64 KiB
SHARD_BYTES = 1 << 30
Progress = Callable[[str], None]
ALLOWED_SUFFIXES = (".json", ".safetensors", ".onnx", ".data", ".py", ".diff", ".dot", ".txt", ".md", ".so", ".engine",
                    ".plan", ".cubin", ".ptx", ".bin", ".wrapper.cpp", ".cpp", ".h")
FORBIDDEN_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".pt2", ".ckpt", ".npy", ".npz")


def manifest_digest(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON without its own digest: catches a corrupted or edited
    manifest (the files are covered by their own hashes in it)."""
    body = {k: v for k, v in manifest.items() if k != MANIFEST_DIGEST}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8", "surrogatepass")).hexdigest()


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
        from safetensors.torch import save_file  # noqa: PLC0415

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
                if rel.endswith(FORBIDDEN_SUFFIXES):
                    raise ArtifactError(f"the build wrote {rel}, a pickle-format file, into the artifact.",
                                        "report a dsv4c bug: artifacts may not contain pickles.")
                files[rel] = {"size": p.stat().st_size, "sha256": sha256_file(p), "head_sha256": sha256_file(p, HEAD_BYTES)}
                _fsync(p)
        manifest = dict(manifest, files=files)
        manifest[MANIFEST_DIGEST] = manifest_digest(manifest)
        (self.tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        _fsync(self.tmp / MANIFEST)
        for d in sorted({self.tmp, *[(self.tmp / r).parent for r in files]}):
            _fsync(d)
        old = None
        if self.out.exists():
            old = self.out.with_name(f".{self.out.name}.old-{os.getpid()}")
            os.replace(self.out, old)
        os.replace(self.tmp, self.out)
        _fsync(self.out.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.out


def _fsync(path: Path) -> None:
    """Flush a file or directory to disk so that a crash after the rename never exposes a torn artifact."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def artifact_writer(out_dir: str | Path) -> Iterator[ArtifactWriter]:
    """Open a temporary sibling of ``out_dir`` under an exclusive lock; remove it on any failure.

    A second writer of the same output fails at once with a clear message (nothing is waited for and
    nothing is overwritten); temp directories of killed builds are removed under the lock."""
    out = Path(out_dir).absolute()
    try:
        if out.exists() and not (out / MANIFEST).is_file():
            if out.is_dir() and not any(out.iterdir()):
                out.rmdir()
            else:
                raise ArtifactError(f"{out} exists and is not a dsv4c artifact.",
                                    "choose another output path (dsv4c only replaces its own artifacts).")
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ArtifactError(f"cannot create the artifact directory {out} ({e.strerror or e}).",
                            "choose an output path in a writable directory.") from None
    with _build_lock(out):
        _remove_stale_temps(out)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            yield ArtifactWriter(out, tmp)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def _build_lock(out: Path) -> Iterator[None]:
    """An exclusive flock on ``.NAME.lock`` beside ``out``, removed on release.

    The lock file is unlinked by its holder; a waiter that locked a file which was unlinked (or
    replaced) meanwhile retries on the current file, so two builds never both hold "the" lock."""
    lock_path = out.with_name(f".{out.name}.lock")
    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise ArtifactError(f"cannot create the build lock {lock_path} ({e.strerror or e}).",
                                "choose an output path in a writable directory.") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ArtifactError(f"another dsv4c build is writing {out} right now (it holds {lock_path.name}).",
                                "wait for it to finish, or build into another directory.") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock_path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the previous holder removed the file after we opened it: lock the new one
    try:
        yield
    finally:
        try:
            os.unlink(lock_path)
        except FileNotFoundError:
            pass
        os.close(fd)


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
        try:
            return self.file(rel).read_text()
        except (OSError, ValueError) as e:
            raise ArtifactError(f"{self.path}/{rel} cannot be read ({type(e).__name__}: {str(e)[:120]}).",
                                f"run `dsv4c verify {self.path}`; rebuild the artifact if it fails.") from None

    def load_tensors(self, table_key: str = "params", device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """Load the tensors listed in ``manifest[table_key]`` (name -> {file, shape, dtype})."""
        table = self.manifest[table_key]
        fix = f"rebuild the artifact; run `dsv4c verify {self.path}` to see what changed."
        by_file: dict[str, list[str]] = {}
        for name, ent in table.items():
            by_file.setdefault(ent["file"], []).append(name)
        out: dict[str, torch.Tensor] = {}
        for rel, names in by_file.items():
            path = self.file(rel)
            header = read_header_checked(path, ArtifactError, fix)
            absent = [n for n in names if n not in header]
            if absent:
                raise ArtifactError(f"{self.path}/{rel} lacks tensor(s) listed in the manifest: {absent[:8]}.", fix)
            wrong = [f"{n} is {header[n]['dtype']} {header[n]['shape']}, the manifest says {table[n]['dtype']} "
                     f"{table[n]['shape']}" for n in names
                     if header[n]["shape"] != table[n]["shape"] or _ST_DTYPE.get(header[n]["dtype"]) != table[n]["dtype"]]
            if wrong:
                raise ArtifactError(f"{self.path}/{rel}: " + "; ".join(wrong[:8]) + ".", fix)
            out.update(load_tensors_checked(path, names, str(device), ArtifactError, fix, header=header))
        return out


# safetensors dtype -> the torch dtype name the manifest records (F4 is stored as packed pairs).
_ST_DTYPE = {k: v for k, v in TORCH_DTYPES.items() if k != "F4"}
CACHE_DTYPES = ("bfloat16", "float32", "float16", "float8_e4m3fn", "uint8", "int8", "int32", "int64")
MAX_BATCH = 1024
_MAX_DIM = 1 << 40


def _is_file(p: Path) -> bool:
    try:
        return p.is_file() and not p.is_symlink()
    except (OSError, ValueError):
        return False


def _inside(root: Path, rel: str) -> Path:
    hostile = "the manifest is corrupt or hostile; rebuild the artifact (and do not run artifacts of unknown origin)."
    if (not isinstance(rel, str) or not rel or rel.startswith("/") or "\\" in rel or "\x00" in rel
            or any(part in ("", ".", "..") for part in rel.split("/"))):
        raise ArtifactError(f"manifest path {str(rel)[:120]!r} is not a plain relative path inside the artifact {root}.",
                            hostile)
    try:
        p = (root / rel).resolve()
        inside = p.is_relative_to(root.resolve())
    except (OSError, RuntimeError, ValueError):  # a symlink loop, a name too long for the file system
        inside = False
    if not inside:
        raise ArtifactError(f"manifest path {rel[:120]!r} points outside the artifact directory {root}.", hostile)
    return p


def _looks_like_pickle(head: bytes) -> bool:
    """A pickle stream (protocol 2+) or a torch.save zip archive (which holds data.pkl)."""
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return True
    return head.startswith(b"PK\x03\x04") and b".pkl" in head


def _torch_version() -> str:
    """The installed torch's version without the local suffix (no torch import needed)."""
    mod = sys.modules.get("torch")
    if mod is not None:
        return mod.__version__.split("+")[0]
    from importlib.metadata import version  # noqa: PLC0415

    return version("torch").split("+")[0]


def _short(v: Any, n: int = 40) -> str:
    return show(v, n)


def _rebuild_cmd(m: dict[str, Any], root: Path, target: str | None = None, backend: str | None = None) -> str:
    """The command that rebuilds this artifact with the running dsv4c, as far as the manifest says."""
    spec = m.get("spec") if isinstance(m.get("spec"), dict) else {}
    name = spec.get("name")
    from .spec import VARIANTS  # noqa: PLC0415

    src = f"--variant {name}" if isinstance(name, str) and name in VARIANTS else "--checkpoint CKPT_DIR"
    parts = [f"dsv4c build {src}"]
    for flag, key, override, kind in (("--target", "target", target, str), ("--backend", "backend", backend, str),
                                      ("--max-seq-len", "max_seq_len", None, int), ("--max-batch", "max_batch", None, int)):
        v = override if override is not None else m.get(key)
        if (type(v) is kind and len(str(v)) <= 20
                and str(v).replace("-", "").replace("_", "").isalnum() and str(v)[0] != "-"):
            parts.append(f"{flag} {v}")
    parts.append(f"-o {root}")
    return "rebuild it with this dsv4c: `" + " ".join(parts) + "`."


def _schema_problems(m: dict[str, Any]) -> list[str]:
    """Type and range problems of the manifest fields the runtime relies on (files are checked separately)."""
    problems: list[str] = []

    def is_int(v: Any, lo: int = 0, hi: int = _MAX_DIM) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi

    def is_shape(v: Any) -> bool:
        return isinstance(v, list) and len(v) <= 16 and all(is_int(d) for d in v)

    for key in ("target", "backend", "numerics", "dtype"):
        if not isinstance(m.get(key), str) or not m[key]:
            problems.append(f"`{key}` must be a non-empty string, got {_short(m.get(key))}")
    for key, hi in (("max_seq_len", 1 << 26), ("max_batch", MAX_BATCH)):
        if not is_int(m.get(key), 1, hi):
            problems.append(f"`{key}` must be an integer in 1..{hi}, got {_short(m.get(key))}")
    cl = m.get("cache_layout")
    if not isinstance(cl, dict) or not all(
            isinstance(e, dict) and is_shape(e.get("shape")) and e.get("dtype") in CACHE_DTYPES for e in cl.values()):
        problems.append("`cache_layout` must map names to {shape: [ints], dtype: " + "|".join(CACHE_DTYPES) + "}")
    ks = m.get("kv_storage", "dense")
    if ks not in ("dense", "packed"):
        problems.append(f"`kv_storage` must be 'dense' or 'packed', got {_short(ks)}")
    elif isinstance(cl, dict):
        packed_names = any(k.endswith(("_nope", "_codes")) for k in cl)
        if packed_names != (ks == "packed"):
            problems.append(f"`cache_layout` does not match `kv_storage` {ks!r}")
    for key in ("params", "consts"):
        t = m.get(key)
        if not isinstance(t, dict) or not all(
                isinstance(e, dict) and isinstance(e.get("file"), str) and is_shape(e.get("shape"))
                and isinstance(e.get("dtype"), str) for e in t.values()):
            problems.append(f"`{key}` must map tensor names to {{file, shape, dtype}}")
    progs = m.get("programs")
    if not isinstance(progs, dict) or not all(isinstance(e, dict) and isinstance(e.get("file"), str) for e in progs.values()):
        problems.append("`programs` must map entry points to {file, ...}")
    elif not {"prefill", "decode"} <= set(progs):
        problems.append(f"`programs` must hold the prefill and decode entry points, has {sorted(progs)[:8]}")
    files = m.get("files")
    if not isinstance(files, dict) or not all(
            isinstance(e, dict) and is_int(e.get("size")) and isinstance(e.get("sha256"), str)
            and isinstance(e.get("head_sha256"), str) for e in files.values()):
        problems.append("`files` must map relative paths to {size, sha256, head_sha256}")
    return problems


def open_artifact(path: str | Path, target: str | None = None, backend: str | None = None,
                  full_check: bool = False) -> Artifact:
    """Read and check an artifact's manifest and files.

    Refuses, with the command that fixes it: a missing or malformed manifest, another schema version,
    dsv4c or torch version, another target or backend than asked for, manifest paths that leave the
    directory, pickle files, files not listed in the manifest, and files whose size or hash differ
    (the first 64 KiB of weights and all of every other file; every byte with ``full_check``)."""
    root = Path(path)
    mpath = root / MANIFEST
    if not _is_file(mpath):
        raise ArtifactError(f"{root} is not a dsv4c artifact (no {MANIFEST}).", "point at a directory written by `dsv4c build`.")
    rebuild_any = f"rebuild it: `dsv4c build ... -o {root}`."
    try:
        m = json.loads(mpath.read_bytes().decode("utf-8"))
    except OSError as e:
        raise ArtifactError(f"{mpath} cannot be read ({e.strerror or e}).", "check the file's permissions.") from None
    except (ValueError, RecursionError) as e:  # bad JSON or UTF-8, absurd nesting or numbers
        raise ArtifactError(f"{mpath} is not valid JSON ({type(e).__name__}: {str(e)[:120]}).", rebuild_any) from None
    if not isinstance(m, dict):
        raise ArtifactError(f"{mpath} is a JSON {type(m).__name__}, not an object.", rebuild_any)
    rebuild = _rebuild_cmd(m, root)
    sv = m.get("schema_version")
    if type(sv) is not int or sv != SCHEMA_VERSION:
        raise ArtifactError(f"{mpath}: artifact schema version {_short(sv)}; this dsv4c {__version__} reads "
                            f"version {SCHEMA_VERSION}.", rebuild)
    if m.get("dsv4c_version") != __version__:
        raise ArtifactError(f"{mpath}: built by dsv4c {_short(m.get('dsv4c_version'))}; this is dsv4c {__version__}.", rebuild)
    torch_version = _torch_version()
    if m.get("torch_version") != torch_version:
        raise ArtifactError(f"{mpath}: built with torch {_short(m.get('torch_version'))}; this runtime has torch "
                            f"{torch_version}.", rebuild.rstrip(".") + f" (or run it with torch {str(m.get('torch_version'))[:40]}).")
    if target is not None and m.get("target") != target:
        raise ArtifactError(f"{mpath}: built for target {_short(m.get('target'))}, not {target!r}.",
                            _rebuild_cmd(m, root, target=target).rstrip(".") + f", or run it on {_short(m.get('target'))}.")
    if backend is not None and m.get("backend") != backend:
        raise ArtifactError(f"{mpath}: built for backend {_short(m.get('backend'))}, not {backend!r}.",
                            _rebuild_cmd(m, root, backend=backend))
    required = ("target", "backend", "spec", "params", "consts", "programs", "cache_layout", "numerics", "dtype",
                "max_seq_len", "max_batch", "files")
    missing = [k for k in required if k not in m]
    if missing:
        raise ArtifactError(f"{mpath} lacks {missing}.", rebuild)
    problems = _schema_problems(m)
    if not problems:
        from .errors import ConfigError  # noqa: PLC0415
        from .spec import ModelSpec  # noqa: PLC0415

        try:
            spec = ModelSpec.from_dict(m["spec"])
        except ConfigError as e:
            problems.append(f"`spec` is invalid: {e.problem.rstrip('.')}")
        else:
            if m["max_seq_len"] > spec.max_position_embeddings:
                problems.append(f"`max_seq_len` {m['max_seq_len']} exceeds the spec's max_position_embeddings")
    if problems:
        raise ArtifactError(f"{mpath} is malformed: " + "; ".join(problems[:10]) + ".", rebuild)
    files: dict[str, dict[str, Any]] = m["files"]
    named = set(files) | {e["file"] for key in ("params", "consts", "programs") for e in m[key].values()}
    for rel in sorted(named):
        _inside(root, rel)  # hostile paths stop everything
    for rel in files:
        if rel.endswith(FORBIDDEN_SUFFIXES):
            problems.append(f"{rel}: pickle-format files are never loaded")
    for rel, ent in files.items():
        if rel.endswith(FORBIDDEN_SUFFIXES):
            continue
        p = root / rel
        try:
            if p.is_symlink():
                problems.append(f"{rel}: a symbolic link (an artifact holds plain files only)")
                continue
            if not _is_file(p):
                problems.append(f"{rel}: missing")
                continue
            size = p.stat().st_size
            if size != ent["size"]:
                problems.append(f"{rel}: {size} bytes, the manifest says {ent['size']} (truncated or modified)")
                continue
            with open(p, "rb") as f:
                head = f.read(4096)
            if not rel.endswith(".safetensors") and _looks_like_pickle(head):
                problems.append(f"{rel}: holds a pickle, which is never loaded")
                continue
            # Weights get the fast check (first 64 KiB); programs and everything else are hashed whole.
            whole = full_check or not rel.endswith(".safetensors")
            if sha256_file(p, HEAD_BYTES) != ent["head_sha256"] or (whole and sha256_file(p) != ent["sha256"]):
                problems.append(f"{rel}: sha256 mismatch (modified or corrupted)")
        except OSError as e:
            problems.append(f"{rel}: cannot be read ({e.strerror or e})")
    try:
        on_disk = sorted(root.rglob("*"))
    except OSError as e:
        on_disk = []
        problems.append(f"cannot list the directory ({e.strerror or e})")
    for p in on_disk:
        rel = p.relative_to(root).as_posix()
        if rel == MANIFEST or rel in files:
            continue
        if p.is_symlink() or not p.is_dir():
            kind = "pickle-format file" if rel.endswith(FORBIDDEN_SUFFIXES) else "file"
            problems.append(f"{rel}: a {kind} not listed in the manifest (nothing may be slipped into an artifact)")
    for key in ("params", "consts"):
        stray = sorted({e["file"] for e in m[key].values()} - set(files))
        if stray:
            problems.append(f"the `{key}` table names files not in the manifest: {stray[:4]}")
    for entry, ent in m["programs"].items():
        if ent["file"] not in files:
            problems.append(f"program {entry!r} names {ent['file'][:80]!r}, which is not in the manifest")
    if problems:
        raise ArtifactError(f"artifact {root} failed its integrity check: " + "; ".join(problems[:10])
                            + (f"; ... ({len(problems) - 10} more)" if len(problems) > 10 else "") + ".", rebuild)
    if m.get(MANIFEST_DIGEST) != manifest_digest(m):
        raise ArtifactError(f"{mpath} was modified after the build (its {MANIFEST_DIGEST} does not match its content).",
                            rebuild)
    return Artifact(root, m)
