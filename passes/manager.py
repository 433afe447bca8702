"""The pass interface, the registry and the pass manager.

A pass is a small class (see vLLM ``vllm/compilation`` passes and TensorRT-LLM AutoDeploy's
``transform/interface.py`` for the same shape)::

    @register
    class RewriteSwigluClamp(GraphPass):
        name = "rewrite_swiglu_clamp"
        Config = SwigluConfig                # a frozen dataclass: the pass's slice of the config

        def run(self, prog, weights, ctx) -> PassResult: ...

- ``GraphPass.run`` rewrites one program (entry point) at a time; the base ``__call__`` runs it over
  every entry and collects per-entry match counts.
- Weight-rewriting passes (``WeightPass``) see all programs at once because the programs share one
  parameter table: they add parameters with ``Program.add_param_input``, drop the replaced ones and
  rewrite ``weights`` (a dict the manager owns) in place.
- ``uuid()`` hashes the pass's source (its module and the shared helper modules it names) and its
  config, so the artifact manifest says exactly which rewrite produced a graph.

The ``PassManager`` runs a pipeline: it times every pass, stamps ``node.meta["dsv4c_pass"]`` on the
nodes a pass created (``Program.to_json`` keeps it), lints every graph a pass changed, logs one line
per pass, can skip any pass by name and can dump every pass's before/after graphs (see ``dump.py``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable

import torch

from dsv4c.errors import ConfigError
from dsv4c.program import Program

Log = Callable[[str], None]


@dataclass
class PassResult:
    """What a pass did: matches (an int for one program, {entry: n} for all), whether it skipped
    (nothing applicable), free-text notes, and extra keys for its manifest record."""

    num_matches: int | dict[str, int] = 0
    skipped: bool = False
    notes: str = ""
    record: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class NoConfig:
    pass


REGISTRY: dict[str, type["Pass"]] = {}


def register(cls: type["Pass"]) -> type["Pass"]:
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise ValueError(f"two passes are named {cls.name!r}")
    REGISTRY[cls.name] = cls
    return cls


class Pass:
    name: ClassVar[str]
    Config: ClassVar[type] = NoConfig
    # Modules whose source is part of the pass's identity besides its own (helpers, the ops it emits).
    uses_modules: ClassVar[tuple[str, ...]] = ("dsv4c.passes.fxutil",)
    # Whether the manager runs dead-code elimination after the pass; the product passes prune what
    # their own rewrites leave dead (``fxutil.replace``), so this is for passes that do not.
    prune_after: ClassVar[bool] = False

    def __init__(self, config: Any = None) -> None:
        if config is None:
            config = self.Config()
        elif isinstance(config, dict):
            known = {f.name for f in dataclasses.fields(self.Config)}
            unknown = sorted(set(config) - known)
            if unknown:
                raise ConfigError(f"pass {self.name!r} has no option(s) {unknown}.",
                                  f"its options are: {sorted(known) or 'none'}.")
            config = self.Config(**config)
        self.config = config

    def config_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.config)

    def uuid(self) -> str:
        h = hashlib.sha256(f"{self.name}/{type(self).__qualname__}".encode())
        for mod in (type(self).__module__, *self.uses_modules):
            h.update(inspect.getsource(sys.modules[mod]).encode())
        h.update(json.dumps(self.config_dict(), sort_keys=True).encode())
        return h.hexdigest()[:16]

    def __call__(self, programs: Program | dict[str, Program], weights: dict[str, torch.Tensor], ctx: Any) -> PassResult:
        raise NotImplementedError


class GraphPass(Pass):
    """A pass that rewrites each program on its own."""

    def run(self, prog: Program, weights: dict[str, torch.Tensor], ctx: Any) -> PassResult:
        raise NotImplementedError

    def __call__(self, programs: Program | dict[str, Program], weights: dict[str, torch.Tensor], ctx: Any) -> PassResult:
        programs = _as_dict(programs)
        out = PassResult(num_matches={}, skipped=True)
        notes = []
        for entry, prog in programs.items():
            r = self.run(prog, weights, ctx)
            out.num_matches[entry] = int(r.num_matches)
            out.skipped = out.skipped and r.skipped
            if r.notes:
                notes.append(f"{entry}: {r.notes}")
            for k, v in r.record.items():
                out.record.setdefault(k, {})[entry] = v
        out.notes = "; ".join(notes)
        return out


class WeightPass(Pass):
    """A pass that rewrites parameters: it sees every program at once (they share the weights)."""

    def __call__(self, programs: Program | dict[str, Program], weights: dict[str, torch.Tensor], ctx: Any) -> PassResult:
        return self.run_all(_as_dict(programs), weights, ctx)

    def run_all(self, programs: dict[str, Program], weights: dict[str, torch.Tensor], ctx: Any) -> PassResult:
        raise NotImplementedError


def check_pass_names(names: Iterable[str], what: str = "--disable-pass") -> None:
    """ConfigError naming the valid passes if ``names`` holds one that is not registered."""
    unknown = sorted(set(names) - set(REGISTRY))
    if unknown:
        raise ConfigError(f"{what} names unknown pass(es) {unknown}.", f"use one of: {', '.join(sorted(REGISTRY))}.")


def _as_dict(programs: Program | dict[str, Program]) -> dict[str, Program]:
    return {programs.entry: programs} if isinstance(programs, Program) else programs


# ---- the manager -----------------------------------------------------------------------------------

class PassManager:
    """Runs passes in order over all entry points; see the module docstring."""

    def __init__(self, passes: list[Pass], disable: Iterable[str] = (), dump_dir: Path | str | None = None,
                 log: Log = print) -> None:
        disable = list(disable)
        check_pass_names(disable)
        self.passes = passes
        self.disable = set(disable)
        self.dump_dir = Path(dump_dir) if dump_dir is not None else None
        self.log = log

    def run(self, programs: dict[str, Program], weights: dict[str, torch.Tensor], ctx: Any
            ) -> tuple[dict[str, torch.Tensor], list[dict]]:
        from .dump import Dumper

        weights = dict(weights)  # passes rewrite the table; the caller's dict stays as it was
        dumper = Dumper(self.dump_dir, programs) if self.dump_dir is not None else None
        records = []
        stale: set[str] = set()  # programs whose generated code is behind their graph
        for k, p in enumerate(self.passes, start=1):
            nodes_before = {e: prog.num_nodes() for e, prog in programs.items()}
            rec: dict[str, Any] = {"name": p.name, "uuid": p.uuid(), "config": p.config_dict()}
            if p.name in self.disable:
                # A disabled pass changes the pipeline's identity (the build hashes the uuids).
                rec["uuid"] = hashlib.sha256(f"disabled:{rec['uuid']}".encode()).hexdigest()[:16]
                rec.update(matches={e: 0 for e in programs}, ms=0.0, nodes_before=nodes_before,
                           nodes_after=nodes_before, skipped=True, notes="disabled (--disable-pass)")
                records.append(rec)
                self.log(f"pass {k:02d} {p.name}: disabled")
                continue
            if dumper is not None:
                dumper.before(k, p.name, programs)
            existing = {e: set(prog.graph_module.graph.nodes) for e, prog in programs.items()}
            t0 = time.perf_counter()
            res = p(programs, weights, ctx)
            matches = res.num_matches if isinstance(res.num_matches, dict) else {e: int(res.num_matches) for e in programs}
            for e, prog in programs.items():
                g = prog.graph_module.graph
                if not matches.get(e) and len(g.nodes) == nodes_before[e]:
                    continue  # nothing matched: the graph is as it was
                for n in g.nodes:
                    if n not in existing[e]:
                        n.meta["dsv4c_pass"] = p.name
                if p.prune_after:
                    g.eliminate_dead_code()
                g.lint()
                stale.add(e)
            ms = (time.perf_counter() - t0) * 1e3
            rec.update(matches=matches, ms=round(ms, 2), nodes_before=nodes_before,
                       nodes_after={e: prog.num_nodes() for e, prog in programs.items()},
                       skipped=bool(res.skipped), notes=res.notes)
            rec.update(res.record)
            records.append(rec)
            self.log(_line(k, rec))
            if dumper is not None:
                dumper.after(k, p.name, programs, rec)
        for e in stale:
            programs[e].recompile()  # once, at the end: passes and dumps read the graph, not the code
        if dumper is not None:
            dumper.finish(records)
        return weights, records


def _line(k: int, rec: dict) -> str:
    m = " ".join(f"{e}={n}" for e, n in rec["matches"].items())
    nodes = " ".join(f"{rec['nodes_before'][e]}->{rec['nodes_after'][e]}" for e in rec["matches"])
    extra = " (skipped)" if rec["skipped"] else ""
    return f"pass {k:02d} {rec['name']}: matches {m}; nodes {nodes}; {rec['ms']:.0f} ms{extra}"
