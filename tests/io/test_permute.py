"""Axis permutations expressed in zarr metadata over unchanged chunk bytes."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest
import tensorstore as ts
from hypothesis import given, settings
from hypothesis import strategies as st

from ckptconv.io import _permute
from ckptconv.io._zarr import array_spec


def _store(kv: ts.KvStore, key: str, zarr3: bool) -> ts.TensorStore:
    return ts.open(
        {"driver": "zarr3" if zarr3 else "zarr", "fill_missing_data_reads": False},
        kvstore=kv / f"{key}/",
        open=True,
    ).result()


def _write(kv, key, data, chunk, zarr3, inner=None):
    spec = array_spec(data.shape, np.dtype(data.dtype).name, chunk, use_zarr3=zarr3)
    if zarr3 and inner is not None:
        spec["metadata"]["codecs"][0]["configuration"]["chunk_shape"] = list(inner)
    ts.open(spec, kvstore=kv / f"{key}/", create=True).result().write(data).result()


def _permute_copy(kv, src, dst, perm, zarr3):
    """Copies every key of ``src`` to ``dst`` verbatim, with permuted metadata and chunk keys."""
    doc_name = "zarr.json" if zarr3 else ".zarray"
    doc = json.loads(kv[f"{src}/{doc_name}"])
    new = _permute.permuted_metadata(doc, perm, zarr3=zarr3)
    if new is None:
        return None
    keys = _permute.ChunkKeys(doc, zarr3=zarr3)
    for raw in (kv / f"{src}/").list().result():
        name = raw.decode()
        if name == doc_name:
            continue
        index = keys.parse(name)
        assert index is not None, name
        kv[f"{dst}/{keys.format(_permute.permute(index, perm))}"] = kv[f"{src}/{name}"]
    kv[f"{dst}/{doc_name}"] = json.dumps(new).encode()
    return new


@st.composite
def arrays_and_perms(draw):
    ndim = draw(st.integers(1, 4))
    shape = tuple(draw(st.integers(1, 6)) for _ in range(ndim))
    chunk = tuple(draw(st.integers(1, d)) for d in shape)
    perm = tuple(draw(st.permutations(range(ndim))))
    perm2 = tuple(draw(st.permutations(range(ndim))))
    sharded_inner = draw(st.booleans())
    return shape, chunk, perm, perm2, sharded_inner


@settings(max_examples=60, deadline=None)
@given(arrays_and_perms())
def test_zarr3_permutation_over_verbatim_chunks_reads_as_transpose(case):
    shape, chunk, perm, perm2, sharded_inner = case
    kv = ts.KvStore.open("memory://").result()
    data = np.arange(np.prod(shape), dtype=np.int32).reshape(shape)
    inner = tuple(max(1, c // 2) for c in chunk) if sharded_inner else None
    if inner is not None and any(c % i for c, i in zip(chunk, inner, strict=True)):
        inner = None
    _write(kv, "a", data, chunk, True, inner)
    _permute_copy(kv, "a", "b", perm, True)
    once = np.transpose(data, perm)
    np.testing.assert_array_equal(_store(kv, "b", True).read().result(), once)
    # Permuting a permuted array composes the orders: one transpose codec, never two.
    doc = _permute_copy(kv, "b", "c", perm2, True)
    assert [c["name"] for c in doc["codecs"]].count("transpose") <= 1
    np.testing.assert_array_equal(_store(kv, "c", True).read().result(), np.transpose(once, perm2))


def test_zarr3_inverse_permutation_restores_the_original_metadata():
    kv = ts.KvStore.open("memory://").result()
    data = np.arange(4 * 3 * 5, dtype=np.float32).reshape(4, 3, 5)
    _write(kv, "a", data, (2, 3, 5), True)
    _permute_copy(kv, "a", "b", (1, 0, 2), True)
    back = _permute_copy(kv, "b", "c", (1, 0, 2), True)
    assert back == json.loads(kv["a/zarr.json"])
    keys = kv.list().result()
    assert {k[2:] for k in keys if k.startswith(b"a/")} == {
        k[2:] for k in keys if k.startswith(b"c/")
    }


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16, np.int8])
def test_zarr2_reversal_uses_fortran_order(dtype):
    kv = ts.KvStore.open("memory://").result()
    data = (np.arange(6 * 4) - 7).astype(dtype).reshape(6, 4)
    _write(kv, "a", data, (4, 4), False)
    doc = _permute_copy(kv, "a", "b", (1, 0), False)
    assert doc["order"] == "F" and doc["shape"] == [4, 6] and doc["chunks"] == [4, 4]
    out = _store(kv, "b", False).read().result()
    assert out.dtype == data.dtype
    np.testing.assert_array_equal(out, data.T)
    back = _permute_copy(kv, "b", "c", (1, 0), False)
    assert back["order"] == "C"
    np.testing.assert_array_equal(_store(kv, "c", False).read().result(), data)


def test_zarr2_cannot_express_other_permutations():
    doc = {"shape": [2, 3, 4], "chunks": [2, 3, 4], "order": "C", "dimension_separator": "."}
    assert _permute.permuted_metadata(doc, (1, 0, 2), zarr3=False) is None
    assert _permute.permuted_metadata(doc, (2, 1, 0), zarr3=False)["order"] == "F"
    assert _permute.permuted_metadata(doc, (0, 1, 2), zarr3=False) == doc


def test_permutation_is_checked():
    doc = {"shape": [2, 3], "chunks": [2, 3], "order": "C"}
    with pytest.raises(ValueError, match="permutation of 2 axes"):
        _permute.permuted_metadata(doc, (0, 0), zarr3=False)


@pytest.mark.parametrize(
    ("doc", "zarr3", "key", "index"),
    [
        ({"shape": [4, 4]}, True, "c/1/2", (1, 2)),
        ({"shape": []}, True, "c", ()),
        ({"shape": [4, 4], "chunk_key_encoding": {"name": "v2"}}, True, "1.2", (1, 2)),
        (
            {
                "shape": [4, 4],
                "chunk_key_encoding": {"name": "default", "configuration": {"separator": "."}},
            },
            True,
            "c.1.2",
            (1, 2),
        ),
        ({"shape": [4, 4]}, False, "1.2", (1, 2)),
        ({"shape": [4, 4], "dimension_separator": "/"}, False, "1/2", (1, 2)),
        ({"shape": []}, False, "0", ()),
    ],
)
def test_chunk_keys_round_trip(doc, zarr3, key, index):
    keys = _permute.ChunkKeys(doc, zarr3=zarr3)
    assert keys.parse(key) == index
    assert keys.format(index) == key
    assert keys.parse("zarr.json") is None and keys.parse(".zattrs") is None


def test_compose_matches_numpy():
    a, b = (1, 2, 0, 3), (3, 0, 2, 1)
    y = np.arange(120).reshape(2, 3, 4, 5)
    np.testing.assert_array_equal(
        np.transpose(np.transpose(y, a), b), np.transpose(y, _permute.compose(a, b))
    )
    assert _permute.compose(a, _permute.inverse(a)) == (0, 1, 2, 3)
