"""Reading parts of one large stored chunk: streamed in C order, or decoded once.

TensorStore decodes a whole chunk (the inner chunk under ``sharding_indexed``) to return any
part of it. A converter that cuts one large chunk into slabs under a byte budget would decode
the chunk once per slab and hold it decoded each time: a scanned array that Orbax saved from
one device is one chunk of up to tens of GiB. For chunks of at least :data:`STREAM_BYTES`:

- **streamed**: when a chunk is stored as raw little- or big-endian elements in C order,
  optionally as one zstd stream (Orbax's default codec for zarr2 and zarr3, plain or inside a
  ``sharding_indexed`` shard holding that one chunk), its bytes are read through the kvstore in
  ranges of :data:`READ_BYTES` and decompressed as a stream; a read of the next C-contiguous
  piece (whole rows of the chunk) continues where the last one stopped, so the chunk is decoded
  once, piece by piece, and never held whole;
- **decoded once**: any other read inside one such chunk (another codec, blosc for instance,
  which cannot stream; or a piece that is not C-contiguous) decodes the whole chunk once and
  keeps it until a read outside it, so slabs cut from it do not decode it again.

Limits: one chunk is streamed (or held) at a time per reader, which is what a converter reading
slabs in order needs; a read that goes back within a streamed chunk restarts its stream.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import zstandard

from . import _format as fmt

# Chunks of at least this many decoded bytes are streamed or decoded once (see module doc).
STREAM_BYTES = 32 << 20
# Stored bytes asked of the kvstore per ranged read.
READ_BYTES = 4 << 20
_MISSING = (1 << 64) - 1  # a shard index entry of a chunk never written

Box = tuple[slice, ...]


@dataclasses.dataclass(frozen=True)
class ChunkCodec:
    """How a stored chunk's bytes become its elements, when that can be streamed.

    Attributes:
        dtype: the stored element type, with its byte order.
        zstd: the bytes are one zstd stream (else raw).
        index: for a chunk inside a one-chunk ``sharding_indexed`` shard, the shard index's
            size in bytes and whether it is at the end of the shard (else ``None``).
    """

    dtype: np.dtype
    zstd: bool
    index: tuple[int, bool] | None = None


@dataclasses.dataclass(frozen=True)
class StoredArray:
    """What :class:`ChunkReads` needs to know of one array.

    Attributes:
        name: the array, as named in messages.
        shape: the array's shape.
        chunk: the decoded chunk's shape (the inner chunk of a one-chunk shard).
        itemsize: bytes per element.
        codec: how to stream its chunks, or ``None`` when they cannot be streamed.
        reason: why they cannot be streamed (for ``codec=None``).
        key_of: the kvstore key of the chunk at a chunk-grid index.
    """

    name: str
    shape: tuple[int, ...]
    chunk: tuple[int, ...]
    itemsize: int
    codec: ChunkCodec | None
    reason: str
    key_of: Callable[[tuple[int, ...]], str]

    @property
    def chunk_nbytes(self) -> int:
        """Decoded bytes of one chunk."""
        return math.prod(self.chunk) * self.itemsize


def chunk_codec(doc: dict[str, Any], *, zarr3: bool) -> tuple[ChunkCodec | None, str]:
    """How the chunks of the array described by ``doc`` (its zarr metadata) can be streamed.

    Returns:
        The codec, or ``None`` and the reason they cannot be streamed.
    """
    try:
        return _zarr3_codec(doc) if zarr3 else _zarr2_codec(doc)
    except (KeyError, TypeError, ValueError) as e:
        return None, f"unrecognised zarr metadata ({fmt.one_line(e)})"


def decoded_chunk(doc: dict[str, Any], outer: tuple[int, ...], *, zarr3: bool) -> tuple[int, ...]:
    """The shape of what one decode produces: the inner chunk under ``sharding_indexed``."""
    codecs = doc.get("codecs") or [] if zarr3 else []
    if codecs and codecs[0].get("name") == "sharding_indexed":
        return tuple(int(c) for c in codecs[0]["configuration"]["chunk_shape"])
    return outer


def _zarr2_codec(doc: dict[str, Any]) -> tuple[ChunkCodec | None, str]:
    if doc.get("order", "C") != "C":
        return None, f"zarr2 order {doc.get('order')!r} (only C order streams)"
    if doc.get("filters"):
        return None, "zarr2 filters"
    compressor = doc.get("compressor")
    name = None if compressor is None else compressor.get("id")
    if name not in (None, "zstd"):
        return None, f"compressor {name} cannot stream"
    return ChunkCodec(_np_dtype(doc["dtype"]), zstd=name == "zstd"), ""


def _zarr3_codec(doc: dict[str, Any]) -> tuple[ChunkCodec | None, str]:
    codecs = doc["codecs"]
    index = None
    if len(codecs) == 1 and codecs[0]["name"] == "sharding_indexed":
        config = codecs[0]["configuration"]
        outer = doc["chunk_grid"]["configuration"]["chunk_shape"]
        if list(config["chunk_shape"]) != list(outer):
            return None, "inner chunks (each decoded on its own)"
        index_names = [c["name"] for c in config.get("index_codecs", [])]
        if index_names not in (["bytes"], ["bytes", "crc32c"]):
            return None, f"shard index codecs {index_names}"
        index = (16 + 4 * (index_names[-1] == "crc32c"), config.get("index_location") != "start")
        codecs = config["codecs"]
    names = [c["name"] for c in codecs]
    if names not in (["bytes"], ["bytes", "zstd"]):
        return None, f"codecs {names} cannot stream"
    endian = codecs[0].get("configuration", {}).get("endian", "little")
    dtype = fmt.numpy_dtype(doc["data_type"])
    if dtype.itemsize > 1:
        dtype = dtype.newbyteorder("<" if endian == "little" else ">")
    return ChunkCodec(dtype, zstd=names[-1] == "zstd", index=index), ""


def _np_dtype(name: str) -> np.dtype:
    try:
        return np.dtype(name)
    except TypeError:
        return fmt.numpy_dtype(name)


class _RangeFile:
    """A file-like view of ``[start, stop)`` of one kvstore value, read in ranges."""

    def __init__(self, kvstore: Any, key: str, start: int, stop: int | None) -> None:
        self._kvstore, self._key, self._pos, self._stop = kvstore, key, start, stop

    def read(self, size: int = -1) -> bytes:
        end = self._stop if size < 0 else self._pos + size
        if self._stop is not None and end is not None:
            end = min(end, self._stop)
        if end is not None and end <= self._pos:
            return b""
        try:
            result = self._kvstore.read(self._key, byte_range=slice(self._pos, end)).result()
        except ValueError:  # OUT_OF_RANGE: fewer bytes remain than asked for
            result = self._kvstore.read(self._key, byte_range=slice(self._pos, None)).result()
        if result.state != "value":
            raise ValueError(f"chunk {self._key!r} is missing")
        data = bytes(result.value)
        self._pos += len(data)
        return data

    def readinto(self, out: memoryview) -> int:
        data = self.read(len(out))
        out[: len(data)] = data
        return len(data)


class _Stream:
    """One chunk's decoded bytes, read front to back."""

    def __init__(self, kvstore: Any, key: str, codec: ChunkCodec) -> None:
        start, stop = 0, None
        if codec.index is not None:
            start, stop = _shard_chunk_range(kvstore, key, codec.index)
        raw = _RangeFile(kvstore, key, start, stop)
        self._source: Any = raw
        if codec.zstd:
            self._source = zstandard.ZstdDecompressor().stream_reader(
                raw, read_size=READ_BYTES, read_across_frames=True
            )
        self.key = key
        self.pos = 0

    def read_into(self, out: np.ndarray) -> None:
        """Fills ``out`` (C-contiguous) with the next ``out.nbytes`` decoded bytes."""
        view = memoryview(out.reshape(-1).view(np.uint8))
        done = 0
        while done < len(view):
            n = self._source.readinto(view[done:])
            if not n:
                raise ValueError(
                    f"chunk {self.key!r} ends after {self.pos + done} decoded bytes, expected "
                    f"at least {self.pos + len(view)} (truncated)"
                )
            done += n
        self.pos += done

    def skip(self, nbytes: int) -> None:
        """Decodes and drops the next ``nbytes`` bytes."""
        while nbytes > 0:
            step = min(nbytes, READ_BYTES)
            self.read_into(np.empty(step, np.uint8))
            nbytes -= step


def _shard_chunk_range(kvstore: Any, key: str, index: tuple[int, bool]) -> tuple[int, int]:
    """The byte range of the one chunk of a ``sharding_indexed`` shard, from its index."""
    size, at_end = index
    where = slice(-size, None) if at_end else slice(0, size)
    result = kvstore.read(key, byte_range=where).result()
    if result.state != "value" or len(result.value) != size:
        raise ValueError(f"shard {key!r} is missing or shorter than its {size}-byte index")
    offset, nbytes = np.frombuffer(bytes(result.value)[:16], "<u8").tolist()
    if offset == _MISSING:
        raise ValueError(f"shard {key!r} holds no chunk")
    if offset + nbytes >= 1 << 56:
        raise ValueError(
            f"shard {key!r} has a garbled index (chunk at byte {offset}, {nbytes} bytes): the "
            "shard is truncated or corrupt"
        )
    return offset, offset + nbytes


@dataclasses.dataclass
class _Held:
    name: str
    cell: tuple[int, ...]
    origin: tuple[int, ...]
    data: np.ndarray


class ChunkReads:
    """Serves reads that fall inside one large chunk (see the module doc); one per reader."""

    def __init__(self, kvstore: Any) -> None:
        self._kvstore = kvstore
        self._lock = threading.Lock()
        self._stream: tuple[str, tuple[int, ...], _Stream] | None = None
        self._held: _Held | None = None

    def read(
        self, array: StoredArray, box: Box, read_box: Callable[[Box], np.ndarray]
    ) -> np.ndarray | None:
        """The slab ``box`` of ``array``, or ``None`` when TensorStore should read it.

        Args:
            array: the array.
            box: explicit in-bounds slices.
            read_box: reads a box through TensorStore (to decode a chunk whole, once).

        Raises:
            ValueError: a chunk is missing, truncated or cannot be decompressed.
            zstandard.ZstdError: likewise.
        """
        chunk = array.chunk
        if not chunk or array.chunk_nbytes < STREAM_BYTES:
            return None
        cell = tuple(s.start // c for s, c in zip(box, chunk, strict=True))
        origin = tuple(i * c for i, c in zip(cell, chunk, strict=True))
        valid = tuple(min(c, d - o) for c, d, o in zip(chunk, array.shape, origin, strict=True))
        rel = tuple((s.start - o, s.stop - o) for s, o in zip(box, origin, strict=True))
        if any(b > v for (_, b), v in zip(rel, valid, strict=True)):
            return None  # spans chunks
        if all(r == (0, v) for r, v in zip(rel, valid, strict=True)):
            return None  # a whole chunk: TensorStore decodes it once anyway
        with self._lock:
            piece = None if array.codec is None else _contiguous(rel, valid, chunk)
            if piece is None:
                return self._from_held(array, cell, origin, valid, box, read_box)
            self._held = None
            return self._streamed(array, cell, *piece)

    def _streamed(
        self, array: StoredArray, cell: tuple[int, ...], offset: int, block, keep: Box
    ) -> np.ndarray:
        codec: ChunkCodec = array.codec  # type: ignore[assignment]
        start = offset * codec.dtype.itemsize
        current = self._stream
        if current is None or current[:2] != (array.name, cell) or current[2].pos > start:
            current = (array.name, cell, _Stream(self._kvstore, array.key_of(cell), codec))
        self._stream = None  # dropped if the read below fails
        stream = current[2]
        stream.skip(start - stream.pos)
        data = np.empty(block, codec.dtype)
        stream.read_into(data)
        if stream.pos < array.chunk_nbytes:
            self._stream = current
        data = data[keep]
        native = data.dtype.newbyteorder("=")
        if data.dtype != native or not data.flags.c_contiguous:
            data = np.ascontiguousarray(data, dtype=native)
        return data

    def _from_held(self, array, cell, origin, valid, box, read_box) -> np.ndarray:
        held = self._held
        if held is None or (held.name, held.cell) != (array.name, cell):
            self._held = None  # free the last one first
            whole = tuple(slice(o, o + v) for o, v in zip(origin, valid, strict=True))
            held = _Held(array.name, cell, origin, read_box(whole))
            self._held = held
        inner = tuple(slice(s.start - o, s.stop - o) for s, o in zip(box, held.origin, strict=True))
        return np.array(held.data[inner])

    def release(self) -> None:
        """Drops any stream or decoded chunk kept."""
        with self._lock:
            self._stream = self._held = None


def _contiguous(
    rel: tuple[tuple[int, int], ...], valid: tuple[int, ...], chunk: tuple[int, ...]
) -> tuple[int, tuple[int, ...], Box] | None:
    """Where a box (relative to its chunk) lies in the chunk's C-order element stream.

    It lies in one run when it takes one index on every axis before some axis ``j``, any range
    on ``j`` and all of every later axis (edge chunks are stored padded, so the run covers the
    padding, which is cut off).

    Returns:
        ``(first element, shape of the run as a block, the box within that block)``, or
        ``None`` when the box is not one run.
    """
    n = len(chunk)
    j = n - 1
    while j >= 0 and rel[j] == (0, valid[j]):
        j -= 1
    if j < 0 or any(b - a != 1 for a, b in rel[:j]):
        return None
    offset = sum(rel[a][0] * math.prod(chunk[a + 1 :]) for a in range(j + 1))
    block = (1,) * j + (rel[j][1] - rel[j][0],) + tuple(chunk[j + 1 :])
    keep = (slice(None),) * (j + 1) + tuple(slice(0, valid[a]) for a in range(j + 1, n))
    return offset, block, keep
