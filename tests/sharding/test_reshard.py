"""``ckptconv reshard``: chunk grids equal to the device shard grids, values bit-identical."""

import json
import math

import jax
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx, traverse_util
from jax.sharding import NamedSharding, PartitionSpec

from ckptconv.io import CheckpointReader, CheckpointWriter
from ckptconv.models.adapter import resolve_model
from ckptconv.sharding import (
    get_preset,
    make_mesh,
    param_partition_specs,
    parse_mesh_spec,
    shard_shape,
)
from ckptconv.sharding import reshard as reshard_module
from ckptconv.sharding.reshard import orbax_sharding, reshard
from ckptconv.testing import as_numpy, assert_one_line_error, restore_target, run_cli, tree_get

# Restoring without a target reads the shardings from _sharding, which is the point here.
pytestmark = pytest.mark.filterwarnings("ignore:Sharding info not provided:UserWarning")

KEY = ("model", "decoder", "layers", "self_attention", "key", "kernel", "value")

# The synthetic checkpoint: several arrays per shard axis, various dtypes and source chunks.
SYNTHETIC = {
    ("params", "up"): ((16, 64), "float32", ("embed", "mlp"), (16, 64)),
    ("params", "down"): ((64, 16), "bfloat16", ("mlp", "embed"), (5, 16)),
    ("params", "emb"): ((32, 16), "float32", ("vocab", "embed"), (8, 16)),
    ("params", "heads"): (
        (2, 16, 8, 4),
        "float32",
        ("layers", "embed", "heads", "kv"),
        (1, 3, 8, 4),
    ),
    ("params", "ids"): ((8, 16), "int32", (None, "embed"), (8, 16)),
    ("params", "scale"): ((16,), "float32", ("norm",), (16,)),
    ("step",): ((), "int32", None, ()),
}
NAMES = [
    {"match": r"params/up$", "axes": ["embed", "mlp"]},
    {"match": r"params/down$", "axes": ["mlp", "embed"]},
    {"match": r"params/emb$", "axes": ["vocab", "embed"]},
    {"match": r"params/heads$", "axes": ["layers", "embed", "heads", "kv"]},
    {"match": r"params/ids$", "axes": [None, "embed"]},
    {"match": r"scale", "axes": ["norm"]},
]


def np_dtype(name):
    return ml_dtypes.bfloat16 if name == "bfloat16" else np.dtype(name)


@pytest.fixture(scope="module")
def nnx_a(tmp_path_factory, maxtext_fixtures):
    out = tmp_path_factory.mktemp("reshard") / "nnx_a"
    code, _, err = run_cli("linen-to-nnx", maxtext_fixtures / "A" / "ckpt", out)
    assert code == 0, err
    return out


@pytest.fixture(scope="module")
def config_a(maxtext_fixtures):
    return maxtext_fixtures / "A" / "config.json"


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    rng = np.random.default_rng(0)
    with CheckpointWriter(root / "ckpt", use_zarr3=True) as w:
        for path, (shape, dtype, _, chunk) in SYNTHETIC.items():
            data = (rng.standard_normal(shape) * 100).astype(np_dtype(dtype))
            w.create(path, shape, dtype, chunk_shape=chunk).write(None, data)
    (root / "names.yaml").write_text(json.dumps(NAMES))
    return root


def model_specs(config, rules, mesh):
    abstract = resolve_model(None, str(config)).nnx_model()
    specs = traverse_util.flatten_dict(param_partition_specs(abstract, get_preset(rules), mesh))
    return {("model", *map(str, p), "value"): s for p, s in specs.items()}


def synthetic_specs(rules, mesh):
    with nnx.use_eager_sharding(False):
        state = nnx.State(
            traverse_util.unflatten_dict(
                {
                    p: nnx.Param(jax.ShapeDtypeStruct(shape, "float32"), out_sharding=names)
                    for p, (shape, _, names, _) in SYNTHETIC.items()
                    if names is not None
                }
            )
        )
    return traverse_util.flatten_dict(param_partition_specs(state, get_preset(rules), mesh))


def restore_tree(path, reader, specs, mesh):
    target = restore_target(reader, lambda p: NamedSharding(mesh, specs.get(p, PartitionSpec())))
    return ocp.StandardCheckpointer().restore(str(path), target)


def mesh_of(spec):
    """The mesh on the first devices it needs (all 8, or fewer)."""
    return make_mesh(spec, devices=jax.devices()[: math.prod(parse_mesh_spec(spec).values())])


def check_resharded(src, out, mesh_spec, specs):
    """Every property the issue asks of each array of a resharded checkpoint."""
    mesh = mesh_of(mesh_spec)
    source, result = CheckpointReader(src), CheckpointReader(out)
    sharded = restore_tree(out, result, specs, mesh)
    plain = ocp.PyTreeCheckpointer().restore(str(out))  # without a target: from _sharding
    shardings = json.loads((out / "_sharding").read_text())
    metadata = json.loads((out / "_METADATA").read_text())["tree_metadata"]
    assert result.leaves().keys() == source.leaves().keys()
    for path, leaf in source.leaves().items():
        if leaf.empty:
            continue
        spec = specs.get(path, PartitionSpec())
        shard = shard_shape(leaf.shape, spec, mesh)
        assert result.chunk_shape(path) == tuple(max(1, d) for d in shard), path
        assert metadata[str(path)]["value_metadata"]["write_shape"] == list(shard), path
        expected = source.read(path)
        got = result.read(path)
        assert got.dtype == expected.dtype and got.tobytes() == expected.tobytes(), path
        whole = as_numpy(tree_get(plain, path))
        assert whole.tobytes() == expected.tobytes(), path
        restored = tree_get(sharded, path)
        assert restored.sharding.is_equivalent_to(NamedSharding(mesh, spec), restored.ndim)
        for s in restored.addressable_shards:
            data = as_numpy(s.data)
            assert data.shape == shard
            assert data.tobytes() == whole[s.index].tobytes(), (path, s.index)
    if KEY in specs:  # _sharding holds what Orbax writes for that NamedSharding
        orbax_doc = ocp.metadata.NamedShardingMetadata.from_jax_sharding(
            NamedSharding(mesh, specs[KEY])
        ).to_serialized_string()
        key = next(k for k in shardings if "self_attention.key.kernel" in _b64(k))
        assert json.loads(shardings[key]) == json.loads(orbax_doc)


def _b64(key):
    import base64

    return base64.urlsafe_b64decode(key).decode()


@pytest.mark.parametrize("mesh_spec,rules", [("fsdp=4,tensor=2", "maxtext"), ("fsdp=8", "fsdp-tp")])
def test_fixture_a(nnx_a, config_a, tmp_path, mesh_spec, rules):
    out = tmp_path / "out"
    code, stdout, err = run_cli(
        "reshard", nnx_a, out, "--mesh", mesh_spec, "--rules", rules, "--model-config", config_a
    )
    assert code == 0, err
    assert "replicated (no logical names): optimizer/step/value" in stdout
    mesh = make_mesh(mesh_spec)
    specs = model_specs(config_a, rules, mesh)
    # Optimizer moments of a param are sharded as the param.
    specs |= {
        ("optimizer", "opt_state", "0", m, *p[1:]): s
        for p, s in specs.items()
        for m in ("mu", "nu")
    }
    check_resharded(nnx_a, out, mesh_spec, specs)
    # Back to one chunk per array: the original values.
    code, _, err = run_cli(
        "reshard", out, tmp_path / "back", "--mesh", "fsdp=1,tensor=1", "--rules", rules,
        "--model-config", config_a,
    )  # fmt: skip
    assert code == 0, err
    check_resharded(nnx_a, tmp_path / "back", "fsdp=1,tensor=1", {})


@pytest.mark.parametrize(
    "mesh_spec,rules",
    [("fsdp=2,tensor=4", "fsdp-tp"), ("fsdp=4,tensor=2", "maxtext"), ("fsdp=8", "maxtext")],
)
def test_synthetic(synthetic, tmp_path, monkeypatch, mesh_spec, rules):
    src, out = synthetic / "ckpt", tmp_path / "out"
    monkeypatch.setattr(reshard_module, "INNER_CHUNK_BYTES", 256)
    result = reshard(src, out, mesh=mesh_spec, rules=rules, names=_rules(), slab_bytes=512)
    assert result.unnamed == ["step"]
    for path, (_, dtype, _, _) in SYNTHETIC.items():  # inner chunks tile each shard
        doc = CheckpointReader(out).zarr_metadata(path)
        outer = doc["chunk_grid"]["configuration"]["chunk_shape"]
        inner = doc["codecs"][0]["configuration"]["chunk_shape"]
        assert all(o % i == 0 for o, i in zip(outer, inner, strict=True)), path
        assert math.prod(inner) * np.dtype(np_dtype(dtype)).itemsize <= 256, path
    specs = synthetic_specs(rules, make_mesh(mesh_spec))
    assert any(s != PartitionSpec(None, None) for s in specs.values())
    check_resharded(src, out, mesh_spec, specs)
    back = reshard(out, tmp_path / "back", mesh="fsdp=1", rules=rules, names=_rules())
    check_resharded(src, tmp_path / "back", "fsdp=1", {})
    assert back.copied_leaves >= 1  # the scalar and replicated arrays keep their one chunk
    again = tmp_path / "again"
    code, stdout, err = run_cli(
        "reshard", out, again, "--mesh", mesh_spec, "--rules", rules,
        "--names", synthetic / "names.yaml", "--json",
    )  # fmt: skip
    assert code == 0, err
    assert json.loads(stdout)["copied_leaves"] == len(SYNTHETIC)  # on the grid: not decoded
    check_resharded(src, tmp_path / "again", mesh_spec, specs)


def _rules():
    return [(n["match"], n["axes"]) for n in NAMES]


def test_sharding_json_is_orbax_s():
    mesh = make_mesh("fsdp=4,tensor=2")
    spec = PartitionSpec(None, ("fsdp", "tensor"), None)
    ids = np.vectorize(lambda d: d.id)(mesh.devices).tolist()
    ours = orbax_sharding(spec, dict(mesh.shape), ids)
    theirs = ocp.metadata.NamedShardingMetadata.from_jax_sharding(NamedSharding(mesh, spec))
    assert ours == json.loads(theirs.to_serialized_string())


def test_indivisible_is_refused_or_replicated(nnx_a, config_a, tmp_path):
    out = tmp_path / "out"
    args = ("reshard", nnx_a, out, "--mesh", "fsdp=2,tensor=4", "--model-config", config_a)
    code, _, err = run_cli(*args)
    assert_one_line_error(code, err, "/".join(KEY), "dimension 2", "size 2", "tensor")
    assert not out.exists()
    code, stdout, err = run_cli(*args, "--replicate-indivisible", "--json")
    assert code == 0, err
    doc = json.loads(stdout)
    assert {"path": "/".join(KEY), "dim": 2, "size": 2, "axes": ["tensor"]} in doc["fallbacks"]
    assert CheckpointReader(out).chunk_shape(KEY) == (2, 32, 2, 16)
    code, stdout, err = run_cli(*args, "--replicate-indivisible", "--force")
    assert code == 0, err
    assert f"replicated (indivisible): {'/'.join(KEY)} dim 2 (size 2) over tensor" in stdout


def test_bad_input(synthetic, nnx_a, config_a, maxtext_fixtures, tmp_path):
    out = tmp_path / "out"
    src = synthetic / "ckpt"
    code, _, err = run_cli("reshard", nnx_a, out, "--mesh", "foo=8", "--model-config", config_a)
    assert_one_line_error(code, err, "unknown mesh axis 'foo'")
    bad_regex = tmp_path / "bad_regex.yaml"
    bad_regex.write_text(json.dumps([{"match": "params/(up", "axes": ["embed", "mlp"]}]))
    code, _, err = run_cli("reshard", src, out, "--mesh", "fsdp=8", "--names", bad_regex)
    assert_one_line_error(code, err, "bad regex", "params/(up")
    bad_rank = tmp_path / "bad_rank.yaml"
    bad_rank.write_text(json.dumps([{"match": "params/up$", "axes": ["embed"]}]))
    code, _, err = run_cli("reshard", src, out, "--mesh", "fsdp=8", "--names", bad_rank)
    assert_one_line_error(code, err, "params/up", "1 axes")
    code, _, err = run_cli("reshard", synthetic / "ckpt", out, "--mesh", "fsdp=8")
    assert_one_line_error(code, err, "--model")
    linen = maxtext_fixtures / "A" / "ckpt"
    code, _, err = run_cli("reshard", linen, out, "--mesh", "fsdp=8", "--model-config", config_a)
    assert_one_line_error(code, err, "no leaf model/<param>/value")
    assert not out.exists()
    (tmp_path / "taken").mkdir()
    code, _, err = run_cli(
        "reshard", nnx_a, tmp_path / "taken", "--mesh", "fsdp=8", "--model-config", config_a
    )
    assert_one_line_error(code, err, "taken")
    assert list((tmp_path / "taken").iterdir()) == []


def test_writer_refuses_inner_chunks_that_do_not_tile(tmp_path):
    from ckptconv.errors import CheckpointWriteError

    with CheckpointWriter(tmp_path / "w", use_zarr3=True) as w:
        with pytest.raises(CheckpointWriteError, match="must divide"):
            w.create(("a",), (8, 8), "float32", chunk_shape=(4, 8), inner_chunk_shape=(3, 8))
        w.create(("b",), (8, 8), "float32", chunk_shape=(4, 8), inner_chunk_shape=(2, 8)).write(
            None, np.arange(64, dtype=np.float32).reshape(8, 8)
        )
    assert (
        CheckpointReader(tmp_path / "w").read(("b",)).tobytes()
        == np.arange(64, dtype=np.float32).tobytes()
    )
