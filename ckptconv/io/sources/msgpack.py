"""Flax msgpack checkpoints, read lazily: ``checkpoint_<step>`` files and ``flax_model.msgpack``.

:class:`MsgpackSource` reads what ``flax.training.checkpoints.save_checkpoint`` writes with
Orbax checkpointing off (one msgpack file per step, ``checkpoint_<step>``), and what
``flax.serialization.to_bytes`` writes (Hugging Face's ``flax_model.msgpack``, single or sharded
as ``flax_model-0000N-of-0000M.msgpack`` with ``flax_model.msgpack.index.json``, as
``transformers``' ``save_pretrained`` writes them). Opening a source maps each file and walks it
once (:mod:`._msgpack_scan`): every array's byte offset, shape and dtype is indexed without
reading its data. A slab is then copied out of the mapping alone, and the pages it touched are
handed back to the kernel (``MADV_DONTNEED``), so peak memory follows the slab, not the file.

Flax's encodings, as ``flax.serialization`` writes them: arrays are extension 1 ``(shape,
dtype name, C-order bytes)``, numpy scalars extension 3, Python complex numbers extension 2;
arrays above ``MAX_CHUNK_SIZE`` (1 GiB) are maps ``{"__msgpack_chunked_array__": True, "shape":
{"0": ...}, "chunks": {"0": flat array, ...}}`` (one leaf here, of its full shape); lists and
tuples are maps keyed ``"0"``, ``"1"``, ...; ``None`` and empty containers (optax's
``EmptyState``) are empty leaves; Python numbers are 0-d arrays (int64, or uint64 above
its range; float64; bool; complex128).
Multi-process arrays (``save_checkpoint_multiprocess``) are ``//GDAPlaceholder:<a/b/c>``
strings; their data is a TensorStore zarr array in ``checkpoint_<step>_gda/<a/b/c>/``, opened
lazily and read a slab at a time.

Limits: local files only (the mapping needs a file descriptor); arrays are taken in the
machine's byte order, as Flax writes them; strings and byte strings other than GDA placeholders
are refused as leaves, since they hold no array.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorstore as ts

from ...errors import CheckpointFormatError, LayoutError
from .. import _format as fmt
from .._slab import slab_box
from ..leaf import KeyPath, Leaf, keystr
from ..location import Location
from . import _msgpack_scan as scan

FLAX_WEIGHTS_NAME = "flax_model.msgpack"
FLAX_WEIGHTS_INDEX_NAME = "flax_model.msgpack.index.json"
CHECKPOINT_PREFIX = "checkpoint_"
GDA_SUFFIX = "_gda"  # flax.training.checkpoints.MP_ARRAY_POSTFIX
GDA_PLACEHOLDER = "//GDAPlaceholder:"  # flax.training.checkpoints.MP_ARRAY_PH
CHUNKED_KEY = "__msgpack_chunked_array__"
ORBAX_PLACEHOLDER = "PLACEHOLDER://"
# The block chunk_shape() offers the slab planner: any box is cheap to read from a mapping,
# so this only sets the granularity of reads (contiguous byte ranges of about this size).
SLAB_BYTES = 8 << 20

# A step as flax.training.checkpoints names it (int or float, signed; SIGNED_FLOAT_RE).
_STEP_RE = re.compile(
    re.escape(CHECKPOINT_PREFIX) + r"([-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)"
)
_MAP_MARKERS = frozenset([*range(0x80, 0x90), 0xDE, 0xDF])
_STR_MARKERS = frozenset([*range(0xA0, 0xC0), 0xD9, 0xDA, 0xDB])


def latest_step_name(names: list[str] | set[str]) -> str | None:
    """The ``checkpoint_<step>`` name Flax's ``latest_checkpoint`` picks among ``names``.

    Flax sorts ``checkpoint_*`` names naturally and skips ``checkpoint_tmp``, ``*_gda`` and
    Orbax's ``*.orbax-checkpoint-tmp*`` folders; here only names whose whole suffix is a step
    number count, which skips those and any other leftover, and the highest step wins.

    Example:
        >>> latest_step_name(["checkpoint_2", "checkpoint_10", "checkpoint_tmp", "checkpoint_9_x"])
        'checkpoint_10'
    """
    steps = [(float(m.group(1)), n) for n in names if (m := _STEP_RE.fullmatch(n))]
    return max(steps)[1] if steps else None


class _Format:
    name = "msgpack"
    description = "Flax msgpack checkpoint (checkpoint_<step> or flax_model.msgpack)"

    def detect(self, location: Location) -> bool:
        return MsgpackSource.detect(location)

    def open(self, location: Location) -> MsgpackSource:
        return MsgpackSource(location)


FORMAT = _Format()
"""The :class:`~ckptconv.io.sources.resolve.SourceFormat` to register for this module."""


class _Stored:
    """An array whose bytes lie in mapped files: one segment, or one per Flax chunk."""

    def __init__(self, shape: tuple[int, ...], dtype: str, segments: list[scan.Segment]) -> None:
        self.shape, self.dtype, self.segments = shape, dtype, segments


class _Gda:
    """A multi-process array: a TensorStore zarr array in the ``_gda`` folder."""

    def __init__(self, folder: Location, placeholder: str) -> None:
        self.folder, self.placeholder = folder, placeholder
        self.store: ts.TensorStore | None = None


class MsgpackSource:
    """A Flax msgpack checkpoint opened lazily (a :class:`CheckpointSource`).

    Example:
        >>> src = MsgpackSource("ckpts/")  # a folder of checkpoint_<step> files: the latest
        >>> src.location.name
        'checkpoint_10'
        >>> src.leaves()[("params", "Dense_0", "kernel")]
        Leaf(path=('params', 'Dense_0', 'kernel'), shape=(3, 4), dtype='float32')
        >>> src.read(("params", "Dense_0", "kernel"), (slice(0, 2),)).shape
        (2, 4)

    Args:
        location: a msgpack file (``checkpoint_<step>``, ``flax_model.msgpack``, a shard), a
            ``flax_model.msgpack.index.json``, or a folder holding ``flax_model.msgpack``, its
            index, or ``checkpoint_<step>`` files (the latest step is read, as Flax's
            ``latest_checkpoint`` picks it). A local path or :class:`Location`.

    Raises:
        CheckpointFormatError: nothing of this format is there, a file is not local, or a file
            is truncated, overruns its own length, uses an unknown extension type or holds a
            leaf that is not an array; a sharded index is invalid or names a missing shard.
    """

    format_name = "msgpack"
    use_zarr3 = True

    def __init__(self, location: str | os.PathLike[str] | Location) -> None:
        self.custom_metadata: Any = {}
        loc = Location.parse(location)
        if loc.local_path is None:
            raise CheckpointFormatError(
                f"{loc}: expected a Flax msgpack checkpoint on a local disk, found a "
                f"{loc.scheme}:// location; copy it to a local folder first"
            )
        self.location = _resolve(loc)
        self._lock = threading.Lock()
        self._files: list[scan.MappedFile] = []
        self._entries: dict[KeyPath, Any] = {}
        self._leaves: dict[KeyPath, Leaf] | None = None
        try:
            if self.location.name.endswith(".index.json"):
                self._load_sharded(self.location)
            else:
                self._load_file(self.location)
        except BaseException:
            self.close()
            raise

    def __repr__(self) -> str:
        return f"MsgpackSource({str(self.location)!r})"

    def __enter__(self) -> MsgpackSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @classmethod
    def detect(cls, location: str | os.PathLike[str] | Location) -> bool:
        """Whether ``location`` holds a Flax msgpack checkpoint (names and magic bytes only).

        True for a folder with ``flax_model.msgpack``, its index, or whose latest
        ``checkpoint_<step>`` is a file (Flax with Orbax writes folders instead); for a file
        named ``checkpoint_<step>``, ``*.msgpack`` or ``*.msgpack.index.json``; and for any
        other local file that starts as a msgpack map with a string key. Never raises.
        """
        try:
            loc = Location.parse(location)
            if loc.is_dir():
                names = set(loc.list_dir())
                if FLAX_WEIGHTS_NAME in names or FLAX_WEIGHTS_INDEX_NAME in names:
                    return True
                latest = latest_step_name(names)
                return latest is not None and not loc.join(latest).is_dir()
            if not loc.exists():
                return False
            name = loc.name
            if name.endswith((".msgpack", ".msgpack.index.json")) or _STEP_RE.fullmatch(name):
                return True
            return _starts_as_msgpack_map(loc)
        except Exception:  # noqa: BLE001 - detection never raises; open() reports
            return False

    @property
    def files(self) -> list[Location]:
        """The msgpack files this source reads (one, or every shard)."""
        return [f.location for f in self._files]

    def leaves(self) -> dict[KeyPath, Leaf]:
        """Returns every leaf with its shape and dtype, in file order, from the index alone.

        GDA arrays are opened (metadata only) the first time this is called.

        Raises:
            CheckpointFormatError: a GDA placeholder's TensorStore array is missing or invalid.
        """
        with self._lock:
            if self._leaves is None:
                self._open_gda()
                self._leaves = {path: _leaf(path, e) for path, e in self._entries.items()}
        return dict(self._leaves)

    def chunk_shape(self, path: KeyPath) -> tuple[int, ...]:
        """Returns the box the slab planner should read at a time.

        A msgpack array has no stored chunks: it is one C-order run of bytes (or a few, when
        Flax chunked it), and any box is a strided view of the mapping. The shape returned is
        a C-order block of about :data:`SLAB_BYTES` (8 MiB): whole trailing axes, then as many
        entries of the next axis as fit, then ones; so each such box is one contiguous byte
        range. GDA arrays answer their zarr chunk shape; scalars their shape.

        Raises:
            LayoutError: ``path`` is not an array leaf of this checkpoint.
        """
        entry = self._array_entry(path)
        if isinstance(entry, _Gda):
            return tuple(int(c) for c in entry.store.chunk_layout.read_chunk.shape)  # type: ignore[union-attr]
        shape = tuple(entry.shape)
        itemsize = fmt.dtype_itemsize(str(entry.dtype))
        out = []
        inner = itemsize
        for axis in reversed(range(len(shape))):
            dim = max(shape[axis], 1)
            if inner * dim <= SLAB_BYTES:
                out.append(dim)
                inner *= dim
            else:
                out.append(max(1, SLAB_BYTES // inner))
                out.extend([1] * axis)
                break
        return tuple(reversed(out))

    def ext_metadata(self, path: KeyPath) -> dict[str, Any] | None:
        """Always ``None``: Flax msgpack files record no per-array metadata.

        Raises:
            LayoutError: ``path`` is not a leaf of this checkpoint.
        """
        self._entry(path)
        return None

    def read(self, path: KeyPath, index: tuple[slice, ...] | None = None) -> np.ndarray:
        """Reads one array, or one slab of it, copying only the slab out of the mapping.

        ``path``, ``index`` and the result are as for :meth:`ckptconv.io.CheckpointReader.read`
        (the result is always a new array).

        Raises:
            LayoutError: ``path`` is not an array leaf, or ``index`` does not fit its shape.
            CheckpointFormatError: a GDA array's data cannot be read.
        """
        path = tuple(path)
        entry = self._array_entry(path)
        shape = tuple(entry.shape) if not isinstance(entry, _Gda) else tuple(entry.store.shape)  # type: ignore[union-attr]
        box = slab_box(self.location, path, index, shape)
        if isinstance(entry, np.ndarray):
            return np.array(entry[box])  # indexing a 0-d array gives a scalar; keep an array
        if isinstance(entry, _Gda):
            try:
                return np.asarray(entry.store[box].read().result())  # type: ignore[index]
            except Exception as e:
                raise CheckpointFormatError(
                    f"{self.location}: cannot read array {keystr(path)} ({entry.placeholder}) "
                    f"from {entry.folder}: {fmt.one_line(e)}"
                ) from e
        return scan.read_box(entry.shape, entry.dtype, entry.segments, box)

    def close(self) -> None:
        """Unmaps the files; the source cannot be read afterwards."""
        for f in self._files:
            f.close()

    # -- opening -----------------------------------------------------------------------------

    def _load_file(self, location: Location, seen: dict[KeyPath, Location] | None = None) -> set:
        file = scan.MappedFile(location)
        self._files.append(file)
        root = scan.scan(file.buf, location)
        found = set()
        for path, node in _flatten(root, ()):
            if seen is not None:
                if path in seen:
                    raise CheckpointFormatError(
                        f"{location}: leaf {keystr(path)} is also in shard {seen[path].name}; "
                        "expected each weight in one shard"
                    )
                seen[path] = location
            self._entries[path] = self._classify(file, path, node)
            found.add(path)
        return found

    def _load_sharded(self, index: Location) -> None:
        try:
            doc = json.loads(index.read_bytes())
            weight_map = doc["weight_map"]
            if not isinstance(weight_map, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
            ):
                raise TypeError("weight_map is not a map of names to shard files")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointFormatError(
                f"{index}: expected a Hugging Face index (JSON with a 'weight_map' of parameter "
                f"names to shard files), found {fmt.one_line(e) or type(e).__name__}"
            ) from e
        folder = index.parent
        shards = sorted(set(weight_map.values()))  # as transformers' get_checkpoint_shard_files
        if not shards:
            raise CheckpointFormatError(f"{index}: expected shard files in weight_map, found none")
        seen: dict[KeyPath, Location] = {}
        names: dict[str, set[str]] = {}
        for shard in shards:
            where = folder.join(shard)
            if os.path.isabs(shard) or ".." in shard.split("/") or not where.exists():
                name = next(k for k, v in weight_map.items() if v == shard)
                raise CheckpointFormatError(
                    f"{index}: weight_map names shard {shard!r} (for {name!r}), found no such "
                    f"file in {folder}"
                )
            found = self._load_file(where, seen)
            names[shard] = {sep.join(p) for p in found for sep in ("/", ".")}
        for name, shard in weight_map.items():
            if name not in names[shard]:
                raise CheckpointFormatError(
                    f"{index}: weight_map puts {name!r} in shard {shard}, found no such leaf in it"
                )

    def _classify(self, file: scan.MappedFile, path: KeyPath, node: Any) -> Any:
        if node is None:
            return None
        if isinstance(node, scan.ArrayRef):
            count = math.prod(node.shape)
            return _Stored(node.shape, node.dtype, [scan.Segment(file, 0, count, node.offset)])
        if isinstance(node, dict):  # a chunked array (_flatten yields no other map)
            return self._chunked(file, path, node)
        if isinstance(node, (bool, int, float, complex)):
            return np.asarray(node)
        if isinstance(node, scan.StrRef):
            if node.startswith(file.buf, GDA_PLACEHOLDER):
                return self._gda(file, path, node.text(file.buf))
            text = node.text(file.buf)
            hint = ""
            if text.startswith(ORBAX_PLACEHOLDER):
                hint = "; this is an older Orbax item's tree file: pass its folder instead"
            shown = text if len(text) <= 60 else text[:57] + "..."
            raise CheckpointFormatError(
                f"{file.location}: leaf {keystr(path)}: expected an array, a number or an empty "
                f"node, found the string {shown!r}{hint}"
            )
        raise CheckpointFormatError(
            f"{file.location}: leaf {keystr(path)}: expected an array, a number or an empty "
            f"node, found a msgpack bin of {node.length} bytes"
        )

    def _chunked(self, file: scan.MappedFile, path: KeyPath, node: dict) -> _Stored:
        where = f"{file.location}: chunked array {keystr(path)}"
        shape_node, chunks_node = node.get("shape"), node.get("chunks")
        shape = _as_sequence(shape_node)
        chunks = _as_sequence(chunks_node)
        if (
            set(node) != {CHUNKED_KEY, "shape", "chunks"}
            or node[CHUNKED_KEY] is not True
            or shape is None
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
            or not chunks
            or not all(isinstance(c, scan.ArrayRef) and len(c.shape) == 1 for c in chunks)
        ):
            raise CheckpointFormatError(
                f"{where}: expected Flax's {{{CHUNKED_KEY!r}: True, 'shape': {{'0': ...}}, "
                f"'chunks': {{'0': flat array, ...}}}}, found keys {sorted(node)}"
            )
        dtypes = {c.dtype for c in chunks}
        if len(dtypes) != 1:
            raise CheckpointFormatError(
                f"{where}: expected chunks of one dtype, found {', '.join(sorted(dtypes))}"
            )
        total = sum(c.shape[0] for c in chunks)
        if total != math.prod(shape):
            raise CheckpointFormatError(
                f"{where}: shape {tuple(shape)} needs {math.prod(shape)} elements, found "
                f"{total} in {len(chunks)} chunks"
            )
        segments, start = [], 0
        for c in chunks:
            segments.append(scan.Segment(file, start, c.shape[0], c.offset))
            start += c.shape[0]
        return _Stored(tuple(shape), dtypes.pop(), segments)

    def _gda(self, file: scan.MappedFile, path: KeyPath, text: str) -> _Gda:
        root = file.location.parent.join(file.location.name + GDA_SUFFIX)
        sub = text[len(GDA_PLACEHOLDER) :]
        folder = root.join(sub) if sub else root
        if os.path.isabs(sub) or not folder.is_within(root):
            raise CheckpointFormatError(
                f"{file.location}: leaf {keystr(path)}: expected a {GDA_PLACEHOLDER} path inside "
                f"{root}, found {sub!r}"
            )
        return _Gda(folder, text)

    def _open_gda(self) -> None:
        pending = {}
        for path, entry in self._entries.items():
            if isinstance(entry, _Gda) and entry.store is None:
                names = set(entry.folder.list_dir()) if entry.folder.is_dir() else set()
                driver = "zarr3" if "zarr.json" in names else "zarr" if ".zarray" in names else None
                if driver is None:
                    raise CheckpointFormatError(
                        f"{self.location}: leaf {keystr(path)} is {entry.placeholder!r}: expected "
                        f"a TensorStore zarr array (.zarray or zarr.json) in {entry.folder}, "
                        "found none"
                    )
                spec = {"driver": driver, "kvstore": entry.folder.kvstore_spec()}
                ctx = entry.folder.ts_context()
                pending[path] = ts.open(spec, open=True, read=True, context=ctx)
        for path, future in pending.items():
            entry = self._entries[path]
            try:
                entry.store = future.result()
            except Exception as e:
                raise CheckpointFormatError(
                    f"{self.location}: leaf {keystr(path)} is {entry.placeholder!r}: cannot open "
                    f"its TensorStore array in {entry.folder}: {fmt.one_line(e)}"
                ) from e

    # -- lookups -----------------------------------------------------------------------------

    def _entry(self, path: KeyPath) -> Any:
        path = tuple(path)
        if path not in self._entries:
            raise LayoutError(f"{self.location}: no leaf {keystr(path)} in this checkpoint")
        return self._entries[path]

    def _array_entry(self, path: KeyPath) -> Any:
        entry = self._entry(path)
        if entry is None:
            raise LayoutError(
                f"{self.location}: leaf {keystr(tuple(path))} is empty (None or an empty "
                "container); it holds no array"
            )
        if isinstance(entry, _Gda) and entry.store is None:
            self.leaves()
        return entry


def _resolve(loc: Location) -> Location:
    """The file to read: ``loc`` itself, or the msgpack file or index in folder ``loc``."""
    try:
        is_dir = loc.is_dir()
        exists = is_dir or loc.exists()
    except Exception as e:  # noqa: BLE001 - StorageError and OSError alike
        raise CheckpointFormatError(f"{loc}: cannot be read ({fmt.one_line(e)})") from e
    if not exists:
        raise CheckpointFormatError(f"{loc}: expected a Flax msgpack checkpoint, found nothing")
    if not is_dir:
        return loc
    names = set(loc.list_dir())
    # transformers' from_pretrained prefers the single file to the index.
    for name in (FLAX_WEIGHTS_NAME, FLAX_WEIGHTS_INDEX_NAME):
        if name in names:
            return loc.join(name)
    latest = latest_step_name(names)
    if latest is not None and not loc.join(latest).is_dir():
        return loc.join(latest)
    found = f"the latest step {latest}/ is a folder (an Orbax checkpoint)" if latest else "none"
    raise CheckpointFormatError(
        f"{loc}: expected a Flax msgpack checkpoint ({CHECKPOINT_PREFIX}<step> files, "
        f"{FLAX_WEIGHTS_NAME} or {FLAX_WEIGHTS_INDEX_NAME}), found {found}"
    )


def _starts_as_msgpack_map(loc: Location) -> bool:
    path = loc.local_path
    if path is None:
        return False
    with open(path, "rb") as f:
        head = f.read(8)
    if not head or head[0] not in _MAP_MARKERS:
        return False
    if head[0] == 0x80:  # an empty map
        return len(head) == 1
    key_at = {0xDE: 3, 0xDF: 5}.get(head[0], 1)
    return len(head) > key_at and head[key_at] in _STR_MARKERS


def _flatten(node: Any, path: KeyPath) -> Iterator[tuple[KeyPath, Any]]:
    """Yields ``(path, node)`` for every leaf: values, empty nodes, chunked-array maps."""
    if isinstance(node, dict):
        if CHUNKED_KEY in node:
            yield path, node
        elif not node:
            yield path, None
        else:
            for key, value in node.items():
                yield from _flatten(value, (*path, key))
    elif isinstance(node, list):
        if not node:
            yield path, None
        for i, value in enumerate(node):
            yield from _flatten(value, (*path, str(i)))
    else:
        yield path, node


def _as_sequence(node: Any) -> list | None:
    """Flax's ``_dict_to_tuple``: ``{"0": a, "1": b}`` (or a list) as ``[a, b]``."""
    if isinstance(node, list):
        return node
    if isinstance(node, dict) and set(node) == {str(i) for i in range(len(node))}:
        return [node[str(i)] for i in range(len(node))]
    return None


def _leaf(path: KeyPath, entry: Any) -> Leaf:
    if entry is None:
        return Leaf(path, None, None)
    if isinstance(entry, np.ndarray):
        return Leaf(path, tuple(entry.shape), fmt.dtype_name(entry.dtype))
    if isinstance(entry, _Gda):
        store = entry.store
        return Leaf(path, tuple(store.shape), fmt.dtype_name(store.dtype.numpy_dtype))  # type: ignore[union-attr]
    return Leaf(path, tuple(entry.shape), entry.dtype)
