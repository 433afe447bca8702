"""Fuzz ``ModelSpec.from_config``: every mutated config.json ends in a ConfigError or a valid spec.

Mutations: deleted fields, wrong types, out-of-range numbers, compress_ratios of wrong lengths and
values, broken nested objects (rope_scaling, quantization_config, layer_types) and junk bytes.
"""

from __future__ import annotations

import copy
import json

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from dsv4c.errors import ConfigError, DSV4CError
from dsv4c.spec import ModelSpec, get_variant

from rel_fuzzing import FUZZ, dumps, json_values, junk_bytes, no_hang

HUB = get_variant("tiny").to_hub_config()
TRANSFORMERS = {k: v for k, v in HUB.items() if k not in ("compress_ratios", "num_hash_layers", "qk_rope_head_dim")}
TRANSFORMERS["partial_rotary_factor"] = 0.5
NESTED = ("rope_scaling", "quantization_config", "compress_rates")
NUMERIC = sorted(k for k, v in HUB.items() if isinstance(v, (int, float)) and not isinstance(v, bool))


@st.composite
def mutation(draw, base: dict) -> dict:
    """One edit of a config dict."""
    cfg = copy.deepcopy(base)
    keys = sorted(cfg)
    kind = draw(st.sampled_from(["delete", "retype", "range", "ratios", "nested", "list_field", "add"]))
    if kind == "delete":
        for k in draw(st.lists(st.sampled_from(keys), min_size=1, max_size=4, unique=True)):
            cfg.pop(k, None)
    elif kind == "retype":
        cfg[draw(st.sampled_from(keys))] = draw(json_values)
    elif kind == "range":
        cfg[draw(st.sampled_from(NUMERIC))] = draw(st.one_of(
            st.integers(-(2**64), 2**64), st.sampled_from([0, -1, 1, 3, 5, 7, 100, 10**6, 2**31, 2**40]),
            st.floats(allow_nan=True, allow_infinity=True)))
    elif kind == "ratios":
        cfg["compress_ratios"] = draw(st.lists(
            st.one_of(st.sampled_from([0, 4, 16, 128, -1, 1, 3, 5, 2**20]), json_values), max_size=9))
    elif kind == "nested":
        key = draw(st.sampled_from(NESTED))
        sub = cfg.get(key) if isinstance(cfg.get(key), dict) else {}
        if draw(st.booleans()) or not sub:
            cfg[key] = draw(json_values)
        else:
            sub[draw(st.sampled_from(sorted(sub)))] = draw(json_values)
    elif kind == "list_field":
        key = draw(st.sampled_from(["layer_types", "mlp_layer_types", "eos_token_id"]))
        cfg[key] = draw(st.one_of(
            st.lists(st.sampled_from(["sliding_attention", "compressed_sparse_attention",
                                      "heavily_compressed_attention", "hash_moe", "moe", "bogus"]), max_size=7),
            json_values))
    else:
        cfg[draw(st.text(min_size=1, max_size=10))] = draw(json_values)
    return cfg


@st.composite
def config_bytes(draw) -> bytes:
    if draw(st.integers(0, 9)) == 0:
        return draw(junk_bytes())
    cfg = draw(st.sampled_from([HUB, TRANSFORMERS]))
    for _ in range(draw(st.integers(1, 3))):
        cfg = draw(mutation(cfg))
    text = dumps(cfg)
    if draw(st.integers(0, 19)) == 0:  # a truncated write
        text = text[: draw(st.integers(0, len(text)))]
    return text


@pytest.fixture(scope="module")
def config_path(tmp_path_factory):
    return tmp_path_factory.mktemp("cfgfuzz") / "config.json"


def test_unmodified_configs_load(config_path):
    for base in (HUB, TRANSFORMERS):
        config_path.write_text(json.dumps(base))
        assert ModelSpec.from_config(config_path, name="tiny") == get_variant("tiny")


@FUZZ
@given(data=config_bytes())
def test_fuzzed_config_json_ends_in_config_error_or_a_valid_spec(config_path, data):
    config_path.write_bytes(data)
    try:
        with no_hang():
            spec = ModelSpec.from_config(config_path)
    except DSV4CError as e:
        assert isinstance(e, ConfigError), type(e)
        msg = str(e)
        assert str(config_path) in msg, msg  # names the file ...
        assert "Fix:" in msg and e.fix, msg  # ... and the fix
        assert len(msg) < 2000, msg
        event("ConfigError")
        return
    assert isinstance(spec, ModelSpec)
    spec.validate()
    assert len(spec.compress_ratios) == spec.num_blocks
    event("valid spec")
