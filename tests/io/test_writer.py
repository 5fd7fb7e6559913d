import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap

import hypothesis
import hypothesis.strategies as st
import jax
import ml_dtypes
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
import tensorstore as ts

from ckptconv.errors import (
    CheckpointWriteError,
    DestinationExistsError,
    IncompleteCheckpointError,
)
from ckptconv.io import CheckpointReader, CheckpointWriter, Leaf
from ckptconv.io import _store as store_module
from ckptconv.io import writer as writer_module
from ckptconv.io._coverage import Coverage
from ckptconv.io._zarr import choose_chunk_shape
from ckptconv.io.sources import open_source

pytestmark = pytest.mark.filterwarnings("ignore:Sharding info not provided:UserWarning")

REPO = pathlib.Path(__file__).resolve().parents[2]


def _sample():
    """Every dtype the brief names, scalars, a list with an empty entry, empty dict/list."""
    rng = np.random.default_rng(0)
    return {
        ("params", "dense", "kernel"): rng.standard_normal((3, 5)).astype(np.float32),
        ("params", "dense", "bias"): rng.standard_normal(5).astype(ml_dtypes.bfloat16),
        ("params", "emb"): rng.standard_normal((4, 2, 3)).astype(ml_dtypes.bfloat16),
        ("opt_state", "0", "count"): np.int32(7),
        ("opt_state", "0", "mu", "w"): rng.standard_normal((2, 2)).astype(np.float32),
        ("opt_state", "1"): None,
        ("opt_state", "2", "count"): np.array(3, np.int32),
        ("rng", "count"): np.uint32(4),
        ("rng", "key"): np.arange(4, dtype=np.uint32),
        ("step",): np.int32(11),
        ("ints",): np.arange(-6, 6, dtype=np.int32).reshape(3, 4),
    }


def _key_types(path):
    return tuple(
        1 if (p.isdigit() and i > 0 and path[0] == "opt_state") else 2 for i, p in enumerate(path)
    )


def _write_sample(dest, **kwargs):
    with CheckpointWriter(dest, **kwargs) as writer:
        for path, value in _sample().items():
            if value is None:
                writer.write_empty(path, key_types=_key_types(path))
            else:
                writer.write(path, value, key_types=_key_types(path))
    return dest


def _sample_target():
    """The abstract target tree for StandardCheckpointer, optax EmptyState in the list."""
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def spec(x):
        x = np.asarray(x)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    s = _sample()
    return {
        "params": {
            "dense": {
                "kernel": spec(s[("params", "dense", "kernel")]),
                "bias": spec(s[("params", "dense", "bias")]),
            },
            "emb": spec(s[("params", "emb")]),
        },
        "opt_state": [
            {
                "count": spec(s[("opt_state", "0", "count")]),
                "mu": {"w": spec(s[("opt_state", "0", "mu", "w")])},
            },
            optax.EmptyState(),
            {"count": spec(s[("opt_state", "2", "count")])},
        ],
        "rng": {"count": spec(s[("rng", "count")]), "key": spec(s[("rng", "key")])},
        "step": spec(s[("step",)]),
        "ints": spec(s[("ints",)]),
    }


def _assert_same(ours, theirs):
    theirs = np.asarray(theirs)
    ours = np.asarray(ours)
    assert theirs.dtype == ours.dtype and theirs.shape == ours.shape
    assert theirs.tobytes() == ours.tobytes()


def _siblings(dest):
    return sorted(p.name for p in dest.parent.iterdir() if p.name != dest.name)


# -- round trips through plain Orbax -------------------------------------------------------------


@pytest.mark.parametrize("use_zarr3", [True, False])
def test_restore_without_target_gives_lists_and_values(use_zarr3, tmp_path, tree_get):
    dest = _write_sample(tmp_path / "out", use_zarr3=use_zarr3)
    assert _siblings(dest) == []
    restored = ocp.PyTreeCheckpointer().restore(str(dest))
    assert isinstance(restored["opt_state"], list) and len(restored["opt_state"]) == 3
    assert restored["opt_state"][1] is None
    for path, value in _sample().items():
        if value is not None:
            _assert_same(value, tree_get(restored, path))


@pytest.mark.parametrize("use_zarr3", [True, False])
def test_restore_with_target_gives_the_target_structure(use_zarr3, tmp_path, tree_get):
    dest = _write_sample(tmp_path / "out", use_zarr3=use_zarr3)
    restored = ocp.StandardCheckpointer().restore(dest, _sample_target())
    assert isinstance(restored["opt_state"][1], optax.EmptyState)
    for path, value in _sample().items():
        if value is not None:
            _assert_same(value, tree_get(restored, path))


@pytest.mark.parametrize("use_zarr3", [True, False])
def test_reader_reads_back_what_was_written(use_zarr3, tmp_path):
    dest = _write_sample(tmp_path / "out", use_zarr3=use_zarr3, custom_metadata={"k": [1]})
    reader = CheckpointReader(dest)
    assert reader.use_zarr3 is use_zarr3
    assert reader.custom_metadata == {"k": [1]}
    sample = _sample()
    assert set(reader.leaves()) == set(sample)
    for path, value in sample.items():
        leaf = reader.leaves()[path]
        assert reader.key_types(path) == _key_types(path)
        if value is None:
            assert leaf == Leaf(path, None, None) and reader.value_type(path) == "None"
        else:
            value = np.asarray(value)
            assert leaf == Leaf(path, value.shape, value.dtype.name)
            _assert_same(value, reader.read(path))


def test_layout_matches_what_orbax_writes(tmp_path):
    dest = _write_sample(tmp_path / "out")
    names = set(os.listdir(dest))
    assert {
        "_METADATA",
        "_sharding",
        "_CHECKPOINT_METADATA",
        "commit_success.txt",
        "manifest.ocdbt",
        "d",
        "array_metadatas",
    } <= names
    assert ".ckptconv-incomplete" not in names
    meta = json.loads((dest / "_METADATA").read_text())
    assert meta["use_ocdbt"] is True and meta["store_array_data_equal_to_fill_value"] is True
    entry = meta["tree_metadata"]["('opt_state', '1')"]
    assert entry == {
        "key_metadata": [{"key": "opt_state", "key_type": 2}, {"key": "1", "key_type": 1}],
        "value_metadata": {"value_type": "None", "skip_deserialize": True},
    }
    kernel = meta["tree_metadata"]["('params', 'dense', 'kernel')"]["value_metadata"]
    assert kernel == {"value_type": "jax.Array", "skip_deserialize": False, "write_shape": [3, 5]}
    kv = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{dest}/"}).result()
    doc = json.loads(kv.read("params.dense.kernel/zarr.json").result().value)
    assert doc["codecs"][0]["name"] == "sharding_indexed"
    assert doc["codecs"][0]["configuration"]["codecs"][1] == {
        "name": "zstd",
        "configuration": {"level": 3, "checksum": False},
    }
    assert (dest / "commit_success.txt").read_text().startswith("Checkpoint commit was successful")


def test_writer_copies_a_real_maxtext_checkpoint(maxtext_fixtures, tmp_path, tree_get, as_numpy):
    source = CheckpointReader(maxtext_fixtures / "A" / "ckpt")
    with CheckpointWriter(tmp_path / "copy") as writer:
        for path, leaf in source.leaves().items():
            if leaf.empty:
                writer.write_empty(path, key_types=source.key_types(path))
                continue
            impl = (source.ext_metadata(path) or {}).get("random_key_impl")
            writer.write(
                path, source.read(path), key_types=source.key_types(path), random_key_impl=impl
            )
    ours = ocp.PyTreeCheckpointer().restore(str(tmp_path / "copy"))
    theirs = ocp.PyTreeCheckpointer().restore(str((maxtext_fixtures / "A" / "ckpt").resolve()))
    assert jax.tree.structure(ours) == jax.tree.structure(theirs)
    for path, leaf in source.leaves().items():
        if leaf.empty:
            assert tree_get(ours, path) is None
            continue
        a, b = tree_get(ours, path), tree_get(theirs, path)
        assert a.dtype == b.dtype, path
        _assert_same(as_numpy(a), as_numpy(b))
    assert CheckpointReader(tmp_path / "copy").leaves() == source.leaves()


def test_empty_dict_and_list_leaves(tmp_path):
    with CheckpointWriter(tmp_path / "out") as writer:
        writer.write(("a",), np.ones(2, np.float32))
        writer.write_empty(("b",), value_type="Dict")
        writer.write_empty(("c",), value_type="List")
    restored = ocp.PyTreeCheckpointer().restore(str(tmp_path / "out"))
    assert restored["b"] == {} and restored["c"] == []
    assert CheckpointReader(tmp_path / "out").value_type(("b",)) == "Dict"


def test_explicit_sharding_is_recorded(tmp_path):
    sharding = {
        "sharding_type": "NamedSharding",
        "shape": [8],
        "axis_names": ["fsdp"],
        "partition_spec": ["fsdp"],
    }
    with CheckpointWriter(tmp_path / "out") as writer:
        writer.write(("w",), np.arange(16, dtype=np.float32).reshape(8, 2), sharding=sharding)
    restored = ocp.PyTreeCheckpointer().restore(str(tmp_path / "out"))
    assert restored["w"].sharding.spec == jax.sharding.PartitionSpec("fsdp")
    assert len(restored["w"].sharding.device_set) == 8


# -- streaming ---------------------------------------------------------------------------------


@pytest.mark.parametrize("use_zarr3", [True, False])
def test_streamed_slabs_across_chunks(use_zarr3, tmp_path):
    full = np.arange(37 * 5 * 3, dtype=np.float32).reshape(37, 5, 3)
    # Tiny chunks and transactions: many chunks, slabs that straddle them, several commits.
    with CheckpointWriter(
        tmp_path / "out", use_zarr3=use_zarr3, chunk_bytes=4 * 5 * 3 * 4, max_inflight_bytes=500
    ) as writer:
        handle = writer.create(("big",), full.shape, "float32")
        assert handle.chunk_shape == (4, 5, 3)
        buffer = np.empty((6, 5, 3), np.float32)
        for start in range(0, 37, 6):
            stop = min(start + 6, 37)
            buffer[: stop - start] = full[start:stop]
            handle.write((slice(start, stop),), buffer[: stop - start])
            buffer[:] = -1  # the writer copied the slab already
        assert handle.unwritten() is None
        covered = np.zeros(full.shape, bool)
        for box in handle.written_boxes:
            covered[box] = True
        assert covered.all()
    reader = CheckpointReader(tmp_path / "out")
    _assert_same(full, reader.read(("big",)))
    _assert_same(full, ocp.PyTreeCheckpointer().restore(str(tmp_path / "out"))["big"])
    chunks = [k for k in reader.kvstore.list().result() if not k.endswith((b"json", b"zarray"))]
    assert len(chunks) == 10


def test_streamed_slabs_on_inner_axes_and_bfloat16(tmp_path):
    full = np.arange(4 * 6, dtype=np.float32).reshape(4, 6).astype(ml_dtypes.bfloat16)
    with CheckpointWriter(tmp_path / "out") as writer:
        handle = writer.create(("w",), (4, 6), ml_dtypes.bfloat16)
        handle.write((slice(None), slice(0, 3)), full[:, :3])
        handle.write((slice(None), slice(3, 6)), full[:, 3:])
    _assert_same(full, CheckpointReader(tmp_path / "out").read(("w",)))


@hypothesis.given(
    shape=st.lists(st.integers(0, 300), min_size=0, max_size=4),
    itemsize=st.sampled_from([1, 2, 4, 8]),
    max_bytes=st.integers(1, 1 << 16),
)
def test_chunk_shape_bounds(shape, itemsize, max_bytes):
    chunk = choose_chunk_shape(shape, itemsize, max_bytes)
    assert len(chunk) == len(shape)
    assert all(1 <= c <= max(1, d) for c, d in zip(chunk, shape, strict=True))
    nbytes = int(np.prod(chunk, dtype=np.int64)) * itemsize
    assert nbytes <= max(max_bytes, itemsize)
    # Leading axes are split first: once an axis is split, every later one is whole.
    split = [c < max(1, d) for c, d in zip(chunk, shape, strict=True)]
    if any(split):
        first = split.index(True)
        assert all(c == 1 for c in chunk[:first])


def test_chunks_stay_under_the_limit_for_a_large_array():
    assert choose_chunk_shape((128256, 4096), 2, 64 << 20) == (8192, 4096)
    assert choose_chunk_shape((32, 4096, 14336), 2, 64 << 20) == (1, 2340, 14336)
    assert choose_chunk_shape((), 4, 64 << 20) == ()


# -- atomicity ---------------------------------------------------------------------------------


def test_exception_inside_with_leaves_nothing(tmp_path):
    dest = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"):
        with CheckpointWriter(dest) as writer:
            writer.write(("a",), np.ones(3, np.float32))
            assert writer.temporary_location is not None
            assert writer.temporary_location.exists()
            raise RuntimeError("boom")
    assert not dest.exists()
    assert _siblings(dest) == []


def test_aborted_writer_removes_the_folders_it_created(tmp_path):
    dest = tmp_path / "run" / "3" / "items"
    with pytest.raises(RuntimeError):
        with CheckpointWriter(dest) as writer:
            writer.write(("a",), np.ones(3, np.float32))
            raise RuntimeError
    assert os.listdir(tmp_path) == []


def test_existing_destination_is_refused_without_force(tmp_path):
    dest = _write_sample(tmp_path / "out")
    before = sorted(os.listdir(dest))
    with pytest.raises(DestinationExistsError) as info:
        CheckpointWriter(dest)
    assert str(dest) in str(info.value) and "\n" not in str(info.value)
    assert sorted(os.listdir(dest)) == before


def test_force_replaces_only_once_the_new_one_is_complete(tmp_path):
    dest = _write_sample(tmp_path / "out")
    with CheckpointWriter(dest, force=True) as writer:
        writer.write(("only",), np.full(2, 5, np.int32))
        assert (dest / "_METADATA").exists()  # the old one is intact while writing
    assert list(CheckpointReader(dest).leaves()) == [("only",)]
    assert _siblings(dest) == []
    # A failing replacement keeps the old checkpoint.
    with pytest.raises(RuntimeError):
        with CheckpointWriter(dest, force=True) as writer:
            writer.write(("other",), np.ones(1, np.float32))
            raise RuntimeError
    assert list(CheckpointReader(dest).leaves()) == [("only",)]
    assert _siblings(dest) == []


def test_destination_created_meanwhile_is_not_overwritten(tmp_path):
    dest = tmp_path / "out"
    writer = CheckpointWriter(dest)
    writer.write(("a",), np.ones(3, np.float32))
    dest.mkdir()
    (dest / "mine").write_text("keep")
    with pytest.raises(DestinationExistsError):
        writer.commit()
    assert os.listdir(dest) == ["mine"]
    assert _siblings(dest) == []


_KILLED_WRITER = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from ckptconv.io import CheckpointWriter
    writer = CheckpointWriter(sys.argv[1], max_inflight_bytes=1).__enter__()
    for i in range(5):
        writer.write(("layers", str(i)), np.full((64, 64), i, np.float32))
    print(writer.temporary_location, flush=True)
    time.sleep(60)
    """
)


def test_sigkilled_writer_leaves_no_complete_looking_destination(tmp_path):
    dest = tmp_path / "out"
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    )
    child = subprocess.Popen(
        [sys.executable, "-c", _KILLED_WRITER, str(dest)],
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:
        tmp = pathlib.Path(child.stdout.readline().strip())
        assert tmp.name.startswith(".out.ckptconv-tmp-"), tmp
        assert any((tmp / "d").iterdir())  # some data reached the disk
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        child.stdout.close()
    assert not dest.exists()
    assert _siblings(dest) == [tmp.name]
    with pytest.raises(IncompleteCheckpointError):
        CheckpointReader(tmp)
    # Even renamed by hand, the folder still carries the incomplete marker.
    renamed = tmp.rename(tmp_path / "renamed")
    with pytest.raises(IncompleteCheckpointError, match="ckptconv-incomplete"):
        CheckpointReader(renamed)
    with pytest.raises(IncompleteCheckpointError):
        CheckpointReader(tmp_path)


# -- misuse ------------------------------------------------------------------------------------


def _fails(tmp_path, action, match):
    dest = tmp_path / "out"
    with pytest.raises(CheckpointWriteError, match=match) as info:
        with CheckpointWriter(dest) as writer:
            action(writer)
    assert "\n" not in str(info.value)
    assert not dest.exists() and _siblings(dest) == []


def test_partly_written_array_is_refused(tmp_path):
    def action(w):
        w.create(("a",), (4, 2), np.float32).write((slice(0, 2),), np.ones((2, 2), np.float32))

    _fails(
        tmp_path,
        action,
        r"^a: expected every element of shape \(4, 2\) written, found region \[2:4, 0:2\] "
        "unwritten$",
    )


def test_overlapping_slabs_count_once(tmp_path):
    def twice(w):
        h = w.create(("a",), (8,), np.float32)
        h.write((slice(0, 4),), np.ones(4, np.float32))
        h.write((slice(0, 4),), np.ones(4, np.float32))
        assert h.unwritten() == (slice(4, 8),)

    _fails(
        tmp_path,
        twice,
        r"^a: expected every element of shape \(8,\) written, found region \[4:8\] unwritten$",
    )


@pytest.mark.parametrize("chunk_shape", [None, (4, 3), (3, 7), (1, 1)])
def test_unaligned_overlapping_slabs_that_cover_commit(tmp_path, chunk_shape):
    full = np.arange(10 * 7, dtype=np.int32).reshape(10, 7)
    slabs = [
        (slice(0, 5), slice(0, 4)),
        (slice(3, 10), slice(0, 7)),
        (slice(0, 5), slice(2, 7)),
        (slice(1, 2), slice(1, 6)),  # inside the others
    ]
    with CheckpointWriter(tmp_path / "out") as writer:
        h = writer.create(("a",), full.shape, np.int32, chunk_shape=chunk_shape)
        for index in slabs[:2]:
            h.write(index, full[index])
        assert h.unwritten() == (slice(0, 3), slice(4, 7))
        for index in slabs[2:]:
            h.write(index, full[index])
        assert h.unwritten() is None
    _assert_same(full, CheckpointReader(tmp_path / "out").read(("a",)))


@pytest.mark.parametrize("chunk_shape", [None, (2, 3, 4), (1, 1, 1), (3, 4, 3)])
def test_a_missing_corner_is_named(tmp_path, chunk_shape):
    full = np.arange(4 * 6 * 4, dtype=np.float32).reshape(4, 6, 4)

    def action(w):
        h = w.create(("x", "w"), full.shape, np.float32, chunk_shape=chunk_shape)
        for index in [
            (slice(0, 2),),
            (slice(2, 4), slice(0, 3)),
            (slice(2, 4), slice(3, 6), slice(0, 2)),
        ]:
            h.write(index, full[index])

    _fails(tmp_path, action, r"^x/w: .* shape \(4, 6, 4\) .* region \[2:4, 3:6, 2:4\] unwritten$")


def test_scalars_must_be_written(tmp_path):
    _fails(
        tmp_path,
        lambda w: w.create(("s",), (), np.int32),
        r"^s: expected every element of shape \(\) written, found region \[\(\)\] unwritten$",
    )
    with CheckpointWriter(tmp_path / "ok") as writer:
        h = writer.create(("s",), (), np.int32)
        assert h.unwritten() == ()
        h.write((), np.int32(5))
        assert h.unwritten() is None
    assert int(CheckpointReader(tmp_path / "ok").read(("s",))) == 5


def test_zero_size_arrays_need_no_write(tmp_path):
    with CheckpointWriter(tmp_path / "out") as writer:
        writer.write(("a",), np.ones(2, np.float32))
        h = writer.create(("empty",), (0, 3), np.float32)
        assert h.unwritten() is None
        h.write((slice(0, 0),), np.ones((0, 3), np.float32))
    assert CheckpointReader(tmp_path / "out").leaves()[("empty",)].shape == (0, 3)
    # An empty slab of a non-empty array writes nothing.
    (tmp_path / "b").mkdir()
    _fails(
        tmp_path / "b",
        lambda w: w.create(("b",), (2, 3), np.float32).write(
            (slice(1, 1),), np.ones((0, 3), np.float32)
        ),
        r"region \[0:2, 0:3\] unwritten",
    )


def _brute_force(shape, slabs):
    mask = np.zeros(shape, bool)
    for index in slabs:
        mask[index] = True
    return mask


@hypothesis.settings(max_examples=300, deadline=None)
@hypothesis.given(data=st.data())
def test_coverage_is_exact(data):
    ndim = data.draw(st.integers(0, 3))
    shape = tuple(data.draw(st.lists(st.integers(0, 9), min_size=ndim, max_size=ndim)))
    chunk = tuple(data.draw(st.lists(st.integers(1, 5), min_size=ndim, max_size=ndim)))
    slabs = []
    for _ in range(data.draw(st.integers(0, 6))):
        index = []
        for d in shape:
            a, b = sorted(data.draw(st.lists(st.integers(0, d), min_size=2, max_size=2)))
            index.append(slice(a, b))
        slabs.append(tuple(index))
    coverage = Coverage(shape, chunk)
    for index in slabs:
        coverage.add(index)
    coverage = Coverage.from_json(json.loads(json.dumps(coverage.to_json())))
    mask = _brute_force(shape, slabs)
    region = coverage.unwritten()
    if mask.all():
        assert region is None
    else:
        assert region is not None and mask[region].size > 0 and not mask[region].any()
    np.testing.assert_array_equal(_brute_force(shape, coverage.boxes), mask)
    # A chunk written in part: touched by some slab and not covered.
    partial = coverage.partial_chunk()
    grid = coverage.grid
    expected = None
    for cell in np.ndindex(*grid) if all(grid) else ():
        box = tuple(
            slice(i * c, min((i + 1) * c, d)) for i, c, d in zip(cell, chunk, shape, strict=True)
        )
        touched = any(
            all(
                max(s.start, b.start) < min(s.stop, b.stop) for s, b in zip(box, index, strict=True)
            )
            for index in slabs
        )
        if touched and not mask[box].all():
            expected = box
            break
    assert partial == expected


def test_a_stream_of_chunks_stays_one_box():
    coverage = Coverage((300, 40, 6), (3, 4, 6))
    for i in range(100):
        for j in range(10):
            coverage.add((slice(3 * i, 3 * i + 3), slice(4 * j, 4 * j + 4), slice(0, 6)))
            if (i, j) == (50, 4):
                assert coverage.unwritten() == (slice(150, 300), slice(20, 40), slice(0, 6))
    assert coverage.boxes == [(slice(0, 300), slice(0, 40), slice(0, 6))]
    assert coverage.unwritten() is None


def test_chunks_in_any_order_are_checked_on_the_grid():
    coverage = Coverage((64, 64), (2, 2))
    cells = [(i, j) for i in range(32) for j in range(32) if (i, j) != (17, 5)]
    np.random.default_rng(0).shuffle(cells)
    coverage.add_chunks(cells)
    assert coverage.unwritten() == (slice(34, 36), slice(10, 12))
    coverage.add_chunks([(17, 5)])
    assert coverage.unwritten() is None
    with pytest.raises(ValueError, match="not on the chunk grid"):
        coverage.add_chunks([(32, 0)])


def test_dtype_and_shape_mismatch(tmp_path):
    _fails(
        tmp_path,
        lambda w: w.create(("a",), (2,), np.float32).write(None, np.ones(2)),
        "expected dtype float32, found float64",
    )
    _fails(
        tmp_path,
        lambda w: w.create(("a",), (4,), np.int32).write((slice(0, 2),), np.ones(3, np.int32)),
        "found data of shape",
    )
    _fails(
        tmp_path,
        lambda w: w.create(("a",), (4,), np.int32).write((slice(2, 6),), np.ones(4, np.int32)),
        "does not fit",
    )


def test_paths_written_twice_or_clashing(tmp_path):
    def twice(w):
        w.write(("a", "b"), np.ones(1, np.float32))
        w.write_empty(("a", "b"))

    def dotted(w):
        w.write(("a", "b"), np.ones(1, np.float32))
        w.write(("a.b",), np.ones(1, np.float32))

    def parent_leaf(w):
        w.write(("a",), np.ones(1, np.float32))
        w.write(("a", "b"), np.ones(1, np.float32))

    _fails(tmp_path, twice, "written twice")
    _fails(tmp_path, dotted, "already used by a/b")
    _fails(tmp_path, parent_leaf, "parent a is itself a leaf")


def test_key_types_are_checked(tmp_path):
    def gap(w):
        w.write(("l", "0"), np.ones(1, np.float32), key_types=(2, 1))
        w.write(("l", "2"), np.ones(1, np.float32), key_types=(2, 1))

    def mixed(w):
        w.write(("l", "0"), np.ones(1, np.float32), key_types=(2, 1))
        w.write(("l", "x"), np.ones(1, np.float32))

    def conflict(w):
        w.write(("l", "0", "a"), np.ones(1, np.float32), key_types=(2, 1, 2))
        w.write(("l", "0", "b"), np.ones(1, np.float32))

    _fails(tmp_path, gap, r"entries 0..1, found \['0', '2'\]")
    _fails(tmp_path, mixed, "mixes list indices and dict keys")
    _fails(tmp_path, conflict, "key type 2 here but 1")
    _fails(tmp_path, lambda w: w.write(("l", "x"), np.ones(1), key_types=(2, 1)), "not an index")
    _fails(tmp_path, lambda w: w.write(("l",), np.ones(1), key_types=(2, 2)), "expected 1 key")
    _fails(tmp_path, lambda w: w.write_empty(("l",), value_type="Tuple"), "value_type")


def test_nothing_written_is_refused(tmp_path):
    _fails(tmp_path, lambda w: w.write_empty(("a",)), "at least one array")


def test_bad_custom_metadata_is_refused(tmp_path):
    with pytest.raises(CheckpointWriteError, match="JSON-serialisable"):
        CheckpointWriter(tmp_path / "out", custom_metadata={"x": object()})


def test_writer_is_single_use(tmp_path):
    writer = CheckpointWriter(tmp_path / "out")
    writer.write(("a",), np.ones(1, np.float32))
    assert writer.commit() == writer.location
    with pytest.raises(CheckpointWriteError, match="committed"):
        writer.write(("b",), np.ones(1, np.float32))


def test_a_store_that_cannot_be_opened_leaves_nothing(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise ValueError("FAILED_PRECONDITION: cannot open\nsecond line")

    monkeypatch.setattr(writer_module, "WriteStore", refuse)
    dest = tmp_path / "out"
    with pytest.raises(CheckpointWriteError, match=r"^.*out: cannot open the OCDBT store") as e:
        with CheckpointWriter(dest) as writer:
            writer.write(("a",), np.ones(1, np.float32))
    assert "\n" not in str(e.value) and str(dest) in str(e.value)
    assert list(tmp_path.iterdir()) == []
    writer = CheckpointWriter(dest)
    with pytest.raises(CheckpointWriteError, match="cannot open the OCDBT store"):
        writer.write(("a",), np.ones(1, np.float32))
    with pytest.raises(CheckpointWriteError, match="aborted"):
        writer.commit()
    assert list(tmp_path.iterdir()) == []


# -- cloning when it pays ----------------------------------------------------------------------


def _clone_source(tmp_path):
    rng = np.random.default_rng(0)
    big = rng.standard_normal(2000).astype(np.float32)  # random: stored about as large
    small = rng.standard_normal(20).astype(np.float32)
    with CheckpointWriter(tmp_path / "src") as w:
        w.write(("big",), big)
        w.write(("small",), small)
    return open_source(tmp_path / "src"), big


def test_clone_for_clones_only_when_the_copied_arrays_hold_most_data(tmp_path):
    source, big = _clone_source(tmp_path)
    with CheckpointWriter(tmp_path / "out") as w:
        assert w.clone_for(source, [("big",)])
        w.copy_array(("b",), source, ("big",))
    np.testing.assert_array_equal(CheckpointReader(tmp_path / "out").read(("b",)), big)
    # Only the small array copied: nine tenths of the source would be carried along unused.
    with CheckpointWriter(tmp_path / "small") as w:
        assert not w.clone_for(source, [("small",)])
        assert not w.clone_for(source, [])
        assert w.clone_from(source)  # nothing was done: cloning is still possible
        w.copy_array(("s",), source, ("small",))


def test_clone_for_follows_the_limit_and_skips_sources_without_ocdbt(tmp_path, monkeypatch):
    source, _ = _clone_source(tmp_path)
    monkeypatch.setattr(store_module, "CLONE_MAX_UNUSED_FRACTION", -1.0)
    with CheckpointWriter(tmp_path / "out") as w:
        assert not w.clone_for(source, [("big",), ("small",)])
        w.write(("a",), np.ones(1, np.float32))
    monkeypatch.setattr(store_module, "CLONE_MAX_UNUSED_FRACTION", 0.1)

    class NoOcdbt:
        location = source.location

        def ocdbt_contents(self):
            raise AssertionError("a source without OCDBT has no B-tree to walk")

    with CheckpointWriter(tmp_path / "other") as w:
        assert not w.clone_for(NoOcdbt(), [("big",)])
        w.write(("a",), np.ones(1, np.float32))
