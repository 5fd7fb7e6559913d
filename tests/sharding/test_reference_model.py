"""Annotations of the reference NNX decoder equal flax.linen.logical_to_mesh_axes."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from ckptconv.models import ModelConfig
from ckptconv.models import nnx as nnx_models
from ckptconv.sharding import (
    annotation_rows,
    ar_kv_cache_partition_specs,
    get_preset,
    make_mesh,
    named_shardings,
    param_partition_specs,
    prefill_kv_cache_partition_specs,
    shard_shape,
)
from ckptconv.sharding.annotate import logical_names
from ckptconv.testing import TINY_CONFIG

# every sharded dimension divides by 8 so no fallback hides a difference
CONFIG = {
    **TINY_CONFIG,
    "emb_dim": 64,
    "num_query_heads": 8,
    "num_kv_heads": 8,
    "mlp_dim": 128,
    "vocab_size": 128,
}
MESHES = {
    "maxtext": ["fsdp=8", "fsdp=2,tensor=4", "data=4,tensor=2", "data=1,tensor=8"],
    "fsdp-tp": ["fsdp=8", "fsdp=2,tensor=4", "data=4,tensor=2", "data=1,tensor=8"],
}


def abstract(scan: bool, mode: str):
    config = ModelConfig(**CONFIG, scan_layers=scan)
    batch = 8 if mode == "autoregressive" else 1
    return nnx.eval_shape(
        lambda: nnx_models.Transformer(config, rngs=nnx.Rngs(0), model_mode=mode, cache_batch=batch)
    )


def flat(tree):
    return {
        jax.tree_util.keystr(p): v
        for p, v in jax.tree_util.tree_leaves_with_path(
            tree, is_leaf=lambda x: isinstance(x, PartitionSpec)
        )
    }


@pytest.mark.parametrize("preset", ["maxtext", "fsdp-tp"])
@pytest.mark.parametrize("scan", [True, False])
@pytest.mark.parametrize("mode", ["prefill", "autoregressive"])
def test_every_variable_matches_flax(preset, scan, mode, drop):
    rules = get_preset(preset)
    model = abstract(scan, mode)
    state = nnx.state(model)
    names_by_path = {
        jax.tree_util.keystr(tuple(jax.tree_util.DictKey(k) for k in path)): (
            var,
            logical_names(var),
        )
        for path, var in state.flat_state()
    }
    cache_fn = (
        prefill_kv_cache_partition_specs if mode == "prefill" else ar_kv_cache_partition_specs
    )
    for mesh_spec in MESHES[preset]:
        mesh = make_mesh(mesh_spec)
        specs = {
            **flat(param_partition_specs(model, rules, mesh)),
            **flat(cache_fn(model, rules, mesh)),
        }
        assert specs.keys() == names_by_path.keys()
        for path, spec in specs.items():
            var, names = names_by_path[path]
            assert names is not None and len(names) == len(var.value.shape), path
            if scan and "['layers']" in path:
                assert names[0] == "layers", path  # stacked at nnx_scan_axis 0
            # flax's answer, with mesh axes absent or of size 1 dropped (documented)
            want = drop(nn.logical_to_mesh_axes(names, rules.to_pairs()), mesh)
            assert spec == want, (path, mesh_spec)
        assert any(any(a is not None for a in spec) for spec in specs.values()), mesh_spec


def test_caches_place_and_slot_updates_keep_sharding():
    rules = get_preset("maxtext")
    mesh = make_mesh("data=2,tensor=4")
    for mode, fn in (
        ("prefill", prefill_kv_cache_partition_specs),
        ("autoregressive", ar_kv_cache_partition_specs),
    ):
        model = abstract(True, mode)
        specs = fn(model, rules, mesh)
        shardings = named_shardings(specs, mesh)
        caches = nnx.to_pure_dict(nnx.state(model, nnx.Cache))
        zeros = jax.tree.map(
            lambda s, sh: jax.device_put(jnp.zeros(s.shape, s.dtype), sh), caches, shardings
        )
        for arr, spec in zip(
            jax.tree.leaves(zeros),
            jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, PartitionSpec)),
            strict=True,
        ):
            want = shard_shape(arr.shape, spec, mesh)
            assert {s.data.shape for s in arr.addressable_shards} == {want}
    key = zeros["decoder"]["layers"]["self_attention"]["KVCache_0"]["cached_ar_key"]
    sharding = key.sharding

    @jax.jit
    def insert(cache, slot, value):
        return jax.lax.with_sharding_constraint(cache.at[:, slot].set(value), sharding)

    out = insert(key, 3, jnp.ones(key.shape[:1] + key.shape[2:], key.dtype))
    assert out.sharding == sharding


def test_annotation_rows_have_shard_shapes():
    rows = annotation_rows(
        abstract(True, "prefill"),
        get_preset("maxtext"),
        make_mesh("fsdp=2,tensor=4"),
        "params",
    )
    q = next(r for r in rows if r["path"].endswith("query/kernel"))
    assert q["shape"] == (2, 64, 8, 8)
    assert q["shard_shape"] == (2, 32, 2, 8)
