"""``--dump-passes DIR``: every pass's graphs before and after, a diff and a DOT picture.

For pass number NN and entry point ENTRY the dumper writes::

    NN_<pass>.<ENTRY>.before.py   readable code of the graph the pass received
    NN_<pass>.<ENTRY>.after.py    ... and of the graph it returned
    NN_<pass>.<ENTRY>.diff        unified diff of the two
    NN_<pass>.<ENTRY>.dot         the changed region: nodes the pass created or rewired (filled), the
                                  nodes they read (grey), and the nodes it removed (red, dashed)
    index.json                    the pipeline records and the files of each pass, in order

Lines of the code are annotated with the block the node belongs to (``# [block 3]``, from the frontend's
``meta["dsv4c_block"]``), the pass that created it (``<- pass``) and its expert wave, so
``grep -F "[block 3]"`` on a dump or a diff shows what every pass did to block 3. (TVM's ``DumpIR`` instrument
and PyTorch's ``TORCH_COMPILE_DEBUG`` dumps do the same job.)
"""

from __future__ import annotations

import difflib
import json
import re
from pathlib import Path
from typing import Any

import torch.fx as fx

from dsv4c.program import Program

_MAX_DOT_NODES = 600
_LINE = re.compile(r"^    (\w+) = ")


def annotated_code(gm: fx.GraphModule) -> str:
    """The graph's Python code, each line of a pass-created node annotated with its provenance."""
    src = gm.graph.python_code("self").src
    prov = {}
    for n in gm.graph.nodes:
        tags = [f"[block {n.meta['dsv4c_block']}]"] if "dsv4c_block" in n.meta else []
        if n.meta.get("dsv4c_pass"):
            tags.append(f"<- {n.meta['dsv4c_pass']}")
        if "dsv4c_wave" in n.meta:
            tags.append(f"wave {n.meta['dsv4c_wave']}")
        if tags:
            prov[n.name] = "  # " + ", ".join(tags)
    if not prov:
        return src
    out = []
    for line in src.splitlines():
        m = _LINE.match(line)
        out.append(line + prov[m.group(1)] if m and m.group(1) in prov else line)
    return "\n".join(out) + "\n"


def snapshot(graph: fx.Graph) -> dict[str, tuple[str, tuple[str, ...]]]:
    """name -> (target, input names): enough to tell which nodes a pass added, removed or rewired."""
    return {n.name: (_target(n), tuple(a.name for a in n.all_input_nodes)) for n in graph.nodes}


def _target(n: fx.Node) -> str:
    if n.op != "call_function":
        return n.op
    t = n.target
    if hasattr(t, "_opname"):
        return f"{t.namespace}.{t._opname}"
    return getattr(t, "__name__", str(t))


def unified_diff(a: str, b: str, name_a: str, name_b: str) -> str:
    return "".join(difflib.unified_diff(a.splitlines(keepends=True), b.splitlines(keepends=True), name_a, name_b, n=2))


def region_dot(before: dict, after: dict, title: str) -> str:
    """DOT text of what changed between two snapshots."""
    added = [n for n in after if n not in before or before[n] != after[n]]
    removed = [n for n in before if n not in after]
    lines = [f'digraph "{title}" {{', "  rankdir=TB; node [shape=box, fontsize=10, style=filled, fillcolor=white];",
             f'  label="{title}: {len(added)} nodes added or rewired, {len(removed)} removed"; labelloc=t;']
    if not added and not removed:
        lines.append('  nochange [label="no change", shape=plaintext];')
        return "\n".join(lines) + "\n}\n"
    shown = set()

    def node(name: str, table: dict, style: str, prefix: str = "") -> None:
        key = prefix + name
        if key in shown:
            return
        shown.add(key)
        lines.append(f'  "{key}" [label="{name}\\n{table[name][0]}", {style}];')

    keep_added = added[:_MAX_DOT_NODES]
    for n in keep_added:
        node(n, after, "fillcolor=palegreen")
    for n in keep_added:
        for a in after[n][1]:
            if a not in shown:
                node(a, after, "fillcolor=lightgrey")
            lines.append(f'  "{a}" -> "{n}";')
    if removed:
        lines.append('  subgraph cluster_removed { label="removed"; style=dashed; color=red;')
        for n in removed[:_MAX_DOT_NODES]:
            node(n, before, "fillcolor=mistyrose, style=\"filled,dashed\"", "removed:")
        lines.append("  }")
        for n in removed[:_MAX_DOT_NODES]:
            for a in before[n][1]:
                src = f"removed:{a}" if a in removed else a
                if src not in shown and a in before:
                    node(a, before, "fillcolor=lightgrey")
                lines.append(f'  "{src}" -> "removed:{n}" [style=dashed, color=red];')
    if len(added) > _MAX_DOT_NODES or len(removed) > _MAX_DOT_NODES:
        lines.append(f'  truncated [label="(picture truncated to {_MAX_DOT_NODES} nodes per side)", shape=plaintext];')
    return "\n".join(lines) + "\n}\n"


class Dumper:
    def __init__(self, root: Path, programs: dict[str, Program]) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        for old in list(self.root.glob("[0-9][0-9]_*")) + [self.root / "index.json"]:
            if old.is_file():
                old.unlink()
        self.files: list[dict[str, Any]] = []
        self._before: dict[str, tuple[str, dict]] = {}

    def before(self, k: int, name: str, programs: dict[str, Program]) -> None:
        self._before = {e: (annotated_code(p.graph_module), snapshot(p.graph_module.graph)) for e, p in programs.items()}

    def after(self, k: int, name: str, programs: dict[str, Program], rec: dict) -> None:
        files = {}
        for e, prog in programs.items():
            stem = f"{k:02d}_{name}.{e}"
            code_b, snap_b = self._before[e]
            code_a = annotated_code(prog.graph_module)
            (self.root / f"{stem}.before.py").write_text(code_b)
            (self.root / f"{stem}.after.py").write_text(code_a)
            (self.root / f"{stem}.diff").write_text(unified_diff(code_b, code_a, f"{stem}.before.py", f"{stem}.after.py"))
            (self.root / f"{stem}.dot").write_text(region_dot(snap_b, snapshot(prog.graph_module.graph), f"{k:02d} {name} ({e})"))
            files[e] = stem
        self.files.append({"index": k, "name": name, "stems": files})

    def finish(self, records: list[dict]) -> None:
        (self.root / "index.json").write_text(json.dumps({"passes": self.files, "records": records}, indent=1))


def dump_files(root: Path | str) -> list[Path]:
    """The files a dump in ``root`` consists of (what the build copies into ``ARTIFACT/debug/passes/``)."""
    index = Path(root) / "index.json"
    if not index.is_file():
        return []
    stems = [s for run in json.loads(index.read_text())["passes"] for s in run["stems"].values()]
    exts = (".before.py", ".after.py", ".diff", ".dot")
    return [index] + [Path(root) / f"{s}{e}" for s in stems for e in exts if (Path(root) / f"{s}{e}").is_file()]


def find_stage(index: dict, stage: str, entry: str) -> tuple[str, str]:
    """(file stem, 'before'|'after') of a stage name: a pass name (its graph after the pass; the last
    run of that name), ``NN`` or ``NN_<pass>``, or ``traced`` (the graph before the first pass)."""
    runs = index["passes"]
    if not runs:
        raise KeyError("the dump holds no passes")
    if stage in ("traced", "input", "00"):
        return runs[0]["stems"][entry], "before"
    for r in reversed(runs):
        tags = {r["name"], f"{r['index']:02d}", f"{r['index']:02d}_{r['name']}", str(r["index"])}
        if stage in tags:
            return r["stems"][entry], "after"
    raise KeyError(stage)
