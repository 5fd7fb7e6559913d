"""Lazy reading of Orbax OCDBT checkpoints: metadata first, arrays one slab at a time.

:class:`CheckpointReader` learns every key, shape and dtype from ``_METADATA`` and the zarr
metadata documents inside the OCDBT store, without decoding any array, and opens arrays only
when asked. It reads what Orbax >= 0.12 writes with ``use_ocdbt=True`` (zarr2 or zarr3); the
older per-array folder layout and msgpack checkpoints are refused with a clear message.

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

from ..errors import CheckpointFormatError, IncompleteCheckpointError, LayoutError
from . import _format as fmt
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
        self._location = _resolve_item(Location.parse(location))
        self._metadata = _load_metadata(self._location)
        self._use_zarr3 = bool(self._metadata.get("use_zarr3", False))
        self._entries = _parse_tree_metadata(self._location, self._metadata["tree_metadata"])
        self._lock = threading.RLock()
        self._context: ts.Context | None = None
        self._kvstore: ts.KvStore | None = None
        self._leaves: dict[KeyPath, Leaf] | None = None
        self._zarr: dict[KeyPath, dict[str, Any]] = {}
        self._stores: dict[KeyPath, ts.TensorStore] = {}
        self._custom_metadata: Any = None
        self._ext_metadata: dict[str, Any] | None = None

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
    def metadata(self) -> Mapping[str, Any]:
        """The parsed ``_METADATA`` document, as Orbax wrote it."""
        return self._metadata

    @property
    def kvstore(self) -> ts.KvStore:
        """The opened OCDBT kvstore of the item, for byte-level access (keys are array keys)."""
        with self._lock:
            if self._kvstore is None:
                self._context = self._location.ts_context()
                spec = {
                    "driver": "ocdbt",
                    "base": self._location.kvstore_spec(),
                    "cache_pool": "cache_pool#ocdbt",
                }
                try:
                    self._kvstore = ts.KvStore.open(spec, context=self._context).result()
                except Exception as e:  # TensorStore reports I/O and format errors this way.
                    raise CheckpointFormatError(
                        f"{self._location}: expected a readable OCDBT store "
                        f"({fmt.OCDBT_MANIFEST_FILE}), found an error: {fmt.one_line(e)}"
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
        """Returns the OCDBT key prefix of an array: its '.'-joined key path."""
        return fmt.array_key(tuple(path))

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
        return self._ext_metadata.get(fmt.array_key(tuple(path)))

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
            key = fmt.array_key(path)
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
                    f"{self._location}: cannot open array {keystr(path)} (OCDBT key {key!r}): "
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
            LayoutError: ``path`` is not an array leaf of this checkpoint.
            CheckpointFormatError: a chunk is missing, truncated or cannot be decoded.
        """
        path = tuple(path)
        store = self.open(path)
        if index is None:
            view = store
        else:
            try:
                view = store[fmt.normalize_index(index, tuple(store.shape))]
            except (IndexError, ValueError, TypeError) as e:
                raise LayoutError(
                    f"{self._location}: slab {index!r} does not fit array {keystr(path)} of shape "
                    f"{tuple(store.shape)}: {fmt.one_line(e)}"
                ) from e
        try:
            return np.asarray(view.read().result())
        except Exception as e:
            key = fmt.array_key(path)
            files = _data_files(self._location, key)
            where = f"data file {', '.join(files)}" if files else "data file unknown"
            raise CheckpointFormatError(
                f"{self._location}: cannot read array {keystr(path)} (OCDBT key {key!r}, "
                f"{where}): {fmt.one_line(e)}"
            ) from e

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
            path: kv.read(fmt.zarr_metadata_key(path, self._use_zarr3))
            for path, entry in self._entries.items()
            if not entry["empty"]
        }
        leaves: dict[KeyPath, Leaf] = {}
        for path, entry in self._entries.items():
            if entry["empty"]:
                leaves[path] = Leaf(path, None, None)
                continue
            doc_key = fmt.zarr_metadata_key(path, self._use_zarr3)
            try:
                result = pending[path].result()
            except Exception as e:
                raise CheckpointFormatError(
                    f"{self._location}: cannot read {doc_key!r} of array {keystr(path)} from the "
                    f"OCDBT store: {fmt.one_line(e)}"
                ) from e
            if result.state != "value":
                raise CheckpointFormatError(
                    f"{self._location}: array {keystr(path)} is listed in _METADATA but the OCDBT "
                    f"store has no {doc_key!r}"
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
        if self._location.name in fmt.STEP_ITEM_NAMES or _is_step_name(self._location.parent):
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

    Walks the OCDBT B-tree with ``ts.ocdbt.dump``; used only to name the file in an error
    message, so any failure gives an empty list.
    """
    prefix = key + "/"
    files: set[str] = set()
    try:
        context = location.ts_context()
        base = ts.KvStore.open(location.kvstore_spec(), context=context).result()
        manifest = ts.ocdbt.dump(base, context=context).result()
        todo = [(manifest["versions"][-1]["root"]["location"], "")]
        while todo:
            node_location, node_prefix = todo.pop()
            node = ts.ocdbt.dump(base, node_location, context=context).result()
            for entry in node.get("entries", []):
                if node.get("height", 0):
                    sub = node_prefix + (entry.get("subtree_common_prefix") or b"").decode()
                    todo.append((entry["location"], sub))
                    continue
                full = node_prefix + entry["key"].decode()
                value = entry.get("indirect_value")
                if full.startswith(prefix) and value:
                    # "value:<base path>:<file path>:<offset>:<length>"
                    _, base_path, file_path, _, _ = value.rsplit(":", 4)
                    files.add(base_path + file_path)
    except Exception:  # Only decorates another error; never raise from here.
        return []
    return sorted(files)


def _is_step_name(location: Location) -> bool:
    return location.name.isdigit()


def _check_not_partial(location: Location) -> None:
    """Refuses folders that a writer left behind when it was interrupted."""
    if fmt.is_temporary_name(location.name):
        raise IncompleteCheckpointError(
            f"{location}: expected a committed checkpoint, found a temporary folder of an "
            "interrupted write (its name carries a writer's temporary suffix)"
        )
    if location.join(fmt.INCOMPLETE_MARKER).exists():
        raise IncompleteCheckpointError(
            f"{location}: expected a committed checkpoint, found the marker "
            f"{fmt.INCOMPLETE_MARKER} of an interrupted ckptconv write"
        )


def _has_metadata(location: Location) -> bool:
    return location.join(fmt.METADATA_FILE).exists()


def _step_item(step: Location) -> Location | None:
    """Returns the single item folder of a CheckpointManager step folder, or None."""
    for name in fmt.STEP_ITEM_NAMES:
        candidate = step.join(name)
        if _has_metadata(candidate):
            return candidate
    items = [
        step.join(name)
        for name in step.list_dir()
        if not name.startswith(".") and _has_metadata(step.join(name))
    ]
    if len(items) > 1:
        raise CheckpointFormatError(
            f"{step}: expected a step folder with one checkpoint item, found "
            f"{len(items)} ({', '.join(i.name for i in items)}); pass the item folder itself"
        )
    return items[0] if items else None


def _resolve_item(location: Location) -> Location:
    """Finds the Orbax item folder that ``location`` designates."""
    if not location.exists():
        raise CheckpointFormatError(
            f"{location}: expected an Orbax checkpoint folder, found nothing at this path"
        )
    if not location.is_dir():
        raise CheckpointFormatError(
            f"{location}: expected an Orbax checkpoint folder, found a file"
        )
    _check_not_partial(location)
    if _has_metadata(location):
        return location
    if location.join(fmt.LEGACY_MSGPACK_FILE).exists():
        raise CheckpointFormatError(
            f"{location}: expected an Orbax OCDBT checkpoint (_METADATA), found a legacy msgpack "
            f"'{fmt.LEGACY_MSGPACK_FILE}' file, which ckptconv does not read"
        )
    item = _step_item(location)
    if item is not None:
        _check_not_partial(item)
        return item
    names = location.list_dir()
    steps = [n for n in names if n.isdigit() and location.join(n).is_dir()]
    if steps:
        latest = location.join(max(steps, key=int))
        item = _step_item(latest)
        if item is None:
            raise CheckpointFormatError(
                f"{latest}: expected the latest step of a CheckpointManager to hold an item "
                f"folder with _METADATA ({', '.join(fmt.STEP_ITEM_NAMES)}), found none"
            )
        _check_not_partial(item)
        return item
    partial = [
        n
        for n in names
        if fmt.is_temporary_name(n) or location.join(n, fmt.INCOMPLETE_MARKER).exists()
    ]
    if partial:
        raise IncompleteCheckpointError(
            f"{location}: expected a checkpoint, found only interrupted writes: "
            f"{', '.join(partial)}"
        )
    shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "") if names else "nothing"
    raise CheckpointFormatError(
        f"{location}: expected an Orbax item folder (_METADATA), a step folder holding one, or a "
        f"CheckpointManager root with numeric step folders, found: {shown}"
    )


def _load_metadata(location: Location) -> dict[str, Any]:
    where = location.join(fmt.METADATA_FILE)
    try:
        raw = where.read_bytes()
    except OSError as e:
        raise CheckpointFormatError(f"{where}: cannot read ({fmt.one_line(e)})") from e
    try:
        doc = json.loads(raw)
    except UnicodeDecodeError as e:
        raise CheckpointFormatError(
            f"{where}: expected a JSON document, found non-UTF-8 bytes at offset {e.start}"
        ) from e
    except json.JSONDecodeError as e:
        raise CheckpointFormatError(
            f"{where}: expected a JSON document, found invalid JSON ({e.msg} at line {e.lineno} "
            f"column {e.colno})"
        ) from e
    if not isinstance(doc, dict) or not isinstance(doc.get("tree_metadata"), dict):
        found = (
            f"keys {sorted(doc)[:6]}" if isinstance(doc, dict) else f"a JSON {type(doc).__name__}"
        )
        raise CheckpointFormatError(
            f"{where}: expected an Orbax PyTree metadata object with a 'tree_metadata' object, "
            f"found {found}"
        )
    if doc.get("use_ocdbt") is False or not location.join(fmt.OCDBT_MANIFEST_FILE).exists():
        raise CheckpointFormatError(
            f"{location}: expected an OCDBT checkpoint ({fmt.OCDBT_MANIFEST_FILE}, use_ocdbt "
            f"true), found use_ocdbt={doc.get('use_ocdbt')!r} and "
            f"{'a' if location.join(fmt.OCDBT_MANIFEST_FILE).exists() else 'no'} manifest; "
            "re-save it with Orbax's default use_ocdbt=True"
        )
    return doc


def _parse_tree_metadata(location: Location, tree: dict[str, Any]) -> dict[KeyPath, dict]:
    where = location.join(fmt.METADATA_FILE)
    entries: dict[KeyPath, dict] = {}
    for tree_key, entry in tree.items():
        try:
            key_meta = entry["key_metadata"]
            value_meta = entry["value_metadata"]
            path = tuple(str(k["key"]) for k in key_meta)
            key_types = tuple(int(k["key_type"]) for k in key_meta)
            value_type = str(value_meta["value_type"])
            skip = bool(value_meta.get("skip_deserialize", False))
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointFormatError(
                f"{where}: expected key_metadata [{{key, key_type}}, ...] and value_metadata "
                f"{{value_type, ...}} for entry {tree_key!r}, found {fmt.one_line(entry)[:120]}"
            ) from e
        if not path:
            raise CheckpointFormatError(f"{where}: entry {tree_key!r} has an empty key path")
        empty = skip or value_type in fmt.EMPTY_VALUE_TYPES
        if not empty and value_type not in fmt.ARRAY_VALUE_TYPES:
            raise CheckpointFormatError(
                f"{where}: leaf {keystr(path)} has value_type {value_type!r}; ckptconv reads "
                f"arrays ({', '.join(sorted(fmt.ARRAY_VALUE_TYPES))}) and empty leaves only"
            )
        entries[path] = {
            "value_type": value_type,
            "empty": empty,
            "key_types": key_types,
        }
    return entries
