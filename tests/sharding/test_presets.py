import importlib.resources
import json

import pytest
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from ckptconv.errors import ShardingError
from ckptconv.sharding import (
    FSDP_TP_MESH_AXES,
    PRESET_NAMES,
    LogicalAxisRules,
    get_preset,
    maxtext_mesh_axes,
)


def test_packaged_maxtext_rules_equal_fixture(maxtext_fixtures):
    fixture = json.loads((maxtext_fixtures / "logical_axis_rules.json").read_text())
    resource = importlib.resources.files("ckptconv.sharding").joinpath("maxtext_rules.json")
    assert json.loads(resource.read_text()) == fixture
    rules = get_preset("maxtext")
    assert rules == LogicalAxisRules.from_pairs(
        fixture["logical_axis_rules"], mesh_axes=fixture["mesh_axes"]
    )
    assert maxtext_mesh_axes() == tuple(fixture["mesh_axes"])
    assert len(rules) == len(fixture["logical_axis_rules"])


def test_maxtext_facts_from_design():
    rules = get_preset("maxtext")
    spec = rules.to_partition_spec
    assert spec(("cache_heads",)) == P(("autoregressive", "tensor", "tensor_sequence"))
    assert spec(("cache_batch", "cache_batch_prefill", "cache_sequence", "cache_kv")) == P(
        None, None, None, None
    )
    assert spec(("embed",)) == P(
        ("fsdp", "fsdp_transpose", "context", "context_usp_ulysses", "expert")
    )
    # 'mlp' precedes 'embed' in the rules and takes fsdp_transpose, so embed uses its
    # second rule.
    assert spec(("embed", "mlp")) == P(
        ("fsdp", "context", "context_usp_ulysses", "expert"),
        ("fsdp_transpose", "tensor", "tensor_sequence", "autoregressive"),
    )
    for name in ("heads", "q_heads", "kv_heads", "vocab"):
        assert spec((name,)) == P(("tensor", "tensor_sequence", "autoregressive"))
    assert spec(("norm",)) == P("tensor")
    assert spec(("layers",)) == P("stage")


def test_maxtext_on_small_mesh():
    rules = get_preset("maxtext")
    mesh = AbstractMesh((2, 4), ("fsdp", "tensor"))
    assert rules.to_partition_spec(("layers", "embed", "mlp"), mesh=mesh) == P(
        None, "fsdp", "tensor"
    )
    assert rules.to_partition_spec(("vocab", "embed"), mesh=mesh) == P("tensor", "fsdp")


def test_fsdp_tp_covers_parameter_and_cache_names(reference_logical_names):
    rules = get_preset("fsdp-tp")
    assert rules.mesh_axes == FSDP_TP_MESH_AXES == ("data", "fsdp", "tensor")
    covered = {name for name, _ in rules}
    assert set(reference_logical_names) <= covered
    assert set(rules.used_mesh_axes()) <= set(FSDP_TP_MESH_AXES)


def test_fsdp_tp_layouts():
    spec = get_preset("fsdp-tp").to_partition_spec
    assert spec(("embed", "mlp")) == P("fsdp", "tensor")
    assert spec(("mlp", "embed")) == P("tensor", "fsdp")
    assert spec(("vocab", "embed")) == P("tensor", "fsdp")
    assert spec(("embed", "q_heads", "head_dim")) == P("fsdp", "tensor", None)
    assert spec(("layers", "norm")) == P(None, None)
    assert spec(("cache_batch", "cache_sequence", "cache_heads", "cache_kv")) == P(
        "data", None, "tensor", None
    )
    assert spec(("cache_batch_prefill", "cache_sequence", "cache_heads", "cache_kv")) == P(
        None, None, "tensor", None
    )


def test_get_preset_unknown_lists_known():
    assert PRESET_NAMES == ("maxtext", "fsdp-tp")
    with pytest.raises(ShardingError, match="unknown .* 'fsdp'; known presets: maxtext, fsdp-tp"):
        get_preset("fsdp")


def test_presets_are_cached_and_immutable():
    assert get_preset("maxtext") is get_preset("maxtext")
    assert not hasattr(get_preset("maxtext"), "append")
