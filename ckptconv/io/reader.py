"""Lazy reading of Orbax PyTree checkpoints: metadata first, arrays one slab at a time.

:class:`CheckpointReader` learns every key, shape and dtype from ``_METADATA`` and the zarr
metadata documents, without decoding any array, and opens arrays only when asked. For copying
arrays without decoding them it also lists an array's stored chunk keys and (OCDBT) walks the
B-tree (which files hold what). Shapes are the zarr metadata's, so an array stored with a
``transpose`` codec reads with its logical (permuted) shape.

It reads both ways Orbax stores arrays (zarr2 or zarr3): in one OCDBT database
(``use_ocdbt=True``, the default since Orbax 0.5) or in one folder per array named by its
'.'-joined key path (``use_ocdbt=False``, as older Orbax and MaxText on Pathways write). The tree
comes from ``_METADATA`` or, in older Orbax folders, from the msgpack ``checkpoint`` file whose
array leaves are ``PLACEHOLDER://<name>`` strings (see :mod:`ckptconv.io._legacy`); small values
stored inline there are held in memory.

Limits: a chunk whose compressed bytes are garbled in a way that still decodes (Orbax writes
zstd frames without checksums) cannot be detected; truncated or missing data is.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Mapping
from typing import Any

import numpy as np
import tensorstore as ts

from ..errors import CheckpointFormatError, LayoutError
from . import _format as fmt
from . import _item, _ocdbt, _stream
from ._permute import ChunkKeys
from ._slab import slab_box
from .leaf import KeyPath, Leaf, keystr
from .location import Location


class CheckpointReader:
    """Reads one Orbax checkpoint item lazily.

    Example:
        >>> reader = CheckpointReader("checkpoints/")  # a CheckpointManager root
        >>> str(reader.location)  # the item of the latest step
        '/abs/checkpoints/2/items'
        >>> leaf = reader.leaves()[("step",)]
        >>> reader.read(("params", "params", "decoder", "decoder_norm", "scale"))[:4]

    Args:
        location: an Orbax item folder (holding ``_METADATA``), a CheckpointManager step folder
            holding one item (``items``, ``default`` or ``state``), or a CheckpointManager root
            (its latest numeric step is used). A path, URL or :class:`Location`.

    Raises:
        CheckpointFormatError: the folder is missing, is not an OCDBT Orbax checkpoint, or its
            ``_METADATA`` is not valid.
        IncompleteCheckpointError: the folder is a temporary folder of an interrupted write.
    """

    def __init__(self, location: str | os.PathLike[str] | Location) -> None:
        self._location = _item.resolve_item(Location.parse(location))
        self._metadata = _item.load_metadata(self._location)
        self._use_zarr3 = bool(self._metadata.get("use_zarr3", False))
        self._use_ocdbt = bool(self._metadata["use_ocdbt"])
        self._entries = _item.parse_tree_metadata(self._location, self._metadata["tree_metadata"])
        by_tree_key = {fmt.tree_key(p): p for p in self._entries}
        for tree_key, name in self._metadata.get("legacy_keys", {}).items():
            self._entries[by_tree_key[tree_key]]["key"] = name
        self._inline: dict[KeyPath, np.ndarray] = {
            by_tree_key[k]: v for k, v in self._metadata.get("inline", {}).items()
        }
        self._lock = threading.RLock()
        self._context: ts.Context | None = None
        self._kvstore: ts.KvStore | None = None
        self._leaves: dict[KeyPath, Leaf] | None = None
        self._zarr: dict[KeyPath, dict[str, Any]] = {}
        self._stores: dict[KeyPath, ts.TensorStore] = {}
        self._custom_metadata: Any = None
        self._ext_metadata: dict[str, Any] | None = None
        self._contents: _ocdbt.Contents | None = None
        self._chunk_reads: _stream.ChunkReads | None = None
        self._stored: dict[KeyPath, _stream.StoredArray] = {}

    def __repr__(self) -> str:
        return f"CheckpointReader({str(self._location)!r})"

    @property
    def location(self) -> Location:
        """The item folder actually read (after resolving a step folder or manager root)."""
        return self._location

    @property
    def use_zarr3(self) -> bool:
        """Whether arrays are stored as zarr v3 (``zarr.json``) rather than zarr v2."""
        return self._use_zarr3

    @property
    def use_ocdbt(self) -> bool:
        """Whether arrays are stored in one OCDBT database rather than one folder each."""
        return self._use_ocdbt

    @property
    def format_name(self) -> str:
        """The source format's registry name: ``"ocdbt"`` or ``"zarr"`` (folder per array)."""
        return "ocdbt" if self._use_ocdbt else "zarr"

    @property
    def metadata(self) -> Mapping[str, Any]:
        """The parsed ``_METADATA`` document, as Orbax wrote it."""
        return self._metadata

    @property
    def kvstore(self) -> ts.KvStore:
        """The item's kvstore, for byte-level access (keys start with array keys).

        The OCDBT database, or the item folder itself when each array has its own folder.
        """
        with self._lock:
            if self._kvstore is None:
                self._context = self._location.ts_context()
                spec: dict[str, Any] = self._location.kvstore_spec()
                if self._use_ocdbt:
                    spec = {"driver": "ocdbt", "base": spec, "cache_pool": "cache_pool#ocdbt"}
                try:
                    self._kvstore = ts.KvStore.open(spec, context=self._context).result()
                except Exception as e:  # TensorStore reports I/O and format errors this way.
                    what = "folder"
                    if self._use_ocdbt:
                        what = f"OCDBT store ({fmt.OCDBT_MANIFEST_FILE})"
                    raise CheckpointFormatError(
                        f"{self._location}: expected a readable {what}, found an error: "
                        f"{fmt.one_line(e)}"
                    ) from e
            return self._kvstore

    @property
    def custom_metadata(self) -> Any:
        """The user metadata saved with the checkpoint (MaxText: ``{"scan_layers": true}``).

        Taken from ``_CHECKPOINT_METADATA`` in the item folder, then in its step folder, then
        from ``_METADATA``'s ``custom_metadata``; the first one that is not empty wins. ``{}``
        when none has any.
        """
        if self._custom_metadata is None:
            self._custom_metadata = self._find_custom_metadata()
        return self._custom_metadata

    def array_key(self, path: KeyPath) -> str:
        """Returns the key prefix of an array: its '.'-joined key path, or its placeholder name."""
        entry = self._entries.get(tuple(path))
        if entry is not None and entry.get("key"):
            return entry["key"]
        return fmt.array_key(tuple(path))

    def stores_chunks(self, path: KeyPath) -> bool:
        """Whether an array is stored as zarr chunks (which can be copied verbatim).

        ``False`` for values held inline in an older Orbax ``checkpoint`` file.
        """
        self._array_leaf(path)
        return tuple(path) not in self._inline

    def _doc_key(self, path: KeyPath) -> str:
        return f"{self.array_key(path)}/{'zarr.json' if self._use_zarr3 else '.zarray'}"

    def value_type(self, path: KeyPath) -> str:
        """Returns the ``value_type`` Orbax recorded for a leaf.

        ``"jax.Array"``, ``"np.ndarray"`` or ``"scalar"`` for arrays; ``"None"``, ``"Dict"``
        or ``"List"`` for empty leaves (``None`` / an empty optax state, ``{}``, ``[]``).
        """
        return self._entry(path)["value_type"]

    def key_types(self, path: KeyPath) -> tuple[int, ...]:
        """Returns the Orbax key type of each component of a leaf's path (1 list, 2 dict)."""
        return self._entry(path)["key_types"]

    def leaves(self) -> dict[KeyPath, Leaf]:
        """Returns every leaf with its shape and dtype, from metadata alone.

        Shapes and dtypes come from each array's zarr metadata document, read through the OCDBT
        store in one batch; no array chunk is read. Keys of list entries are the index as a
        string, e.g. ``("opt_state", "0", "mu", ...)``.

        Returns:
            The leaves in ``_METADATA`` order, keyed by path.

        Raises:
            CheckpointFormatError: an array listed in ``_METADATA`` has no valid zarr metadata.
        """
        with self._lock:
            if self._leaves is None:
                self._leaves = self._load_leaves()
        return dict(self._leaves)

    def zarr_metadata(self, path: KeyPath) -> dict[str, Any]:
        """Returns the parsed ``zarr.json`` (zarr3) or ``.zarray`` (zarr2) of an array."""
        self._array_leaf(path)
        return dict(self._zarr[tuple(path)])

    def ext_metadata(self, path: KeyPath) -> dict[str, Any] | None:
        """Returns Orbax's per-array ``ext_metadata`` (``array_metadatas/process_*``) or None.

        Orbax records ``{"random_key_impl": "threefry2x32"}`` here for typed PRNG keys, which
        it stores as their uint32 key data and restores as typed keys.
        """
        self._entry(path)
        if self._ext_metadata is None:
            self._ext_metadata = self._load_ext_metadata()
        return self._ext_metadata.get(self.array_key(path))

    def chunk_shape(self, path: KeyPath) -> tuple[int, ...]:
        """Returns the array's stored chunk shape, in the array's own axis order.

        For zarr3 this is the outer chunk grid (one shard when a ``sharding_indexed`` codec is
        used): reading any element of a chunk decodes that chunk, or its inner chunk.

        Raises:
            LayoutError: ``path`` is not an array leaf of this checkpoint.
            CheckpointFormatError: the zarr metadata has no chunk shape.
        """
        path = tuple(path)
        if path in self._inline:
            return tuple(self._inline[path].shape)
        doc = self.zarr_metadata(path)
        try:
            if self._use_zarr3:
                chunk = doc["chunk_grid"]["configuration"]["chunk_shape"]
            else:
                chunk = doc["chunks"]
            return tuple(int(c) for c in chunk)
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointFormatError(
                f"{self._location}: array {keystr(tuple(path))} has no valid chunk shape in its "
                f"zarr metadata ({fmt.one_line(e)})"
            ) from e

    def write_shape(self, path: KeyPath) -> tuple[int, ...] | None:
        """Returns the ``write_shape`` recorded in ``_METADATA`` (one written shard), if any."""
        shape = self._entry(path).get("write_shape")
        return None if shape is None else tuple(int(d) for d in shape)

    def ocdbt_contents(self) -> _ocdbt.Contents:
        """Returns what the latest version of the item's OCDBT database refers to.

        Walks the B-tree once (cached): the files it refers to, and each key's stored bytes.

        Raises:
            CheckpointFormatError: the database cannot be walked, or there is none (arrays
                stored one folder each).
        """
        if not self._use_ocdbt:
            raise CheckpointFormatError(
                f"{self._location}: stores one folder per array; it has no OCDBT database"
            )
        with self._lock:
            if self._contents is None:
                try:
                    self._contents = _ocdbt.inspect(self._location)
                except Exception as e:
                    raise CheckpointFormatError(
                        f"{self._location}: cannot walk the OCDBT B-tree: {fmt.one_line(e)}"
                    ) from e
            return self._contents

    def check_data_files(self) -> None:
        """Checks that every file the OCDBT B-tree refers to exists and is long enough.

        This catches missing and truncated data files without reading any of them; it does
        not catch garbled bytes of the right length.

        Raises:
            CheckpointFormatError: naming each missing or truncated file.
        """
        folder = self._location.local_path
        if folder is None or not self._use_ocdbt:
            return  # chunk files of per-array folders are checked as they are read
        problems = _ocdbt.damaged_files(folder, self.ocdbt_contents())
        if problems:
            shown = "; ".join(problems[:4]) + (
                f" (and {len(problems) - 4} more)" if len(problems) > 4 else ""
            )
            raise CheckpointFormatError(f"{self._location}: data files are damaged: {shown}")

    def chunk_keys(self, path: KeyPath) -> list[str]:
        """Lists the stored chunk keys of an array, relative to its key prefix, sorted.

        The zarr metadata document is not included. Orbax stores every chunk, so these are
        all the chunks of the array's grid.

        Raises:
            LayoutError: ``path`` is not an array leaf of this checkpoint.
            CheckpointFormatError: the OCDBT store cannot be listed.
        """
        path = tuple(path)
        self._array_leaf(path)
        key = self.array_key(path)
        doc = self._doc_key(path)[len(key) + 1 :]
        try:
            keys = (self.kvstore / f"{key}/").list().result()
        except Exception as e:
            raise CheckpointFormatError(
                f"{self._location}: cannot list the chunks of array {keystr(path)} (key "
                f"{key!r}): {fmt.one_line(e)}"
            ) from e
        return sorted(k.decode() for k in keys if k.decode() != doc)

    def chunk_index(self, path: KeyPath, key: str) -> tuple[int, ...] | None:
        """The chunk-grid index of one of :meth:`chunk_keys`, or ``None`` if not a chunk."""
        return ChunkKeys(self.zarr_metadata(path), zarr3=self._use_zarr3).parse(key)

    def open(self, path: KeyPath) -> ts.TensorStore:
        """Opens one array lazily; no chunk is read until the store is indexed and read.

        Every array shares the reader's OCDBT kvstore and TensorStore context, so opening all
        arrays of a large checkpoint reads its B-tree index once.

        Args:
            path: the key path of an array leaf.

        Returns:
            The opened TensorStore (read-only), in the array's stored dtype.

        Raises:
            LayoutError: ``path`` is not an array leaf of this checkpoint.
            CheckpointFormatError: the array's metadata cannot be opened.
        """
        path = tuple(path)
        self._array_leaf(path)
        with self._lock:
            return self._open_locked(path)

    def _open_locked(self, path: KeyPath) -> ts.TensorStore:
        store = self._stores.get(path)
        if store is None:
            key = self.array_key(path)
            spec = {
                "driver": "zarr3" if self._use_zarr3 else "zarr",
                "recheck_cached_data": False,
                "recheck_cached_metadata": False,
                # A missing chunk is an error, not zeros: Orbax always stores every chunk.
                "fill_missing_data_reads": False,
            }
            try:
                store = ts.open(
                    spec,
                    kvstore=self.kvstore / f"{key}/",
                    context=self._context,
                    open=True,
                    read=True,
                ).result()
            except Exception as e:
                raise CheckpointFormatError(
                    f"{self._location}: cannot open array {keystr(path)} (key {key!r}): "
                    f"{fmt.one_line(e)}"
                ) from e
            self._stores[path] = store
        return store

    def read(self, path: KeyPath, index: tuple[slice, ...] | None = None) -> np.ndarray:
        """Reads one array, or one slab of it, into host memory.

        Args:
            path: the key path of an array leaf.
            index: a tuple of slices (step 1) selecting one slab, missing trailing axes taken
                whole; ``None`` reads it all.

        Returns:
            A numpy array in the stored dtype (bfloat16 as ``ml_dtypes.bfloat16``); a 0-d
            array for a scalar.

        Raises:
            LayoutError: ``path`` is not an array leaf of this checkpoint, or ``index`` does not
                fit its shape.
            CheckpointFormatError: a chunk is missing, truncated or cannot be decoded.
        """
        path = tuple(path)
        if path in self._inline:
            return self._read_inline(path, index)
        store = self.open(path)
        box = None if index is None else slab_box(self._location, path, index, tuple(store.shape))
        try:
            if box is not None:
                part = self._large_chunks().read(
                    self.stored_array(path), box, lambda b: np.asarray(store[b].read().result())
                )
                if part is not None:
                    return part
            return np.asarray((store if box is None else store[box]).read().result())
        except Exception as e:
            key = self.array_key(path)
            if self._use_ocdbt:
                files = _data_files(self._location, key)
                where = f"data file {', '.join(files)}" if files else "data file unknown"
            else:
                where = f"folder {self._location.join(key)}"
            raise CheckpointFormatError(
                f"{self._location}: cannot read array {keystr(path)} (key {key!r}, "
                f"{where}): {fmt.one_line(e)}"
            ) from e

    def stored_array(self, path: KeyPath) -> _stream.StoredArray:
        """How one array's chunks are stored: whether parts of a large one can be streamed.

        Raises:
            LayoutError: ``path`` is not an array leaf of this checkpoint.
        """
        path = tuple(path)
        found = self._stored.get(path)
        if found is None:
            doc = self.zarr_metadata(path)
            codec, reason = _stream.chunk_codec(doc, zarr3=self._use_zarr3)
            prefix, keys = self.array_key(path), ChunkKeys(doc, zarr3=self._use_zarr3)
            found = _stream.StoredArray(
                name=keystr(path),
                shape=tuple(self.open(path).shape),
                chunk=_stream.decoded_chunk(doc, self.chunk_shape(path), zarr3=self._use_zarr3),
                itemsize=self.open(path).dtype.numpy_dtype.itemsize,
                codec=codec,
                reason=reason,
                key_of=lambda cell: f"{prefix}/{keys.format(cell)}",
            )
            self._stored[path] = found
        return found

    def _large_chunks(self) -> _stream.ChunkReads:
        with self._lock:
            if self._chunk_reads is None:
                self._chunk_reads = _stream.ChunkReads(self.kvstore)
            return self._chunk_reads

    def _read_inline(self, path: KeyPath, index: tuple[slice, ...] | None) -> np.ndarray:
        value = self._inline[path]
        if index is None:
            return value.copy()
        return np.array(value[slab_box(self._location, path, index, value.shape)])

    # -- internals ---------------------------------------------------------------------------

    def _entry(self, path: KeyPath) -> dict[str, Any]:
        entry = self._entries.get(tuple(path))
        if entry is None:
            raise LayoutError(f"{self._location}: no leaf {keystr(tuple(path))} in _METADATA")
        return entry

    def _array_leaf(self, path: KeyPath) -> Leaf:
        self._entry(path)
        leaf = self.leaves()[tuple(path)]
        if leaf.empty:
            raise LayoutError(
                f"{self._location}: leaf {keystr(leaf.path)} is empty "
                f"(value_type {self.value_type(path)!r}); it holds no array"
            )
        return leaf

    def _load_leaves(self) -> dict[KeyPath, Leaf]:
        kv = self.kvstore
        pending = {
            path: kv.read(self._doc_key(path))
            for path, entry in self._entries.items()
            if not entry["empty"] and path not in self._inline
        }
        leaves: dict[KeyPath, Leaf] = {}
        for path, entry in self._entries.items():
            if entry["empty"]:
                leaves[path] = Leaf(path, None, None)
                continue
            if path in self._inline:
                value = self._inline[path]
                leaves[path] = Leaf(path, tuple(value.shape), fmt.dtype_name(value.dtype))
                continue
            doc_key = self._doc_key(path)
            try:
                result = pending[path].result()
            except Exception as e:
                raise CheckpointFormatError(
                    f"{self._location}: cannot read {doc_key!r} of array {keystr(path)}: "
                    f"{fmt.one_line(e)}"
                ) from e
            if result.state != "value":
                raise CheckpointFormatError(
                    f"{self._location}: array {keystr(path)} is listed in the tree metadata but "
                    f"the checkpoint has no {doc_key!r}"
                )
            try:
                doc = json.loads(bytes(result.value))
                shape = tuple(int(d) for d in doc["shape"])
                dtype = fmt.dtype_name(doc["data_type"] if self._use_zarr3 else doc["dtype"])
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise CheckpointFormatError(
                    f"{self._location}: expected a zarr metadata document at {doc_key!r} of array "
                    f"{keystr(path)}, found invalid content ({fmt.one_line(e)})"
                ) from e
            self._zarr[path] = doc
            leaves[path] = Leaf(path, shape, dtype)
        return leaves

    def _load_ext_metadata(self) -> dict[str, Any]:
        folder = self._location.join(fmt.ARRAY_METADATAS_DIR)
        out: dict[str, Any] = {}
        if not folder.is_dir():
            return out
        for name in folder.list_dir():
            if not name.startswith("process_"):
                continue
            try:
                doc = json.loads(folder.join(name).read_bytes())
                for item in doc.get("array_metadatas", []):
                    meta = item["array_metadata"]
                    if meta.get("ext_metadata") is not None:
                        out.setdefault(meta["param_name"], meta["ext_metadata"])
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                raise CheckpointFormatError(
                    f"{folder.join(name)}: expected Orbax array metadata JSON, found invalid "
                    f"content ({fmt.one_line(e)})"
                ) from e
        return out

    def _find_custom_metadata(self) -> Any:
        candidates = [self._location.join(fmt.CHECKPOINT_METADATA_FILE)]
        if self._location.name in fmt.STEP_ITEM_NAMES or _item.is_step_name(self._location.parent):
            candidates.append(self._location.parent.join(fmt.CHECKPOINT_METADATA_FILE))
        for candidate in candidates:
            try:
                doc = json.loads(candidate.read_bytes())
            except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
                continue
            except (OSError, ValueError) as e:
                raise CheckpointFormatError(
                    f"{candidate}: expected JSON, found invalid content ({fmt.one_line(e)})"
                ) from e
            value = doc.get("custom_metadata") if isinstance(doc, dict) else None
            if value:
                return value
        return self._metadata.get("custom_metadata") or {}


def _data_files(location: Location, key: str) -> list[str]:
    """Best effort: the data files (relative to the item) that hold the chunks of ``key``.

    Walks the OCDBT B-tree afresh; used only to name the file in an error message, so any
    failure gives an empty list.
    """
    prefix = (key + "/").encode()
    try:
        contents = _ocdbt.inspect(location)
    except Exception:  # Only decorates another error; never raise from here.
        return []
    return sorted({f for k, f in contents.value_files.items() if k.startswith(prefix)})
