"""Chunks larger than the slab budget are decoded once, streamed in rows, never held whole."""

from __future__ import annotations

import collections

import ml_dtypes
import numpy as np
import pytest

from ckptconv.convert import ConvertOptions, compare, convert
from ckptconv.convert.expr import MoveAxis, Src
from ckptconv.convert.schedule import streamed_slabs
from ckptconv.io import CheckpointReader, CheckpointWriter, _stream
from ckptconv.testing import scanned_maxtext_shapes

pytestmark = pytest.mark.filterwarnings("ignore:Sharding info not provided")

E, L, M, V = 8, 3, 12, 10
SLAB = 256  # bytes: every kernel's single chunk holds several slabs


def build(path, *, zarr3: bool, dtype) -> dict:
    """A scanned MaxText-layout checkpoint, every array one chunk, with AdamW mu/nu."""
    rng = np.random.default_rng(0)
    arrays = {}
    with CheckpointWriter(
        path, use_zarr3=zarr3, chunk_bytes=1 << 30, custom_metadata={"scan_layers": True}
    ) as w:
        for root in [("params", "params"), ("opt_state", "0", "mu", "params")]:
            for rel, shape in scanned_maxtext_shapes(emb=E, layers=L, mlp=M, vocab=V).items():
                key = (*root, *rel)
                types = (2,) * len(key) if root[0] == "params" else (2, 1) + (2,) * (len(key) - 2)
                x = (rng.standard_normal(shape) * 30).astype(dtype)
                w.write(key, x, key_types=types)
                arrays[key] = x
        w.write(("opt_state", "0", "count"), np.array(5, np.int32), key_types=(2, 1, 2))
        w.write(("step",), np.array(5, np.int32))
    return arrays


@pytest.fixture
def streams(monkeypatch):
    """Counts the streams opened per chunk key; decoding a large chunk whole fails."""
    monkeypatch.setattr(_stream, "STREAM_BYTES", 1)
    monkeypatch.setattr(_stream, "READ_BYTES", 64)
    opened = collections.Counter()
    real = _stream._Stream
    monkeypatch.setattr(_stream, "_Stream", lambda *a: opened.update([a[1]]) or real(*a))

    def held(self, array, *args):
        raise AssertionError(f"{array.name}: a large chunk was decoded whole")

    monkeypatch.setattr(_stream.ChunkReads, "_from_held", held)
    return opened


CASES = {
    "unscan": lambda dtype: ConvertOptions(scan_layers=False),
    "cast": lambda dtype: ConvertOptions(
        dtype="float32" if dtype == ml_dtypes.bfloat16 else "bfloat16"
    ),
}


@pytest.mark.parametrize("zarr3", [True, False], ids=["zarr3", "zarr2"])
@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_each_large_chunk_is_streamed_once(tmp_path, streams, zarr3, dtype, case):
    arrays = build(tmp_path / "src", zarr3=zarr3, dtype=dtype)
    options = CASES[case](dtype)
    # The reference: slabs of whole chunks (nothing streamed), every leaf decoded.
    convert(tmp_path / "src", tmp_path / "ref", options=options, fast=False)
    assert not streams
    convert(tmp_path / "src", tmp_path / "out", options=options, slab_bytes=SLAB)
    reader = CheckpointReader(tmp_path / "src")
    large = {
        reader.stored_array(k).key_of((0,) * x.ndim)
        for k, x in arrays.items()
        if x.size * max(x.itemsize, 4 if options.dtype == "float32" else 0) > SLAB
        and (case == "cast" or "layers" in k)  # an unscan copies the other arrays
    }
    assert large and set(streams) == large, "every large chunk streamed, nothing else"
    assert all(n == 1 for n in streams.values()), streams
    result = compare(tmp_path / "ref", tmp_path / "out")
    assert result.bit_exact, result


def test_the_reference_decode_path_streams_too(tmp_path, streams):
    build(tmp_path / "src", zarr3=True, dtype=np.float32)
    convert(tmp_path / "src", tmp_path / "out", fast=False, slab_bytes=SLAB)
    assert streams and all(n == 1 for n in streams.values())
    assert compare(tmp_path / "src", tmp_path / "out").bit_exact


def test_streamed_slabs_cut_each_chunk_in_c_order_and_permute_them():
    src = Src(("w",), (10, 3, 4), "float32")  # 480 bytes in chunks of (4, 3, 4): 192 bytes
    slabs = streamed_slabs(MoveAxis(src, 1, 0), lambda p: (4, 3, 4), 96)
    as_src = [(b[1], b[0], b[2]) for b in slabs]
    assert [(s[0].start, s[0].stop) for s in as_src] == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10)]
    assert all(s[1:] == (slice(0, 3), slice(0, 4)) for s in as_src)
    assert streamed_slabs(src, lambda p: (4, 3, 4), 192) is None  # chunks fit: whole chunks
