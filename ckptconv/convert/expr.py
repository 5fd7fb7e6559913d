"""Lazy array expressions: what one output leaf is, in terms of source leaves.

A conversion plan maps every output leaf to an expression over source leaves. Expressions
are computed from metadata alone (shape and dtype propagate without reading data) and are
evaluated one output leaf, or one slab of it, at a time, reading only the source slabs they
need. Every operation except :class:`Cast` is a pure data movement, so evaluation is
bit-exact.

Besides evaluation, an expression tells the converter how to avoid it: :func:`permuted_source`
recognises a source read as stored or with its axes permuted (which can be copied without
decoding), and :func:`source_chunk_box` maps the source's chunk grid into output coordinates,
so that slabs can be chosen to read whole source chunks.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from collections.abc import Callable, Sequence

import numpy as np

from ..io import KeyPath, keystr, normalize_index, numpy_dtype

ReadFn = Callable[[KeyPath, "tuple[slice | int, ...] | None"], np.ndarray]


class Expr(abc.ABC):
    """Base class of lazy array expressions; subclasses are frozen dataclasses."""

    shape: tuple[int, ...]
    dtype: str

    @abc.abstractmethod
    def sources(self) -> list[KeyPath]:
        """Returns the source leaf paths this expression reads, in order."""

    @abc.abstractmethod
    def describe(self) -> str:
        """Returns a short human-readable form, used by ``--dry-run``."""


@dataclasses.dataclass(frozen=True)
class Src(Expr):
    """A source leaf, read as stored."""

    path: KeyPath
    shape: tuple[int, ...]
    dtype: str

    def sources(self) -> list[KeyPath]:  # noqa: D102
        return [self.path]

    def describe(self) -> str:  # noqa: D102
        return keystr(self.path)


@dataclasses.dataclass(frozen=True)
class MoveAxis(Expr):
    """``np.moveaxis(x, src, dst)``."""

    x: Expr
    src: int
    dst: int

    @property
    def shape(self) -> tuple[int, ...]:  # noqa: D102
        dims = list(self.x.shape)
        d = dims.pop(self.src)
        dims.insert(self.dst, d)
        return tuple(dims)

    @property
    def dtype(self) -> str:  # noqa: D102
        return self.x.dtype

    def sources(self) -> list[KeyPath]:  # noqa: D102
        return self.x.sources()

    def describe(self) -> str:  # noqa: D102
        return f"moveaxis({self.x.describe()}, {self.src}->{self.dst})"


@dataclasses.dataclass(frozen=True)
class Take(Expr):
    """``x[..., index, ...]`` along ``axis`` (one layer of a stack)."""

    x: Expr
    axis: int
    index: int

    @property
    def shape(self) -> tuple[int, ...]:  # noqa: D102
        return self.x.shape[: self.axis] + self.x.shape[self.axis + 1 :]

    @property
    def dtype(self) -> str:  # noqa: D102
        return self.x.dtype

    def sources(self) -> list[KeyPath]:  # noqa: D102
        return self.x.sources()

    def describe(self) -> str:  # noqa: D102
        return f"take({self.x.describe()}, axis={self.axis}, index={self.index})"


@dataclasses.dataclass(frozen=True)
class Stack(Expr):
    """``np.stack(xs, axis)`` (layers into one scanned array)."""

    xs: tuple[Expr, ...]
    axis: int

    @property
    def shape(self) -> tuple[int, ...]:  # noqa: D102
        s = self.xs[0].shape
        return s[: self.axis] + (len(self.xs),) + s[self.axis :]

    @property
    def dtype(self) -> str:  # noqa: D102
        return self.xs[0].dtype

    def sources(self) -> list[KeyPath]:  # noqa: D102
        return [p for x in self.xs for p in x.sources()]

    def describe(self) -> str:  # noqa: D102
        first, last = self.xs[0].describe(), self.xs[-1].describe()
        return f"stack([{first} .. {last}] ({len(self.xs)}), axis={self.axis})"


@dataclasses.dataclass(frozen=True)
class Cast(Expr):
    """``x.astype(dtype)``: the only operation that can change bits."""

    x: Expr
    dtype: str

    @property
    def shape(self) -> tuple[int, ...]:  # noqa: D102
        return self.x.shape

    def sources(self) -> list[KeyPath]:  # noqa: D102
        return self.x.sources()

    def describe(self) -> str:  # noqa: D102
        return f"cast({self.x.describe()}, {self.dtype})"


def move_axis(x: Expr, src: int, dst: int) -> Expr:
    """Returns ``x`` with axis ``src`` moved to ``dst``, simplified."""
    if src == dst:
        return x
    if isinstance(x, MoveAxis) and x.dst == src and x.src == dst:
        return x.x
    return MoveAxis(x, src, dst)


def take(x: Expr, axis: int, index: int) -> Expr:
    """Returns layer ``index`` of ``x`` along ``axis``, simplified."""
    if isinstance(x, Stack) and x.axis == axis:
        return x.xs[index]
    return Take(x, axis, index)


def stack(xs: list[Expr], axis: int) -> Expr:
    """Returns the stack of ``xs`` along ``axis``, simplified when it undoes a split."""
    first = xs[0]
    if (
        isinstance(first, Take)
        and first.axis == axis
        and len(first.x.shape) > axis
        and first.x.shape[axis] == len(xs)
        and all(
            isinstance(x, Take) and x.x == first.x and x.axis == axis and x.index == i
            for i, x in enumerate(xs)
        )
    ):
        return first.x
    return Stack(tuple(xs), axis)


def cast(x: Expr, dtype: str) -> Expr:
    """Returns ``x`` cast to ``dtype`` (no-op when it already has that dtype)."""
    if x.dtype == dtype:
        return x
    return Cast(x, dtype)


def is_data_movement(x: Expr) -> bool:
    """Whether ``x`` only moves bytes (no cast), so its output is bit-identical to its input."""
    if isinstance(x, Cast):
        return False
    if isinstance(x, Src):
        return True
    if isinstance(x, Stack):
        return all(is_data_movement(e) for e in x.xs)
    return is_data_movement(x.x)  # type: ignore[attr-defined]


def permuted_source(x: Expr) -> tuple[Src, tuple[int, ...]] | None:
    """Returns ``(src, axes)`` when ``x`` is ``np.transpose(src, axes)``, else ``None``.

    A source read as stored gives the identity ``axes``; chains of :class:`MoveAxis` compose
    into one permutation. Anything that selects, stacks or casts values gives ``None``.

    Example:
        >>> src = Src(("params", "w"), (4, 2, 8), "float32")
        >>> permuted_source(MoveAxis(src, 1, 0))
        (Src(path=('params', 'w'), shape=(4, 2, 8), dtype='float32'), (1, 0, 2))
    """
    if isinstance(x, Src):
        return x, tuple(range(len(x.shape)))
    if isinstance(x, MoveAxis):
        inner = permuted_source(x.x)
        if inner is None:
            return None
        src, first = inner
        axes = list(range(len(x.x.shape)))
        axes.insert(x.dst, axes.pop(x.src))
        return src, tuple(first[i] for i in axes)
    return None


def source_chunk_box(x: Expr, chunk_of: Callable[[KeyPath], Sequence[int]]) -> tuple[int, ...]:
    """Returns the shape of one source chunk in ``x``'s output coordinates.

    Output slabs on this grid read whole source chunks: a source chunk is decoded once, not
    once per slab. Layer selection drops the layer axis; stacking puts one layer per box;
    for stacks and casts of several sources, the first one's chunks are used.

    Args:
        x: the expression.
        chunk_of: the stored chunk shape of a source leaf.

    Returns:
        A box shape with ``len(x.shape)`` entries, each between 1 and the axis length.
    """
    if isinstance(x, Src):
        box = tuple(chunk_of(x.path))
    elif isinstance(x, MoveAxis):
        inner = list(source_chunk_box(x.x, chunk_of))
        inner.insert(x.dst, inner.pop(x.src))
        box = tuple(inner)
    elif isinstance(x, Take):
        inner = source_chunk_box(x.x, chunk_of)
        box = inner[: x.axis] + inner[x.axis + 1 :]
    elif isinstance(x, Stack):
        inner = source_chunk_box(x.xs[0], chunk_of)
        box = inner[: x.axis] + (1,) + inner[x.axis :]
    elif isinstance(x, Cast):
        box = source_chunk_box(x.x, chunk_of)
    else:
        raise TypeError(f"unknown expression {type(x).__name__}")
    return tuple(max(1, min(int(b), d)) for b, d in zip(box, x.shape, strict=True))


def evaluate(x: Expr, read: ReadFn, *, index: Sequence[slice] | None = None) -> np.ndarray:
    """Evaluates ``x``, or one slab of it, with numpy, reading source slabs through ``read``.

    Only the source slabs the output slab depends on are read: ``index`` is mapped through
    every operation (axis moves permute it, layer selection adds the layer, stacking selects
    layers), so unstacking never loads the whole stack and a slab of a moved or stacked array
    reads one slab of each source.

    Example:
        >>> reader = CheckpointReader("ckpt")  # doctest: +SKIP
        >>> x = MoveAxis(Src(("params", "w"), (1024, 16, 4096), "float32"), 1, 0)
        >>> evaluate(x, reader.read, index=(slice(0, 4),)).shape  # doctest: +SKIP
        (4, 1024, 4096)

    Args:
        x: the expression.
        read: ``read(path, index)`` reads a source leaf, or the slab ``index`` (a tuple of
            slices with step 1, one per axis) of it when ``index`` is not None.
        index: the output slab to compute: slices with step 1, missing trailing axes taken
            whole; ``None`` computes the whole array.

    Returns:
        The array (C-contiguous), of ``x.dtype`` and ``x.shape`` (or the slab's shape).

    Raises:
        ValueError: ``index`` does not fit ``x.shape``.
    """
    full = None if index is None else normalize_index(tuple(index), x.shape)
    out = np.asarray(_evaluate(x, read, full))
    # Not np.ascontiguousarray: it turns a 0-d array into a 1-d one.
    return out if out.flags.c_contiguous else np.array(out, order="C")


def _whole(shape: tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(slice(0, d) for d in shape)


def _evaluate(x: Expr, read: ReadFn, index: tuple[slice, ...] | None) -> np.ndarray:
    """:func:`evaluate` on an explicit index (one in-bounds slice per axis) or ``None``."""
    if isinstance(x, Src):
        return np.asarray(read(x.path, index))
    if isinstance(x, Take):
        outer = _whole(x.shape) if index is None else index
        inner = outer[: x.axis] + (slice(x.index, x.index + 1),) + outer[x.axis :]
        return np.squeeze(_evaluate(x.x, read, inner), axis=x.axis)
    if isinstance(x, MoveAxis):
        inner = None
        if index is not None:
            axes = list(range(len(x.shape)))
            axes.insert(x.dst, axes.pop(x.src))  # output axis k is input axis axes[k]
            slices = [slice(0, 0)] * len(axes)
            for k, a in enumerate(axes):
                slices[a] = index[k]
            inner = tuple(slices)
        return np.moveaxis(_evaluate(x.x, read, inner), x.src, x.dst)
    if isinstance(x, Stack):
        if index is None:
            return np.stack([_evaluate(e, read, None) for e in x.xs], axis=x.axis)
        layers = index[x.axis]
        rest = index[: x.axis] + index[x.axis + 1 :]
        parts = [_evaluate(x.xs[i], read, rest) for i in range(layers.start, layers.stop)]
        if not parts:
            shape = tuple(s.stop - s.start for s in index)
            return np.empty(shape, numpy_dtype(x.dtype))
        return np.stack(parts, axis=x.axis)
    if isinstance(x, Cast):
        return _evaluate(x.x, read, index).astype(numpy_dtype(x.dtype))
    raise TypeError(f"unknown expression {type(x).__name__}")


def slab_boxes(shape: Sequence[int], box: Sequence[int]) -> list[tuple[slice, ...]]:
    """Returns the slabs of a regular grid of ``box``-shaped cells over ``shape``, in C order.

    Example:
        >>> slab_boxes((5, 4), (2, 4))[-1]
        (slice(4, 5, None), slice(0, 4, None))
    """
    counts = [math.ceil(d / b) if d else 0 for d, b in zip(shape, box, strict=True)]
    out = []
    for cell in np.ndindex(*counts):
        out.append(
            tuple(
                slice(c * b, min(d, (c + 1) * b)) for c, b, d in zip(cell, box, shape, strict=True)
            )
        )
    return out
