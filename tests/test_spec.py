"""ModelSpec: variants, both config spellings, and validation messages that name the field."""

import json

import pytest

from dsv4c.errors import ConfigError
from dsv4c.layout import kv_bytes_per_token
from dsv4c.spec import ModelSpec, get_variant


@pytest.mark.parametrize("name", ["pro", "flash", "mini", "tiny"])
def test_variants_roundtrip_through_hub_config(name):
    spec = get_variant(name)
    again = ModelSpec.from_config(spec.to_hub_config(), name=name)
    assert again == spec


def test_small_variants_keep_every_feature():
    for name in ("mini", "tiny"):
        s = get_variant(name)
        kinds = {s.attn_kind(i) for i in range(s.num_layers)}
        routes = {s.route_kind(i) for i in range(s.num_layers)}
        assert kinds == {"window", "csa", "hca"} and routes == {"hash", "topk"}
        assert s.num_mtp_layers == 1 and s.n_shared_experts == 1 and s.expert_dtype == "fp4"


def test_transformers_spelling_is_read():
    spec = get_variant("tiny")
    cfg = spec.to_hub_config()
    for k in ("compress_ratios", "num_hash_layers", "qk_rope_head_dim", "rope_scaling"):
        cfg.pop(k)
    cfg["partial_rotary_factor"] = spec.rope_dim / spec.head_dim
    cfg["rope_parameters"] = {"main": {"rope_type": "default", "rope_theta": 10000.0},
                              "compress": {"rope_type": "yarn", "factor": 16.0, "rope_theta": 160000.0,
                                           "original_max_position_embeddings": 65536, "beta_fast": 32.0, "beta_slow": 1.0}}
    assert ModelSpec.from_config(cfg, name="tiny") == spec


def test_kv_bytes_per_token_match_the_contract():
    # MODEL-SEMANTICS section 10: Flash about 3.5 KB/token, Pro about 5.0 KB/token.
    assert kv_bytes_per_token(get_variant("flash")) == pytest.approx(21 * (584 + 68) / 4 + 20 * 584 / 128)
    assert kv_bytes_per_token(get_variant("pro")) == pytest.approx(30 * (584 + 68) / 4 + 31 * 584 / 128)
    assert 3400 < kv_bytes_per_token(get_variant("flash")) < 3600
    assert 4900 < kv_bytes_per_token(get_variant("pro")) < 5100


@pytest.mark.parametrize("change, field", [
    ({"compress_ratios": [0, 4, 16]}, "compress_ratios"),
    ({"hidden_size": 100}, "hidden_size"),
    ({"scoring_func": "relu"}, "scoring_func"),
    ({"head_dim": 130}, "head_dim"),
    ({"index_head_dim": 96}, "index_head_dim"),
    ({"num_attention_heads": "two"}, "num_attention_heads"),
    ({"num_experts_per_tok": 99}, "num_experts_per_tok"),
])
def test_inconsistent_configs_are_rejected_naming_the_field(change, field):
    cfg = get_variant("tiny").to_hub_config()
    cfg.update(change)
    with pytest.raises(ConfigError) as e:
        ModelSpec.from_config(cfg)
    assert field in str(e.value) and "Fix:" in str(e.value)


def test_malformed_config_file(tmp_path):
    p = tmp_path / "config.json"
    p.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelSpec.from_config(tmp_path)
    p.write_text(json.dumps({"hidden_size": 128}))
    with pytest.raises(ConfigError, match="lacks required field"):
        ModelSpec.from_config(p)
