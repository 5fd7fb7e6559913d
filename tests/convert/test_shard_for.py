"""``--shard-for MESH`` on the conversion commands: convert and reshard in one streamed pass."""

import math

import jax
import orbax.checkpoint as ocp
import pytest
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec

from ckptconv.convert import convert
from ckptconv.io import CheckpointReader
from ckptconv.models.adapter import resolve_model
from ckptconv.sharding import get_preset, make_mesh, param_partition_specs, shard_shape
from ckptconv.sharding.reshard import ShardFor
from ckptconv.testing import as_numpy, assert_one_line_error, run_cli, tree_get

MESH = "fsdp=4,tensor=2"


@pytest.fixture(scope="module")
def fixture_a(maxtext_fixtures):
    return maxtext_fixtures / "A" / "ckpt", maxtext_fixtures / "A" / "config.json"


@pytest.fixture(scope="module")
def plain_nnx(tmp_path_factory, fixture_a):
    out = tmp_path_factory.mktemp("shard_for") / "plain"
    code, _, err = run_cli("linen-to-nnx", fixture_a[0], out)
    assert code == 0, err
    return out


def nnx_specs(config, mesh):
    """The model's specs at its NNX leaves, and at the optimizer moments of each param."""
    model = resolve_model(None, str(config)).nnx_model()
    flat = traverse_util.flatten_dict(param_partition_specs(model, get_preset("maxtext"), mesh))
    specs = {("model", *map(str, p), "value"): s for p, s in flat.items()}
    opt = ("optimizer", "opt_state", "0")
    moments = {(*opt, m, *p[1:]): s for p, s in specs.items() for m in ("mu", "nu")}
    return specs | moments


def restore(path, sharding):
    """Plain Orbax restores ``path`` into ``NamedSharding`` targets (its own tree structure)."""
    checkpointer = ocp.StandardCheckpointer()
    tree = checkpointer.metadata(str(path)).item_metadata.tree

    def target(keys, meta):
        keys = tuple(str(getattr(k, "key", getattr(k, "idx", k))) for k in keys)
        return jax.ShapeDtypeStruct(meta.shape, meta.dtype, sharding=sharding(keys))

    return checkpointer.restore(str(path), jax.tree_util.tree_map_with_path(target, tree))


def check_sharded(out, reference, specs, mesh):
    """Chunk grids are the shard shapes, values the reference's, Orbax restores each shard."""
    got, want = CheckpointReader(out), CheckpointReader(reference)
    assert got.leaves() == want.leaves()
    sharding = lambda p: NamedSharding(mesh, specs.get(p, PartitionSpec()))  # noqa: E731
    restored = restore(out, sharding)
    split = 0
    for path, leaf in want.leaves().items():
        if leaf.empty:
            continue
        shard = shard_shape(leaf.shape, specs.get(path, PartitionSpec()), mesh)
        split += shard != leaf.shape
        assert got.chunk_shape(path) == tuple(max(1, d) for d in shard), path
        assert got.write_shape(path) == shard, path
        expected = want.read(path)
        assert got.read(path).tobytes() == expected.tobytes(), path
        array = tree_get(restored, path)
        assert array.sharding.is_equivalent_to(sharding(path), array.ndim), path
        for s in array.addressable_shards:
            assert as_numpy(s.data).tobytes() == expected[s.index].tobytes(), (path, s.index)
    assert split >= 10  # the params and their moments are sharded, not replicated


def test_linen_to_nnx_shards_in_one_pass(fixture_a, plain_nnx, tmp_path):
    src, config = fixture_a
    out = tmp_path / "out"
    code, stdout, err = run_cli(
        "linen-to-nnx", src, out, "--shard-for", MESH, "--model-config", config
    )
    assert code == 0, err
    assert "sharded for mesh fsdp=4,tensor=2" in stdout
    assert "replicated (no logical names): optimizer/step/value" in stdout
    mesh = make_mesh(MESH)
    check_sharded(out, plain_nnx, nnx_specs(config, mesh), mesh)


def test_nnx_to_linen_takes_the_source_s_names(fixture_a, plain_nnx, tmp_path):
    src, config = fixture_a
    names = resolve_model(None, str(config))
    result = convert(
        plain_nnx, tmp_path / "linen", direction="nnx-to-linen", shard_for=ShardFor(MESH, names)
    )
    specs = {s.path: s.spec for s in result.shardings.leaves}
    key = ("params", "params", "decoder", "layers", "self_attention", "key", "kernel")
    assert specs[key] != PartitionSpec(None, None, None, None)
    check_sharded(tmp_path / "linen", src, specs, make_mesh(MESH))
    assert result.to_dict()["mesh"] == {"fsdp": 4, "tensor": 2}
    # Back to NNX for the same mesh: the chunks are on the grid, so they are copied.
    again = convert(tmp_path / "linen", tmp_path / "nnx", shard_for=ShardFor(MESH, names))
    assert again.copied_leaves >= len(again.plan.leaves) - 1
    check_sharded(tmp_path / "nnx", plain_nnx, nnx_specs(config, make_mesh(MESH)), make_mesh(MESH))


def test_refused(fixture_a, tmp_path):
    src, config = fixture_a
    out = tmp_path / "out"
    args = ("linen-to-nnx", src, out, "--model-config", config)
    code, _, err = run_cli(*args, "--shard-for", MESH, "--num-processes", "2")
    assert_one_line_error(code, err, "--shard-for", "--num-processes 2")
    code, _, err = run_cli(*args)
    assert_one_line_error(code, err, "--model-config needs --shard-for")
    code, _, err = run_cli(*args, "--shard-for", "fsdp=2,tensor=4")
    assert_one_line_error(code, err, "dimension 2", "tensor")
    assert not out.exists()
    assert math.prod(make_mesh(MESH).shape.values()) == len(jax.devices())
