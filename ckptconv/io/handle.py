"""A handle on one array being written slab by slab: see :meth:`CheckpointWriter.create`.

Every slab it writes is recorded exactly in a :class:`~ckptconv.io._coverage.Coverage`, so a
commit refuses an array with any element never written (overlapping slabs count once,
unaligned slabs are fine).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import CheckpointWriteError
from . import _format as fmt
from ._coverage import Coverage
from .leaf import KeyPath, keystr

if TYPE_CHECKING:
    import tensorstore as ts

    from .writer import CheckpointWriter


class ArrayHandle:
    """One array being written; get it from :meth:`CheckpointWriter.create`.

    Attributes:
        path: the key path.
        shape: the array shape.
        dtype: the canonical dtype name.
        chunk_shape: the stored chunk shape; slabs aligned to it are written without any
            read-modify-write of a chunk.
        coverage: what has been written so far (exactly; see :class:`Coverage`).
    """

    def __init__(
        self,
        writer: CheckpointWriter,
        path: KeyPath,
        shape: tuple[int, ...],
        dtype: str,
        chunk_shape: tuple[int, ...],
        store: ts.TensorStore,
    ) -> None:
        self.path = path
        self.shape = shape
        self.dtype = dtype
        self.chunk_shape = chunk_shape
        self.coverage = Coverage(shape, chunk_shape)
        self._writer = writer
        self._store = store

    def __repr__(self) -> str:
        return f"ArrayHandle({keystr(self.path)}, shape={self.shape}, dtype={self.dtype})"

    @property
    def size(self) -> int:
        """Number of elements of the whole array."""
        return math.prod(self.shape)

    @property
    def written_boxes(self) -> list[tuple[slice, ...]]:
        """The boxes written so far (see :attr:`Coverage.boxes`)."""
        return self.coverage.boxes

    def unwritten(self) -> tuple[slice, ...] | None:
        """The first region never written, as a tuple of slices, or ``None`` once complete.

        Example:
            >>> h = writer.create(("w",), (8,), "float32")
            >>> h.write((slice(0, 4),), np.ones(4, np.float32))
            >>> h.unwritten()
            (slice(4, 8, None),)
        """
        return self.coverage.unwritten()

    def write(self, index: tuple[slice, ...] | None, array: Any) -> None:
        """Writes one slab of the array.

        The data is copied before this returns, so ``array`` may be reused at once.

        Args:
            index: a tuple of slices (step 1) selecting the slab, or ``None`` for the whole
                array; missing trailing axes are taken whole.
            array: the slab's values, of exactly the slab's shape and the array's dtype.

        Raises:
            CheckpointWriteError: the index, dtype or shape does not match, or the writer is
                closed.
        """
        self._writer._check_open()
        data = np.asarray(array)
        if fmt.dtype_name(data.dtype) != self.dtype:
            raise CheckpointWriteError(
                f"{keystr(self.path)}: expected dtype {self.dtype}, found {data.dtype.name} "
                "(cast explicitly; the writer never converts silently)"
            )
        view = self._store
        box = None
        if index is not None:
            try:
                box = fmt.normalize_index(index, self.shape)
                view = self._store[box]
            except (IndexError, ValueError, TypeError) as e:
                raise CheckpointWriteError(
                    f"{keystr(self.path)}: slab index {index!r} does not fit shape "
                    f"{self.shape}: {fmt.one_line(e)}"
                ) from e
        if tuple(view.shape) != data.shape:
            raise CheckpointWriteError(
                f"{keystr(self.path)}: slab {index!r} has shape {tuple(view.shape)}, found data "
                f"of shape {data.shape}"
            )
        self._writer._submit(self.path, view, data)
        self.coverage.add(box)
