"""A structural msgpack walker: where every array's bytes are, without reading them.

:func:`scan` walks one msgpack document once, over any buffer (an ``mmap`` of the file), and
returns its tree: maps as ``dict`` (keys as ``str``), arrays as ``list``, small scalars as Python
values, strings and byte strings as :class:`StrRef` / :class:`BinRef` (offset and length
only), and Flax's ndarray and numpy-scalar extensions (types 1 and 3) as :class:`ArrayRef`:
the byte offset of the raw C-order data, its shape and dtype. Only headers are read: a payload
of any size costs the few bytes of its header, so walking a file touches a handful of pages.

It reads every msgpack type (fixint, nil, bool, int/uint 8-64, float 32/64, fixstr/str8-32,
bin8-32, fixarray/array16/32, fixmap/map16/map32, fixext1-16/ext8-32) and Flax's three
extension types (``flax.serialization._MsgpackExtType``: 1 ndarray, 2 Python complex, 3 numpy
scalar); an ndarray's payload is itself msgpack ``(shape, dtype name, bytes)``, as written by
``flax.serialization._ndarray_to_bytes``. Any other extension type, a truncated document, a
length that reaches past the end of the file, and bytes after the document are
:class:`~ckptconv.errors.CheckpointFormatError` naming the byte offset and the tree path.

It also maps files (:class:`MappedFile`) and copies one box of an array out of its runs of
bytes (:func:`read_box`), touching only the pages the box lies on and releasing them after.

Limits: at most :data:`MAX_DEPTH` nested maps and arrays; array bytes are taken in the machine's
byte order (Flax writes ``tobytes()`` without an endianness mark, so files from big-endian hosts
are not recognised as such).
"""

from __future__ import annotations

import dataclasses
import math
import mmap
import os
import struct
from collections.abc import Iterator
from typing import Any

import numpy as np

from ...errors import CheckpointFormatError
from .. import _format as fmt
from ..leaf import KeyPath, keystr
from ..location import Location

# flax.serialization._MsgpackExtType
EXT_NDARRAY = 1
EXT_COMPLEX = 2
EXT_NPSCALAR = 3
EXT_NAMES = {EXT_NDARRAY: "ndarray", EXT_COMPLEX: "complex", EXT_NPSCALAR: "numpy scalar"}

MAX_DEPTH = 200

_BE = {
    1: struct.Struct(">B"),
    2: struct.Struct(">H"),
    4: struct.Struct(">I"),
    8: struct.Struct(">Q"),
}
_BE_SIGNED = {
    1: struct.Struct(">b"),
    2: struct.Struct(">h"),
    4: struct.Struct(">i"),
    8: struct.Struct(">q"),
}
_F32 = struct.Struct(">f")
_F64 = struct.Struct(">d")


@dataclasses.dataclass(frozen=True)
class ArrayRef:
    """A Flax ndarray (extension 1) or numpy scalar (extension 3), located in the file.

    Attributes:
        offset: byte offset of the raw C-order data in the buffer.
        nbytes: length of the raw data (``prod(shape) * itemsize``, checked).
        shape: the array shape (``()`` for a numpy scalar).
        dtype: the canonical dtype name (``"float32"``, ``"bfloat16"``).
        at: byte offset of the extension object itself, for messages.
    """

    offset: int
    nbytes: int
    shape: tuple[int, ...]
    dtype: str
    at: int


@dataclasses.dataclass(frozen=True)
class StrRef:
    """A msgpack string value, not yet decoded (offset and length of its UTF-8 bytes)."""

    offset: int
    length: int

    def text(self, buf: Any) -> str:
        """Decodes the string (``errors="replace"``: values are only compared with prefixes)."""
        return bytes(buf[self.offset : self.offset + self.length]).decode("utf-8", "replace")

    def startswith(self, buf: Any, prefix: str) -> bool:
        """Whether the string starts with ``prefix``, reading only that many bytes."""
        raw = prefix.encode()
        if self.length < len(raw):
            return False
        return bytes(buf[self.offset : self.offset + len(raw)]) == raw


@dataclasses.dataclass(frozen=True)
class BinRef:
    """A msgpack byte string value (offset and length of its bytes)."""

    offset: int
    length: int


def scan(buf: Any, where: object) -> Any:
    """Walks a whole msgpack document and returns its tree of references.

    Example:
        >>> import mmap, msgpack
        >>> tree = scan(msgpack.packb({"a": {"b": 1.5}, "c": None}), "x.msgpack")
        >>> tree
        {'a': {'b': 1.5}, 'c': None}

    Args:
        buf: the document: ``bytes``, a ``memoryview`` or an ``mmap``.
        where: the file, named in error messages.

    Returns:
        The root: ``dict`` / ``list`` containers; ``None``, ``bool``, ``int``, ``float`` and
        ``complex`` values; :class:`StrRef`, :class:`BinRef` and :class:`ArrayRef` references.

    Raises:
        CheckpointFormatError: the document is truncated, a declared length overruns the file,
            an extension type is not one of Flax's, an ndarray payload is malformed, or bytes
            follow the document.
    """
    walker = _Walker(buf, str(where), 0, len(buf), "the file")
    root, end = walker.value(0, (), 0)
    if end != len(buf):
        raise CheckpointFormatError(
            f"{where}: expected the end of the file after the msgpack document that ends at byte "
            f"{end}, found {len(buf) - end} more bytes"
        )
    return root


def _at(path: KeyPath) -> str:
    return f" (at {keystr(path)})" if path else ""


class _Walker:
    """Reads msgpack values within ``[start, end)`` of a buffer (one region: file or payload)."""

    def __init__(self, buf: Any, where: str, start: int, end: int, region: str) -> None:
        self.buf = buf
        self.where = where
        self.start = start
        self.end = end
        self.region = region

    # -- bounds ------------------------------------------------------------------------------

    def _need(self, pos: int, n: int, what: str, path: KeyPath) -> None:
        if pos + n > self.end:
            raise CheckpointFormatError(
                f"{self.where}: truncated msgpack data{_at(path)}: expected {what} at byte {pos}, "
                f"found the end of {self.region} at byte {self.end}"
            )

    def _extent(self, pos: int, n: int, what: str, at: int, path: KeyPath) -> None:
        if pos + n > self.end:
            raise CheckpointFormatError(
                f"{self.where}: {what} at byte {at}{_at(path)} declares {n} bytes of data "
                f"through byte {pos + n}, but {self.region} ends at byte {self.end}"
            )

    def _uint(self, pos: int, size: int, what: str, path: KeyPath) -> int:
        self._need(pos, size, what, path)
        return _BE[size].unpack_from(self.buf, pos)[0]

    # -- values ------------------------------------------------------------------------------

    def value(self, pos: int, path: KeyPath, depth: int) -> tuple[Any, int]:
        """Reads the value at ``pos``; returns it and the position after it."""
        self._need(pos, 1, "a msgpack value", path)
        b = self.buf[pos]
        if b <= 0x7F:
            return b, pos + 1
        if b >= 0xE0:
            return b - 0x100, pos + 1
        if b <= 0x8F:
            return self._map(pos, pos + 1, b & 0x0F, path, depth)
        if b <= 0x9F:
            return self._array(pos, pos + 1, b & 0x0F, path, depth)
        if b <= 0xBF:
            return self._bytes(pos, pos + 1, b & 0x1F, "a string", path, StrRef)
        if b == 0xC0:
            return None, pos + 1
        if b == 0xC2:
            return False, pos + 1
        if b == 0xC3:
            return True, pos + 1
        if 0xC4 <= b <= 0xC6:  # bin 8/16/32
            size = 1 << (b - 0xC4)
            n = self._uint(pos + 1, size, f"the {size}-byte length of a bin", path)
            return self._bytes(pos, pos + 1 + size, n, "a bin", path, BinRef)
        if 0xC7 <= b <= 0xC9:  # ext 8/16/32
            size = 1 << (b - 0xC7)
            n = self._uint(pos + 1, size, f"the {size}-byte length of an ext", path)
            return self._ext(pos, pos + 1 + size, n, path, depth)
        if b == 0xCA:
            self._need(pos + 1, 4, "a float32", path)
            return _F32.unpack_from(self.buf, pos + 1)[0], pos + 5
        if b == 0xCB:
            self._need(pos + 1, 8, "a float64", path)
            return _F64.unpack_from(self.buf, pos + 1)[0], pos + 9
        if 0xCC <= b <= 0xCF:  # uint 8/16/32/64
            size = 1 << (b - 0xCC)
            return self._uint(pos + 1, size, f"a uint{8 * size}", path), pos + 1 + size
        if 0xD0 <= b <= 0xD3:  # int 8/16/32/64
            size = 1 << (b - 0xD0)
            self._need(pos + 1, size, f"an int{8 * size}", path)
            return _BE_SIGNED[size].unpack_from(self.buf, pos + 1)[0], pos + 1 + size
        if 0xD4 <= b <= 0xD8:  # fixext 1/2/4/8/16
            return self._ext(pos, pos + 1, 1 << (b - 0xD4), path, depth)
        if 0xD9 <= b <= 0xDB:  # str 8/16/32
            size = 1 << (b - 0xD9)
            n = self._uint(pos + 1, size, f"the {size}-byte length of a string", path)
            return self._bytes(pos, pos + 1 + size, n, "a string", path, StrRef)
        if b in (0xDC, 0xDD):  # array 16/32
            size = 2 if b == 0xDC else 4
            n = self._uint(pos + 1, size, f"the {size}-byte length of an array", path)
            return self._array(pos, pos + 1 + size, n, path, depth)
        if b in (0xDE, 0xDF):  # map 16/32
            size = 2 if b == 0xDE else 4
            n = self._uint(pos + 1, size, f"the {size}-byte length of a map", path)
            return self._map(pos, pos + 1 + size, n, path, depth)
        raise CheckpointFormatError(  # 0xc1 is the only byte left
            f"{self.where}: expected a msgpack type byte at byte {pos}{_at(path)}, found 0xc1 "
            "(reserved, never written)"
        )

    def _bytes(self, at: int, pos: int, n: int, what: str, path: KeyPath, ref: type) -> Any:
        self._extent(pos, n, what, at, path)
        return ref(pos, n), pos + n

    def _enter(self, at: int, pos: int, count: int, what: str, path, depth: int) -> None:
        """Checks depth, and that ``count`` entries (a byte each at least) fit the region."""
        if depth >= MAX_DEPTH:
            raise CheckpointFormatError(
                f"{self.where}: expected at most {MAX_DEPTH} nested maps and arrays, found deeper "
                f"nesting at byte {at}{_at(path)}"
            )
        # Checked before looping, so a garbled count of billions fails at once.
        per_item = 2 if what == "map" else 1
        if pos + count * per_item > self.end:
            raise CheckpointFormatError(
                f"{self.where}: {what} at byte {at}{_at(path)} declares {count} entries, at least "
                f"{count * per_item} bytes through byte {pos + count * per_item}, but "
                f"{self.region} ends at byte {self.end}"
            )

    def _array(self, at: int, pos: int, n: int, path: KeyPath, depth: int) -> tuple[list, int]:
        self._enter(at, pos, n, "array", path, depth)
        items = []
        for i in range(n):
            item, pos = self.value(pos, (*path, str(i)), depth + 1)
            items.append(item)
        return items, pos

    def _map(self, at: int, pos: int, n: int, path: KeyPath, depth: int) -> tuple[dict, int]:
        self._enter(at, pos, n, "map", path, depth)
        out: dict[str, Any] = {}
        for _ in range(n):
            key_at = pos
            key, pos = self.value(pos, path, depth + 1)
            name = self._key_name(key, key_at, path)
            out[name], pos = self.value(pos, (*path, name), depth + 1)
        return out, pos

    def _key_name(self, key: Any, at: int, path: KeyPath) -> str:
        if isinstance(key, (StrRef, BinRef)):
            raw = bytes(self.buf[key.offset : key.offset + key.length])
            try:
                return raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise CheckpointFormatError(
                    f"{self.where}: expected a UTF-8 map key at byte {at}{_at(path)}, found "
                    f"undecodable bytes ({e.reason} at position {e.start})"
                ) from e
        if isinstance(key, (bool, int, float)) or key is None:
            return str(key)  # msgpack_restore keeps such keys; flax's state dicts use str()
        raise CheckpointFormatError(
            f"{self.where}: expected a string map key at byte {at}{_at(path)}, found a {_kind(key)}"
        )

    def _ext(self, at: int, pos: int, n: int, path: KeyPath, depth: int) -> tuple[Any, int]:
        self._need(pos, 1, "the type code of an ext", path)
        code = _BE_SIGNED[1].unpack_from(self.buf, pos)[0]
        data = pos + 1
        if code not in EXT_NAMES:
            raise CheckpointFormatError(
                f"{self.where}: expected a Flax msgpack extension type (1 ndarray, 2 complex, "
                f"3 numpy scalar) at byte {at}{_at(path)}, found extension type {code}"
            )
        self._extent(data, n, f"an ext ({EXT_NAMES[code]})", at, path)
        region = f"the {EXT_NAMES[code]} payload of the ext at byte {at}"
        sub = _Walker(self.buf, self.where, data, data + n, region)
        payload, end = sub.value(data, path, depth + 1)
        if end != data + n:
            raise CheckpointFormatError(
                f"{self.where}: expected {region} to end at byte {data + n}{_at(path)}, found "
                f"its msgpack value ending at byte {end}"
            )
        if code == EXT_COMPLEX:
            return self._complex(payload, at, path), data + n
        return self._ndarray(payload, at, path, code == EXT_NPSCALAR), data + n

    def _complex(self, payload: Any, at: int, path: KeyPath) -> complex:
        if (
            isinstance(payload, list)
            and len(payload) == 2
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in payload)
        ):
            return complex(payload[0], payload[1])
        raise CheckpointFormatError(
            f"{self.where}: expected Flax's complex payload (real, imag) in the ext at byte "
            f"{at}{_at(path)}, found {_describe(payload)}"
        )

    def _ndarray(self, payload: Any, at: int, path: KeyPath, scalar: bool) -> ArrayRef:
        shape_ok = (
            isinstance(payload, list)
            and len(payload) == 3
            and isinstance(payload[0], list)
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in payload[0])
            and isinstance(payload[1], (StrRef, BinRef))
            and isinstance(payload[2], (StrRef, BinRef))
        )
        if not shape_ok:
            raise CheckpointFormatError(
                f"{self.where}: expected Flax's ndarray payload (shape, dtype name, bytes) in the "
                f"ext at byte {at}{_at(path)}, found {_describe(payload)}"
            )
        shape = tuple(payload[0])
        name_ref, data = payload[1], payload[2]
        name = bytes(self.buf[name_ref.offset : name_ref.offset + name_ref.length]).decode(
            "ascii", "replace"
        )
        dtype = _dtype(name)
        if dtype is None:
            raise CheckpointFormatError(
                f"{self.where}: array at byte {at}{_at(path)}: expected a numeric dtype name "
                f"(float32, bfloat16, int8, ...), found {name!r}"
            )
        if scalar and shape != ():
            raise CheckpointFormatError(
                f"{self.where}: numpy scalar at byte {at}{_at(path)}: expected shape (), found "
                f"{shape}"
            )
        needed = math.prod(shape) * dtype.itemsize
        if data.length != needed:
            raise CheckpointFormatError(
                f"{self.where}: array at byte {at}{_at(path)}: shape {shape} of {name} needs "
                f"{needed} bytes, found {data.length}"
            )
        return ArrayRef(data.offset, data.length, shape, fmt.dtype_name(dtype), at)


def _dtype(name: str) -> np.dtype | None:
    try:
        dtype = fmt.numpy_dtype(name)
    except (TypeError, AttributeError, ValueError):
        return None
    # Flax refuses object and structured dtypes; strings and datetimes are not weights either.
    if dtype.hasobject or dtype.names is not None or dtype.kind in "OUSMm" or not dtype.itemsize:
        return None
    return dtype


def _kind(value: Any) -> str:
    if isinstance(value, StrRef):
        return "string"
    if isinstance(value, BinRef):
        return "bin"
    if isinstance(value, ArrayRef):
        return "Flax array"
    if isinstance(value, dict):
        return "map"
    if isinstance(value, list):
        return "array"
    return type(value).__name__


def _describe(payload: Any) -> str:
    if isinstance(payload, list):
        return "an array of [" + ", ".join(_kind(x) for x in payload) + "]"
    return f"a {_kind(payload)}"


# -- mapped files and boxes ------------------------------------------------------------------


class MappedFile:
    """One local file, mapped read-only (an empty file is ``b""``: it cannot be mapped).

    Args:
        location: a local file.

    Raises:
        CheckpointFormatError: the file cannot be opened or mapped.
    """

    def __init__(self, location: Location) -> None:
        self.location = location
        try:
            with open(str(location.local_path), "rb") as f:
                size = os.fstat(f.fileno()).st_size
                self.buf: Any = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
        except (OSError, ValueError) as e:
            raise CheckpointFormatError(f"{location}: cannot read ({fmt.one_line(e)})") from e

    def release(self, start: int, stop: int) -> None:
        """Hands the pages of ``[start, stop)`` back to the kernel (the page cache keeps them).

        Pages of a read-only file mapping count in the process's RSS until released; dropping
        them after each copy keeps RSS at the size of one slab. Another thread reading the same
        pages only faults them in again.
        """
        if not isinstance(self.buf, mmap.mmap) or not hasattr(mmap, "MADV_DONTNEED"):
            return
        begin = start - start % mmap.PAGESIZE
        stop = min(stop, len(self.buf))
        if stop > begin:
            self.buf.madvise(mmap.MADV_DONTNEED, begin, stop - begin)

    def close(self) -> None:
        """Unmaps the file."""
        if isinstance(self.buf, mmap.mmap):
            self.buf.close()


@dataclasses.dataclass(frozen=True)
class Segment:
    """A run of an array's flat (C-order) elements stored contiguously in one mapped file.

    Attributes:
        file: the file.
        start: the flat index of the run's first element.
        count: the number of elements.
        offset: the byte offset of the first element in the file.
    """

    file: MappedFile
    start: int
    count: int
    offset: int


def read_box(
    shape: tuple[int, ...], dtype_name: str, segments: list[Segment], box: tuple[slice, ...]
) -> np.ndarray:
    """Copies one box of an array out of its mapped segments, then releases the pages read.

    Args:
        shape: the array's shape.
        dtype_name: its canonical dtype name.
        segments: its flat runs, in order, covering ``prod(shape)`` elements (one for a plain
            Flax array, one per chunk for a chunked one).
        box: explicit in-bounds step-1 slices, one per axis.

    Returns:
        A new array of the box's shape: only the box's elements are copied, through strided
        views of the mapping.
    """
    dtype = fmt.numpy_dtype(dtype_name)
    out = np.empty(tuple(s.stop - s.start for s in box), dtype)
    if out.size == 0:
        return out
    first = _ravel(tuple(s.start for s in box), shape)
    last = _ravel(tuple(s.stop - 1 for s in box), shape) + 1
    for seg in segments:
        lo_flat, hi_flat = max(first, seg.start), min(last, seg.start + seg.count)
        if lo_flat >= hi_flat:
            continue
        flat = np.frombuffer(seg.file.buf, dtype, count=seg.count, offset=seg.offset)
        for start, size in _flat_boxes(lo_flat, hi_flat, shape):
            lo = [max(a, s.start) for a, s in zip(start, box, strict=True)]
            hi = [min(a + n, s.stop) for a, n, s in zip(start, size, box, strict=True)]
            if any(a >= b for a, b in zip(lo, hi, strict=True)):
                continue
            at = _ravel(start, shape) - seg.start
            view = flat[at : at + math.prod(size)].reshape(size)
            pairs = list(zip(lo, hi, strict=True))
            dst = tuple(
                slice(a - s.start, b - s.start) for (a, b), s in zip(pairs, box, strict=True)
            )
            src = tuple(slice(a - s, b - s) for (a, b), s in zip(pairs, start, strict=True))
            out[dst] = view[src]
            del view
        del flat
        base = seg.offset - seg.start * dtype.itemsize
        seg.file.release(base + lo_flat * dtype.itemsize, base + hi_flat * dtype.itemsize)
    return out


def _ravel(index: tuple[int, ...], shape: tuple[int, ...]) -> int:
    flat = 0
    for i, d in zip(index, shape, strict=True):
        flat = flat * d + i
    return flat


def _flat_boxes(
    a: int, b: int, shape: tuple[int, ...]
) -> Iterator[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Splits the flat range ``[a, b)`` of a C-order array into boxes ``(start, size)``.

    At most three boxes per axis (a partial head row, whole rows, a partial tail row), each
    contiguous in memory.
    """
    if a >= b:
        return
    if not shape:
        yield (), ()
        return
    inner = math.prod(shape[1:])
    r0, ra = divmod(a, inner)
    r1, rb = divmod(b, inner)
    if r0 == r1:
        for s, n in _flat_boxes(ra, rb, shape[1:]):
            yield (r0, *s), (1, *n)
        return
    if ra:
        for s, n in _flat_boxes(ra, inner, shape[1:]):
            yield (r0, *s), (1, *n)
        r0 += 1
    if r1 > r0:
        yield (r0, *([0] * (len(shape) - 1))), (r1 - r0, *shape[1:])
    if rb:
        for s, n in _flat_boxes(0, rb, shape[1:]):
            yield (r1, *s), (1, *n)
