"""Every bad input through the real command line (``python -m dsv4c.cli`` in a subprocess).

Each case must exit non-zero with one paragraph on stderr that names the problem (and the file where
there is one) and the fix, print no Python traceback, and, for a failed build, leave neither the
artifact directory nor a temporary directory or lock file behind. The cases are prepared once and run
concurrently (they are independent processes); each is reported as its own test.
"""

from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from rel_helpers import assert_one_paragraph_error, edit_manifest, flip_bit, run_cli

PARAMS = "weights/params-00001.safetensors"
REBUILD = "`dsv4c build --variant tiny --target cpu --backend eager --max-seq-len 256 --max-batch 2 -o"


@dataclass
class Case:
    args: list[str]
    needles: list[str]
    out: Path | None = None  # a build's -o: must not exist afterwards, nor any .NAME.* sibling
    result: object = field(default=None, repr=False)


def _bad_ckpt(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    edit(dst)
    return dst


def _edit_shard(fn):
    def edit(d: Path) -> None:
        (shard,) = sorted(d.glob("*.safetensors"))
        t = load_file(shard)
        fn(t)
        save_file(t, shard, metadata={"format": "pt"})
    return edit


def _set_config(**changes):
    def edit(d: Path) -> None:
        cfg = json.loads((d / "config.json").read_text())
        cfg.update(changes)
        (d / "config.json").write_text(json.dumps(cfg))
    return edit


def _truncate(d: Path) -> None:
    (shard,) = sorted(d.glob("*.safetensors"))
    raw = shard.read_bytes()
    shard.write_bytes(raw[: len(raw) - 4096])


def _mistakes(t: dict) -> None:
    t["bogus.weight"] = torch.zeros(3)
    t["head.weight"] = torch.zeros(5, 5, dtype=torch.bfloat16)
    t["norm.weight"] = t["norm.weight"].to(torch.int32)


def _cases(tmp: Path, ckpt: Path, art: Path) -> dict[str, Case]:
    c: dict[str, Case] = {}

    def build_case(name: str, edit, needles: list[str]) -> None:
        d = _bad_ckpt(ckpt, tmp / f"ckpt-{name}", edit)
        out = tmp / "out" / name
        c[name] = Case(["build", "--checkpoint", str(d), "--max-seq-len", "256", "-o", str(out)],
                       [n.replace("{ckpt}", str(d)) for n in needles], out)

    # ---- build: malformed / inconsistent config, missing / extra / mis-shaped tensors, truncation
    build_case("config_not_json", lambda d: (d / "config.json").write_text("{not json"),
               ["{ckpt}/config.json is not valid JSON", "Fix: repair or re-download config.json."])
    build_case("config_inconsistent", _set_config(compress_ratios=[0, 4]),
               ["{ckpt}/config.json: Invalid model config: `compress_ratios` has 2 entries but num_hidden_layers + "
                "num_nextn_predict_layers = 4 + 1 = 5", "Fix: correct these fields in config.json"])
    build_case("config_wrong_type", _set_config(hidden_size="big"),
               ["{ckpt}/config.json: `hidden_size` must be an integer, got 'big'.", "Fix: set `hidden_size`"])
    build_case("missing_tensor", _edit_shard(lambda t: t.pop("embed.weight")),
               ["Checkpoint {ckpt} has 1 problem(s)", "1 missing tensor(s): embed.weight", "Fix: re-download"])
    build_case("extra_misshaped_mistyped", _edit_shard(_mistakes),
               ["Checkpoint {ckpt} has 2 problem(s)", "1 unexpected tensor(s): bogus.weight",
                "head.weight: shape [5, 5] where [256, 128] was expected",
                "norm.weight: dtype I32 where a float tensor (F32, BF16 or F16) was expected"])
    build_case("truncated_safetensors", _truncate,
               ["model-00001-of-00001.safetensors: damaged safetensors file: the file is truncated",
                "Fix: re-download or re-write damaged shards"])
    c["max_seq_len_zero"] = Case(["build", "--variant", "tiny", "--max-seq-len", "0", "-o", str(tmp / "out" / "msl")],
                                 ["--max-seq-len 0 is outside 1..4096", "Fix: pick a context length"], tmp / "out" / "msl")

    # ---- run: token ids, context, sampling, device
    a = str(art)
    run = lambda name, extra, needles: c.__setitem__(name, Case(["run", a, *extra], needles))  # noqa: E731
    run("id_ge_vocab", ["--prompt-ids", "1,2,256"], ["prompt 0 holds token id 256, outside the vocabulary 0..255",
                                                      "Fix: tokenize with this model's tokenizer."])
    run("id_negative", ["--prompt-ids=-1,2"], ["prompt 0 holds token id -1, outside the vocabulary"])
    run("prompt_longer_than_cache", ["--prompt-ids", ",".join(["7"] * 257)],
        ["a prompt of 257 tokens exceeds this artifact's context of 256", "rebuild with --max-seq-len"])
    run("generation_past_context", ["--prompt-ids", ",".join(["7"] * 200), "--max-new-tokens", "100"],
        ["a 200-token prompt plus 100 new tokens exceeds the context of 256", "ask for at most 57 new tokens"])
    run("max_new_tokens_zero", ["--prompt-ids", "1,2", "--max-new-tokens", "0"],
        ["max_new_tokens must be a positive integer, got 0"])
    run("temperature_negative", ["--prompt-ids", "1,2", "--temperature", "-1"],
        ["temperature must be a finite number >= 0, got -1.0", "Fix: use 0 for greedy decoding."])
    run("temperature_nan", ["--prompt-ids", "1,2", "--temperature", "nan"], ["temperature must be a finite number >= 0, got nan"])
    run("top_p_out_of_range", ["--prompt-ids", "1,2", "--top-p", "1.5"], ["top_p must be in (0, 1], got 1.5"])
    run("top_k_out_of_range", ["--prompt-ids", "1,2", "--top-k", "999"],
        ["top_k must be an integer in 0..256 (the vocabulary size), got 999"])
    run("prompt_ids_not_integers", ["--prompt-ids", "1,two,3"], ["--prompt-ids '1,two,3' is not a comma-separated list"])
    if not torch.cuda.is_available():
        run("device_without_gpu", ["--prompt-ids", "1,2", "--device", "cuda"],
            ["device 'cuda' was asked for but this machine has no usable CUDA GPU"])

    # ---- damaged or foreign artifacts: verify and run
    def art_case(name: str, cmd: str, edit, needles: list[str]) -> None:
        d = tmp / f"art-{name}"
        shutil.copytree(art, d)
        edit(d)
        extra = ["--prompt-ids", "1,2", "--max-new-tokens", "1"] if cmd == "run" else []
        c[name] = Case([cmd, str(d), *extra], [n.replace("{art}", str(d)) for n in needles])

    def deep_flip(d: Path) -> None:
        flip_bit(d / PARAMS, (d / PARAMS).stat().st_size - 777, 5)

    def truncate_weights(d: Path) -> None:
        with open(d / PARAMS, "r+b") as f:
            f.truncate(1000)

    art_case("verify_bit_flip", "verify", deep_flip, [f"{PARAMS}: sha256 mismatch (modified or corrupted)", REBUILD])
    art_case("verify_truncated_weights", "verify", truncate_weights,
             [f"{PARAMS}: 1000 bytes, the manifest says", "(truncated or modified)"])
    art_case("verify_path_traversal", "verify",
             lambda d: edit_manifest(d, lambda m: m["files"].__setitem__("../../etc/passwd", m["files"].pop(PARAMS))),
             ["manifest path '../../etc/passwd' is not a plain relative path inside the artifact {art}",
              "Fix: the manifest is corrupt or hostile"])
    art_case("run_pickle_slipped_in", "run", lambda d: torch.save({"x": 1}, d / "weights" / "extra.pt"),
             ["artifact {art} failed its integrity check: weights/extra.pt: a pickle-format file not listed in the manifest"])
    art_case("run_wrong_dsv4c_version", "run", lambda d: edit_manifest(d, lambda m: m.__setitem__("dsv4c_version", "0.0.9")),
             ["{art}/manifest.json: built by dsv4c '0.0.9'; this is dsv4c 0.1.0", REBUILD])
    art_case("run_wrong_target", "run", lambda d: edit_manifest(d, lambda m: m.__setitem__("target", "h100")),
             ["was built for target 'h100' but was asked to run on 'cpu'", "--target cpu"])
    art_case("run_wrong_backend", "run", lambda d: edit_manifest(d, lambda m: m.__setitem__("backend", "tensorrt")),
             # a bf16 artifact relabelled: its packed KV cache is refused before TensorRT is looked for
             ["a 'tensorrt' artifact with a 'packed' KV cache", "takes dense caches only", "--dtype fp32"])
    c["verify_not_an_artifact"] = Case(["verify", str(tmp)], [f"{tmp} is not a dsv4c artifact (no manifest.json)"])
    return c


@pytest.fixture(scope="module")
def cli_results(tmp_path_factory, tiny_ckpt_dir, artifact):
    tmp = tmp_path_factory.mktemp("cli")
    cases = _cases(tmp, tiny_ckpt_dir, artifact)
    with ThreadPoolExecutor(max_workers=max(2, min(4, os.cpu_count() or 2))) as pool:
        futures = {name: pool.submit(run_cli, *case.args) for name, case in cases.items()}
        for name, f in futures.items():
            cases[name].result = f.result()
    return cases


CASE_NAMES = ["config_not_json", "config_inconsistent", "config_wrong_type", "missing_tensor", "extra_misshaped_mistyped",
              "truncated_safetensors", "max_seq_len_zero", "id_ge_vocab", "id_negative", "prompt_longer_than_cache",
              "generation_past_context", "max_new_tokens_zero", "temperature_negative", "temperature_nan",
              "top_p_out_of_range", "top_k_out_of_range", "prompt_ids_not_integers", "device_without_gpu",
              "verify_bit_flip", "verify_truncated_weights", "verify_path_traversal", "run_pickle_slipped_in",
              "run_wrong_dsv4c_version", "run_wrong_target", "run_wrong_backend", "verify_not_an_artifact"]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_bad_input_through_the_cli(cli_results, name):
    if name not in cli_results:
        pytest.skip("needs a machine without a GPU")
    case = cli_results[name]
    r = case.result
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert_one_paragraph_error(r, *case.needles)
    if case.out is not None:
        assert not case.out.exists(), "a failed build left its output directory"
        debris = [p.name for p in case.out.parent.glob(f".{case.out.name}*")] if case.out.parent.exists() else []
        assert debris == [], f"a failed build left {debris}"


def test_cli_cases_are_all_listed(cli_results):
    assert set(cli_results) <= set(CASE_NAMES)


def test_verify_accepts_the_pristine_artifact(artifact):
    r = run_cli("verify", str(artifact))
    assert r.returncode == 0 and r.stdout.startswith(f"ok: {artifact}: 4 files") and "every byte matches" in r.stdout
