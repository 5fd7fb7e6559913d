"""Planning a verbatim copy of one stored array: new metadata, renamed chunk keys, no decoding.

A renamed array keeps its zarr metadata and chunk keys; an array whose axes are permuted
gets the metadata of :func:`~ckptconv.io._permute.permuted_metadata` and chunk keys renamed
by the same permutation. Either way the encoded chunk bytes are reused as stored.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Collection, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointFormatError
from . import _format as fmt
from . import _permute
from .leaf import KeyPath, keystr
from .sources.base import can_copy_chunks

if TYPE_CHECKING:
    from .reader import CheckpointReader


@dataclasses.dataclass(frozen=True)
class ArrayCopy:
    """How to copy one source array verbatim under a new key.

    Attributes:
        source_key: the source array's key prefix (in its OCDBT store or folder).
        doc_name: the zarr metadata document's name (``zarr.json`` or ``.zarray``).
        metadata: the output's zarr metadata document.
        chunk_keys: ``(source key, output key)`` of every chunk, relative to the array prefix.
        shape: the output shape.
        dtype: the dtype name (unchanged).
        chunk_shape: the output's chunk shape.
        write_shape: the output's Orbax ``write_shape``.
        chunk_nbytes: decoded bytes of one chunk, an upper bound of a stored chunk's size
            used to budget reads in flight.
    """

    source_key: str
    doc_name: str
    metadata: dict[str, Any]
    chunk_keys: list[tuple[str, str]]
    shape: tuple[int, ...]
    dtype: str
    chunk_shape: tuple[int, ...]
    write_shape: tuple[int, ...]
    chunk_nbytes: int

    def only(self, chunks: Collection[str]) -> ArrayCopy:
        """The copy of only the source chunk keys ``chunks`` (relative to the array)."""
        return dataclasses.replace(
            self, chunk_keys=[(s, d) for s, d in self.chunk_keys if s in chunks]
        )

    def grid_chunks(self) -> Iterator[tuple[int, ...]]:
        """Yields the index on the output's chunk grid of every chunk copied.

        Keys that are no chunk of the grid are copied under their own name but yield nothing.
        """
        codec = _permute.ChunkKeys(self.metadata, zarr3=self.doc_name == "zarr.json")
        grid = [-(-d // c) for d, c in zip(self.shape, self.chunk_shape, strict=True)]
        for _, key in self.chunk_keys:
            index = codec.grid_index(key, grid)
            if index is not None:
                yield index


def plan_copy(
    reader: CheckpointReader, path: KeyPath, axes: Sequence[int] | None, *, use_zarr3: bool
) -> ArrayCopy | None:
    """Plans copying ``np.transpose(reader.read(path), axes)`` without decoding it.

    Args:
        reader: the source checkpoint.
        path: the source array's key path.
        axes: the axis permutation (as for ``np.transpose``); ``None`` keeps the axes.
        use_zarr3: the destination's zarr format.

    Returns:
        The plan, or ``None`` when a verbatim copy cannot produce the array: the formats
        differ, or zarr2 cannot express the permutation.

    Raises:
        LayoutError: ``path`` is not an array leaf of the source.
        ValueError: ``axes`` is not a permutation of the array's axes.
    """
    path = tuple(path)
    if not can_copy_chunks(reader) or reader.use_zarr3 != use_zarr3:
        return None
    if not reader.stores_chunks(path):
        return None
    doc = reader.zarr_metadata(path)  # raises LayoutError unless path is an array leaf
    leaf = reader.leaves()[path]
    assert leaf.shape is not None and leaf.dtype is not None
    perm = _permute.identity(len(leaf.shape)) if axes is None else tuple(axes)
    perm = _permute.check_perm(perm, len(leaf.shape))
    metadata = _permute.permuted_metadata(doc, perm, zarr3=use_zarr3)
    if metadata is None:
        return None
    chunk = reader.chunk_shape(path)
    chunk_keys = _renamed_chunk_keys(reader, path, doc, perm, leaf.shape, chunk, use_zarr3)
    write_shape = reader.write_shape(path)
    if write_shape is None or len(write_shape) != len(chunk):
        write_shape = chunk
    return ArrayCopy(
        source_key=reader.array_key(path),
        doc_name="zarr.json" if use_zarr3 else ".zarray",
        metadata=metadata,
        chunk_keys=chunk_keys,
        shape=tuple(_permute.permute(leaf.shape, perm)),
        dtype=leaf.dtype,
        chunk_shape=tuple(_permute.permute(chunk, perm)),
        write_shape=tuple(_permute.permute(write_shape, perm)),
        chunk_nbytes=math.prod(chunk) * fmt.numpy_dtype(leaf.dtype).itemsize,
    )


def _renamed_chunk_keys(
    reader: CheckpointReader,
    path: KeyPath,
    doc: dict[str, Any],
    perm: tuple[int, ...],
    shape: tuple[int, ...],
    chunk: tuple[int, ...],
    use_zarr3: bool,
) -> list[tuple[str, str]]:
    """Lists the source's chunk keys with their names after ``perm``; checks none is missing.

    Orbax stores every chunk of the grid, and a reader of the copy must find them all: a
    missing chunk would otherwise read as zeros wherever missing chunks are filled.

    Raises:
        CheckpointFormatError: a chunk of the grid is not stored.
    """
    codec = _permute.ChunkKeys(doc, zarr3=use_zarr3)
    grid = [math.ceil(d / c) for d, c in zip(shape, chunk, strict=True)]
    out = []
    found = set()
    for key in reader.chunk_keys(path):
        index = codec.grid_index(key, grid)
        if index is None:
            out.append((key, key))  # not a chunk of the grid: kept under its own name
            continue
        found.add(index)
        out.append((key, codec.format(_permute.permute(index, perm))))
    expected = math.prod(grid)
    if len(found) != expected:
        raise CheckpointFormatError(
            f"{reader.location}: array {keystr(path)} stores {len(found)} of its {expected} "
            f"chunks (grid {grid}); expected every chunk, as Orbax writes them"
        )
    return out


def can_copy_verbatim(
    source: CheckpointReader, path: KeyPath, axes: Sequence[int] | None, *, use_zarr3: bool
) -> bool:
    """Whether ``np.transpose(source[path], axes)`` can be written by copying stored chunks.

    A writer storing zarr3 (``use_zarr3``) or zarr2 answers this for its ``can_copy``.
    """
    return plan_copy(source, path, axes, use_zarr3=use_zarr3) is not None
