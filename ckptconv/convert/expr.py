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
from ._reshape import evaluate_reshape, reshape_box

ReadFn = Callable[[KeyPath, "tuple[slice | int, ...] | None"], np.ndarray]


class Expr(abc.ABC):
    """Base class of lazy array expressions; subclasses are frozen dataclasses.

    Each node knows its shape and dtype from metadata, the source chunk box in its own
    coordinates (:meth:`box`) and how to compute one slab of itself (:meth:`slab`).
    """

    shape: tuple[int, ...]
    dtype: str

    def children(self) -> tuple[Expr, ...]:
        """Returns the expressions this one reads."""
        return ()

    def sources(self) -> list[KeyPath]:
        """Returns the source leaf paths this expression reads, in order."""
        return [p for c in self.children() for p in c.sources()]

    @abc.abstractmethod
    def describe(self) -> str:
        """Returns a short human-readable form, used by ``--dry-run``."""

    @abc.abstractmethod
    def box(self, chunk_of: Callable[[KeyPath], Sequence[int]]) -> tuple[int, ...]:
        """Returns one source chunk's shape in this expression's coordinates (unclipped)."""

    @abc.abstractmethod
    def slab(self, read: ReadFn, index: tuple[slice, ...] | None) -> np.ndarray:
        """Computes the slab ``index`` (one in-bounds slice per axis), or all when None."""


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

    def box(self, chunk_of):  # noqa: D102
        return tuple(chunk_of(self.path))

    def slab(self, read, index):  # noqa: D102
        return np.asarray(read(self.path, index))


class _Unary(Expr):
    """An operation on one expression ``x`` that keeps its dtype."""

    x: Expr

    def children(self) -> tuple[Expr, ...]:  # noqa: D102
        return (self.x,)

    @property
    def dtype(self) -> str:  # noqa: D102
        return self.x.dtype


class _Permute(_Unary):
    """``np.transpose(x, axes)``: output axis ``k`` is input axis ``axes()[k]``."""

    @abc.abstractmethod
    def axes(self) -> tuple[int, ...]:
        """Returns the permutation, as ``np.transpose`` takes it."""

    @property
    def shape(self) -> tuple[int, ...]:  # noqa: D102
        return tuple(self.x.shape[a] for a in self.axes())

    def box(self, chunk_of):  # noqa: D102
        inner = source_chunk_box(self.x, chunk_of)
        return tuple(inner[a] for a in self.axes())

    def slab(self, read, index):  # noqa: D102
        axes = self.axes()
        inner = None
        if index is not None:
            slices = [slice(0, 0)] * len(axes)
            for k, a in enumerate(axes):
                slices[a] = index[k]
            inner = tuple(slices)
        return np.transpose(self.x.slab(read, inner), axes)


@dataclasses.dataclass(frozen=True)
class MoveAxis(_Permute):
    """``np.moveaxis(x, src, dst)``."""

    x: Expr
    src: int
    dst: int

    def axes(self) -> tuple[int, ...]:  # noqa: D102
        axes = list(range(len(self.x.shape)))
        axes.insert(self.dst, axes.pop(self.src))
        return tuple(axes)

    def describe(self) -> str:  # noqa: D102
        return f"moveaxis({self.x.describe()}, {self.src}->{self.dst})"


@dataclasses.dataclass(frozen=True)
class Transpose(_Permute):
    """``np.transpose(x, perm)``."""

    x: Expr
    perm: tuple[int, ...]

    def axes(self) -> tuple[int, ...]:  # noqa: D102
        return self.perm

    def describe(self) -> str:  # noqa: D102
        return f"transpose({self.x.describe()}, {list(self.perm)})"


@dataclasses.dataclass(frozen=True)
class Take(_Unary):
    """``x[..., index, ...]`` along ``axis`` (one layer of a stack)."""

    x: Expr
    axis: int
    index: int

    @property
    def shape(self) -> tuple[int, ...]:  # noqa: D102
        return self.x.shape[: self.axis] + self.x.shape[self.axis + 1 :]

    def describe(self) -> str:  # noqa: D102
        return f"take({self.x.describe()}, axis={self.axis}, index={self.index})"

    def box(self, chunk_of):  # noqa: D102
        inner = source_chunk_box(self.x, chunk_of)
        return inner[: self.axis] + inner[self.axis + 1 :]

    def slab(self, read, index):  # noqa: D102
        outer = _whole(self.shape) if index is None else index
        inner = outer[: self.axis] + (slice(self.index, self.index + 1),) + outer[self.axis :]
        return np.squeeze(self.x.slab(read, inner), axis=self.axis)


@dataclasses.dataclass(frozen=True)
class Slice(_Unary):
    """``x[..., start:stop, ...]`` along ``axis`` (one part of a split)."""

    x: Expr
    axis: int
    start: int
    stop: int

    @property
    def shape(self) -> tuple[int, ...]:  # noqa: D102
        s = self.x.shape
        return s[: self.axis] + (self.stop - self.start,) + s[self.axis + 1 :]

    def describe(self) -> str:  # noqa: D102
        return f"slice({self.x.describe()}, axis={self.axis}, {self.start}:{self.stop})"

    def box(self, chunk_of):  # noqa: D102
        return source_chunk_box(self.x, chunk_of)

    def slab(self, read, index):  # noqa: D102
        outer = list(_whole(self.shape) if index is None else index)
        cut = outer[self.axis]
        outer[self.axis] = slice(cut.start + self.start, cut.stop + self.start)
        return self.x.slab(read, tuple(outer))


@dataclasses.dataclass(frozen=True)
class Reshape(_Unary):
    """``x.reshape(shape)`` in C order (merges or splits axes)."""

    x: Expr
    shape: tuple[int, ...]

    def describe(self) -> str:  # noqa: D102
        return f"reshape({self.x.describe()}, {list(self.shape)})"

    def box(self, chunk_of):  # noqa: D102
        if not math.prod(self.shape):
            return self.shape
        return reshape_box(self.x.shape, self.shape, source_chunk_box(self.x, chunk_of))

    def slab(self, read, index):  # noqa: D102
        if index is None or not math.prod(self.shape):
            whole = self.x.slab(read, None).reshape(self.shape)
            return whole if index is None else whole[index]
        return evaluate_reshape(
            self.x.shape, self.shape, index, lambda inner: self.x.slab(read, inner)
        )


@dataclasses.dataclass(frozen=True)
class Cast(Expr):
    """``x.astype(dtype)``: the only operation that can change bits."""

    x: Expr
    dtype: str

    def children(self) -> tuple[Expr, ...]:  # noqa: D102
        return (self.x,)

    @property
    def shape(self) -> tuple[int, ...]:  # noqa: D102
        return self.x.shape

    def describe(self) -> str:  # noqa: D102
        return f"cast({self.x.describe()}, {self.dtype})"

    def box(self, chunk_of):  # noqa: D102
        return source_chunk_box(self.x, chunk_of)

    def slab(self, read, index):  # noqa: D102
        return self.x.slab(read, index).astype(numpy_dtype(self.dtype))


@dataclasses.dataclass(frozen=True)
class _Many(Expr):
    """An operation joining several expressions of one dtype along ``axis``."""

    xs: tuple[Expr, ...]
    axis: int

    def children(self) -> tuple[Expr, ...]:  # noqa: D102
        return self.xs

    @property
    def dtype(self) -> str:  # noqa: D102
        return self.xs[0].dtype

    def _empty(self, index: tuple[slice, ...]) -> np.ndarray:
        return np.empty(tuple(s.stop - s.start for s in index), numpy_dtype(self.dtype))


@dataclasses.dataclass(frozen=True)
class Stack(_Many):
    """``np.stack(xs, axis)`` (layers into one scanned array)."""

    @property
    def shape(self) -> tuple[int, ...]:  # noqa: D102
        s = self.xs[0].shape
        return s[: self.axis] + (len(self.xs),) + s[self.axis :]

    def describe(self) -> str:  # noqa: D102
        first, last = self.xs[0].describe(), self.xs[-1].describe()
        return f"stack([{first} .. {last}] ({len(self.xs)}), axis={self.axis})"

    def box(self, chunk_of):  # noqa: D102
        inner = source_chunk_box(self.xs[0], chunk_of)
        return inner[: self.axis] + (1,) + inner[self.axis :]

    def slab(self, read, index):  # noqa: D102
        if index is None:
            return np.stack([e.slab(read, None) for e in self.xs], axis=self.axis)
        layers = index[self.axis]
        rest = index[: self.axis] + index[self.axis + 1 :]
        parts = [self.xs[i].slab(read, rest) for i in range(layers.start, layers.stop)]
        return np.stack(parts, axis=self.axis) if parts else self._empty(index)


@dataclasses.dataclass(frozen=True)
class Concat(_Many):
    """``np.concatenate(xs, axis)`` (the inverse of a split)."""

    @property
    def shape(self) -> tuple[int, ...]:  # noqa: D102
        s = self.xs[0].shape
        n = sum(x.shape[self.axis] for x in self.xs)
        return s[: self.axis] + (n,) + s[self.axis + 1 :]

    def describe(self) -> str:  # noqa: D102
        parts = ", ".join(x.describe() for x in self.xs)
        return f"concat([{parts}], axis={self.axis})"

    def box(self, chunk_of):  # noqa: D102
        return source_chunk_box(self.xs[0], chunk_of)

    def slab(self, read, index):  # noqa: D102
        if index is None:
            return np.concatenate([e.slab(read, None) for e in self.xs], axis=self.axis)
        cut, parts, offset = index[self.axis], [], 0
        for x in self.xs:
            n = x.shape[self.axis]
            lo, hi = max(cut.start, offset), min(cut.stop, offset + n)
            if lo < hi:
                inner = list(index)
                inner[self.axis] = slice(lo - offset, hi - offset)
                parts.append(x.slab(read, tuple(inner)))
            offset += n
        return np.concatenate(parts, axis=self.axis) if parts else self._empty(index)


def move_axis(x: Expr, src: int, dst: int) -> Expr:
    """Returns ``x`` with axis ``src`` moved to ``dst``, simplified."""
    if src == dst:
        return x
    if isinstance(x, MoveAxis) and x.dst == src and x.src == dst:
        return x.x
    return MoveAxis(x, src, dst)


def transpose(x: Expr, perm: Sequence[int]) -> Expr:
    """Returns ``np.transpose(x, perm)``, simplified (identities vanish, chains compose)."""
    perm = tuple(int(p) for p in perm)
    if isinstance(x, Transpose):
        perm, x = tuple(x.perm[p] for p in perm), x.x
    if perm == tuple(range(len(perm))):
        return x
    return Transpose(x, perm)


def reshape(x: Expr, shape: Sequence[int]) -> Expr:
    """Returns ``x.reshape(shape)``, simplified (no-ops vanish, chains collapse)."""
    shape = tuple(int(d) for d in shape)
    if isinstance(x, Reshape):
        x = x.x
    return x if x.shape == shape else Reshape(x, shape)


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


def slice_axis(x: Expr, axis: int, start: int, stop: int) -> Expr:
    """Returns ``x[..., start:stop, ...]`` along ``axis`` (the whole axis is ``x`` itself)."""
    if start == 0 and stop == x.shape[axis]:
        return x
    return Slice(x, axis, start, stop)


def concat(xs: list[Expr], axis: int) -> Expr:
    """Returns the concatenation of ``xs`` along ``axis``, simplified when it undoes a split."""
    if len(xs) == 1:
        return xs[0]
    first = xs[0]
    if isinstance(first, Slice) and first.axis == axis and first.start == 0:
        stop = 0
        for x in xs:
            if not (isinstance(x, Slice) and x.x == first.x and x.axis == axis):
                break
            if x.start != stop:
                break
            stop = x.stop
        else:
            if stop == first.x.shape[axis]:
                return first.x
    return Concat(tuple(xs), axis)


def cast(x: Expr, dtype: str) -> Expr:
    """Returns ``x`` cast to ``dtype`` (no-op when it already has that dtype)."""
    if x.dtype == dtype:
        return x
    return Cast(x, dtype)


def is_data_movement(x: Expr) -> bool:
    """Whether ``x`` only moves bytes (no cast), so its output is bit-identical to its input."""
    return not isinstance(x, Cast) and all(is_data_movement(c) for c in x.children())


def permuted_source(x: Expr) -> tuple[Src, tuple[int, ...]] | None:
    """Returns ``(src, axes)`` when ``x`` is ``np.transpose(src, axes)``, else ``None``.

    A source read as stored gives the identity ``axes``; chains of axis moves and transposes
    compose into one permutation. Anything that selects, reshapes, stacks or casts values
    gives ``None``.

    Example:
        >>> src = Src(("params", "w"), (4, 2, 8), "float32")
        >>> permuted_source(MoveAxis(src, 1, 0))
        (Src(path=('params', 'w'), shape=(4, 2, 8), dtype='float32'), (1, 0, 2))
    """
    if isinstance(x, Src):
        return x, tuple(range(len(x.shape)))
    if isinstance(x, _Permute):
        inner = permuted_source(x.x)
        if inner is None:
            return None
        src, first = inner
        return src, tuple(first[a] for a in x.axes())
    return None


def source_chunk_box(x: Expr, chunk_of: Callable[[KeyPath], Sequence[int]]) -> tuple[int, ...]:
    """Returns the shape of one source chunk in ``x``'s output coordinates.

    Output slabs on this grid read whole source chunks: a source chunk is decoded once, not
    once per slab. Layer selection drops the layer axis; stacking puts one layer per box;
    a reshape keeps whole groups of axes; for stacks and concatenations of several sources,
    the first one's chunks are used.

    Args:
        x: the expression.
        chunk_of: the stored chunk shape of a source leaf.

    Returns:
        A box shape with ``len(x.shape)`` entries, each between 1 and the axis length.
    """
    box = x.box(chunk_of)
    return tuple(max(1, min(int(b), d)) for b, d in zip(box, x.shape, strict=True))


def evaluate(x: Expr, read: ReadFn, *, index: Sequence[slice] | None = None) -> np.ndarray:
    """Evaluates ``x``, or one slab of it, with numpy, reading source slabs through ``read``.

    Only the source slabs the output slab depends on are read: ``index`` is mapped through
    every operation (axis moves permute it, layer selection adds the layer, stacking selects
    layers, slices shift it, a reshape maps it group by group), so unstacking never loads
    the whole stack and a slab of a moved or stacked array reads one slab of each source.

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
    out = np.asarray(x.slab(read, full))
    # Not np.ascontiguousarray: it turns a 0-d array into a 1-d one.
    return out if out.flags.c_contiguous else np.array(out, order="C")


def _whole(shape: tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(slice(0, d) for d in shape)


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
