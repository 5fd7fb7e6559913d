"""Flax msgpack sources: fixtures written by flax's and transformers' own conventions."""

import concurrent.futures
import gc
import itertools
import json
import math
import os
import tracemalloc

import jax
import jax.numpy as jnp
import ml_dtypes
import msgpack
import numpy as np
import optax
import pytest
from flax import config as flax_config
from flax import linen as nn
from flax import serialization
from flax.training import checkpoints, train_state

from ckptconv.convert.layouts import detect_layout
from ckptconv.errors import CheckpointFormatError, CkptconvError, LayoutError
from ckptconv.io import Leaf, Location
from ckptconv.io._format import numpy_dtype
from ckptconv.io.sources import CheckpointSource
from ckptconv.io.sources import _msgpack_scan as scan
from ckptconv.io.sources.msgpack import (
    CHUNKED_KEY,
    FLAX_WEIGHTS_INDEX_NAME,
    FLAX_WEIGHTS_NAME,
    FORMAT,
    SLAB_BYTES,
    MsgpackSource,
    latest_step_name,
)


@pytest.fixture
def legacy_flax():
    """Flax's msgpack checkpointing (Orbax off) for one test, restored afterwards."""
    with flax_config.temp_flip_flag("use_orbax_checkpointing", False):
        yield


# -- helpers -----------------------------------------------------------------------------------


def flat_restored(tree, path=()):
    """``{path: value or None}`` of what ``msgpack_restore`` returned (empty nodes: None)."""
    if isinstance(tree, dict):
        if not tree:
            return {path: None}
        out = {}
        for k, v in tree.items():
            out.update(flat_restored(v, (*path, str(k))))
        return out
    if isinstance(tree, (list, tuple)):
        if not tree:
            return {path: None}
        out = {}
        for i, v in enumerate(tree):
            out.update(flat_restored(v, (*path, str(i))))
        return out
    return {path: None if tree is None else np.asarray(tree)}


def assert_same_bits(got: np.ndarray, want: np.ndarray, where=""):
    assert isinstance(got, np.ndarray), where
    assert got.dtype == want.dtype, where
    assert got.shape == want.shape, where
    assert got.tobytes() == np.ascontiguousarray(want).tobytes(), where


def boxes(shape, chunk, rng, extra=6):
    """The chunk_shape grid of ``shape`` plus random boxes (some empty, some 1-wide)."""
    starts = [range(0, max(d, 1), max(c, 1)) for d, c in zip(shape, chunk, strict=True)]
    out = [
        tuple(slice(s, min(s + c, d)) for s, c, d in zip(corner, chunk, shape, strict=True))
        for corner in itertools.product(*starts)
    ]
    for _ in range(extra):
        box = []
        for d in shape:
            a = int(rng.integers(0, d + 1))
            box.append(slice(a, int(rng.integers(a, d + 1))))
        out.append(tuple(box))
    return out


def check_against_restore(src, raw_files, rng, gda_values=None):
    """Every leaf of ``src`` equals msgpack_restore's, whole and slab by slab, bit for bit."""
    want = {}
    for raw in raw_files:
        want.update(flat_restored(serialization.msgpack_restore(raw)))
    want.update(gda_values or {})
    leaves = src.leaves()
    assert set(leaves) == set(want)
    for path, value in want.items():
        leaf = leaves[path]
        if value is None:
            assert leaf == Leaf(path, None, None)
            continue
        assert (leaf.shape, numpy_dtype(leaf.dtype)) == (value.shape, value.dtype), path
        assert_same_bits(src.read(path), value, path)
        for box in boxes(value.shape, src.chunk_shape(path), rng):
            assert_same_bits(src.read(path, box), value[box], (path, box))
    return leaves


def error_of(fn, *args):
    with pytest.raises(CheckpointFormatError) as e:
        fn(*args)
    message = str(e.value)
    assert "\n" not in message
    assert isinstance(e.value, CkptconvError)
    return message


# -- flax.training.checkpoints: a TrainState, several steps --------------------------------------


class _Model(nn.Module):
    @nn.compact
    def __call__(self, x, train=True):
        x = nn.Dense(5)(x)
        return nn.BatchNorm(use_running_average=not train)(x)


class _State(train_state.TrainState):
    batch_stats: dict


def _train_state(step):
    model = _Model()
    variables = model.init(jax.random.key(0), jnp.ones((2, 3)))
    state = _State.create(
        apply_fn=model.apply,
        params=variables["params"],
        tx=optax.adamw(1e-3),
        batch_stats=variables["batch_stats"],
    )
    grads = jax.tree_util.tree_map(jnp.ones_like, state.params)
    state = state.apply_gradients(grads=grads)  # mu, nu and count become non-trivial
    return state.replace(step=step)


def test_train_state_latest_step_as_flax_picks_it(tmp_path, legacy_flax):
    for step in (1, 2, 10):
        checkpoints.save_checkpoint(tmp_path, _train_state(step), step=step, keep=5)
    # Leftovers Flax skips: its temporary file, a GDA folder, Orbax's temporary folder.
    (tmp_path / "checkpoint_tmp").write_bytes(b"\x81\xa1a\xc0")
    (tmp_path / "checkpoint_11_gda").mkdir()
    (tmp_path / "checkpoint_12.orbax-checkpoint-tmp-3").mkdir()

    assert MsgpackSource.detect(tmp_path) and FORMAT.detect(Location.parse(tmp_path))
    src = FORMAT.open(Location.parse(tmp_path))
    assert isinstance(src, CheckpointSource)
    assert src.location == Location.parse(checkpoints.latest_checkpoint(tmp_path))
    assert src.location.name == "checkpoint_10"
    assert (src.format_name, src.use_zarr3, src.custom_metadata) == ("msgpack", True, {})

    raw = (tmp_path / "checkpoint_10").read_bytes()
    leaves = check_against_restore(src, [raw], np.random.default_rng(0))
    # The TrainState layout, as Orbax's reader shows it.
    assert leaves[("step",)] == Leaf(("step",), (), "int64")
    assert int(src.read(("step",))) == 10
    assert leaves[("params", "Dense_0", "kernel")] == Leaf(
        ("params", "Dense_0", "kernel"), (3, 5), "float32"
    )
    assert leaves[("opt_state", "0", "count")].shape == ()
    assert leaves[("opt_state", "0", "mu", "Dense_0", "kernel")].shape == (3, 5)
    assert leaves[("opt_state", "1")].empty and leaves[("opt_state", "2")].empty
    assert leaves[("batch_stats", "BatchNorm_0", "mean")].shape == (5,)
    assert src.ext_metadata(("params", "Dense_0", "kernel")) is None
    assert detect_layout(leaves).name == "flax"  # the same layout as Orbax's TrainState

    # A step file named directly is read as it is.
    older = MsgpackSource(tmp_path / "checkpoint_2")
    assert int(older.read(("step",))) == 2


def test_latest_step_name_is_numeric_not_lexicographic():
    names = ["checkpoint_9", "checkpoint_10", "checkpoint_1e1x", "checkpoint_tmp", "other_99"]
    assert latest_step_name(names) == "checkpoint_10"
    assert latest_step_name(["checkpoint_0.5", "checkpoint_-1", "checkpoint_0.25"]) == (
        "checkpoint_0.5"
    )
    assert latest_step_name(["checkpoint_tmp", "checkpoint_3_gda"]) is None


def test_latest_step_that_is_an_orbax_folder_is_not_msgpack(tmp_path):
    (tmp_path / "checkpoint_1").write_bytes(serialization.to_bytes({"a": np.ones(2)}))
    (tmp_path / "checkpoint_2").mkdir()  # Flax with Orbax on writes folders
    assert not MsgpackSource.detect(tmp_path)
    message = error_of(MsgpackSource, tmp_path)
    assert str(tmp_path) in message and "checkpoint_2" in message and "folder" in message


# -- flax.serialization.to_bytes: one file, every kind of leaf ------------------------------------


def _params():
    rng = np.random.default_rng(1)
    return {
        "Dense_0": {
            "kernel": rng.standard_normal((7, 5)).astype(np.float32),
            "bias": jnp.asarray(rng.standard_normal(5), jnp.bfloat16),
        },
        "ids": np.arange(24, dtype=np.int32).reshape(2, 3, 4) - 7,
        "bytes": rng.integers(0, 256, (3, 9), dtype=np.uint8),
        "half": rng.standard_normal((4,)).astype(np.float16),
        "flags": np.array([True, False, True]),
        "np_scalar": np.float32(2.5),
        "zero_size": np.zeros((0, 3), np.float32),
        "layers": [np.full((2,), 3, np.int8), {"w": np.ones((1, 2), np.float64)}],
        "py_int": 7,
        "py_big": 2**63 + 5,
        "py_float": 0.1,
        "py_bool": True,
        "py_complex": 1.5 - 2j,
        "nothing": None,
        "empty": {},
    }


def test_to_bytes_single_file_every_leaf_kind(tmp_path):
    raw = serialization.to_bytes(_params())
    (tmp_path / FLAX_WEIGHTS_NAME).write_bytes(raw)
    (tmp_path / "config.json").write_text("{}")
    for where in (tmp_path, tmp_path / FLAX_WEIGHTS_NAME):
        assert MsgpackSource.detect(where)
        with MsgpackSource(where) as src:
            assert src.location.name == FLAX_WEIGHTS_NAME
            leaves = check_against_restore(src, [raw], np.random.default_rng(2))
    assert leaves[("Dense_0", "bias")].dtype == "bfloat16"
    assert leaves[("np_scalar",)] == Leaf(("np_scalar",), (), "float32")
    assert leaves[("layers", "0")] == Leaf(("layers", "0"), (2,), "int8")
    assert leaves[("py_int",)] == Leaf(("py_int",), (), "int64")
    assert leaves[("py_big",)] == Leaf(("py_big",), (), "uint64")
    assert leaves[("py_float",)] == Leaf(("py_float",), (), "float64")
    assert leaves[("py_complex",)] == Leaf(("py_complex",), (), "complex128")
    assert leaves[("nothing",)].empty and leaves[("empty",)].empty
    assert leaves[("zero_size",)].shape == (0, 3)


def test_a_root_array_is_the_leaf_at_the_root(tmp_path):
    value = np.arange(6, dtype=np.int32).reshape(3, 2)
    (tmp_path / "w.msgpack").write_bytes(serialization.msgpack_serialize(value))
    src = MsgpackSource(tmp_path / "w.msgpack")
    assert src.leaves() == {(): Leaf((), (3, 2), "int32")}
    assert_same_bits(src.read((), (slice(1, 3),)), value[1:3])


def test_slabs_in_every_position_of_a_3d_array(tmp_path):
    value = np.arange(5 * 6 * 7, dtype=np.int32).reshape(5, 6, 7)
    (tmp_path / "f.msgpack").write_bytes(serialization.to_bytes({"v": value}))
    src = MsgpackSource(tmp_path / "f.msgpack")
    for box in boxes(value.shape, (2, 4, 3), np.random.default_rng(3), extra=40):
        assert_same_bits(src.read(("v",), box), value[box], box)
    assert_same_bits(src.read(("v",), (slice(-2, None),)), value[-2:])


def test_read_errors_name_the_leaf(tmp_path):
    (tmp_path / "f.msgpack").write_bytes(serialization.to_bytes({"a": np.ones(3), "n": None}))
    src = MsgpackSource(tmp_path / "f.msgpack")
    with pytest.raises(LayoutError, match="no leaf b/c"):
        src.read(("b", "c"))
    with pytest.raises(LayoutError, match="leaf n is empty"):
        src.read(("n",))
    with pytest.raises(LayoutError, match=r"does not fit array a of shape \(3,\)"):
        src.read(("a",), (slice(0, 4),))
    with pytest.raises(LayoutError, match="no leaf x"):
        src.ext_metadata(("x",))


def test_chunk_shape_is_a_contiguous_block_of_about_8_mib(tmp_path):
    tree = {"rows": np.zeros((9000, 1024), np.uint8), "deep": np.zeros((2, 3000, 4096), np.uint8)}
    tree["small"] = np.zeros((3, 4), np.float32)
    (tmp_path / "f.msgpack").write_bytes(serialization.to_bytes(tree))
    src = MsgpackSource(tmp_path / "f.msgpack")
    assert src.chunk_shape(("rows",)) == (SLAB_BYTES // 1024, 1024)
    assert src.chunk_shape(("deep",)) == (1, SLAB_BYTES // 4096, 4096)
    assert src.chunk_shape(("small",)) == (3, 4)


# -- Hugging Face: sharded with an index ---------------------------------------------------------


def _write_sharded(folder, params, groups, sep="/"):
    """Writes shards as transformers' save_pretrained does (to_bytes of unflattened sub-dicts)."""
    from flax.traverse_util import flatten_dict, unflatten_dict

    flat = flatten_dict(params, sep="/")
    weight_map, raws = {}, []
    for i, names in enumerate(groups):
        shard = f"flax_model-{i + 1:05d}-of-{len(groups):05d}.msgpack"
        raw = serialization.to_bytes(unflatten_dict({k: flat[k] for k in names}, sep="/"))
        (folder / shard).write_bytes(raw)
        raws.append(raw)
        weight_map.update({k.replace("/", sep): shard for k in names})
    total = sum(v.nbytes for v in flat.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / FLAX_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True))
    return raws


def _hf_params():
    rng = np.random.default_rng(4)
    return {
        "embed": {"embedding": rng.standard_normal((11, 4)).astype(np.float32)},
        "h": {
            "0": {"kernel": rng.standard_normal((4, 4)).astype(ml_dtypes.bfloat16)},
            "1": {"kernel": rng.standard_normal((4, 4)).astype(np.float32)},
        },
        "ln": {"scale": np.ones(4, np.float32)},
    }


@pytest.mark.parametrize("sep", ["/", "."])
def test_sharded_index_reads_every_shard(tmp_path, sep):
    groups = [["embed/embedding", "h/0/kernel"], ["h/1/kernel", "ln/scale"]]
    raws = _write_sharded(tmp_path, _hf_params(), groups, sep)
    for where in (tmp_path, tmp_path / FLAX_WEIGHTS_INDEX_NAME):
        assert MsgpackSource.detect(where)
        src = MsgpackSource(where)
        assert src.location.name == FLAX_WEIGHTS_INDEX_NAME
        assert [f.name for f in src.files] == [
            "flax_model-00001-of-00002.msgpack",
            "flax_model-00002-of-00002.msgpack",
        ]
        check_against_restore(src, raws, np.random.default_rng(5))
    assert MsgpackSource.detect(tmp_path / "flax_model-00002-of-00002.msgpack")


def test_the_single_file_wins_over_the_index_as_in_transformers(tmp_path):
    _write_sharded(tmp_path, _hf_params(), [["embed/embedding"], ["h/0/kernel", "h/1/kernel"]])
    (tmp_path / FLAX_WEIGHTS_NAME).write_bytes(serialization.to_bytes({"only": np.ones(2)}))
    assert set(MsgpackSource(tmp_path).leaves()) == {("only",)}


def test_index_naming_a_missing_shard(tmp_path):
    _write_sharded(tmp_path, _hf_params(), [["embed/embedding", "ln/scale"], ["h/0/kernel"]])
    (tmp_path / "flax_model-00002-of-00002.msgpack").unlink()
    message = error_of(MsgpackSource, tmp_path)
    assert str(tmp_path / FLAX_WEIGHTS_INDEX_NAME) in message
    assert "'flax_model-00002-of-00002.msgpack'" in message and "h/0/kernel" in message


def test_index_whose_shard_lacks_a_listed_weight(tmp_path):
    _write_sharded(tmp_path, _hf_params(), [["embed/embedding"], ["ln/scale"]])
    index = json.loads((tmp_path / FLAX_WEIGHTS_INDEX_NAME).read_text())
    index["weight_map"]["h/9/kernel"] = "flax_model-00001-of-00002.msgpack"
    (tmp_path / FLAX_WEIGHTS_INDEX_NAME).write_text(json.dumps(index))
    message = error_of(MsgpackSource, tmp_path)
    assert "'h/9/kernel'" in message and "flax_model-00001-of-00002.msgpack" in message


def test_index_that_is_not_an_index(tmp_path):
    (tmp_path / FLAX_WEIGHTS_INDEX_NAME).write_text('{"metadata": {}}')
    message = error_of(MsgpackSource, tmp_path)
    assert FLAX_WEIGHTS_INDEX_NAME in message and "weight_map" in message


# -- chunked arrays (above MAX_CHUNK_SIZE) -------------------------------------------------------


def test_chunked_arrays_are_one_leaf_of_full_shape(tmp_path, monkeypatch):
    monkeypatch.setattr(serialization, "MAX_CHUNK_SIZE", 256)
    rng = np.random.default_rng(6)
    tree = {
        "big": rng.standard_normal((37, 11)).astype(np.float32),  # 7 chunks, the last partial
        "bf16": rng.standard_normal((5, 9, 13)).astype(ml_dtypes.bfloat16),
        "small": np.arange(8, dtype=np.int32),  # 32 bytes: not chunked
    }
    raw = serialization.to_bytes(tree)
    stored = msgpack.unpackb(raw, strict_map_key=False, ext_hook=lambda c, d: None)
    assert stored["big"][CHUNKED_KEY] is True and len(stored["big"]["chunks"]) == 7
    assert CHUNKED_KEY in stored["bf16"] and CHUNKED_KEY not in str(stored["small"])
    path = tmp_path / "checkpoint_3"
    path.write_bytes(raw)
    src = MsgpackSource(path)
    leaves = check_against_restore(src, [raw], rng)
    assert leaves[("big",)] == Leaf(("big",), (37, 11), "float32")
    for box in boxes((5, 9, 13), (2, 2, 5), rng, extra=30):
        assert_same_bits(src.read(("bf16",), box), tree["bf16"][box], box)


def test_concurrent_slab_reads(tmp_path, monkeypatch):
    monkeypatch.setattr(serialization, "MAX_CHUNK_SIZE", 1000)
    value = np.random.default_rng(8).standard_normal((64, 33)).astype(np.float32)
    (tmp_path / "f.msgpack").write_bytes(serialization.to_bytes({"w": value}))
    src = MsgpackSource(tmp_path / "f.msgpack")
    rows = [(slice(i, min(i + 3, 64)),) for i in range(0, 64, 3)] * 8
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda box: src.read(("w",), box), rows))
    for box, got in zip(rows, results, strict=True):
        assert_same_bits(got, value[box], box)


def test_chunked_array_with_wrong_total(tmp_path):
    chunks = {"0": msgpack.ExtType(1, serialization._ndarray_to_bytes(np.ones(3, np.float32)))}
    doc = {"w": {CHUNKED_KEY: True, "shape": {"0": 2, "1": 2}, "chunks": chunks}}
    (tmp_path / "f.msgpack").write_bytes(msgpack.packb(doc))
    message = error_of(MsgpackSource, tmp_path / "f.msgpack")
    assert "chunked array w" in message and "needs 4 elements, found 3" in message


# -- multi-process arrays: //GDAPlaceholder: and checkpoint_<step>_gda/ ---------------------------


def test_gda_placeholders_read_from_tensorstore(tmp_path, legacy_flax, monkeypatch):
    # One process holds every shard, so Flax would inline these arrays; treating every
    # jax.Array as multi-process makes save_checkpoint_multiprocess write them exactly as it
    # does on several hosts (placeholders plus TensorStore arrays in checkpoint_<step>_gda/).
    from jax.experimental.array_serialization.serialization import GlobalAsyncCheckpointManager
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    monkeypatch.setattr(checkpoints, "_is_multiprocess_array", lambda v: isinstance(v, jax.Array))
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("a", "b"))
    w = np.arange(64 * 6, dtype=np.float32).reshape(64, 6) / 7
    b = np.arange(16).astype(ml_dtypes.bfloat16)
    tree = {
        "params": {
            "w": jax.device_put(w, NamedSharding(mesh, P("a", "b"))),
            "v": {"b": jax.device_put(b, NamedSharding(mesh, P("a")))},
            "inline": np.arange(3, dtype=np.int32),
        },
        "step": 3,
    }
    manager = GlobalAsyncCheckpointManager()
    path = checkpoints.save_checkpoint_multiprocess(tmp_path, tree, step=3, gda_manager=manager)
    manager.wait_until_finished()
    assert (tmp_path / "checkpoint_3_gda" / "params" / "w" / ".zarray").exists()
    raw = (tmp_path / "checkpoint_3").read_bytes()
    assert b"//GDAPlaceholder:params/w" in raw

    src = MsgpackSource(tmp_path)
    assert src.location == Location.parse(path)
    gda = {("params", "w"): w, ("params", "v", "b"): b}
    want_inline = {
        k: v for k, v in flat_restored(serialization.msgpack_restore(raw)).items() if k not in gda
    }
    leaves = check_against_restore(src, [], np.random.default_rng(7), {**want_inline, **gda})
    assert leaves[("params", "v", "b")] == Leaf(("params", "v", "b"), (16,), "bfloat16")
    assert src.chunk_shape(("params", "w")) == (16, 3)  # the zarr chunks: one shard each

    # A placeholder whose array is gone.
    import shutil

    shutil.rmtree(tmp_path / "checkpoint_3_gda" / "params" / "w")
    message = error_of(lambda: MsgpackSource(tmp_path).leaves())
    assert "params/w" in message and "//GDAPlaceholder:params/w" in message


# -- bad input -----------------------------------------------------------------------------------


def test_truncated_at_every_byte_names_the_file(tmp_path):
    raw = serialization.to_bytes(_params())
    path = tmp_path / "checkpoint_1"
    messages = []
    for cut in range(len(raw)):
        path.write_bytes(raw[:cut])
        messages.append(error_of(MsgpackSource, path))
        assert messages[-1].startswith(f"{path}: "), messages[-1]
    assert any("truncated msgpack data" in m for m in messages)
    assert any("but the file ends at byte" in m for m in messages)


def test_truncated_between_entries_says_what_was_expected(tmp_path):
    raw = serialization.to_bytes({"step": 3, "params": {"w": np.ones(2)}})
    cut = raw.index(b"\xa6params") + 7  # right after the key: its value is missing
    (tmp_path / "f.msgpack").write_bytes(raw[:cut])
    message = error_of(MsgpackSource, tmp_path / "f.msgpack")
    assert message == (
        f"{tmp_path / 'f.msgpack'}: truncated msgpack data (at params): expected a msgpack "
        f"value at byte {cut}, found the end of the file at byte {cut}"
    )


def test_array_whose_declared_size_overruns_the_file(tmp_path):
    raw = serialization.to_bytes({"a": np.ones(3), "w": np.zeros((100, 100), np.float32)})
    cut = len(raw) - 5000
    (tmp_path / "f.msgpack").write_bytes(raw[:cut])
    message = error_of(MsgpackSource, tmp_path / "f.msgpack")
    assert "an ext (ndarray) at byte" in message and "(at w)" in message
    assert f"but the file ends at byte {cut}" in message


def test_array_bytes_overrunning_their_payload(tmp_path):
    inner = msgpack.packb(((2, 2), "float32", b"\0" * 16), use_bin_type=True)
    bad = inner[:-16]  # the bin declares 16 bytes, the ext holds none of them
    (tmp_path / "f.msgpack").write_bytes(msgpack.packb({"w": msgpack.ExtType(1, bad)}))
    message = error_of(MsgpackSource, tmp_path / "f.msgpack")
    assert "ndarray payload of the ext at byte" in message and "declares 16 bytes" in message


def test_array_bytes_that_do_not_match_the_shape(tmp_path):
    inner = msgpack.packb(((2, 3), "float32", b"\0" * 16), use_bin_type=True)
    (tmp_path / "f.msgpack").write_bytes(msgpack.packb({"w": msgpack.ExtType(1, inner)}))
    message = error_of(MsgpackSource, tmp_path / "f.msgpack")
    assert "shape (2, 3) of float32 needs 24 bytes, found 16" in message


def test_unknown_extension_type(tmp_path):
    raw = msgpack.packb({"params": {"w": msgpack.ExtType(42, b"xyz")}})
    (tmp_path / "f.msgpack").write_bytes(raw)
    message = error_of(MsgpackSource, tmp_path / "f.msgpack")
    assert str(tmp_path / "f.msgpack") in message
    assert "expected a Flax msgpack extension type" in message
    assert "found extension type 42" in message and "params/w" in message


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"", "expected a msgpack value at byte 0, found the end of the file at byte 0"),
        (b"\x81\xa1a\xc1", "found 0xc1"),
        (b"\x80\x00", "found 1 more bytes"),
        (b"\xdf\xff\xff\xff\xff", "map at byte 0 declares 4294967295 entries, at least"),
        (msgpack.packb({"a": "hello"}), "found the string 'hello'"),
        (msgpack.packb({"a": b"xy"}, use_bin_type=True), "found a msgpack bin of 2 bytes"),
        (msgpack.packb({"a": "PLACEHOLDER://a"}), "older Orbax item's tree file"),
        (msgpack.packb({b"\xff": 1}, use_bin_type=True), "expected a UTF-8 map key"),
        (
            msgpack.packb({"w": msgpack.ExtType(1, msgpack.packb(((1,), "object", b"x")))}),
            "expected a numeric dtype name",
        ),
        (b"\x91" * 300 + b"\xc0", "expected at most 200 nested maps and arrays"),
    ],
)
def test_malformed_documents(tmp_path, raw, expected):
    (tmp_path / "checkpoint_1").write_bytes(raw)
    message = error_of(MsgpackSource, tmp_path / "checkpoint_1")
    assert message.startswith(f"{tmp_path / 'checkpoint_1'}: ")
    assert expected in message


def test_nothing_there(tmp_path):
    assert "found nothing" in error_of(MsgpackSource, tmp_path / "missing")
    assert "found none" in error_of(MsgpackSource, tmp_path)
    assert "on a local disk" in error_of(MsgpackSource, "memory://ckpt/checkpoint_1")


def test_detect_never_raises_and_claims_only_msgpack(tmp_path):
    (tmp_path / "orbax").mkdir()
    (tmp_path / "orbax" / "_METADATA").write_text("{}")
    (tmp_path / "notes.json").write_text('{"a": 1}')
    (tmp_path / "zeros.bin").write_bytes(b"\x00" * 16)
    (tmp_path / "weights.bin").write_bytes(serialization.to_bytes({"a": np.ones(1)}))
    for where in ("orbax", "notes.json", "zeros.bin", "missing", ""):
        assert not MsgpackSource.detect(tmp_path / where), where
    assert MsgpackSource.detect(tmp_path / "weights.bin")
    assert not MsgpackSource.detect("memory://nothing/here")


def test_walker_skips_payloads_without_copying():
    value = np.arange(1000, dtype=np.float32)
    raw = serialization.to_bytes({"a": {"b": value}, "c": [1, -3, 2.5, None, True]})
    tree = scan.scan(memoryview(raw), "x")
    ref = tree["a"]["b"]
    assert isinstance(ref, scan.ArrayRef) and (ref.shape, ref.dtype) == ((1000,), "float32")
    assert raw[ref.offset : ref.offset + ref.nbytes] == value.tobytes()
    assert tree["c"] == {"0": 1, "1": -3, "2": 2.5, "3": None, "4": True}
    ints = msgpack.packb([0, 127, -32, -33, 255, 65535, 2**32 - 1, 2**64 - 1, -(2**63), 1.0])
    assert scan.scan(ints, "x") == msgpack.unpackb(ints)
    long = {"s" * 40: "t" * 70000, "m": {str(i): i for i in range(70000)}}
    doc = scan.scan(msgpack.packb(long), "x")
    assert doc["s" * 40].length == 70000 and len(doc["m"]) == 70000


# -- memory: a ~200 MB file read slab by slab ----------------------------------------------------


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc for RSS")
def test_memory_stays_at_the_slab_size_not_the_file_size(tmp_path, monkeypatch):
    monkeypatch.setattr(serialization, "MAX_CHUNK_SIZE", 64 << 20)
    shapes = {"emb": (20000, 2048), "plain": (5, 1000, 2048)}  # 164 MB chunked, 41 MB plain
    path = tmp_path / "checkpoint_1"
    tree = {k: np.arange(math.prod(s), dtype=np.int32).reshape(s) for k, s in shapes.items()}
    path.write_bytes(serialization.to_bytes(tree))
    del tree
    gc.collect()
    size = path.stat().st_size
    assert size > 200e6
    with open(path, "rb") as f:
        assert CHUNKED_KEY.encode() in f.read(4096)  # "emb" is stored in chunks

    baseline = _rss_bytes()
    tracemalloc.start()
    try:
        src = MsgpackSource(path)
        peak_rss = 0
        for name, shape in shapes.items():
            chunk = src.chunk_shape((name,))
            inner = math.prod(shape[1:])
            for start in range(0, shape[0], chunk[0]):
                stop = min(start + chunk[0], shape[0])
                got = src.read((name,), (slice(start, stop),))
                want = np.arange(start * inner, stop * inner, dtype=np.int32).reshape(got.shape)
                assert np.array_equal(got, want), (name, start)
                del got, want
                peak_rss = max(peak_rss, _rss_bytes() - baseline)
        _, peak_traced = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    slab = SLAB_BYTES
    assert peak_traced < 4 * slab < size / 5, peak_traced
    assert peak_rss < size / 4, (peak_rss, size)
