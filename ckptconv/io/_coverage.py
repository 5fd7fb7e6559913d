"""The exact record of what was written of one array: :class:`Coverage`.

A :class:`Coverage` keeps writes by stored chunk: a slab's whole chunks as one box on the
chunk grid (merged with the previous box when they line up, so a stream of chunk-aligned
slabs stays a handful of boxes) and, for the chunks a slab covers in part only, the element
box inside each. Checking marks a boolean grid compressed to the boxes' boundaries on the
chunk grid (never more cells than chunks), and each chunk written in part is checked on its
own. Recording a slab costs the number of chunks it covers in part (none when it is aligned
to the chunks). Limits: many scattered unaligned slabs in an array of rank 3 or more make
the compressed grid large (its size grows as the product of boundaries per axis).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from . import _format as fmt

Box = tuple[tuple[int, int], ...]
"""A box as ``(start, stop)`` per axis, stop excluded."""

# The most cells of the grid of slab boundaries marked to name an unwritten region.
_MAX_CELLS = 1 << 24


def format_region(region: Sequence[slice]) -> str:
    """Formats a box of slices as numpy would index it: ``[0:4, 2:3]`` (``[()]`` for a scalar).

    Example:
        >>> format_region((slice(0, 4), slice(2, 3)))
        '[0:4, 2:3]'
    """
    if not region:
        return "[()]"
    return "[" + ", ".join(f"{s.start}:{s.stop}" for s in region) + "]"


def describe_unwritten(shape: Sequence[int], region: Sequence[slice]) -> str:
    """The one-line complaint about an unwritten ``region`` of an array of ``shape``."""
    return (
        f"expected every element of shape {tuple(shape)} written, found region "
        f"{format_region(region)} unwritten"
    )


class Coverage:
    """The exact set of elements written so far into one array.

    Example:
        >>> c = Coverage((8,), (4,))
        >>> c.add((slice(0, 4),)); c.add((slice(0, 4),))
        >>> c.unwritten()
        (slice(4, 8, None),)

    Args:
        shape: the array shape.
        chunk_shape: the stored chunk shape (the chunk grid writes are kept on).
    """

    def __init__(self, shape: Sequence[int], chunk_shape: Sequence[int]) -> None:
        self.shape = tuple(int(d) for d in shape)
        self.chunk_shape = tuple(int(c) for c in chunk_shape)
        if len(self.chunk_shape) != len(self.shape) or any(c < 1 for c in self.chunk_shape):
            raise ValueError(f"chunk shape {self.chunk_shape} does not fit shape {self.shape}")
        self.grid = tuple(-(-d // c) for d, c in zip(self.shape, self.chunk_shape, strict=True))
        # Boxes of whole chunks, in chunk-grid coordinates.
        self._whole: list[Box] = []
        # Chunks written in part by some slab: the element boxes written inside each.
        self._parts: dict[tuple[int, ...], list[Box]] = {}

    def __repr__(self) -> str:
        return f"Coverage(shape={self.shape}, chunk_shape={self.chunk_shape})"

    # -- recording ----------------------------------------------------------------------------

    def add(self, index: Sequence[slice] | None) -> None:
        """Records that the slab ``index`` (in-bounds slices, step 1) was written.

        ``None`` is the whole array. Empty slabs write nothing and change nothing.
        """
        if index is None:
            self.add_all()
            return
        box = tuple((int(s.start), int(s.stop)) for s in index)
        if len(box) != len(self.shape) or any(
            not 0 <= a <= b <= d for (a, b), d in zip(box, self.shape, strict=True)
        ):
            raise ValueError(f"slab {index!r} does not fit shape {self.shape}")
        if any(a == b for a, b in box):
            return
        touched, inner = [], []
        for (a, b), c, d, g in zip(box, self.chunk_shape, self.shape, self.grid, strict=True):
            touched.append((a // c, -(-b // c)))
            # The last chunk of an axis ends at the array's edge, not at a multiple of c.
            inner.append((-(-a // c), g if b == d else b // c))
        if all(lo < hi for lo, hi in inner):
            self._add_whole(tuple(inner))
            if inner == touched:
                return  # aligned to the chunks: the usual case
        for chunk in _outside(touched, inner):
            extent = self._chunk_extent(chunk)
            part = tuple(
                (max(a, lo), min(b, hi)) for (a, b), (lo, hi) in zip(box, extent, strict=True)
            )
            self._parts.setdefault(chunk, []).append(part)

    def add_chunks(self, chunks: Iterable[Sequence[int]]) -> None:
        """Records that whole chunks (by their index on the chunk grid) were written.

        Raises:
            ValueError: an index lies outside the chunk grid.
        """
        for chunk in chunks:
            index = tuple(int(i) for i in chunk)
            if len(index) != len(self.grid) or any(
                not 0 <= i < g for i, g in zip(index, self.grid, strict=True)
            ):
                raise ValueError(f"chunk {index} is not on the chunk grid {self.grid}")
            self._add_whole(tuple((i, i + 1) for i in index))

    def add_all(self) -> None:
        """Records that the whole array was written."""
        if all(self.grid):
            self._add_whole(tuple((0, g) for g in self.grid))

    def include(self, other: Coverage) -> None:
        """Adds everything ``other`` (of the same shape and chunks) records as written.

        Raises:
            ValueError: ``other`` has another shape or chunk shape.
        """
        if (other.shape, other.chunk_shape) != (self.shape, self.chunk_shape):
            raise ValueError(
                f"cannot join the coverage of shape {other.shape} chunks {other.chunk_shape} "
                f"with shape {self.shape} chunks {self.chunk_shape}"
            )
        for box in other._whole:
            self._add_whole(box)
        for chunk, parts in other._parts.items():
            self._parts.setdefault(chunk, []).extend(parts)

    # -- checking -----------------------------------------------------------------------------

    @property
    def boxes(self) -> list[tuple[slice, ...]]:
        """The boxes written so far, as tuples of slices; they may overlap.

        Boxes of whole chunks are merged where they line up; a slab is split at the chunks it
        covers in part.
        """
        out = []
        for box in self._whole:
            out.append(
                tuple(
                    slice(lo * c, min(hi * c, d))
                    for (lo, hi), c, d in zip(box, self.chunk_shape, self.shape, strict=True)
                )
            )
        for parts in self._parts.values():
            out.extend(tuple(slice(a, b) for a, b in part) for part in parts)
        return out

    def unwritten(self) -> tuple[slice, ...] | None:
        """The first region (in C order) where nothing was written, or ``None`` if none.

        The region is a box between the boundaries of the slabs written: all of it is
        unwritten, but it may be part of a larger unwritten region.
        """
        region = self._scan()[0]
        if region is None:
            return None
        # Found on the chunk grid, the region may stop at a chunk's edge; with the slabs'
        # own boundaries it is the same whatever the chunks, unless that grid is too large.
        boxes = [tuple((s.start, s.stop) for s in box) for box in self.boxes]
        bounds = [{0, d} for d in self.shape]
        for box in boxes:
            for axis, (a, b) in enumerate(box):
                bounds[axis].update((a, b))
        if math.prod(len(b) - 1 for b in bounds) > _MAX_CELLS:
            return region
        gap = _first_gap(tuple((0, d) for d in self.shape), boxes)
        return region if gap is None else _slices(gap)

    def partial_chunk(self) -> tuple[slice, ...] | None:
        """The first chunk written in part only (as its element box), or ``None`` if none.

        A chunk whose pieces, taken together, cover it is not written in part.
        """
        return self._scan()[1]

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable record of this coverage (see :meth:`from_json`)."""
        return {
            "shape": list(self.shape),
            "chunk_shape": list(self.chunk_shape),
            "whole": [[list(r) for r in box] for box in self._whole],
            "parts": [
                [list(chunk), [[list(r) for r in part] for part in parts]]
                for chunk, parts in self._parts.items()
            ],
        }

    @classmethod
    def from_json(cls, data: Any) -> Coverage:
        """Rebuilds a coverage from :meth:`to_json`'s record.

        Raises:
            ValueError: the record is malformed.
        """
        try:
            out = cls(data["shape"], data["chunk_shape"])
            for box in data["whole"]:
                out._add_whole(_box(box, out.grid))
            for chunk, parts in data["parts"]:
                index = tuple(lo for lo, _ in _box([(i, i + 1) for i in chunk], out.grid))
                out._parts[index] = [_box(part, out.shape) for part in parts]
        except (KeyError, TypeError, IndexError) as e:
            raise ValueError(f"malformed coverage record: {fmt.one_line(e)}") from e
        return out

    # -- internals ----------------------------------------------------------------------------

    def _add_whole(self, box: Box) -> None:
        boxes = self._whole
        if boxes:
            joined = _join(boxes[-1], box)
            if joined is not None:
                boxes[-1] = joined
                # A finished row joins the rows before it: a stream stays one box.
                while len(boxes) > 1 and (joined := _join(boxes[-2], boxes[-1])) is not None:
                    boxes[-2] = joined
                    boxes.pop()
                return
        boxes.append(box)

    def _chunk_extent(self, chunk: tuple[int, ...]) -> Box:
        return tuple(
            (i * c, min((i + 1) * c, d))
            for i, c, d in zip(chunk, self.chunk_shape, self.shape, strict=True)
        )

    def _scan(self) -> tuple[tuple[slice, ...] | None, tuple[slice, ...] | None]:
        """Returns (the first unwritten region, the first chunk written in part only)."""
        if not all(self.grid):
            return None, None  # a zero-size array has nothing to write
        whole = list(self._whole)
        gaps: dict[tuple[int, ...], Box] = {}
        for chunk, parts in self._parts.items():
            gap = _first_gap(self._chunk_extent(chunk), parts)
            if gap is None:
                whole.append(tuple((i, i + 1) for i in chunk))
            else:
                gaps[chunk] = gap
        # Each chunk with a gap gets its own cell, so that the cell found is either that
        # chunk or a block of chunks nothing was written into.
        extent = tuple((0, g) for g in self.grid)
        extra = [set() for _ in self.grid]
        for chunk in gaps:
            for axis, i in enumerate(chunk):
                extra[axis].update((i, i + 1))
        bounds, marks = _mark(extent, whole, extra)
        partial = None
        for chunk in sorted(gaps):
            cell = tuple(
                int(np.searchsorted(b, i, "right")) - 1 for b, i in zip(bounds, chunk, strict=True)
            )
            if not marks[cell]:
                partial = _slices(self._chunk_extent(chunk))
                break
        region = None
        left = np.flatnonzero(~marks)
        if left.size:
            cell = np.unravel_index(int(left[0]), marks.shape)
            box = tuple((b[k], b[k + 1]) for b, k in zip(bounds, cell, strict=True))
            chunk = tuple(lo for lo, _ in box)
            if chunk in gaps and all(hi - lo == 1 for lo, hi in box):
                region = _slices(gaps[chunk])
            else:
                region = tuple(
                    slice(lo * c, min(hi * c, d))
                    for (lo, hi), c, d in zip(box, self.chunk_shape, self.shape, strict=True)
                )
        return region, partial


def _box(data: Any, limits: Sequence[int]) -> Box:
    box = tuple((int(a), int(b)) for a, b in data)
    if len(box) != len(limits) or any(
        not 0 <= a < b <= n for (a, b), n in zip(box, limits, strict=True)
    ):
        raise ValueError(f"malformed coverage record: box {data} outside {tuple(limits)}")
    return box


def _slices(box: Box) -> tuple[slice, ...]:
    return tuple(slice(a, b) for a, b in box)


def _join(a: Box, b: Box) -> Box | None:
    """The union of two boxes if it is a box along one axis (or they are equal), else None."""
    diff = [k for k in range(len(a)) if a[k] != b[k]]
    if not diff:
        return a
    if len(diff) > 1:
        return None
    k = diff[0]
    (a0, a1), (b0, b1) = a[k], b[k]
    if b0 > a1 or a0 > b1:
        return None
    return a[:k] + ((min(a0, b0), max(a1, b1)),) + a[k + 1 :]


def _outside(touched: list[tuple[int, int]], inner: list[tuple[int, int]]):
    """Yields the grid indices in the ``touched`` box but not in the ``inner`` box in it."""
    if any(lo >= hi for lo, hi in inner):
        yield from itertools.product(*(range(lo, hi) for lo, hi in touched))
        return
    for k, ((t0, t1), (i0, i1)) in enumerate(zip(touched, inner, strict=True)):
        # inner lies in touched and misses at most its first and last index.
        edges = sorted({i for i in (t0, t1 - 1) if not i0 <= i < i1})
        axes = (
            [range(lo, hi) for lo, hi in inner[:k]]
            + [edges]
            + [range(lo, hi) for lo, hi in touched[k + 1 :]]
        )
        yield from itertools.product(*axes)


def _mark(
    extent: Box, boxes: Iterable[Box], extra: Sequence[Iterable[int]] | None = None
) -> tuple[list[np.ndarray], np.ndarray]:
    """Marks ``boxes`` on the grid of ``extent`` compressed to their boundaries.

    Returns:
        The boundaries per axis and the boolean marks, one cell per pair of consecutive
        boundaries.
    """
    boxes = [
        tuple((max(a, lo), min(b, hi)) for (a, b), (lo, hi) in zip(box, extent, strict=True))
        for box in boxes
    ]
    boxes = [box for box in boxes if all(a < b for a, b in box)]
    bounds = []
    for axis, (lo, hi) in enumerate(extent):
        points = {lo, hi}
        points.update(x for box in boxes for x in box[axis])
        if extra is not None:
            points.update(x for x in extra[axis] if lo <= x <= hi)
        bounds.append(np.array(sorted(points), dtype=np.int64))
    marks = np.zeros([len(b) - 1 for b in bounds], dtype=bool)
    for box in boxes:
        marks[
            tuple(
                slice(int(np.searchsorted(b, a)), int(np.searchsorted(b, c)))
                for b, (a, c) in zip(bounds, box, strict=True)
            )
        ] = True
    return bounds, marks


def _first_gap(extent: Box, boxes: Iterable[Box]) -> Box | None:
    """The first unwritten box of ``extent`` in C order, or None if ``boxes`` cover it.

    The first cell of the compressed grid that no box covers, grown forward along each axis
    (the last first) while the cells it takes in are uncovered too, so that a box written in
    several pieces does not split the region found.
    """
    bounds, marks = _mark(extent, boxes)
    left = np.flatnonzero(~marks)
    if not left.size:
        return None
    lo = [int(k) for k in np.unravel_index(int(left[0]), marks.shape)]
    hi = [k + 1 for k in lo]
    for axis in reversed(range(marks.ndim)):
        while hi[axis] < marks.shape[axis]:
            ahead = tuple(
                slice(hi[k], hi[k] + 1) if k == axis else slice(lo[k], hi[k])
                for k in range(marks.ndim)
            )
            if marks[ahead].any():
                break
            hi[axis] += 1
    return tuple((int(b[i]), int(b[j])) for b, i, j in zip(bounds, lo, hi, strict=True))
