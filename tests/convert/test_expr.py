"""Expressions: slab evaluation, permuted sources and source chunk boxes."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ckptconv.convert.expr import (
    Cast,
    Concat,
    MoveAxis,
    Reshape,
    Slice,
    Src,
    Stack,
    Take,
    Transpose,
    concat,
    evaluate,
    move_axis,
    permuted_source,
    slab_boxes,
    source_chunk_box,
)


class Store:
    """Arrays by path, read like CheckpointReader.read, recording every slab read."""

    def __init__(self, arrays):
        self.arrays = arrays
        self.reads = []

    def read(self, path, index=None):
        self.reads.append((path, index))
        a = self.arrays[path]
        return a if index is None else a[index]


def numpy_eval(x, arrays):
    """The reference: numpy on whole arrays."""
    if isinstance(x, Src):
        return arrays[x.path]
    if isinstance(x, MoveAxis):
        return np.moveaxis(numpy_eval(x.x, arrays), x.src, x.dst)
    if isinstance(x, Take):
        return np.take(numpy_eval(x.x, arrays), x.index, axis=x.axis)
    if isinstance(x, Stack):
        return np.stack([numpy_eval(e, arrays) for e in x.xs], axis=x.axis)
    if isinstance(x, Transpose):
        return np.transpose(numpy_eval(x.x, arrays), x.perm)
    if isinstance(x, Reshape):
        return numpy_eval(x.x, arrays).reshape(x.shape)
    if isinstance(x, Slice):
        return np.take(numpy_eval(x.x, arrays), range(x.start, x.stop), axis=x.axis)
    if isinstance(x, Concat):
        return np.concatenate([numpy_eval(e, arrays) for e in x.xs], axis=x.axis)
    if isinstance(x, Cast):
        dtype = ml_dtypes.bfloat16 if x.dtype == "bfloat16" else x.dtype
        return numpy_eval(x.x, arrays).astype(dtype)
    raise TypeError(x)


@st.composite
def expressions(draw):
    """A random expression over random sources, with its arrays."""
    arrays = {}
    shape = tuple(draw(st.integers(1, 4)) for _ in range(draw(st.integers(1, 3))))

    def source(shape):
        path = (f"s{len(arrays)}",)
        arrays[path] = np.arange(np.prod(shape), dtype=np.float32).reshape(shape) + len(arrays)
        return Src(path, shape, "float32")

    n = draw(st.integers(1, 3))
    x = Stack(tuple(source(shape) for _ in range(n)), draw(st.integers(0, len(shape))))
    if n == 1 and draw(st.booleans()):
        x = x.xs[0]
    for _ in range(draw(st.integers(0, 4))):
        nd = len(x.shape)
        op = draw(st.sampled_from(["move", "take", "cast", "transpose", "reshape", "split"]))
        if op == "transpose":
            x = Transpose(x, tuple(draw(st.permutations(range(nd)))))
        elif op == "reshape":
            x = Reshape(x, _factor(draw, int(np.prod(x.shape))))
        elif op == "split" and x.shape[0] > 1:
            cut = draw(st.integers(1, x.shape[0] - 1))
            parts = [Slice(x, 0, 0, cut), Slice(x, 0, cut, x.shape[0])]
            keep = draw(st.sampled_from(["first", "second", "concat"]))
            x = {"first": parts[0], "second": parts[1], "concat": Concat(tuple(parts), 0)}[keep]
        elif op == "move" and nd > 1:
            x = MoveAxis(x, draw(st.integers(0, nd - 1)), draw(st.integers(0, nd - 1)))
        elif op == "take" and nd > 1:
            axis = draw(st.integers(0, nd - 1))
            x = Take(x, axis, draw(st.integers(0, x.shape[axis] - 1)))
        elif op == "cast" and x.dtype == "float32":
            x = Cast(x, "bfloat16")
    index = tuple(
        slice(a, draw(st.integers(a + 1, d)))
        for d in x.shape
        for a in [draw(st.integers(0, d - 1))]
    )
    return x, arrays, index


def _factor(draw, n: int) -> tuple[int, ...]:
    """A random shape with ``n`` elements, size-1 axes included."""
    dims = []
    while n > 1:
        d = draw(st.sampled_from([k for k in range(2, n + 1) if n % k == 0]))
        dims.append(d)
        n //= d
    if draw(st.booleans()):
        dims.insert(draw(st.integers(0, len(dims))), 1)
    return tuple(dims) or (1,)


@settings(max_examples=300, deadline=None)
@given(expressions())
def test_slab_evaluation_equals_slicing_the_whole(case):
    x, arrays, index = case
    whole = numpy_eval(x, arrays)
    assert evaluate(x, Store(arrays).read).tobytes() == np.ascontiguousarray(whole).tobytes()
    slab = evaluate(x, Store(arrays).read, index=index)
    expected = whole[index]
    assert slab.shape == expected.shape and slab.dtype == expected.dtype
    assert slab.tobytes() == np.ascontiguousarray(expected).tobytes()
    assert slab.flags.c_contiguous


def test_a_slab_reads_only_the_source_slab_it_needs():
    src = Src(("w",), (4, 6, 8), "float32")
    store = Store({("w",): np.zeros((4, 6, 8), np.float32)})
    evaluate(Take(MoveAxis(src, 1, 0), 0, 2), store.read, index=(slice(1, 3),))
    assert store.reads == [(("w",), (slice(1, 3), slice(2, 3), slice(0, 8)))]


def test_a_reshape_slab_reads_one_box_not_the_whole_array():
    src = Src(("w",), (8, 12), "float32")
    arrays = {("w",): np.arange(96, dtype=np.float32).reshape(8, 12)}
    store = Store(arrays)
    x = Reshape(src, (8, 3, 4))
    out = evaluate(x, store.read, index=(slice(2, 4), slice(1, 2)))
    np.testing.assert_array_equal(out, arrays[("w",)].reshape(8, 3, 4)[2:4, 1:2])
    assert store.reads == [(("w",), (slice(2, 4), slice(4, 8)))]
    merged = Reshape(src, (96,))
    store.reads.clear()
    evaluate(merged, store.read, index=(slice(30, 40),))
    assert store.reads == [(("w",), (slice(2, 4), slice(0, 12)))]


def test_concat_of_a_split_is_the_source_itself():
    src = Src(("w",), (6, 2), "float32")
    parts = [Slice(src, 0, 0, 2), Slice(src, 0, 2, 6)]
    assert concat(parts, 0) == src
    assert concat(parts[::-1], 0) != src


def test_scalar_results_stay_scalars():
    src = Src(("c",), (3,), "int32")
    store = Store({("c",): np.array([5, 6, 7], np.int32)})
    out = evaluate(Take(src, 0, 1), store.read)
    assert out.shape == () and int(out) == 6
    assert evaluate(Take(src, 0, 1), store.read, index=()).shape == ()


def test_index_outside_the_shape_is_refused():
    src = Src(("w",), (4,), "float32")
    with pytest.raises(ValueError, match="outside"):
        evaluate(src, Store({("w",): np.zeros(4, np.float32)}).read, index=(slice(0, 9),))


def test_permuted_source_composes_axis_moves():
    src = Src(("w",), (2, 3, 4, 5), "float32")
    x = np.arange(120).reshape(2, 3, 4, 5)
    expr = MoveAxis(MoveAxis(MoveAxis(src, 1, 0), 3, 1), 0, 2)
    found, axes = permuted_source(expr)
    assert found == src
    expected = np.moveaxis(np.moveaxis(np.moveaxis(x, 1, 0), 3, 1), 0, 2)
    np.testing.assert_array_equal(np.transpose(x, axes), expected)
    assert permuted_source(src) == (src, (0, 1, 2, 3))
    assert permuted_source(move_axis(move_axis(src, 1, 0), 0, 1)) == (src, (0, 1, 2, 3))
    assert permuted_source(Take(src, 0, 0)) is None
    assert permuted_source(Cast(src, "bfloat16")) is None
    assert permuted_source(Stack((src, src), 0)) is None


def test_source_chunk_box_follows_every_operation():
    chunks = {("a",): (2, 3, 4), ("b",): (5, 6)}
    a, b = Src(("a",), (8, 6, 4), "float32"), Src(("b",), (10, 12), "float32")
    assert source_chunk_box(a, chunks.get) == (2, 3, 4)
    assert source_chunk_box(MoveAxis(a, 2, 0), chunks.get) == (4, 2, 3)
    assert source_chunk_box(Take(a, 1, 0), chunks.get) == (2, 4)
    assert source_chunk_box(Stack((b, b, b), 1), chunks.get) == (5, 1, 6)
    assert source_chunk_box(Cast(b, "bfloat16"), chunks.get) == (5, 6)
    assert source_chunk_box(Transpose(a, (1, 2, 0)), chunks.get) == (3, 4, 2)
    assert source_chunk_box(Slice(a, 0, 2, 6), chunks.get) == (2, 3, 4)
    # merging the two trailing axes of a chunk that holds them whole keeps its rows
    assert source_chunk_box(
        Reshape(Src(("c",), (8, 6, 4), "f"), (8, 24)), {("c",): (2, 6, 4)}.get
    ) == (2, 24)
    assert source_chunk_box(Reshape(b, (10, 3, 4)), chunks.get) == (5, 1, 4)
    # a chunk larger than the array (zarr2 pads edge chunks) is clipped
    assert source_chunk_box(Src(("c",), (3,), "int8"), {("c",): (8,)}.get) == (3,)


@pytest.mark.parametrize(("shape", "box"), [((5, 4), (2, 4)), ((7, 3, 2), (3, 2, 2)), ((), ())])
def test_slab_boxes_tile_the_array_once(shape, box):
    seen = np.zeros(shape, np.int32)
    for index in slab_boxes(shape, box):
        seen[index] += 1
    assert (seen == 1).all()
