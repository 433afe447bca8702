"""Fuzz artifact manifests: every mutated manifest ends in a dsv4c error or a loadable artifact.

Half of the mutated manifests are re-signed (their ``manifest_sha256`` recomputed), so that the checks
behind the digest are fuzzed too. Mutations: schema version, dsv4c/torch versions, target and backend, hostile or malformed paths in
the file table and in the tensor/program tables, file-table sizes and hashes, the spec, the cache
layout, the limits, deleted and retyped keys, junk bytes. The target is ``open_artifact`` followed,
when it accepts, by the engine's own construction (spec, tensor tables, KV-cache allocation) with a
stand-in executor, so that "accepted by the checks" is shown to mean "the runtime can use it".
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hypothesis import event, given
from hypothesis import strategies as st

from dsv4c.artifact import MANIFEST_DIGEST, manifest_digest, open_artifact
from dsv4c.errors import DSV4CError
from dsv4c.runtime import Engine

from rel_fuzzing import FUZZ, dumps, json_values, junk_bytes, no_hang

HOSTILE_PATHS = ["../../etc/passwd", "/etc/passwd", "weights/../../../etc/passwd", "weights/../manifest.json",
                 "manifest.json", ".", "..", "", "weights//params-00001.safetensors", "weights/./params-00001.safetensors",
                 "weights\\params-00001.safetensors", "weights/params-00001.safetensors\x00.json",
                 "programs/prefill.json/", "a" * 300, "a/" * 200 + "b", "weights", "model.pt", "weights/evil.pkl",
                 "~/x", "programs/../programs/prefill.json", "\u2215etc\u2215passwd", "%2e%2e/etc/passwd"]


class _NoExecutor:
    """Stands in for the backend executor (loading graphs takes seconds): it carries the real programs'
    input names, so the engine still checks that the manifest provides every input they take."""

    def __init__(self, input_names: dict[str, list[str]]) -> None:
        self.programs = {e: SimpleNamespace(input_names=names) for e, names in input_names.items()}

    def run(self, entry, inputs):  # noqa: ANN001
        raise AssertionError("not run in the fuzz")


@dataclass
class Case:
    dir: Path
    text: str = field(repr=False)
    inputs: dict = field(repr=False)


@st.composite
def mutated_manifest(draw, text: str) -> bytes:
    m = json.loads(text)  # a fresh copy, faster than deepcopy
    kind = draw(st.sampled_from(["schema", "versions", "target", "path", "path", "files", "spec", "cache", "tables",
                                 "limits", "delete", "retype", "junk"]))
    if kind == "junk":
        return draw(junk_bytes())
    if kind == "schema":
        m["schema_version"] = draw(st.one_of(st.sampled_from([0, 2, -1, 1.0, "1", True, None, [1], 10**30]), json_values))
    elif kind == "versions":
        key = draw(st.sampled_from(["dsv4c_version", "torch_version"]))
        m[key] = draw(st.one_of(st.sampled_from(["0.0.1", "0.1.0 ", "2.0.0", "2.13.0+cu130", "99.0", ""]), json_values))
    elif kind == "target":
        key = draw(st.sampled_from(["target", "backend"]))
        m[key] = draw(st.one_of(st.sampled_from(["cpu", "h100", "h200", "tpu", "eager", "inductor", "onnx", "tensorrt",
                                                 "CPU", "", "../x"]), json_values))
    elif kind == "path":
        bad = draw(st.one_of(st.sampled_from(HOSTILE_PATHS), st.text(max_size=20)))
        where = draw(st.sampled_from(["files", "params", "consts", "programs"]))
        if where == "files":
            old = draw(st.sampled_from(sorted(m["files"])))
            m["files"][bad] = m["files"].pop(old) if draw(st.booleans()) else dict(m["files"][old])
        else:
            name = draw(st.sampled_from(sorted(m[where])))
            m[where][name]["file"] = bad
    elif kind == "files":
        rel = draw(st.sampled_from(sorted(m["files"])))
        op = draw(st.sampled_from(["drop", "size", "sha", "head", "entry", "table"]))
        if op == "drop":
            del m["files"][rel]
        elif op == "size":
            m["files"][rel]["size"] = draw(st.one_of(st.integers(-1, 2**64), json_values))
        elif op in ("sha", "head"):
            m["files"][rel]["sha256" if op == "sha" else "head_sha256"] = draw(
                st.one_of(st.sampled_from(["0" * 64, "", "x"]), json_values))
        elif op == "entry":
            m["files"][rel] = draw(json_values)
        else:
            m["files"] = draw(json_values)
    elif kind == "spec":
        key = draw(st.sampled_from(sorted(m["spec"]) + ["bogus_field"]))
        m["spec"][key] = draw(st.one_of(json_values, st.integers(-3, 300)))
    elif kind == "cache":
        name = draw(st.sampled_from(sorted(m["cache_layout"])))
        ent = m["cache_layout"][name]
        op = draw(st.sampled_from(["shape", "dtype", "entry", "huge"]))
        if op == "shape":
            ent["shape"] = draw(st.one_of(st.lists(st.integers(-2, 64), max_size=4), json_values))
        elif op == "dtype":
            ent["dtype"] = draw(st.one_of(st.sampled_from(["float32", "bfloat16", "float64", "int64", "bool", "x"]), json_values))
        elif op == "huge":
            ent["shape"] = draw(st.sampled_from([[2**40], [2**20, 2**20], [2**31, 2**31, 2**31], [2**62]]))
        else:
            m["cache_layout"][name] = draw(json_values)
    elif kind == "tables":
        table = draw(st.sampled_from(["params", "consts", "programs"]))
        name = draw(st.sampled_from(sorted(m[table])))
        op = draw(st.sampled_from(["drop", "shape", "dtype", "entry", "rename"]))
        if op == "drop":
            del m[table][name]
        elif op == "shape":
            m[table][name]["shape"] = draw(st.one_of(st.lists(st.integers(-1, 300), max_size=3), json_values))
        elif op == "dtype":
            m[table][name]["dtype"] = draw(st.one_of(st.sampled_from(["float32", "bfloat16", "uint8", "float8_e4m3fn",
                                                                      "int64", "float4_e2m1fn_x2", "x"]), json_values))
        elif op == "entry":
            m[table][name] = draw(json_values)
        else:
            m[table][name + "_renamed"] = m[table].pop(name)
    elif kind == "limits":
        key = draw(st.sampled_from(["max_seq_len", "max_batch"]))
        m[key] = draw(st.one_of(st.integers(-2, 5000), st.sampled_from([2**31, 2**63, 10**30]), json_values))
    elif kind == "delete":
        for k in draw(st.lists(st.sampled_from(sorted(m)), min_size=1, max_size=3, unique=True)):
            m.pop(k, None)
    else:
        m[draw(st.sampled_from(sorted(m)))] = draw(json_values)
    if draw(st.booleans()):
        # Half the cases re-sign the edit (a buggy or hostile writer): the checks behind the manifest
        # digest must hold on their own.
        m[MANIFEST_DIGEST] = manifest_digest(m)
    return dumps(m)


@pytest.fixture(scope="module")
def art_case(artifact, tmp_path_factory):
    d = tmp_path_factory.mktemp("mffuzz") / "art"
    shutil.copytree(artifact, d)
    m = json.loads((d / "manifest.json").read_text())
    inputs = {e: json.loads((d / ent["file"]).read_text())["inputs"] for e, ent in m["programs"].items()}
    return Case(d, (d / "manifest.json").read_text(), inputs)


def test_unmutated_manifest_opens(art_case):
    d = art_case.dir
    (d / "manifest.json").write_text(art_case.text)
    art = open_artifact(d, full_check=True)
    eng = Engine(art, _NoExecutor(art_case.inputs), torch.device("cpu"))
    assert eng.max_batch == 2 and eng.max_seq_len == 256


@FUZZ
@given(data=st.data())
def test_fuzzed_manifest_ends_in_a_dsv4c_error_or_a_loadable_artifact(art_case, data):
    d = art_case.dir
    (d / "manifest.json").write_bytes(data.draw(mutated_manifest(art_case.text)))
    try:
        with no_hang():
            art = open_artifact(d)
            eng = Engine(art, _NoExecutor(art_case.inputs), torch.device("cpu"))
    except DSV4CError as e:
        msg = str(e)
        assert str(d) in msg and "Fix:" in msg, msg
        event(type(e).__name__)
        return
    assert eng.cache and eng._static
    event("accepted")
