"""Fault injection on real artifacts and builds: kills, truncation, bit flips, hostile paths, pickles,
concurrent writers, and artifacts built for another version, target or backend.

Every refusal is a ``DSV4CError`` whose message names the file and the fix; the tests assert on that text.
"""

from __future__ import annotations

import json
import pickle
import threading
from pathlib import Path

import pytest
import torch

from dsv4c.artifact import HEAD_BYTES, artifact_writer, open_artifact
from dsv4c.errors import ArtifactError, ConfigError, DSV4CError
from dsv4c.lowering.build import BuildRequest, build
from dsv4c.runtime import Engine

from rel_helpers import edit_manifest, flip_bit

PARAMS = "weights/params-00001.safetensors"
REBUILD = "rebuild it with this dsv4c: `dsv4c build --variant tiny --target cpu --backend eager --max-seq-len 256 --max-batch 2 -o"


# ---- a build killed mid-way, then rebuilt (the session artifact is that rebuild) ------------------

def test_build_killed_while_writing_leaves_no_artifact_and_a_rebuild_succeeds(built):
    k = built.kill
    assert k.stopped_while_holding_lock, "the first build was not caught in its writing phase"
    assert k.temp_dirs_at_kill, "no temporary directory: the kill did not land mid-write"
    assert not k.output_existed_at_kill and not k.output_existed_after_kill, "a killed build left a directory at -o"
    assert k.victim_returncode == -9
    # The rebuild (same -o, started while the first was still tracing) replaced the debris ...
    assert built.rebuild_returncode == 0 and "Traceback" not in built.rebuild_stderr
    assert built.leftovers_after_rebuild == [], "temp dirs or the lock file survived the rebuild"
    # ... and wrote a complete, verifiable artifact.
    art = open_artifact(built.path, full_check=True)
    assert {"programs/prefill.json", "programs/decode.json", PARAMS} <= set(art.manifest["files"])


def test_a_build_that_fails_while_writing_leaves_nothing(tmp_path):
    out = tmp_path / "art"
    with pytest.raises(RuntimeError, match="disk on fire"):
        with artifact_writer(out) as w:
            w.write_text("programs/prefill.json", "{}")
            raise RuntimeError("disk on fire")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_build_rejected_before_writing_creates_no_directory(tmp_path):
    out = tmp_path / "sub" / "art"
    with pytest.raises(ConfigError, match="--max-seq-len 0 is outside"):
        build(BuildRequest(output=out, variant="tiny", max_seq_len=0), progress=lambda m: None)
    assert not (tmp_path / "sub").exists()


# ---- two builds into the same output --------------------------------------------------------------

def test_concurrent_writers_of_one_output_the_second_fails_clearly_and_nothing_is_corrupt(tmp_path):
    out = tmp_path / "art"
    with artifact_writer(out) as first:
        first.write_text("programs/prefill.json", '{"a": 1}')
        errors: list[BaseException] = []

        def second() -> None:  # another thread: flock conflicts between separate opens even in one process
            try:
                with artifact_writer(out) as w:
                    w.write_text("programs/prefill.json", '{"b": 2}')
                    w.commit({"who": "second"})
            except BaseException as e:  # noqa: BLE001
                errors.append(e)

        t = threading.Thread(target=second)
        t.start()
        t.join(30)
        assert len(errors) == 1 and isinstance(errors[0], ArtifactError), errors
        msg = str(errors[0])
        assert f"another dsv4c build is writing {out}" in msg and "Fix: wait for it to finish" in msg
        first.commit({"who": "first"})
    m = json.loads((out / "manifest.json").read_text())
    assert m["who"] == "first" and (out / "programs/prefill.json").read_text() == '{"a": 1}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]  # no temp dir, no lock file
    # The lock is free again: a later build replaces the artifact whole.
    with artifact_writer(out) as w:
        w.write_text("programs/prefill.json", '{"c": 3}')
        w.commit({"who": "third"})
    assert json.loads((out / "manifest.json").read_text())["who"] == "third"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_output_that_is_not_an_artifact_is_never_overwritten(tmp_path):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    with pytest.raises(ArtifactError, match="exists and is not a dsv4c artifact") as e:
        with artifact_writer(out):
            pass
    assert "Fix: choose another output path" in str(e.value)
    assert (out / "thesis.tex").read_text() == "years of work"


# ---- truncation and bit flips ----------------------------------------------------------------------

def test_truncated_artifact_weights_are_refused_on_load(artifact_copy):
    p = artifact_copy / PARAMS
    size = p.stat().st_size
    with open(p, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(ArtifactError) as e:
        Engine.load(artifact_copy)
    msg = str(e.value)
    assert f"{PARAMS}: {size // 2} bytes, the manifest says {size} (truncated or modified)" in msg
    assert REBUILD in msg


def test_bit_flip_in_the_first_64k_of_weights_fails_the_fast_load_check(artifact_copy):
    flip_bit(artifact_copy / PARAMS, HEAD_BYTES - 100)
    with pytest.raises(ArtifactError) as e:
        Engine.load(artifact_copy)
    assert f"{PARAMS}: sha256 mismatch (modified or corrupted)" in str(e.value) and REBUILD in str(e.value)


def test_bit_flip_deep_in_weights_passes_the_fast_check_and_is_caught_by_full_verification(artifact_copy):
    p = artifact_copy / PARAMS
    flip_bit(p, p.stat().st_size - 1000, bit=3)
    open_artifact(artifact_copy)  # the fast check (sizes + first 64 KiB) cannot see it: by design
    with pytest.raises(ArtifactError) as e:
        open_artifact(artifact_copy, full_check=True)  # what `dsv4c verify` and Engine.load(full_check=True) run
    assert f"{PARAMS}: sha256 mismatch" in str(e.value)


def test_any_byte_of_a_program_is_checked_on_every_load(artifact_copy):
    p = artifact_copy / "programs/decode.json"
    flip_bit(p, p.stat().st_size - 50, bit=1)  # far past 64 KiB: programs are always hashed whole
    with pytest.raises(ArtifactError, match="programs/decode.json: sha256 mismatch"):
        open_artifact(artifact_copy)


def test_edited_manifest_is_refused(artifact_copy):
    edit_manifest(artifact_copy, lambda m: m["spec"].__setitem__("rms_norm_eps", 1e-5), resign=False)
    with pytest.raises(ArtifactError) as e:
        open_artifact(artifact_copy)
    assert "manifest.json was modified after the build (its manifest_sha256 does not match" in str(e.value)


# ---- hostile paths and pickles ---------------------------------------------------------------------

@pytest.mark.parametrize("where", ["files", "params", "programs"])
def test_manifest_path_escaping_the_artifact_is_refused(artifact_copy, where):
    bad = "../../etc/passwd"

    def edit(m):
        if where == "files":
            m["files"][bad] = {"size": 1, "sha256": "0" * 64, "head_sha256": "0" * 64}
        elif where == "params":
            m["params"]["embed.weight"]["file"] = bad
        else:
            m["programs"]["prefill"]["file"] = bad

    edit_manifest(artifact_copy, edit)
    with pytest.raises(ArtifactError) as e:
        Engine.load(artifact_copy)
    msg = str(e.value)
    assert "manifest path '../../etc/passwd' is not a plain relative path inside the artifact" in msg
    assert "Fix: the manifest is corrupt or hostile; rebuild the artifact" in msg


def test_symlink_to_outside_is_refused(artifact_copy, tmp_path):
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes((artifact_copy / PARAMS).read_bytes())
    (artifact_copy / PARAMS).unlink()
    (artifact_copy / PARAMS).symlink_to(outside)
    with pytest.raises(ArtifactError, match="points outside the artifact directory"):
        open_artifact(artifact_copy)


class _Evil:
    """Unpickling this creates ``marker``: proof, if it ever exists, that something unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickle_file_slipped_into_an_artifact_is_refused_and_never_loaded(artifact_copy, tmp_path):
    marker = tmp_path / "unpickled"
    (artifact_copy / "weights/extra.pt").write_bytes(pickle.dumps(_Evil(marker), protocol=4))
    with pytest.raises(ArtifactError) as e:
        Engine.load(artifact_copy)
    assert "weights/extra.pt: a pickle-format file not listed in the manifest" in str(e.value)
    assert not marker.exists()


def test_pickle_listed_in_the_manifest_is_refused(artifact_copy, tmp_path):
    from dsv4c.artifact import HEAD_BYTES as H, sha256_file

    marker = tmp_path / "unpickled"
    p = artifact_copy / "weights/extra.pt"
    torch.save({"x": _Evil(marker)}, p)
    edit_manifest(artifact_copy, lambda m: m["files"].__setitem__(
        "weights/extra.pt", {"size": p.stat().st_size, "sha256": sha256_file(p), "head_sha256": sha256_file(p, H)}))
    with pytest.raises(ArtifactError, match="weights/extra.pt: pickle-format files are never loaded"):
        Engine.load(artifact_copy)
    assert not marker.exists()


def test_pickle_disguised_under_another_name_is_refused(artifact_copy, tmp_path):
    from dsv4c.artifact import HEAD_BYTES as H, sha256_file

    marker = tmp_path / "unpickled"
    p = artifact_copy / "weights/kernels.bin"
    p.write_bytes(pickle.dumps(_Evil(marker), protocol=2))
    edit_manifest(artifact_copy, lambda m: m["files"].__setitem__(
        "weights/kernels.bin", {"size": p.stat().st_size, "sha256": sha256_file(p), "head_sha256": sha256_file(p, H)}))
    with pytest.raises(ArtifactError, match="weights/kernels.bin: holds a pickle, which is never loaded"):
        open_artifact(artifact_copy)
    assert not marker.exists()


# ---- another version, target or backend -----------------------------------------------------------

@pytest.mark.parametrize("key, value, text", [
    ("schema_version", 2, "artifact schema version 2; this dsv4c 0.1.0 reads version 1"),
    ("schema_version", "1", "artifact schema version '1'; this dsv4c 0.1.0 reads version 1"),
    ("dsv4c_version", "0.0.9", "built by dsv4c '0.0.9'; this is dsv4c 0.1.0"),
    ("torch_version", "2.4.0", "built with torch '2.4.0'; this runtime has torch"),
])
def test_wrong_schema_or_versions_are_refused_with_the_rebuild_command(artifact_copy, key, value, text):
    edit_manifest(artifact_copy, lambda m: m.__setitem__(key, value))
    with pytest.raises(ArtifactError) as e:
        Engine.load(artifact_copy)
    msg = str(e.value)
    assert str(artifact_copy / "manifest.json") in msg and text in msg, msg
    assert REBUILD in msg, msg


def test_gpu_target_artifact_loaded_on_cpu_is_refused(artifact_copy):
    edit_manifest(artifact_copy, lambda m: m.__setitem__("target", "h100"))
    with pytest.raises(ArtifactError) as e:
        Engine.load(artifact_copy, device="cpu")
    msg = str(e.value)
    assert "was built for target 'h100' but was asked to run on 'cpu'" in msg
    assert f"Fix: rebuild it for this device: `dsv4c build ... --target cpu -o {artifact_copy}`" in msg


def test_artifact_for_another_target_than_asked_is_refused(artifact):
    with pytest.raises(ArtifactError) as e:
        Engine.load(artifact, target="h200")
    msg = str(e.value)
    assert "built for target 'cpu', not 'h200'" in msg and "--target h200" in msg


def test_artifact_for_another_backend_than_asked_is_refused(artifact):
    with pytest.raises(ArtifactError) as e:
        Engine.load(artifact, backend="onnx")
    msg = str(e.value)
    assert "built for backend 'eager', not 'onnx'" in msg and "--backend onnx" in msg


@pytest.mark.parametrize("backend, cls, text", [
    ("bogus", ArtifactError, "names unknown backend 'bogus'"),
    # the fixture is a bf16 reference artifact (packed KV cache): refused for the layout before TensorRT is looked for
    ("tensorrt", ArtifactError, "takes dense caches only"),
    ("onnx", DSV4CError, "onnx"),  # an eager artifact relabelled: the executor finds no ONNX programs
    ("inductor", DSV4CError, "inductor"),
])
def test_artifact_of_an_unknown_or_unavailable_backend_is_refused(artifact_copy, backend, cls, text):
    edit_manifest(artifact_copy, lambda m: m.__setitem__("backend", backend))
    with pytest.raises(DSV4CError) as e:
        Engine.load(artifact_copy)
    assert isinstance(e.value, cls) and text in str(e.value) and "Fix:" in str(e.value), str(e.value)
