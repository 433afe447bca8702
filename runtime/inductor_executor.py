"""Runtime of ``--backend inductor``: compile the artifact's programs with torch.compile / Inductor at load.

What happens where (the artifact's ``manifest["inductor"]`` records the same):

- Build (``lowering/inductor.py``): the passed programs are stored as JSON graphs, as for ``eager``. When
  the build machine has the target device, each entry point is also compiled once there (below), which
  fills the keyed compile cache; otherwise that happens at the first load.
- Load (:func:`make_executor`): the graphs are read back, a few load-time rewrites adapt them to the
  device (:func:`prepare_graph`), and each entry point is compiled by Inductor on first use. Inductor's
  FX-graph / AOTAutograd caches and Triton's kernel cache are pointed at a directory keyed by the
  artifact's pass-pipeline uuid, the program hash, the dsv4c / torch / triton versions and the device
  name (:func:`compile_cache_dir`; root ``$DSV4C_CACHE`` or ``~/.cache/dsv4c``), so a second load only
  re-traces the graphs (dynamo) and reloads compiled code.
- ``dsv4`` ops stay extern calls: on CUDA the Triton kernels of ``dsv4c.ops.triton_kernels`` (registered
  here), on CPU the reference impls. Fused ops that have no kernel of their own (compressor finish,
  indexer top-k) are decomposed for Inductor into their pieces so their element-wise parts fuse.
- Prefill is compiled with a dynamic sequence length. Decode is compiled per batch-size bucket (static
  shapes) and, on CUDA, captured in a CUDA graph per bucket: the graph reads and writes the very cache
  tensors it was captured with (static buffers); each step copies the token ids and positions into the
  graph's input buffers and replays. Batches are padded up to the next bucket when the cache tensors
  are views into a larger cache (the Engine's always are: padding rows are free slots).

The cache holds files written by torch's own compiler caches (which use pickle); they are this
machine's own compile products, never part of an artifact, and ``DSV4C_CACHE`` can point them anywhere.
Set ``DSV4C_CUDA_GRAPHS=0`` to run decode without graph capture (debugging).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

import dsv4c.ops  # noqa: F401  (registers torch.ops.dsv4)
from dsv4c.artifact import Artifact
from dsv4c.errors import ArtifactError
from dsv4c.ops import kv_storage
from dsv4c.program import Program
from dsv4c.runtime.load_rewrites import _register_cuda, prepare_graph

FORMAT = "dsv4c.inductor/1"
DECODE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
dsv4 = torch.ops.dsv4


# ---- the keyed compile cache ----------------------------------------------------------------------------

def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu-{platform.machine()}"


def _triton_version() -> str:
    try:
        import triton  # noqa: PLC0415

        return triton.__version__
    except ImportError:
        return "none"


def cache_key_parts(manifest: Mapping[str, Any], program_texts: Mapping[str, str], device: torch.device) -> dict:
    progs = hashlib.sha256("".join(program_texts[k] for k in sorted(program_texts)).encode()).hexdigest()[:16]
    return {"pipeline_uuid": manifest.get("pipeline_uuid"), "programs_sha256": progs,
            "dsv4c": manifest.get("dsv4c_version"), "torch": torch.__version__, "triton": _triton_version(),
            "device": device_name(device), "format": FORMAT, "runtime_sha256": _runtime_hash()}


def _runtime_hash() -> str:
    """Hash of the code that shapes the compiled graphs: the ops' schemas and implementations, the
    decompositions, the load-time rewrites and the Triton launchers (every module of ``dsv4c.ops`` and
    ``dsv4c.runtime``). Inductor's FX-graph cache keys on the traced graph, which shows neither a changed
    decomposition nor a changed op schema; a compiled module that calls an op with its old arguments can
    crash the process (seen with Inductor's C++ wrapper on the CPU)."""
    import dsv4c.ops as ops_pkg  # noqa: PLC0415
    import dsv4c.ops.triton_kernels as tk  # noqa: PLC0415

    h = hashlib.sha256()
    for folder in (Path(ops_pkg.__file__).parent, Path(__file__).parent):
        for mod in sorted(folder.glob("*.py")):
            h.update(mod.name.encode())
            h.update(mod.read_bytes())
    h.update(json.dumps({k: tk.TUNE.get(k) for k in DECOMP_SWITCHES}, sort_keys=True).encode())
    return h.hexdigest()[:16]


def cache_root() -> Path:
    return Path(os.environ.get("DSV4C_CACHE") or Path.home() / ".cache" / "dsv4c")


def compile_cache_dir(manifest: Mapping[str, Any], program_texts: Mapping[str, str], device: torch.device) -> Path:
    parts = cache_key_parts(manifest, program_texts, device)
    key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]
    return cache_root() / f"inductor-{key}"


def use_compile_cache(path: Path, parts: dict | None = None) -> None:
    """Point Inductor's and Triton's on-disk caches at ``path`` (process-wide)."""
    path.mkdir(parents=True, exist_ok=True)
    if parts is not None and not (path / "key.json").exists():
        (path / "key.json").write_text(json.dumps(parts, indent=1, sort_keys=True))
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path / "inductor")
    os.environ["TRITON_CACHE_DIR"] = str(path / "triton")
    import torch._inductor.config as icfg  # noqa: PLC0415

    icfg.fx_graph_cache = True
    try:
        import torch._functorch.config as fcfg  # noqa: PLC0415

        fcfg.enable_autograd_cache = True
    except (ImportError, AttributeError):  # pragma: no cover - older torch
        pass


# ---- Inductor decompositions of fused ops without a kernel of their own -------------------------------------

def _rotate(x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``x @ h`` (the indexer keys' Hadamard rotation); under TUNE ``const_mm_reduction`` as a product and a
    sum that Inductor generates instead of a cuBLAS fp32 GEMM (the same products, fp32 sums in another
    order). The switch is part of the compile cache key (:func:`_runtime_hash`)."""
    from dsv4c.ops.triton_kernels import TUNE  # noqa: PLC0415

    return (x.unsqueeze(-1) * h).sum(-2) if TUNE["const_mm_reduction"] else x @ h


# TUNE switches that change a decomposition: the compiled code depends on them without the traced graph
# showing it, so they are part of the compile cache key
DECOMP_SWITCHES = ("const_mm_reduction",)


def _compress_finish(a, z, a_prev, z_prev, norm_w, pos, freqs, hadamard, overlap, eps, act_dtype_code, quant_mode,
                     ue8m0):
    """``dsv4::compress_finish`` as its pieces (the library's reference, with the quantizers kept as
    ``dsv4`` ops so they stay bit-exact kernels)."""
    from dsv4c.ops.library import _DTYPE_CODES  # noqa: PLC0415
    from dsv4c.rope import apply_rope  # noqa: PLC0415

    dtype = _DTYPE_CODES[act_dtype_code]
    e = dsv4.compress_pool(a, z, a_prev, z_prev, overlap).to(dtype)
    ef = e.float()
    e = (ef * torch.rsqrt(ef.pow(2).mean(-1, keepdim=True) + eps) * norm_w.float()).to(dtype)
    e = apply_rope(e, pos, freqs)
    r = freqs.shape[0] * 2
    if quant_mode == 1:
        e = torch.cat((dsv4.fp8_qdq(e[..., :-r], 64, ue8m0), e[..., -r:]), dim=-1)
    elif quant_mode in (2, 3):
        e = _rotate(e.float(), hadamard.float()).to(dtype)
        if quant_mode == 2:
            e = dsv4.fp4_qdq(e, 32)
    return e


def _compress_finish_pair(a, z, a_prev, z_prev, norm_w, pos, ia, iz, ia_prev, iz_prev, inorm_w, ipos, freqs, hadamard,
                          overlap, eps, act_dtype_code, quant_mode, iquant_mode, ue8m0):
    return (_compress_finish(a, z, a_prev, z_prev, norm_w, pos, freqs, hadamard, overlap, eps, act_dtype_code,
                             quant_mode, ue8m0),
            _compress_finish(ia, iz, ia_prev, iz_prev, inorm_w, ipos, freqs, hadamard, overlap, eps, act_dtype_code,
                             iquant_mode, ue8m0))


# the visible prefix goes to the selection as row lengths: the kernel reads only that prefix of the scores
# (the cache holds max_seq_len / ratio entries); the packed scores skip the rest too (an 8k prefill at a 64k
# artifact context: 2048 live of 16513 entries, the causal half of them visible to the average token)
def _indexer_topk(q, k, w, visible, topk):
    return dsv4.topk_ids(dsv4.indexer_score(q, k, w), topk, visible)


def _indexer_topk_packed(q, k_codes, k_scale, w, visible, topk):
    return dsv4.topk_ids(dsv4.indexer_score_packed(q, k_codes, k_scale, w, visible), topk, visible)


# The KV storage codecs (elementwise with one small reduction per block) have no kernel of their own:
# as decompositions Inductor fuses each into one generated kernel with its neighbours; as opaque ops they
# would run their torch composite eagerly, ~30 small kernels per call (~200 per flash-4 decode step).
_DECOMPS = {"compress_finish": _compress_finish, "compress_finish_pair": _compress_finish_pair,
            "indexer_topk": _indexer_topk, "indexer_topk_packed": _indexer_topk_packed,
            "kv_pack": kv_storage.pack_kv_entries, "kv_unpack": kv_storage.unpack_kv_entries,
            "fp4_pack": kv_storage.pack_fp4_keys}


def register_decompositions() -> None:
    """Add the decompositions to Inductor's table (process-wide; only ``dsv4`` ops are affected). Passing a
    table to ``compile_fx`` instead would make Inductor's FX-graph cache bypass every compile."""
    from torch._inductor import decomposition as idec  # noqa: PLC0415

    for name, fn in _DECOMPS.items():
        idec.decompositions[getattr(dsv4, name).default] = fn


def inductor_pdl_options(device: torch.device) -> dict:
    """Inductor options that launch its generated kernels with programmatic dependent launch (TUNE
    ``inductor_pdl``): CUDA sm_90+ and a torch whose Inductor has ``triton.enable_pdl`` and lets
    ``runtime/inductor_pdl.py`` make every kernel wait before its first access; nothing otherwise."""
    import torch._inductor.config as icfg  # noqa: PLC0415
    from dsv4c.ops.triton_kernels import TUNE  # noqa: PLC0415

    from .inductor_pdl import install_wait_first  # noqa: PLC0415

    if not (TUNE["inductor_pdl"] and device.type == "cuda" and hasattr(icfg.triton, "enable_pdl")):
        return {}
    if torch.cuda.get_device_capability(device)[0] < 9 or not install_wait_first():
        return {}
    return {"triton.enable_pdl": True}


def compile_program(prog: Program, device: torch.device, dynamic: bool) -> Callable:
    import torch._dynamo  # noqa: PLC0415

    register_decompositions()
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    if hasattr(torch._dynamo.config, "recompile_limit"):
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    options = {"cpp_wrapper": True} if device.type == "cpu" else {}  # CPU: one C++ file, far faster to build
    import torch._inductor.config as icfg  # noqa: PLC0415

    if hasattr(icfg, "emulate_precision_casts"):  # round intermediates to bf16 where eager does
        options["emulate_precision_casts"] = True
    options.update(inductor_pdl_options(device))
    return torch.compile(prog.graph_module, backend="inductor", options=options,
                         dynamic=None if dynamic else False, fullgraph=True)


# ---- decode in CUDA graphs ---------------------------------------------------------------------------------

def _bucket_for(b: int, room: int) -> int:
    for k in DECODE_BUCKETS:
        if b <= k <= room:
            return k
    return b


def _room(t: torch.Tensor) -> int:
    """How many rows along dim 0 the storage behind view ``t`` holds from its first row on."""
    if t.dim() == 0 or not t.is_contiguous() or t.shape[0] == 0:
        return t.shape[0] if t.dim() else 0
    row = t.stride(0)
    avail = t.untyped_storage().nbytes() // t.element_size() - t.storage_offset()
    return max(t.shape[0], avail // row) if row else t.shape[0]


def _widen(t: torch.Tensor, rows: int) -> torch.Tensor:
    if rows == t.shape[0]:
        return t
    return t.as_strided((rows, *t.shape[1:]), t.stride(), t.storage_offset())


class _Graph:
    def __init__(self, graph: torch.cuda.CUDAGraph, static: list, out: torch.Tensor, sig: tuple,
                 chain: "_Chain | None" = None) -> None:
        self.graph, self.static, self.out, self.sig, self.chain = graph, static, out, sig, chain


class _Chain:
    """The device buffers of a greedy chain graph: which rows are live, the replay counter, the chosen ids."""

    def __init__(self, bucket: int, device: torch.device) -> None:
        self.live = torch.zeros((bucket,), dtype=torch.long, device=device)
        self.ctr = torch.zeros((1,), dtype=torch.long, device=device)
        self.hist = torch.zeros((bucket, GREEDY_HIST), dtype=torch.long, device=device)


GREEDY_HIST = 256  # ids a greedy chain graph records before the host copies them out


class CudaGraphDecode:
    """Decode through CUDA graphs, one per batch-size bucket (see the module docstring)."""

    def __init__(self, fn: Callable, names: list[str], device: torch.device) -> None:
        self.fn = fn
        self.names = names
        self.device = device
        self.i_ids = names.index("input_ids")
        self.i_start = names.index("start_pos")
        self.cache_idx = [i for i, n in enumerate(names) if n.startswith("cache.")]
        self.graphs: dict[int, _Graph] = {}
        self.chains: dict[int, _Graph] = {}  # greedy chain graphs (see greedy)
        self.pool = None
        self.captures = 0
        self.failed: str | None = None

    def _inputs_for(self, flat: list[torch.Tensor], bucket: int) -> list[torch.Tensor]:
        out = list(flat)
        for i in self.cache_idx:
            out[i] = _widen(flat[i], bucket)
        return out

    def _graph_for(self, flat: list[torch.Tensor], greedy: bool) -> _Graph | None:
        """The bucket's captured graph for these cache tensors (captured now if needed), with this call's
        ids and positions in its input buffers; None when capture failed (once: then never again)."""
        ids, start = flat[self.i_ids], flat[self.i_start]
        b = ids.shape[0]
        room = min([_room(flat[i]) for i in self.cache_idx] or [b])
        bucket = _bucket_for(b, room)
        wide = self._inputs_for(flat, bucket)
        sig = tuple(t.data_ptr() for i, t in enumerate(wide) if i not in (self.i_ids, self.i_start))
        graphs = self.chains if greedy else self.graphs
        g = graphs.get(bucket)
        if g is None or g.sig != sig:
            if self.failed is not None:
                return None
            try:
                g = self._capture(wide, sig, bucket, ids, start, greedy)
            except Exception as e:  # noqa: BLE001 - run uncaptured rather than not at all, and say why
                self.failed = f"{type(e).__name__}: {str(e)[:300]}"
                import warnings  # noqa: PLC0415

                warnings.warn(f"dsv4c: CUDA graph capture failed, decoding without graphs ({self.failed})")
                torch.cuda.synchronize(self.device)
                return None
        g.static[self.i_ids][:b].copy_(ids)
        g.static[self.i_start][:b].copy_(start)
        if bucket > b:
            g.static[self.i_ids][b:].zero_()
            g.static[self.i_start][b:].zero_()
        return g

    def run(self, flat: list[torch.Tensor]) -> torch.Tensor:
        g = self._graph_for(flat, greedy=False)
        if g is None:
            return self.fn(*flat)
        g.graph.replay()
        return g.out[:flat[self.i_ids].shape[0]].clone()

    def greedy(self, flat: list[torch.Tensor], steps: int) -> torch.Tensor:
        """``steps`` greedy decode steps chained on the device: one replay per step of a graph that ends by
        taking the argmax of its logits as its own next input ids and advancing the live rows' positions,
        so that no work between replays waits on the host. Returns the chosen ids [b, steps] (device)."""
        b = flat[self.i_ids].shape[0]
        g = self._graph_for(flat, greedy=True)
        if g is None:  # uncaptured: the same chain, one call per step
            out, flat = [], list(flat)
            for _ in range(steps):
                nxt = self.fn(*flat).argmax(-1, keepdim=True)
                out.append(nxt)
                flat[self.i_ids], flat[self.i_start] = nxt, flat[self.i_start] + 1
            return torch.cat(out, dim=1) if out else torch.empty((b, 0), dtype=torch.long, device=self.device)
        c = g.chain
        c.live.zero_()
        c.live[:b] = 1
        out = torch.empty((b, steps), dtype=torch.long, device=self.device)
        for s0 in range(0, steps, GREEDY_HIST):
            n = min(GREEDY_HIST, steps - s0)
            c.ctr.zero_()
            for _ in range(n):
                g.graph.replay()
            out[:, s0:s0 + n].copy_(c.hist[:b, :n])
        return out

    def _capture(self, wide: list[torch.Tensor], sig: tuple, bucket: int, ids: torch.Tensor,
                 start: torch.Tensor, greedy: bool = False) -> _Graph:
        from dsv4c.ops import triton_kernels as tk  # noqa: PLC0415
        from dsv4c.ops.triton_argmax import argmax_rows  # noqa: PLC0415

        tk.prepare_device(self.device)
        b = ids.shape[0]
        static = list(wide)
        static[self.i_ids] = torch.zeros((bucket, *ids.shape[1:]), dtype=ids.dtype, device=self.device)
        static[self.i_start] = torch.zeros((bucket,), dtype=start.dtype, device=self.device)
        static[self.i_ids][:b].copy_(ids)
        static[self.i_start][:b].copy_(start)
        # Warm-up runs compile this bucket and every kernel; they mutate the cache, which a decode step
        # does not tolerate twice at a window boundary, so the cache is restored afterwards.
        saved = [static[i].clone() for i in self.cache_idx]
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self.fn(*static)
        torch.cuda.current_stream(self.device).wait_stream(side)
        for i, s in zip(self.cache_idx, saved):
            static[i].copy_(s)
        del saved
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        chain = _Chain(bucket, self.device) if greedy else None
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self.fn(*static)
            if chain is not None:  # the step's tail: its argmax becomes the next step's input
                nxt = argmax_rows(out, out=static[self.i_ids])
                static[self.i_start].add_(chain.live)
                chain.hist.scatter_(1, chain.ctr.expand(bucket, 1), nxt)
                chain.ctr.add_(1)
        self.captures += 1
        g = _Graph(graph, static, out, sig, chain)
        graphs = self.chains if greedy else self.graphs
        old = graphs.pop(bucket, None)
        del old
        graphs[bucket] = g
        return g


# ---- the executor ----------------------------------------------------------------------------------------

class InductorExecutor:
    """Runs an inductor artifact's entry points compiled by Inductor (see the module docstring)."""

    def __init__(self, art: Artifact, device: torch.device) -> None:
        m = art.manifest
        info = m.get("inductor")
        if not isinstance(info, dict) or info.get("format") != FORMAT:
            raise ArtifactError(f"{art.path}: the manifest has no `inductor` section of format {FORMAT}.",
                                "rebuild the artifact with `dsv4c build ... --backend inductor`.")
        if device.type == "cuda":
            _register_cuda()
        self.device = device
        self.texts = {entry: art.read_text(ent["file"]) for entry, ent in m["programs"].items()}
        self.programs: dict[str, Program] = {}
        self.rewrites: dict[str, dict] = {}
        for entry, text in self.texts.items():
            prog = Program.from_json(text, where=f"{art.path}/{m['programs'][entry]['file']}", device=device)
            self.rewrites[entry] = prepare_graph(prog, device, m.get("params"))
            prog.recompile()
            self.programs[entry] = prog
        # graph inputs whose FP8 codes the wo_a_fp8 rewrite's op reads (found before each call, see
        # runtime/wo_a_fp8.py register_weight)
        self.fp8_weight_inputs = {entry: _fp8_weight_inputs(prog, self.rewrites[entry])
                                  for entry, prog in self.programs.items()}
        parts = cache_key_parts(m, self.texts, device)
        self.cache_dir = compile_cache_dir(m, self.texts, device)
        use_compile_cache(self.cache_dir, parts)
        self.use_graphs = device.type == "cuda" and os.environ.get("DSV4C_CUDA_GRAPHS", "1") != "0"
        self._fns: dict[str, Callable] = {}
        self._decode: CudaGraphDecode | None = None
        self.compile_seconds: dict[str, float] = {}

    def _fn(self, entry: str) -> Callable:
        fn = self._fns.get(entry)
        if fn is None:
            fn = compile_program(self.programs[entry], self.device, dynamic=entry == "prefill")
            self._fns[entry] = fn
        return fn

    def _flat_inputs(self, entry: str, inputs: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        """``inputs`` in the graph's order, with what the load-time rewrites need of them prepared."""
        flat = [inputs[n] for n in self.programs[entry].input_names]
        if self.fp8_weight_inputs[entry]:
            from .wo_a_fp8 import register_weight  # noqa: PLC0415

            for name in self.fp8_weight_inputs[entry]:
                register_weight(inputs[name])
        return flat

    def run(self, entry: str, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        prog = self.programs[entry]
        flat = self._flat_inputs(entry, inputs)
        fn = self._fn(entry)
        if entry == "decode" and self.use_graphs:
            if self._decode is None:
                self._decode = CudaGraphDecode(fn, prog.input_names, self.device)
            t0 = time.perf_counter()
            n0 = self._decode.captures
            out = self._decode.run(flat)
            if self._decode.captures != n0:
                self.compile_seconds[f"decode:{flat[prog.input_names.index('input_ids')].shape[0]}"] = \
                    time.perf_counter() - t0
            return out
        if entry == "prefill":
            ids = flat[prog.input_names.index("input_ids")]
            if ids.shape[1] > 1:
                torch._dynamo.maybe_mark_dynamic(ids, 1)
        t0 = time.perf_counter()
        first = entry not in self.compile_seconds
        out = fn(*flat)
        if first:
            self.compile_seconds[entry] = time.perf_counter() - t0
        return out

    def decode_greedy(self, inputs: Mapping[str, torch.Tensor], steps: int) -> torch.Tensor | None:
        """``steps`` greedy decode steps from ``inputs`` (ids [B, 1], positions [B]) chained on the device in
        CUDA graphs (:meth:`CudaGraphDecode.greedy`); the chosen ids [B, steps]. None where decode does
        not run in CUDA graphs (the caller loops over :meth:`run`)."""
        if not self.use_graphs:
            return None
        prog = self.programs["decode"]
        if self._decode is None:
            self._decode = CudaGraphDecode(self._fn("decode"), prog.input_names, self.device)
        return self._decode.greedy(self._flat_inputs("decode", inputs), steps)


def _fp8_weight_inputs(prog: Program, done: Mapping[str, Any]) -> list[str]:
    """Input names of the weights the wo_a_fp8 rewrite's op reads (none where it did not run)."""
    if not done.get("wo_a_fp8"):
        return []
    from .wo_a_fp8 import weight_inputs  # noqa: PLC0415

    return weight_inputs(prog)


def make_executor(art: Artifact, device: torch.device) -> InductorExecutor:
    return InductorExecutor(art, device)


# ---- compile at build time (used by lowering/inductor.py when the target device is present) ----------------

def example_inputs(prog: Program, manifest: Mapping[str, Any], entry: str, device: torch.device, batch: int = 1,
                   seq: int = 16) -> list[torch.Tensor]:
    """Zero-valued inputs with the shapes the runtime will pass (from the graph's placeholder metadata
    for parameters and constants, the manifest's cache layout for the cache)."""
    phs = [n for n in prog.graph_module.graph.nodes if n.op == "placeholder"]
    out = []
    dtypes = {str(d).removeprefix("torch."): d for d in (torch.bfloat16, torch.float32, torch.float16,
                                                          torch.float8_e4m3fn, torch.uint8, torch.int8, torch.int32,
                                                          torch.int64, torch.bool)}
    for name, node in zip(prog.input_names, phs):
        if name == "input_ids":
            out.append(torch.zeros((1, seq) if entry == "prefill" else (batch, 1), dtype=torch.long, device=device))
        elif name == "start_pos":
            out.append(torch.zeros((1 if entry == "prefill" else batch,), dtype=torch.long, device=device))
        elif name.startswith("cache."):
            # views of the first rows of a full-size cache, as the engine passes them (Inductor's cache key
            # includes the storage behind each input)
            ent = manifest["cache_layout"][name[len("cache."):]]
            rows = 1 if entry == "prefill" else batch
            full = torch.zeros((max(rows, int(manifest["max_batch"])), *ent["shape"]), dtype=dtypes[ent["dtype"]],
                               device=device)
            out.append(full[:rows])
        else:
            val = node.meta.get("val")
            if val is None:
                raise ValueError(f"placeholder {name} has no shape metadata")
            out.append(torch.zeros(tuple(int(s) for s in val.shape), dtype=val.dtype, device=device))
    return out


def _params_table(prog: Program) -> dict[str, dict[str, Any]]:
    """The manifest-style ``params`` table (shape, dtype) of a program whose placeholders carry metadata."""
    phs = [n for n in prog.graph_module.graph.nodes if n.op == "placeholder"]
    return {name[len("params."):]: {"shape": list(n.meta["val"].shape),
                                    "dtype": str(n.meta["val"].dtype).removeprefix("torch.")}
            for name, n in zip(prog.input_names, phs) if name.startswith("params.") and "val" in n.meta}


def compile_at_build(programs: Mapping[str, Program], manifest: Mapping[str, Any], device: torch.device,
                     decode_batches: Sequence[int] = (1,), progress: Callable[[str], None] = print,
                     texts: Mapping[str, str] | None = None) -> dict:
    """Compile each entry point once on ``device`` into the keyed cache (what a first load would do).
    ``texts``: the JSON graphs exactly as written into the artifact (they key the cache)."""
    if device.type == "cuda":
        _register_cuda()
    texts = dict(texts) if texts is not None else {entry: prog.to_json() for entry, prog in programs.items()}
    cdir = compile_cache_dir(manifest, texts, device)
    use_compile_cache(cdir, cache_key_parts(manifest, texts, device))
    seconds = {}
    for entry, text in texts.items():
        meta_src = programs[entry]
        prog = Program.from_json(text, device=device)
        # JSON drops node metadata; the example inputs take shapes from the live program's placeholders.
        # the manifest's params table may not be written yet: the live program's metadata gives the same
        # shapes and dtypes (the load-time rewrites, and so the compile cache key, must come out the same)
        prepare_graph(prog, device, manifest.get("params") or _params_table(meta_src))
        prog.recompile()
        fn = compile_program(prog, device, dynamic=entry == "prefill")
        for b in (decode_batches if entry == "decode" else (1,)):
            inputs = example_inputs(meta_src, manifest, entry, device, batch=b)
            if entry == "prefill":
                torch._dynamo.maybe_mark_dynamic(inputs[prog.input_names.index("input_ids")], 1)
            t0 = time.perf_counter()
            with torch.no_grad():
                fn(*inputs)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            key = entry if entry == "prefill" else f"decode:{b}"
            seconds[key] = round(time.perf_counter() - t0, 2)
            progress(f"compiled {key} for {device_name(device)} in {seconds[key]:.1f} s")
            del inputs
    return {"cache_dir_key": cdir.name, "seconds": seconds}


__all__ = ["InductorExecutor", "make_executor", "compile_at_build", "compile_cache_dir", "cache_key_parts",
           "prepare_graph", "CudaGraphDecode",
           "DECODE_BUCKETS", "FORMAT"]
