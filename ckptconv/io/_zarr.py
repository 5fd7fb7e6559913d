"""Chunk shapes and TensorStore zarr specs for arrays written the way Orbax writes them."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def choose_chunk_shape(shape: Sequence[int], itemsize: int, max_bytes: int) -> tuple[int, ...]:
    """Returns a chunk shape of at most ``max_bytes`` that splits the leading axes first.

    Trailing axes stay whole as long as possible, so slabs along axis 0 (the natural streaming
    order) cover whole chunks.

    Example:
        >>> choose_chunk_shape((1024, 1024), 4, 1 << 20)
        (256, 1024)

    Args:
        shape: the array shape.
        itemsize: bytes per element.
        max_bytes: the largest chunk, in bytes (a single element may exceed it).

    Returns:
        The chunk shape, every entry at least 1.
    """
    chunk = [max(1, d) for d in shape]
    for axis in range(len(chunk)):
        if math.prod(chunk) * itemsize <= max_bytes:
            break
        rest = math.prod(chunk[axis + 1 :]) * itemsize
        if rest <= max_bytes:
            chunk[axis] = max(1, min(chunk[axis], max_bytes // rest))
            break
        chunk[axis] = 1
    return tuple(chunk)


def tiles(inner: Sequence[int], chunk: Sequence[int]) -> bool:
    """Whether chunks of shape ``inner`` tile one of shape ``chunk`` exactly."""
    if len(inner) != len(chunk):
        return False
    return all(i >= 1 and c % i == 0 for i, c in zip(inner, chunk, strict=True))


def array_spec(
    shape: Sequence[int],
    dtype: str,
    chunk: Sequence[int],
    *,
    use_zarr3: bool,
    inner_chunk: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Returns the TensorStore spec (without kvstore) that creates one array as Orbax would.

    zarr3 as MaxText writes it: a ``sharding_indexed`` codec whose shard is one chunk (or
    holds chunks of ``inner_chunk``), bytes little-endian then zstd level 3, a crc32c index at
    the end. zarr2 as ``ocp.StandardCheckpointer`` writes it: zstd level 1.

    Args:
        shape: the array shape.
        dtype: the canonical dtype name.
        chunk: the chunk shape (see :func:`choose_chunk_shape`).
        use_zarr3: zarr v3 rather than v2.
        inner_chunk: zarr3 only: the chunk shape inside each stored chunk, which it must
            divide; default: ``chunk`` itself.

    Returns:
        A JSON spec for ``ts.open``.
    """
    if use_zarr3:
        metadata: dict[str, Any] = {
            "shape": list(shape),
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(chunk)}},
            "codecs": [
                {
                    "name": "sharding_indexed",
                    "configuration": {
                        "chunk_shape": list(chunk if inner_chunk is None else inner_chunk),
                        "codecs": [
                            {"name": "bytes", "configuration": {"endian": "little"}},
                            {"name": "zstd", "configuration": {"level": 3}},
                        ],
                        "index_codecs": [
                            {"name": "bytes", "configuration": {"endian": "little"}},
                            {"name": "crc32c"},
                        ],
                        "index_location": "end",
                    },
                }
            ],
        }
    else:
        metadata = {
            "shape": list(shape),
            "chunks": list(chunk),
            "compressor": {"id": "zstd", "level": 1},
        }
    return {
        "driver": "zarr3" if use_zarr3 else "zarr",
        "dtype": dtype,
        "metadata": metadata,
        "recheck_cached_data": False,
        "recheck_cached_metadata": False,
        # Orbax stores every chunk, even all-zero ones, and refuses missing chunks on restore;
        # its _METADATA says so (store_array_data_equal_to_fill_value).
        "store_data_equal_to_fill_value": True,
    }
