import json
import os
import pathlib
import time

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorstore as ts

from ckptconv.errors import CheckpointFormatError, IncompleteCheckpointError, LayoutError
from ckptconv.io import CheckpointReader, Leaf, Location

pytestmark = pytest.mark.filterwarnings("ignore:Sharding info not provided:UserWarning")

FIXTURES = ("A", "B")


@pytest.fixture(scope="module")
def restored(maxtext_fixtures):
    """What plain Orbax restores from each fixture, restored once per module."""
    return {
        name: ocp.PyTreeCheckpointer().restore(str((maxtext_fixtures / name / "ckpt").resolve()))
        for name in FIXTURES
    }


# -- metadata ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FIXTURES)
def test_leaves_equal_layout_txt_exactly(name, maxtext_fixtures, parse_layout):
    expected = parse_layout(maxtext_fixtures / name / "layout.txt")
    leaves = CheckpointReader(maxtext_fixtures / name / "ckpt").leaves()
    assert set(leaves) == set(expected)
    for path, want in expected.items():
        leaf = leaves[path]
        assert isinstance(leaf, Leaf) and leaf.path == path
        if want is None:
            assert leaf.empty and leaf.shape is None and leaf.dtype is None
        else:
            assert (leaf.shape, leaf.dtype) == want, path


def test_metadata_facts_of_fixture_a(maxtext_fixtures):
    reader = CheckpointReader(maxtext_fixtures / "A" / "ckpt")
    assert reader.use_zarr3
    assert reader.location == Location.parse(maxtext_fixtures / "A" / "ckpt")
    assert reader.custom_metadata == {}
    assert reader.value_type(("opt_state", "1")) == "None"
    assert reader.value_type(("step",)) == "jax.Array"
    assert reader.key_types(("opt_state", "0", "count")) == (2, 1, 2)
    path = ("params", "params", "decoder", "layers", "mlp", "wi_0", "kernel")
    assert reader.array_key(path) == "params.params.decoder.layers.mlp.wi_0.kernel"
    assert reader.zarr_metadata(path)["codecs"][0]["name"] == "sharding_indexed"
    rng_key = ("nnx_aux", "model", "decoder", "rngs", "params", "key")
    assert reader.ext_metadata(rng_key) == {"random_key_impl": "unsafe_rbg"}
    assert reader.ext_metadata(path) is None
    assert isinstance(reader.kvstore, ts.KvStore)


def test_leaves_come_from_metadata_only(fixture_copy):
    # Delete every data file that holds chunks: metadata (inline in the B-tree) still reads.
    ckpt = fixture_copy("A")
    reader = CheckpointReader(ckpt)
    for f in (ckpt / "ocdbt.process_0" / "d").iterdir():
        if f.stat().st_size > 100_000:
            f.unlink()
    leaves = reader.leaves()
    assert len(leaves) == 52


# -- arrays ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FIXTURES)
def test_read_is_bit_identical_to_orbax_restore(
    name, maxtext_fixtures, restored, tree_get, as_numpy
):
    reader = CheckpointReader(maxtext_fixtures / name / "ckpt")
    for path, leaf in reader.leaves().items():
        theirs = tree_get(restored[name], path)
        if leaf.empty:
            assert theirs is None
            continue
        ours = reader.read(path)
        want = as_numpy(theirs)
        assert ours.dtype == want.dtype and ours.shape == want.shape == leaf.shape, path
        assert ours.tobytes() == want.tobytes(), path


def test_slab_reads(maxtext_fixtures):
    reader = CheckpointReader(maxtext_fixtures / "A" / "ckpt")
    path = ("params", "params", "decoder", "layers", "self_attention", "query", "kernel")
    full = reader.read(path)
    assert full.shape == (64, 2, 4, 16)
    np.testing.assert_array_equal(reader.read(path, (slice(8, 24),)), full[8:24])
    np.testing.assert_array_equal(
        reader.read(path, (slice(0, 64), slice(1, 2), slice(-2, None))), full[:, 1:2, -2:]
    )
    np.testing.assert_array_equal(reader.read(path, (slice(5, 5),)), full[5:5])
    store = reader.open(path)
    assert tuple(store.shape) == (64, 2, 4, 16)
    with pytest.raises(LayoutError, match="does not fit"):
        reader.read(path, (slice(60, 70),))
    with pytest.raises(LayoutError, match="step 1"):
        reader.read(path, (slice(0, 10, 2),))


def test_read_scalar_and_errors_on_non_arrays(maxtext_fixtures):
    reader = CheckpointReader(maxtext_fixtures / "A" / "ckpt")
    step = reader.read(("step",))
    assert step.shape == () and step.dtype == np.int32 and int(step) == 3
    with pytest.raises(LayoutError, match="empty"):
        reader.read(("opt_state", "1"))
    with pytest.raises(LayoutError, match="no leaf params/nope"):
        reader.read(("params", "nope"))


def test_opening_every_array_is_cheap(maxtext_fixtures):
    reader = CheckpointReader(maxtext_fixtures / "B" / "ckpt")
    start = time.perf_counter()
    stores = [reader.open(p) for p, leaf in reader.leaves().items() if not leaf.empty]
    assert len(stores) == 99
    assert time.perf_counter() - start < 5
    assert reader.open(("step",)) is reader.open(("step",))


def test_bfloat16_stays_bfloat16(tmp_path):
    tree = {"w": jnp.arange(6, dtype=jnp.bfloat16).reshape(2, 3)}
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "bf", tree)
    reader = CheckpointReader(tmp_path / "bf")
    assert reader.leaves()[("w",)] == Leaf(("w",), (2, 3), "bfloat16")
    assert not reader.use_zarr3
    out = reader.read(("w",))
    assert out.dtype == ml_dtypes.bfloat16
    assert out.tobytes() == np.asarray(tree["w"]).tobytes()


def test_python_scalars_numpy_arrays_and_empty_containers(tmp_path):
    tree = {"a": 3, "b": np.arange(3, dtype=np.int16), "c": {}, "d": [], "e": None}
    ocp.PyTreeCheckpointer().save(tmp_path / "mixed", tree)
    reader = CheckpointReader(tmp_path / "mixed")
    leaves = reader.leaves()
    assert leaves[("a",)].shape == () and reader.value_type(("a",)) == "scalar"
    assert leaves[("b",)] == Leaf(("b",), (3,), "int16")
    assert reader.value_type(("b",)) == "np.ndarray"
    assert [reader.value_type((k,)) for k in "cde"] == ["Dict", "List", "None"]
    assert all(leaves[(k,)].empty for k in "cde")
    assert int(reader.read(("a",))) == 3
    np.testing.assert_array_equal(reader.read(("b",)), tree["b"])


# -- resolving CheckpointManager folders ---------------------------------------------------------


def _tiny_tree(step):
    return {"w": jnp.full((2, 3), step, jnp.float32), "opt": [{"n": jnp.int32(step)}, None]}


def test_checkpoint_manager_root_and_step_folders(tmp_path):
    root = tmp_path / "mgr"
    with ocp.CheckpointManager(root) as mngr:
        for step in (1, 3):
            mngr.save(step, args=ocp.args.StandardSave(_tiny_tree(step)))
        mngr.wait_until_finished()
    (root / "7.orbax-checkpoint-tmp-123").mkdir()  # an interrupted save is never "latest"
    latest = CheckpointReader(root)
    assert latest.location == Location.parse(root / "3" / "default")
    assert latest.read(("w",))[0, 0] == 3
    assert latest.leaves()[("opt", "1")].empty
    step1 = CheckpointReader(root / "1")
    assert step1.location == Location.parse(root / "1" / "default")
    assert int(step1.read(("opt", "0", "n"))) == 1
    with pytest.raises(IncompleteCheckpointError):
        CheckpointReader(root / "7.orbax-checkpoint-tmp-123")


def test_checkpoint_manager_items_name_and_custom_metadata(tmp_path):
    root = tmp_path / "maxtext_like"
    with ocp.CheckpointManager(root, item_names=("items",)) as mngr:
        mngr.save(
            2,
            args=ocp.args.Composite(items=ocp.args.StandardSave(_tiny_tree(2))),
            custom_metadata={"scan_layers": True},
        )
        mngr.wait_until_finished()
    reader = CheckpointReader(root)
    assert reader.location == Location.parse(root / "2" / "items")
    assert reader.custom_metadata == {"scan_layers": True}
    assert CheckpointReader(root / "2" / "items").custom_metadata == {"scan_layers": True}


@pytest.mark.parametrize("item", ["state", "custom_name"])
def test_step_folder_with_one_item_of_any_name(item, fixture_copy, tmp_path):
    fixture_copy("B", f"run/5/{item}")
    reader = CheckpointReader(tmp_path / "run")
    assert reader.location == Location.parse(tmp_path / "run" / "5" / item)


def test_step_folder_with_two_items_is_ambiguous(fixture_copy, tmp_path):
    fixture_copy("B", "5/first")
    fixture_copy("B", "5/second")
    with pytest.raises(CheckpointFormatError, match="first, second"):
        CheckpointReader(tmp_path / "5")


def test_custom_metadata_from_checkpoint_metadata_file(fixture_copy):
    ckpt = fixture_copy("A", "4/items")
    (ckpt.parent / "_CHECKPOINT_METADATA").write_text(
        json.dumps({"custom_metadata": {"scan_layers": True}})
    )
    assert CheckpointReader(ckpt).custom_metadata == {"scan_layers": True}


# -- errors ------------------------------------------------------------------------------------


def _assert_one_line_naming(error, path):
    message = str(error.value)
    assert "\n" not in message
    assert str(path) in message
    return message


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointFormatError) as info:
        CheckpointReader(tmp_path / "nowhere")
    assert "found nothing" in _assert_one_line_naming(info, tmp_path / "nowhere")


def test_a_file_is_not_a_checkpoint(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(CheckpointFormatError) as info:
        CheckpointReader(tmp_path / "f")
    assert "found a file" in _assert_one_line_naming(info, tmp_path / "f")


def test_empty_folder(tmp_path):
    with pytest.raises(CheckpointFormatError) as info:
        CheckpointReader(tmp_path)
    assert "found: nothing" in _assert_one_line_naming(info, tmp_path)


@pytest.mark.parametrize(
    "content, expected",
    [
        (b"{not json", "invalid JSON"),
        (b"\xff\xfe\x00", "non-UTF-8"),
        (b"[1, 2]", "found a JSON list"),
        (b'{"use_ocdbt": true}', "tree_metadata"),
        (b'{"tree_metadata": {"(\'a\',)": {"key_metadata": 3}}}', "key_metadata"),
        (
            b'{"tree_metadata": {"(\'a\',)": {"key_metadata": [{"key": "a", "key_type": 2}], '
            b'"value_metadata": {"value_type": "string", "skip_deserialize": false}}}}',
            "value_type 'string'",
        ),
    ],
)
def test_garbage_metadata(content, expected, fixture_copy):
    ckpt = fixture_copy("B")
    (ckpt / "_METADATA").write_bytes(content)
    with pytest.raises(CheckpointFormatError) as info:
        CheckpointReader(ckpt)
    assert expected in _assert_one_line_naming(info, ckpt)


def test_array_without_zarr_metadata(fixture_copy):
    ckpt = fixture_copy("B")
    meta = json.loads((ckpt / "_METADATA").read_text())
    meta["tree_metadata"]["('ghost',)"] = {
        "key_metadata": [{"key": "ghost", "key_type": 2}],
        "value_metadata": {"value_type": "jax.Array", "skip_deserialize": False},
    }
    (ckpt / "_METADATA").write_text(json.dumps(meta))
    reader = CheckpointReader(ckpt)
    with pytest.raises(CheckpointFormatError) as info:
        reader.leaves()
    assert "'ghost/zarr.json'" in _assert_one_line_naming(info, ckpt)


_TREE = {
    "params": {"w": np.arange(24, dtype=np.float32).reshape(2, 3, 4), "b": np.ones(4, np.int32)},
    "step": np.int32(7),
    "opt_state": [{"count": np.int32(1)}, None],
}


@pytest.mark.parametrize("use_zarr3", [False, True], ids=["zarr2", "zarr3"])
def test_non_ocdbt_checkpoints_are_read(tmp_path, use_zarr3):
    checkpointer = ocp.Checkpointer(
        ocp.PyTreeCheckpointHandler(use_ocdbt=False, use_zarr3=use_zarr3)
    )
    checkpointer.save(tmp_path / "plain", _TREE)
    reader = CheckpointReader(tmp_path / "plain")
    assert not reader.use_ocdbt and reader.format_name == "zarr"
    assert reader.use_zarr3 is use_zarr3
    leaves = reader.leaves()
    assert leaves[("params", "w")].shape == (2, 3, 4)
    assert leaves[("opt_state", "1")].empty
    np.testing.assert_array_equal(reader.read(("params", "w")), _TREE["params"]["w"])
    np.testing.assert_array_equal(
        reader.read(("params", "w"), (slice(1, 2), slice(0, 2))), _TREE["params"]["w"][1:2, :2]
    )
    assert reader.read(("step",)) == 7
    assert reader.chunk_keys(("params", "w")) == (["c/0/0/0"] if use_zarr3 else ["0.0.0"])
    reader.check_data_files()  # nothing to check without a database: no error
    with pytest.raises(CheckpointFormatError, match="no OCDBT database"):
        reader.ocdbt_contents()


def _legacy_checkpoint(tmp_path) -> pathlib.Path:
    """An older Orbax item: per-array zarr folders and the tree in a msgpack ``checkpoint``."""
    import msgpack

    plain = tmp_path / "legacy"
    ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=False)).save(
        plain, {"params": {"w": _TREE["params"]["w"]}}
    )
    (plain / "_METADATA").unlink()
    inline = msgpack.packb(((), "int32", np.int32(7).tobytes()), use_bin_type=True)
    tree = {
        "params": {"w": "PLACEHOLDER://params.w"},
        "step": msgpack.ExtType(3, inline),
        "opt_state": {"0": None},
    }
    (plain / "checkpoint").write_bytes(msgpack.packb(tree, use_bin_type=True))
    return plain


def test_legacy_msgpack_tree_with_placeholders_is_read(tmp_path):
    reader = CheckpointReader(_legacy_checkpoint(tmp_path))
    assert reader.format_name == "zarr"
    leaves = reader.leaves()
    assert sorted(leaves) == [("opt_state", "0"), ("params", "w"), ("step",)]
    assert leaves[("opt_state", "0")].empty
    np.testing.assert_array_equal(reader.read(("params", "w")), _TREE["params"]["w"])
    assert leaves[("step",)] == Leaf(("step",), (), "int32")
    assert reader.read(("step",)) == 7
    assert not reader.stores_chunks(("step",)) and reader.stores_chunks(("params", "w"))


def test_garbled_legacy_msgpack_is_refused(tmp_path):
    (tmp_path / "checkpoint").write_bytes(b"\xc1\xc1")
    with pytest.raises(CheckpointFormatError, match="msgpack") as info:
        CheckpointReader(tmp_path)
    _assert_one_line_naming(info, tmp_path / "checkpoint")


def test_metadata_claiming_ocdbt_without_manifest_is_refused(fixture_copy):
    ckpt = fixture_copy("A")
    (ckpt / "manifest.ocdbt").unlink()
    with pytest.raises(CheckpointFormatError, match="manifest.ocdbt") as info:
        CheckpointReader(ckpt)
    _assert_one_line_naming(info, ckpt)


def _largest_data_file(ckpt):
    return max((ckpt / "ocdbt.process_0" / "d").iterdir(), key=lambda f: f.stat().st_size)


def _read_all(reader):
    errors = []
    for path, leaf in reader.leaves().items():
        if not leaf.empty:
            try:
                reader.read(path)
            except CheckpointFormatError as e:
                errors.append((path, e))
    return errors


def test_truncated_chunk_names_key_path_and_file(fixture_copy):
    ckpt = fixture_copy("A")
    victim = _largest_data_file(ckpt)
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    errors = _read_all(CheckpointReader(ckpt))
    assert errors
    path, error = errors[0]
    message = str(error)
    assert "\n" not in message
    assert "/".join(path) in message
    assert f"ocdbt.process_0/d/{victim.name}" in message
    assert str(ckpt) in message


def test_garbled_chunk_is_a_format_error(fixture_copy):
    ckpt = fixture_copy("A")
    victim = _largest_data_file(ckpt)
    data = bytearray(victim.read_bytes())
    for i in range(len(data)):
        data[i] ^= 0x5A
    victim.write_bytes(bytes(data))
    errors = _read_all(CheckpointReader(ckpt))
    assert errors
    assert all("\n" not in str(e) and victim.name in str(e) for _, e in errors)


def test_garbled_manifest_is_a_format_error(fixture_copy):
    ckpt = fixture_copy("B")
    (ckpt / "manifest.ocdbt").write_bytes(b"garbage" * 10)
    with pytest.raises(CheckpointFormatError) as info:
        CheckpointReader(ckpt).leaves()
    _assert_one_line_naming(info, ckpt)


# -- partial writes ----------------------------------------------------------------------------


def test_writer_temporary_folder_is_refused(fixture_copy):
    ckpt = fixture_copy("B", ".out.ckptconv-tmp-0a1b2c3d4e5f")
    with pytest.raises(IncompleteCheckpointError) as info:
        CheckpointReader(ckpt)
    _assert_one_line_naming(info, ckpt)


def test_incomplete_marker_is_refused(fixture_copy):
    ckpt = fixture_copy("B")
    (ckpt / ".ckptconv-incomplete").write_text("")
    with pytest.raises(IncompleteCheckpointError, match=".ckptconv-incomplete"):
        CheckpointReader(ckpt)


def test_checkpoint_without_commit_marker_from_older_orbax_is_accepted(fixture_copy):
    ckpt = fixture_copy("B")
    os.remove(ckpt / "commit_success.txt")
    assert len(CheckpointReader(ckpt).leaves()) == 100


# -- other locations ---------------------------------------------------------------------------


def test_memory_location_reads_like_a_file(maxtext_fixtures, restored, tree_get, as_numpy):
    src = maxtext_fixtures / "A" / "ckpt"
    loc = Location.parse("memory://tests/reader/A")
    kv = ts.KvStore.open(loc.kvstore_spec(), context=loc.ts_context()).result()
    for folder, _, files in os.walk(src):
        for name in files:
            full = os.path.join(folder, name)
            kv.write(os.path.relpath(full, src), open(full, "rb").read()).result()
    reader = CheckpointReader("memory://tests/reader/A")
    assert reader.leaves() == CheckpointReader(src).leaves()
    path = ("params", "params", "token_embedder", "embedding")
    want = as_numpy(tree_get(restored["A"], path))
    assert reader.read(path).tobytes() == want.tobytes()


def test_typed_rng_keys_read_as_key_data(maxtext_fixtures, restored):
    reader = CheckpointReader(maxtext_fixtures / "A" / "ckpt")
    path = ("nnx_aux", "model", "decoder", "rngs", "params", "key")
    theirs = restored["A"]["nnx_aux"]["model"]["decoder"]["rngs"]["params"]["key"]
    assert jax.dtypes.issubdtype(theirs.dtype, jax.dtypes.prng_key)
    np.testing.assert_array_equal(reader.read(path), jax.random.key_data(theirs))
