"""Verbatim array copies: CheckpointWriter.copy_array and clone_from, read back by plain Orbax."""

from __future__ import annotations

import json
import os
import shutil

import jax
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorstore as ts

from ckptconv.errors import CheckpointFormatError, CheckpointWriteError
from ckptconv.io import CheckpointReader, CheckpointWriter

pytestmark = pytest.mark.filterwarnings("ignore:Sharding info not provided")

DTYPES = [np.float32, ml_dtypes.bfloat16, np.int8]
PERMS = [None, (1, 0, 2), (2, 0, 1), (2, 1, 0)]


def make_source(path, *, zarr3, dtype, chunk_bytes=1 << 20, seed=0):
    """A small checkpoint: one multi-chunk 3-d array, one single-chunk 2-d array, a scalar."""
    rng = np.random.default_rng(seed)
    arrays = {
        ("a", "big"): (rng.standard_normal((12, 5, 7)) * 50).astype(dtype),
        ("a", "small"): (rng.standard_normal((3, 4)) * 50).astype(dtype),
        ("step",): np.array(7, np.int32),
    }
    with CheckpointWriter(path, use_zarr3=zarr3, chunk_bytes=chunk_bytes) as w:
        for p, x in arrays.items():
            w.write(p, x)
    return arrays


def orbax_restore_both(path, expected):
    """Restores with and without a target; returns both trees."""
    plain = ocp.PyTreeCheckpointer().restore(str(path))
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), expected)
    with_target = ocp.StandardCheckpointer().restore(str(path), target)
    return plain, with_target


@pytest.mark.parametrize("zarr3", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("clone", [True, False])
def test_copies_read_back_as_transposed_values(tmp_path, zarr3, dtype, clone):
    item = (5 * 7) * np.dtype(dtype).itemsize
    arrays = make_source(tmp_path / "src", zarr3=zarr3, dtype=dtype, chunk_bytes=4 * item)
    reader = CheckpointReader(tmp_path / "src")
    assert len(reader.chunk_keys(("a", "big"))) == 3  # 12 rows in chunks of 4
    expected = {}
    with CheckpointWriter(tmp_path / "out", use_zarr3=zarr3) as w:
        if clone:
            assert w.clone_from(reader)
        for i, perm in enumerate(PERMS):
            if not w.can_copy(reader, ("a", "big"), perm):
                assert not zarr3 and perm in ((1, 0, 2), (2, 0, 1))
                with pytest.raises(CheckpointWriteError, match="cannot be copied verbatim"):
                    w.copy_array(("x", f"p{i}"), reader, ("a", "big"), axes=perm)
                continue
            shape = w.copy_array(("x", f"p{i}"), reader, ("a", "big"), axes=perm)
            expected[f"p{i}"] = np.transpose(arrays[("a", "big")], perm or (0, 1, 2))
            assert shape == expected[f"p{i}"].shape
        w.copy_array(("x", "small_t"), reader, ("a", "small"), axes=(1, 0))
        expected["small_t"] = arrays[("a", "small")].T
        w.copy_array(("x", "step"), reader, ("step",))
        expected["step"] = arrays[("step",)]
    out = CheckpointReader(tmp_path / "out")
    for name, x in expected.items():
        leaf = out.leaves()[("x", name)]
        assert leaf.shape == x.shape and leaf.dtype == np.dtype(x.dtype).name
        y = out.read(("x", name))
        assert y.dtype == x.dtype and y.tobytes() == np.ascontiguousarray(x).tobytes(), name
    plain, with_target = orbax_restore_both(tmp_path / "out", {"x": expected})
    for name, x in expected.items():
        np.testing.assert_array_equal(np.asarray(plain["x"][name]), x)
        np.testing.assert_array_equal(np.asarray(with_target["x"][name]), x)
        assert np.asarray(with_target["x"][name]).dtype == x.dtype


def test_clone_holds_only_the_declared_arrays(tmp_path):
    arrays = make_source(tmp_path / "src", zarr3=True, dtype=np.float32, chunk_bytes=512)
    reader = CheckpointReader(tmp_path / "src")
    with CheckpointWriter(tmp_path / "out") as w:
        assert w.clone_from(reader)
        w.copy_array(("m", "big"), reader, ("a", "big"), axes=(1, 0, 2))
        w.write(("m", "new"), np.arange(3, dtype=np.float32))
    kv = CheckpointReader(tmp_path / "out").kvstore
    prefixes = {k.decode().split("/")[0] for k in kv.list().result()}
    assert prefixes == {"m.big", "m.new"}  # no source key, no staging key
    meta = json.loads((tmp_path / "out" / "_METADATA").read_text())
    entry = meta["tree_metadata"][str(("m", "big"))]["value_metadata"]
    src_meta = json.loads((tmp_path / "src" / "_METADATA").read_text())
    src_entry = src_meta["tree_metadata"][str(("a", "big"))]["value_metadata"]
    assert entry["write_shape"] == [src_entry["write_shape"][i] for i in (1, 0, 2)]
    out = CheckpointReader(tmp_path / "out")
    np.testing.assert_array_equal(out.read(("m", "big")), np.moveaxis(arrays[("a", "big")], 1, 0))
    assert out.zarr_metadata(("m", "big"))["codecs"][0]["name"] == "transpose"


def test_clone_copies_orbax_written_per_process_data(tmp_path):
    """Orbax writes data under ocdbt.process_0/ and merges the index into the root."""
    tree = {"w": np.arange(24, dtype=np.float32).reshape(2, 3, 4), "b": np.ones(3, np.int8)}
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp_path / "src", tree)
    ckpt.wait_until_finished()
    reader = CheckpointReader(tmp_path / "src")
    with CheckpointWriter(tmp_path / "out", use_zarr3=reader.use_zarr3) as w:
        assert w.clone_from(reader)
        w.copy_array(("w_t",), reader, ("w",), axes=(2, 1, 0))
        w.copy_array(("b",), reader, ("b",))
    shutil.rmtree(tmp_path / "src")  # the output depends on nothing of the source
    restored = ocp.PyTreeCheckpointer().restore(str(tmp_path / "out"))
    np.testing.assert_array_equal(np.asarray(restored["w_t"]), tree["w"].T)
    np.testing.assert_array_equal(np.asarray(restored["b"]), tree["b"])


def test_clone_refuses_truncated_data_files(tmp_path):
    with CheckpointWriter(tmp_path / "src") as w:
        w.write(("big",), np.random.default_rng(0).standard_normal(1 << 14).astype(np.float32))
    for f in (tmp_path / "src" / "d").iterdir():
        if f.stat().st_size > 1 << 15:  # the data file, not a B-tree node
            os.truncate(f, f.stat().st_size // 2)
    reader = CheckpointReader(tmp_path / "src")
    with pytest.raises(CheckpointFormatError, match="truncated"):
        with CheckpointWriter(tmp_path / "out") as w:
            w.clone_from(reader)
    assert not (tmp_path / "out").exists()


def test_copy_refuses_a_source_with_a_missing_chunk(tmp_path):
    make_source(tmp_path / "src", zarr3=True, dtype=np.float32, chunk_bytes=512)
    kv = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{tmp_path / 'src'}/"}).result()
    kv.delete_range(ts.KvStore.KeyRange(b"a.big/c/1/", b"a.big/c/10")).result()
    reader = CheckpointReader(tmp_path / "src")
    with pytest.raises(CheckpointFormatError, match=r"stores \d+ of its \d+ chunks"):
        with CheckpointWriter(tmp_path / "out") as w:
            w.copy_array(("x",), reader, ("a", "big"))


def test_clone_only_first_and_only_when_possible(tmp_path):
    make_source(tmp_path / "src", zarr3=True, dtype=np.float32)
    reader = CheckpointReader(tmp_path / "src")
    with CheckpointWriter(tmp_path / "zarr2", use_zarr3=False) as w:
        assert not w.clone_from(reader)  # formats differ: nothing done
        assert not w.can_copy(reader, ("step",))
        w.write(("s2",), np.ones(2, np.float32))
    with CheckpointWriter(tmp_path / "out") as w:
        w.write(("s",), np.ones(2, np.float32))
        with pytest.raises(CheckpointWriteError, match="before anything is written"):
            w.clone_from(reader)
        w.abort()


def test_value_copies_stay_within_the_read_budget(tmp_path):
    arrays = make_source(tmp_path / "src", zarr3=True, dtype=np.float32, chunk_bytes=256)
    reader = CheckpointReader(tmp_path / "src")
    with CheckpointWriter(tmp_path / "out", max_inflight_bytes=300) as w:
        w.copy_array(("y",), reader, ("a", "big"), axes=(2, 1, 0))
        assert w._store._copy_bytes <= 300
    np.testing.assert_array_equal(
        CheckpointReader(tmp_path / "out").read(("y",)), arrays[("a", "big")].T
    )


def test_only_copied_arrays_commit(tmp_path):
    make_source(tmp_path / "src", zarr3=False, dtype=np.int8)
    reader = CheckpointReader(tmp_path / "src")
    with CheckpointWriter(tmp_path / "out", use_zarr3=False) as w:
        w.copy_array(("z",), reader, ("a", "small"))
    assert CheckpointReader(tmp_path / "out").leaves()[("z",)].shape == (3, 4)


def test_a_copy_of_some_chunks_leaves_the_rest_to_write(tmp_path):
    arrays = make_source(tmp_path / "src", zarr3=True, dtype=np.float32, chunk_bytes=4 * 5 * 7 * 4)
    reader = CheckpointReader(tmp_path / "src")
    keys = reader.chunk_keys(("a", "big"))
    assert len(keys) == 3  # 12 rows in chunks of 4
    big = arrays[("a", "big")]
    with CheckpointWriter(tmp_path / "out") as w:
        w.copy_array(("y",), reader, ("a", "big"), axes=(1, 0, 2), chunks=set(keys))
    np.testing.assert_array_equal(
        CheckpointReader(tmp_path / "out").read(("y",)), big.transpose(1, 0, 2)
    )
    with pytest.raises(CheckpointWriteError, match=r"^z: .*region \[4:8, 0:5, 0:7\] unwritten"):
        with CheckpointWriter(tmp_path / "out2") as w:
            w.copy_array(("z",), reader, ("a", "big"), chunks={keys[0], keys[2]})
    assert not (tmp_path / "out2").exists()
