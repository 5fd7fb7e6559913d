"""Parts of large chunks: streamed in C order (decoded once, never whole), or decoded once."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest
import tensorstore as ts

from ckptconv.errors import CheckpointFormatError
from ckptconv.io import CheckpointReader, CheckpointWriter, _stream, normalize_index
from ckptconv.io._permute import ChunkKeys


@pytest.fixture(autouse=True)
def small_chunks_stream(monkeypatch):
    monkeypatch.setattr(_stream, "STREAM_BYTES", 256)
    monkeypatch.setattr(_stream, "READ_BYTES", 64)


ZSTD3 = [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "zstd"}]
CODECS = {
    "zarr3-zstd": (3, {"codecs": ZSTD3}),
    "zarr3-raw-big-endian": (
        3,
        {"codecs": [{"name": "bytes", "configuration": {"endian": "big"}}]},
    ),
    "zarr3-one-chunk-shard": (3, "shard"),
    "zarr2-zstd": (2, {"compressor": {"id": "zstd", "level": 1}}),
    "zarr2-none": (2, {"compressor": None}),
}
HELD = {
    "zarr2-blosc": (
        2,
        {"compressor": {"id": "blosc", "cname": "lz4", "clevel": 5, "shuffle": 1}},
    ),
    "zarr2-F-order": (2, {"order": "F", "compressor": {"id": "zstd", "level": 1}}),
    "zarr3-transpose": (
        3,
        {"codecs": [{"name": "transpose", "configuration": {"order": [1, 0, 2]}}, *ZSTD3]},
    ),
}


def _write(tmp_path, version, extra, data, chunk):
    kv = {"driver": "file", "path": str(tmp_path / "arr")}
    dtype = data.dtype.name
    if version == 2:
        meta = {"shape": data.shape, "chunks": chunk, "dtype": _zarr2_dtype(data.dtype), **extra}
        spec = {"driver": "zarr", "kvstore": kv, "metadata": meta}
    else:
        meta = {"shape": data.shape, "data_type": dtype}
        if extra == "shard":
            meta["chunk_grid"] = {"name": "regular", "configuration": {"chunk_shape": chunk}}
            meta["codecs"] = [
                {
                    "name": "sharding_indexed",
                    "configuration": {
                        "chunk_shape": chunk,
                        "codecs": ZSTD3,
                        "index_codecs": [{"name": "bytes"}, {"name": "crc32c"}],
                    },
                }
            ]
        else:
            meta["chunk_grid"] = {"name": "regular", "configuration": {"chunk_shape": chunk}}
            meta.update(extra)
        spec = {"driver": "zarr3", "kvstore": kv, "metadata": meta}
    store = ts.open(spec, create=True).result()
    store.write(data).result()
    doc_name = ".zarray" if version == 2 else "zarr.json"
    doc = json.loads((tmp_path / "arr" / doc_name).read_text())
    kvstore = ts.KvStore.open({"driver": "file", "path": str(tmp_path) + "/"}).result()
    return store, doc, kvstore


def _zarr2_dtype(dtype):
    return "bfloat16" if dtype == ml_dtypes.bfloat16 else dtype.str


def _array(store, doc, version, chunk):
    codec, reason = _stream.chunk_codec(doc, zarr3=version == 3)
    keys = ChunkKeys(doc, zarr3=version == 3)
    return _stream.StoredArray(
        name="arr",
        shape=tuple(store.shape),
        chunk=tuple(chunk),
        itemsize=store.dtype.numpy_dtype.itemsize,
        codec=codec,
        reason=reason,
        key_of=lambda cell: "arr/" + keys.format(cell),
    )


def _rows(shape, chunk, rows):
    """C-contiguous pieces of ``rows`` rows of axis 0, chunk by chunk (as the schedule cuts)."""
    out = []
    for c0 in range(0, shape[0], chunk[0]):
        for c1 in range(0, shape[1], chunk[1]):
            for r in range(c0, min(shape[0], c0 + chunk[0]), rows):
                stop = min(r + rows, c0 + chunk[0], shape[0])
                out.append((slice(r, stop), slice(c1, min(shape[1], c1 + chunk[1]))))
    return out


def _reads(reads, array):
    def read(box, read_box):
        return reads.read(array, normalize_index(box, array.shape), read_box)

    return read


DTYPES = [np.float32, ml_dtypes.bfloat16, np.int32]


def _data(shape, dtype):
    return (np.arange(np.prod(shape)).reshape(shape) % 251 - 100).astype(dtype)


@pytest.mark.parametrize("name", sorted(CODECS))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_streamable_chunks_are_read_piece_by_piece_without_decoding_them_whole(
    tmp_path, monkeypatch, name, dtype
):
    version, extra = CODECS[name]
    shape, chunk = (21, 10, 3), [8, 10, 3]  # edge chunk along axis 0 (stored padded)
    data = _data(shape, dtype)
    store, doc, kvstore = _write(tmp_path, version, extra, data, chunk)
    array = _array(store, doc, version, chunk)
    assert array.codec is not None, array.reason
    opened = []
    real = _stream._Stream
    monkeypatch.setattr(_stream, "_Stream", lambda *a: opened.append(a[1]) or real(*a))
    reads = _stream.ChunkReads(kvstore)
    read = _reads(reads, array)

    def never(box):
        raise AssertionError(f"decoded {box} through TensorStore")

    for box in _rows(shape, chunk, 3):
        got = read(box, never)
        assert got.dtype == np.dtype(dtype) and got.dtype.isnative
        np.testing.assert_array_equal(got, data[box])
    # One stream per chunk: each chunk decoded once, front to back.
    assert opened == [array.key_of((i, 0, 0)) for i in range(3)]
    # Single rows of one row (axis 1 pieces) are C-contiguous too.
    for j in range(0, 10, 4):
        box = (slice(9, 10), slice(j, min(10, j + 4)))
        np.testing.assert_array_equal(read(box, never), data[box])


@pytest.mark.parametrize("name", sorted(HELD))
def test_other_codecs_and_scattered_pieces_decode_each_chunk_once(tmp_path, name):
    version, extra = HELD[name]
    shape, chunk = (16, 12, 2), [8, 12, 2]
    data = _data(shape, np.float32)
    store, doc, kvstore = _write(tmp_path, version, extra, data, chunk)
    array = _array(store, doc, version, chunk)
    assert array.codec is None and array.reason
    decoded = []

    def whole(box):
        decoded.append(box)
        return np.asarray(store[box].read().result())

    read = _reads(_stream.ChunkReads(kvstore), array)
    boxes = [(slice(r, r + 2), slice(c, c + 6)) for r in range(0, 16, 2) for c in (0, 6)]
    for box in boxes:
        np.testing.assert_array_equal(read(box, whole), data[box])
    assert decoded == [
        (slice(0, 8), slice(0, 12), slice(0, 2)),
        (slice(8, 16), slice(0, 12), slice(0, 2)),
    ]


def test_a_read_going_back_restarts_the_stream_and_stays_exact(tmp_path):
    shape, chunk = (16, 8), [16, 8]
    data = _data(shape, np.float32)
    store, doc, kvstore = _write(tmp_path, 3, {"codecs": ZSTD3}, data, chunk)
    array = _array(store, doc, 3, chunk)
    read = _reads(_stream.ChunkReads(kvstore), array)
    for rows in [(8, 12), (12, 16), (0, 4), (10, 11)]:
        box = (slice(*rows), slice(0, 8))
        np.testing.assert_array_equal(read(box, None), data[box])


def test_whole_chunks_and_small_chunks_are_left_to_tensorstore(tmp_path, monkeypatch):
    data = _data((16, 8), np.float32)
    store, doc, kvstore = _write(tmp_path, 3, {"codecs": ZSTD3}, data, [8, 8])
    array = _array(store, doc, 3, [8, 8])
    read = _reads(_stream.ChunkReads(kvstore), array)
    assert read((slice(0, 8), slice(0, 8)), None) is None  # a whole chunk
    assert read((slice(4, 12), slice(0, 8)), None) is None  # spans two chunks
    monkeypatch.setattr(_stream, "STREAM_BYTES", 1 << 20)
    assert read((slice(0, 2), slice(0, 8)), None) is None  # a small chunk


def test_a_truncated_chunk_is_one_error_naming_the_array(tmp_path, monkeypatch):
    values = _data((64, 16), np.float32)
    path = tmp_path / "ckpt"
    with CheckpointWriter(path, use_zarr3=True, use_ocdbt=False) as w:
        h = w.create(("params", "w"), values.shape, "float32", chunk_shape=values.shape)
        h.write(None, values)
    reader = CheckpointReader(path)
    chunk_file = next(
        p for p in (path / "params.w").rglob("*") if p.is_file() and "zarr" not in p.name
    )
    raw = chunk_file.read_bytes()
    chunk_file.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointFormatError, match=r"params\.w|params/w|'params', 'w'"):
        for r in range(0, 64, 8):
            reader.read(("params", "w"), (slice(r, r + 8),))


def test_the_reader_streams_parts_of_a_large_chunk(tmp_path, monkeypatch):
    values = _data((64, 16), np.float32)
    path = tmp_path / "ckpt"
    with CheckpointWriter(path, use_zarr3=True) as w:
        h = w.create(("params", "w"), values.shape, "float32", chunk_shape=values.shape)
        h.write(None, values)
    reader = CheckpointReader(path)
    opened = []
    real = _stream._Stream
    monkeypatch.setattr(_stream, "_Stream", lambda *a: opened.append(a[1]) or real(*a))
    got = np.concatenate(
        [reader.read(("params", "w"), (slice(r, r + 8),)) for r in range(0, 64, 8)]
    )
    np.testing.assert_array_equal(got, values)
    assert len(opened) == 1
