"""Lazy array expressions: what one output leaf is, in terms of source leaves.

A conversion plan maps every output leaf to an expression over source leaves. Expressions
are computed from metadata alone (shape and dtype propagate without reading data) and are
evaluated one output leaf at a time, reading only the source slabs they need. Every
operation except :class:`Cast` is a pure data movement, so evaluation is bit-exact.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable

import numpy as np

from ..io.leaf import KeyPath, _np_dtype, keystr

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


def evaluate(x: Expr, read: ReadFn) -> np.ndarray:
    """Evaluates ``x`` with numpy, reading source slabs through ``read(path, index)``.

    ``Take`` of a source reads only that slab, so unstacking never loads the whole stack.

    Args:
        x: the expression.
        read: reads a source leaf, or a slab of it when ``index`` is not None.

    Returns:
        The array, of ``x.shape`` and ``x.dtype``.
    """
    if isinstance(x, Src):
        return np.asarray(read(x.path, None))
    if isinstance(x, Take):
        inner = x.x
        if isinstance(inner, Src):
            index = (slice(None),) * x.axis + (slice(x.index, x.index + 1),)
            return np.squeeze(np.asarray(read(inner.path, index)), axis=x.axis)
        return np.take(evaluate(inner, read), x.index, axis=x.axis)
    if isinstance(x, MoveAxis):
        return np.ascontiguousarray(np.moveaxis(evaluate(x.x, read), x.src, x.dst))
    if isinstance(x, Stack):
        return np.stack([evaluate(e, read) for e in x.xs], axis=x.axis)
    if isinstance(x, Cast):
        return evaluate(x.x, read).astype(_np_dtype(x.dtype))
    raise TypeError(f"unknown expression {type(x).__name__}")
