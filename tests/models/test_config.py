import json

import hypothesis.strategies as st
import jax.numpy as jnp
import pytest
import yaml
from hypothesis import given, settings

from ckptconv.errors import ConfigError
from ckptconv.models import ModelConfig

# MaxText's base.yml values, written as base.yml writes them: the oracle for the defaults.
BASE_DEFAULTS = yaml.safe_load(
    """
    emb_dim: 2048
    num_query_heads: 16
    num_kv_heads: 16
    head_dim: 128
    mlp_dim: 7168
    num_decoder_layers: 16
    vocab_size: 32000
    scan_layers: true
    param_scan_axis: 1
    nnx_scan_axis: 0
    dtype: bfloat16
    weight_dtype: float32
    normalization_layer_epsilon: 1.0e-5
    max_target_length: 2048
    max_prefill_predict_length: 64
    """
)


def test_defaults_are_maxtext_base_yml():
    for config in (ModelConfig(), ModelConfig.from_maxtext({})):
        for key, value in BASE_DEFAULTS.items():
            assert getattr(config, key) == value, key
    assert ModelConfig().activation_dtype == jnp.bfloat16
    assert ModelConfig().param_dtype == jnp.float32


def test_override_names_with_string_values():
    config = ModelConfig.from_maxtext(
        {
            "base_emb_dim": "64",
            "base_num_query_heads": "4",
            "base_num_kv_heads": "2",
            "head_dim": "16",
            "base_mlp_dim": "128",
            "base_num_decoder_layers": "2",
            "vocab_size": "256",
            "scan_layers": "false",
            "dtype": "float32",
            "max_target_length": "64",
            "max_prefill_predict_length": "16",
            "normalization_layer_epsilon": "1e-6",
            "run_name": "ignored",
            "steps": "3",
        }
    )
    assert (config.emb_dim, config.num_query_heads, config.num_kv_heads) == (64, 4, 2)
    assert (config.head_dim, config.mlp_dim, config.num_decoder_layers) == (16, 128, 2)
    assert config.vocab_size == 256 and config.scan_layers is False
    assert config.dtype == "float32" and config.normalization_layer_epsilon == 1e-6
    assert config.ar_cache_length == 48


def test_derived_names():
    config = ModelConfig.from_maxtext(
        {"emb_dim": 32, "num_query_heads": 4, "num_kv_heads": 1, "mlp_dim": 96, "head_dim": 8}
    )
    assert (config.emb_dim, config.num_kv_heads, config.mlp_dim) == (32, 1, 96)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("A", dict(emb_dim=64, num_query_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=128,
                   num_decoder_layers=2, vocab_size=256, scan_layers=True)),
        ("B", dict(emb_dim=32, num_query_heads=4, num_kv_heads=1, head_dim=8, mlp_dim=96,
                   num_decoder_layers=3, vocab_size=128, scan_layers=False)),
    ],
)  # fmt: skip
def test_fixture_config_json(maxtext_fixtures, name, expected):
    path = maxtext_fixtures / name / "config.json"
    for config in (ModelConfig.from_maxtext(json.loads(path.read_text())), ModelConfig.load(path)):
        for key, value in expected.items():
            assert getattr(config, key) == value, key
        assert config.param_scan_axis == 1 and config.dtype == "float32"
        assert config.max_target_length == 64 and config.max_prefill_predict_length == 16


def test_override_and_derived_names_must_agree():
    with pytest.raises(ConfigError, match="base_emb_dim.*emb_dim|emb_dim.*base_emb_dim"):
        ModelConfig.from_maxtext({"train_overrides": {"base_emb_dim": "64"}, "emb_dim": 32})


@pytest.mark.parametrize(
    "key, value",
    [
        ("use_qk_norm", True),
        ("logits_via_embedding", "true"),
        ("mlp_bias", True),
        ("attention_bias", True),
        ("final_logits_soft_cap", 30.0),
        ("attn_logits_soft_cap", "50"),
        ("quantization", "int8"),
        ("quantize_kvcache", True),
        ("rope_type", "llama3.1"),
        ("attention_type", "local_sliding"),
        ("fused_qkv", True),
        ("num_experts", 8),
        ("decoder_block", "gemma2"),
        ("mlp_activations", ["gelu"]),
    ],
)
def test_unsupported_math_names_the_key(key, value):
    with pytest.raises(ConfigError, match=key):
        ModelConfig.from_maxtext({key: value})
    with pytest.raises(ConfigError, match=key):  # also inside train_overrides
        ModelConfig.from_maxtext({"train_overrides": {key: value}})


@pytest.mark.parametrize(
    "key, value",
    [
        ("final_logits_soft_cap", None),
        ("final_logits_soft_cap", 0.0),
        ("attn_logits_soft_cap", "0.0"),
        ("quantization", ""),
        ("rope_type", "default"),
        ("use_qk_norm", "false"),
        ("float32_logits", False),
        ("attention", "flash"),
        ("ici_fsdp_parallelism", "-1"),
        ("some_note", "free text"),
    ],
)
def test_harmless_values_are_accepted(key, value):
    # Accepted, and they change nothing about the math: the config equals the default one.
    assert ModelConfig.from_maxtext({key: value}) == ModelConfig.from_maxtext({})
    assert ModelConfig.from_maxtext({"train_overrides": {key: value}}) == (
        ModelConfig.from_maxtext({})
    )
    # Next to real settings, those still land where they belong (derived names included).
    real = {"base_emb_dim": "64", "base_mlp_dim": "128", "vocab_size": "256"}
    config = ModelConfig.from_maxtext({**real, key: value})
    assert config == ModelConfig.from_maxtext(real)
    assert (config.emb_dim, config.mlp_dim, config.vocab_size) == (64, 128, 256)


def test_float32_only_precision_knobs():
    ModelConfig.from_maxtext({"dtype": "float32", "float32_logits": True})
    with pytest.raises(ConfigError, match="float32_logits"):
        ModelConfig.from_maxtext({"dtype": "bfloat16", "float32_logits": True})


def test_unknown_key_is_rejected():
    with pytest.raises(ConfigError, match="bogus_key"):
        ModelConfig.from_maxtext({"bogus_key": 1})
    with pytest.raises(ConfigError, match="num_heads"):
        ModelConfig.from_dict({"num_heads": 4})


def test_model_name_needs_derived_sizes():
    with pytest.raises(ConfigError, match="model_name"):
        ModelConfig.from_maxtext({"model_name": "llama2-7b"})
    ModelConfig.from_maxtext(
        {"model_name": "llama2-7b", "emb_dim": 64, "num_decoder_layers": 2, "num_kv_heads": 4}
    )


@pytest.mark.parametrize(
    "changes, key",
    [
        (dict(num_query_heads=6, num_kv_heads=4), "num_query_heads"),
        (dict(head_dim=7), "head_dim"),
        (dict(emb_dim=0), "emb_dim"),
        (dict(vocab_size=-1), "vocab_size"),
        (dict(num_decoder_layers=0), "num_decoder_layers"),
        (dict(max_prefill_predict_length=4096), "max_prefill_predict_length"),
        (dict(param_scan_axis=2), "param_scan_axis"),
        (dict(nnx_scan_axis=-1), "nnx_scan_axis"),
        (dict(dtype="float64"), "dtype"),
        (dict(emb_dim="sixty"), "emb_dim"),
        (dict(emb_dim=True), "emb_dim"),
        (dict(emb_dim=2.5), "emb_dim"),
        (dict(scan_layers="maybe"), "scan_layers"),
    ],
)
def test_validation_names_the_key(changes, key):
    with pytest.raises(ConfigError, match=key):
        ModelConfig(**changes)
    with pytest.raises(ConfigError, match=key):
        ModelConfig.from_dict(changes)


def test_string_coercion_in_constructor():
    config = ModelConfig(emb_dim="64", scan_layers="True", normalization_layer_epsilon="1e-6")
    assert config.emb_dim == 64 and config.scan_layers is True
    assert config.normalization_layer_epsilon == 1e-6


@pytest.mark.parametrize("suffix", [".json", ".yaml", ".yml"])
def test_load_both_forms(tmp_path, tiny_config, suffix):
    config = tiny_config(scan_layers=False, nnx_scan_axis=1)
    dump = json.dumps if suffix == ".json" else yaml.safe_dump
    plain = tmp_path / f"plain{suffix}"
    plain.write_text(dump(config.to_dict()))
    assert ModelConfig.load(plain) == config
    maxtext = tmp_path / f"maxtext{suffix}"
    maxtext.write_text(
        dump({"base_emb_dim": 32, "base_num_kv_heads": "4", "run_name": "x", "dtype": "float32"})
    )
    loaded = ModelConfig.load(maxtext)
    assert loaded.emb_dim == 32 and loaded.num_kv_heads == 4 and loaded.dtype == "float32"


def test_load_errors(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        ModelConfig.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="cannot parse"):
        ModelConfig.load(bad)
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        ModelConfig.load(listing)


def test_frozen_and_replace(tiny_config):
    config = tiny_config()
    with pytest.raises(AttributeError):
        config.emb_dim = 3
    assert config.replace(emb_dim=48).emb_dim == 48
    with pytest.raises(ConfigError, match="head_dim"):
        config.replace(head_dim=3)


@settings(max_examples=40, deadline=None)
@given(
    kv=st.integers(1, 4),
    group=st.integers(1, 4),
    half_head=st.integers(1, 16),
    layers=st.integers(1, 8),
    scan=st.booleans(),
    axes=st.tuples(st.integers(0, 1), st.integers(0, 1)),
    dtype=st.sampled_from(["float32", "bfloat16", "float16"]),
)
def test_to_dict_round_trip(kv, group, half_head, layers, scan, axes, dtype):
    config = ModelConfig(
        num_kv_heads=kv,
        num_query_heads=kv * group,
        head_dim=2 * half_head,
        num_decoder_layers=layers,
        scan_layers=scan,
        param_scan_axis=axes[0],
        nnx_scan_axis=axes[1],
        dtype=dtype,
    )
    assert ModelConfig.from_dict(config.to_dict()) == config
    assert ModelConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert ModelConfig.from_maxtext(config.to_dict()) == config
