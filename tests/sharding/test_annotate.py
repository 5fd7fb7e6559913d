import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from ckptconv.errors import ShardingError
from ckptconv.sharding import (
    Fallback,
    ShardingFallbackWarning,
    annotation_rows,
    ar_kv_cache_partition_specs,
    get_preset,
    logical_names,
    make_mesh,
    named_shardings,
    param_partition_specs,
    prefill_kv_cache_partition_specs,
    shard_shape,
)

LAYERS, VOCAB, EMBED, MLP, SEQ, KV = 2, 64, 16, 32, 16, 4
CACHE_NAMES = ("cache_sequence", "cache_heads", "cache_kv")


class Linear(nnx.Module):
    def __init__(self, din, dout, names):
        self.kernel = nnx.Param(jnp.zeros((din, dout)), out_sharding=names)


class Block(nnx.Module):
    def __init__(self, mode, batch, heads):
        self.wi = Linear(EMBED, MLP, ("embed", "mlp"))
        self.wo = Linear(MLP, EMBED, ("mlp", "embed"))
        self.scale = nnx.Param(jnp.ones((EMBED,)), out_sharding=("norm",))
        self.bias = nnx.Param(jnp.zeros((MLP,)))  # no names: replicated
        batch_name = "cache_batch_prefill" if mode == "prefill" else "cache_batch"
        names = (batch_name, *CACHE_NAMES)
        self.key = nnx.Cache(jnp.zeros((batch, SEQ, heads, KV)), out_sharding=names)
        self.value = nnx.Cache(jnp.zeros((batch, SEQ, heads, KV)), out_sharding=names)
        self.index = nnx.Cache(jnp.zeros((batch,), jnp.int32))  # no names


class Toy(nnx.Module):
    def __init__(self, *, mode="ar", scan_axis=0, batch=8, heads=8):
        self.embedding = nnx.Param(jnp.zeros((VOCAB, EMBED)), out_sharding=("vocab", "embed"))

        @nnx.vmap(in_axes=0, out_axes=scan_axis, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make(_):
            return Block(mode, batch, heads)

        self.layers = make(jnp.arange(LAYERS))


@functools.cache
def toy(**kwargs):
    with nnx.use_eager_sharding(False):
        return nnx.eval_shape(lambda: Toy(**kwargs))


def abstract(model, var_type):
    return nnx.to_pure_dict(nnx.state(model, var_type))


def leaves_with_paths(tree):
    return jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, P))[0]


def flax_reference(model, var_type, rules, mesh):
    """Expected specs: flax.linen.logical_to_mesh_axes, then the mesh drop-out."""

    def one(var):
        names = var.get_metadata().get("out_sharding")
        if not names:
            return P()
        spec = nn.logical_to_mesh_axes(names, rules.to_pairs())
        out = []
        for entry in spec:
            axes = () if entry is None else (entry,) if isinstance(entry, str) else entry
            kept = tuple(a for a in axes if mesh.shape.get(a, 1) > 1)
            out.append(None if not kept else kept[0] if len(kept) == 1 else kept)
        return P(*out)

    return nnx.to_pure_dict(nnx.state(model, var_type), extract_fn=one)


MESHES = {
    "maxtext": [("fsdp=8",), ("fsdp=2,tensor=4",), ("fsdp=4,tensor=2",), ("stage=1,tensor=8",)],
    "fsdp-tp": [("tensor=8",), ("fsdp=2,tensor=4",), ("data=4,tensor=2",), ("fsdp=1,tensor=8",)],
}
CASES = [(preset, mesh[0]) for preset, meshes in MESHES.items() for mesh in meshes]


@pytest.mark.parametrize("scan_axis", [0, 1])
def test_flax_inserts_layers_name_at_stacked_axis(scan_axis):
    model = toy(scan_axis=scan_axis)
    kernel = model.layers.wi.kernel
    assert kernel.shape[scan_axis] == LAYERS
    assert logical_names(kernel) == (
        ("layers", "embed", "mlp") if scan_axis == 0 else ("embed", "layers", "mlp")
    )
    assert nnx.PARTITION_NAME not in kernel.get_metadata()  # flax stores only out_sharding
    assert logical_names(model.layers.bias) is None


@pytest.mark.parametrize("preset, mesh_spec", CASES)
@pytest.mark.parametrize("scan_axis", [0, 1])
def test_specs_match_flax(preset, mesh_spec, scan_axis):
    rules, mesh = get_preset(preset), make_mesh(mesh_spec)
    ar, prefill = toy(scan_axis=scan_axis), toy(mode="prefill", scan_axis=scan_axis, batch=1)
    params = param_partition_specs(ar, rules, mesh)
    assert params == flax_reference(ar, nnx.Param, rules, mesh)
    assert params["layers"]["bias"] == P()
    assert ar_kv_cache_partition_specs(ar, rules, mesh) == flax_reference(
        ar, nnx.Cache, rules, mesh
    )
    assert prefill_kv_cache_partition_specs(prefill, rules, mesh) == flax_reference(
        prefill, nnx.Cache, rules, mesh
    )
    # Same tree shape as nnx.to_pure_dict, and a State works like the Module.
    assert jax.tree.structure(params, is_leaf=lambda x: isinstance(x, P)) == jax.tree.structure(
        abstract(ar, nnx.Param)
    )
    assert param_partition_specs(nnx.state(ar), rules, mesh) == params


def test_expected_fsdp_tp_layout():
    mesh = make_mesh("data=2,tensor=4")
    rules = get_preset("fsdp-tp")
    params = param_partition_specs(toy(scan_axis=1), rules, mesh)
    assert params["layers"]["wi"]["kernel"] == P(None, None, "tensor")
    assert params["embedding"] == P("tensor", None)
    caches = ar_kv_cache_partition_specs(toy(scan_axis=1), rules, mesh)
    assert caches["layers"]["key"] == P("data", None, None, "tensor", None)
    assert caches["layers"]["index"] == P()


@pytest.mark.parametrize("mode", ["params", "ar", "prefill"])
def test_device_put_shards_have_shard_shape(mode):
    mesh = make_mesh("fsdp=2,tensor=4")
    rules = get_preset("maxtext")
    model = toy(mode="prefill", batch=1) if mode == "prefill" else toy()
    fn = {
        "params": param_partition_specs,
        "ar": ar_kv_cache_partition_specs,
        "prefill": prefill_kv_cache_partition_specs,
    }[mode]
    specs = fn(model, rules, mesh)
    shardings = named_shardings(specs, mesh)
    shapes = abstract(model, nnx.Param if mode == "params" else nnx.Cache)
    arrays = jax.tree.map(
        lambda s, sh: jax.device_put(np.zeros(s.shape, s.dtype), sh), shapes, shardings
    )
    sharded_somewhere = False
    for (_, arr), (_, spec) in zip(
        leaves_with_paths(arrays), leaves_with_paths(specs), strict=True
    ):
        expected = shard_shape(arr.shape, spec, mesh)
        assert len(arr.addressable_shards) == 8
        assert all(s.data.shape == expected for s in arr.addressable_shards)
        sharded_somewhere |= expected != arr.shape
    assert sharded_somewhere


def test_annotation_rows():
    mesh = make_mesh("fsdp=2,tensor=4")
    rows = annotation_rows(toy(), get_preset("fsdp-tp"), mesh, "params")
    by_path = {r["path"]: r for r in rows}
    assert [r["path"] for r in rows] == sorted(by_path)
    row = by_path["layers/wi/kernel"]
    assert row == {
        "path": "layers/wi/kernel",
        "shape": (LAYERS, EMBED, MLP),
        "logical_names": ("layers", "embed", "mlp"),
        "spec": P(None, "fsdp", "tensor"),
        "shard_shape": (LAYERS, EMBED // 2, MLP // 4),
    }
    assert by_path["layers/bias"]["logical_names"] is None
    cache_rows = annotation_rows(toy(), get_preset("fsdp-tp"), mesh, "ar")
    assert {r["path"] for r in cache_rows} == {"layers/key", "layers/value", "layers/index"}
    with pytest.raises(ShardingError, match="unknown annotation mode"):
        annotation_rows(toy(), get_preset("fsdp-tp"), mesh, "train")


@pytest.mark.parametrize("scan_axis", [0, 1])
def test_ar_cache_slot_update_under_jit_keeps_sharding(scan_axis):
    mesh = make_mesh("data=4,tensor=2")
    model = toy(scan_axis=scan_axis)
    specs = ar_kv_cache_partition_specs(model, get_preset("fsdp-tp"), mesh)
    sharding = named_shardings(specs, mesh)["layers"]["key"]
    assert "data" in jax.tree.leaves(tuple(sharding.spec))
    shape = model.layers.key.shape
    slot_axis = 1 if scan_axis == 0 else 0
    cache = jax.device_put(jnp.zeros(shape), sharding)
    update_shape = shape[:slot_axis] + shape[slot_axis + 1 :]

    @functools.partial(jax.jit, out_shardings=sharding, donate_argnums=0)
    def insert(cache, update, slot):
        index = (slice(None),) * slot_axis + (slot,)
        return cache.at[index].set(update)

    out = insert(cache, jnp.ones(update_shape), 5)
    assert out.sharding == sharding
    np.testing.assert_array_equal(np.asarray(jnp.take(out, 5, axis=slot_axis)), 1.0)
    assert float(out.sum()) == np.prod(update_shape)
    expected = shard_shape(shape, sharding.spec, mesh)
    assert all(s.data.shape == expected for s in out.addressable_shards)


def test_wrong_mode_caches_raise_naming_a_path():
    mesh = make_mesh("tensor=8")
    rules = get_preset("fsdp-tp")
    with pytest.raises(ShardingError, match="layers/key .*autoregressive mode"):
        prefill_kv_cache_partition_specs(toy(), rules, mesh)
    with pytest.raises(ShardingError, match="layers/key .*prefill mode"):
        ar_kv_cache_partition_specs(toy(mode="prefill", batch=1), rules, mesh)


def test_indivisible_dimension_raises():
    mesh = make_mesh("tensor=8")
    model = toy(heads=2)
    with pytest.raises(ShardingError) as info:
        ar_kv_cache_partition_specs(model, get_preset("fsdp-tp"), mesh)
    message = str(info.value)
    for part in ("layers/key", "dimension 3", "size 2", "('tensor',)", "replicate_indivisible"):
        assert part in message


def test_indivisible_dimension_fallback_is_reported():
    mesh = make_mesh("tensor=8")
    report: list[Fallback] = []
    with pytest.warns(ShardingFallbackWarning) as record:
        specs = ar_kv_cache_partition_specs(
            toy(heads=2), get_preset("fsdp-tp"), mesh, replicate_indivisible=True, report=report
        )
    assert [str(w.message).split(" is ")[0] for w in record] == [
        "variable layers/key: dimension 3 of size 2",
        "variable layers/value: dimension 3 of size 2",
    ]
    assert specs["layers"]["key"] == P(None, None, None, None, None)
    assert report == [
        Fallback("layers/key", 3, 2, ("tensor",)),
        Fallback("layers/value", 3, 2, ("tensor",)),
    ]
    # Without a report list the fallback still warns.
    with pytest.warns(ShardingFallbackWarning):
        ar_kv_cache_partition_specs(
            toy(heads=2), get_preset("fsdp-tp"), mesh, replicate_indivisible=True
        )


class HandStacked(nnx.Module):
    """Names one short of the rank, as left by tools that do not update out_sharding."""

    def __init__(self, partition_name):
        meta = {} if partition_name is None else {nnx.PARTITION_NAME: partition_name}
        self.w = nnx.Param(jnp.zeros((LAYERS, EMBED, MLP)), out_sharding=("embed", "mlp"), **meta)


def hand_stacked(partition_name):
    with nnx.use_eager_sharding(False):
        return nnx.eval_shape(lambda: HandStacked(partition_name))


def test_missing_layer_name_is_inserted_from_partition_metadata():
    mesh = make_mesh("fsdp=2,tensor=4")
    rules = get_preset("fsdp-tp")
    model = hand_stacked("layers")
    assert logical_names(model.w) == ("layers", "embed", "mlp")
    assert param_partition_specs(model, rules, mesh) == {"w": P(None, "fsdp", "tensor")}
    rows = annotation_rows(
        hand_stacked("layers"), rules, make_mesh("tensor=8"), "params", layer_axis=2
    )
    assert rows[0]["logical_names"] == ("embed", "mlp", "layers")


def test_rank_mismatch_without_partition_metadata_raises():
    with pytest.raises(
        ShardingError, match=r"variable w has shape \(2, 16, 32\) but 2 logical names"
    ):
        param_partition_specs(hand_stacked(None), get_preset("fsdp-tp"), make_mesh("tensor=8"))


def test_repeated_names_raise_naming_the_path():
    class Bad(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.zeros((4, 4)), out_sharding=("embed", "embed"))

    with nnx.use_eager_sharding(False):
        model = nnx.eval_shape(Bad)
    with pytest.raises(ShardingError, match="variable w: .*more than once"):
        param_partition_specs(model, get_preset("fsdp-tp"), make_mesh("tensor=8"))


def test_bad_abstract_model_raises():
    with pytest.raises(ShardingError, match="nnx.Module"):
        param_partition_specs({"w": 1}, get_preset("fsdp-tp"), make_mesh("tensor=8"))


def test_shard_shape():
    mesh = make_mesh("data=2,tensor=4")
    assert shard_shape((8, 12, 3), P("data", "tensor"), mesh) == (4, 3, 3)
    assert shard_shape((8, 12), P(("data", "tensor")), mesh) == (1, 12)
    assert shard_shape((8,), P(), mesh) == (8,)
    assert shard_shape((), P(), mesh) == ()
    with pytest.raises(ShardingError, match="dimension 1 of size 6 .*tensor"):
        shard_shape((8, 6), P("data", "tensor"), mesh)
    with pytest.raises(ShardingError, match="2 entries"):
        shard_shape((8,), P("data", None), mesh)
