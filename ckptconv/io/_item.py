"""Finding the Orbax item folder a location designates, and parsing its ``_METADATA``.

Accepts an item folder, a CheckpointManager step folder holding one item, or a manager root
(its latest numeric step); refuses temporary folders of interrupted writes, msgpack
checkpoints and non-OCDBT layouts with messages that say what was found.

When a checkpoint counts as complete:

- on local disks, a writer renames a finished folder into place, so a folder under its final
  name is complete unless its name is a temporary one or it holds ckptconv's in-progress
  marker (``.ckptconv-incomplete``). ``commit_success.txt`` is not required there: Orbax
  before 0.12.3 did not write it on local disks.
- on object stores (and ``memory://``) nothing can be renamed atomically, so data and metadata
  are written in place and ``commit_success.txt`` last, as Orbax does on GCS: an item is
  complete only once that marker exists, in the item folder or in its step folder (where
  Orbax's CheckpointManager writes it).
"""

from __future__ import annotations

import json
from typing import Any

from ..errors import CheckpointFormatError, IncompleteCheckpointError
from . import _format as fmt
from .leaf import KeyPath, keystr
from .location import Location


def is_step_name(location: Location) -> bool:
    """Whether a folder is named like a CheckpointManager step (digits only)."""
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


def _check_committed(item: Location) -> None:
    """On storage without atomic rename, refuses an item that lacks its commit marker."""
    if item.has_atomic_rename:
        return
    candidates = [item.join(fmt.COMMIT_SUCCESS_FILE)]
    if item.name in fmt.STEP_ITEM_NAMES or is_step_name(item.parent):
        candidates.append(item.parent.join(fmt.COMMIT_SUCCESS_FILE))
    if any(c.exists() for c in candidates):
        return
    raise IncompleteCheckpointError(
        f"{item}: expected a committed checkpoint, found no {fmt.COMMIT_SUCCESS_FILE} (the "
        "marker written last on object stores): its write was interrupted or is still running; "
        "rerun the conversion with --force to replace it"
    )


def _is_file(location: Location) -> bool:
    return location.exists() and not location.is_dir()


def _has_metadata(location: Location) -> bool:
    """Whether an item's tree is described here: ``_METADATA``, or older Orbax's msgpack."""
    return location.join(fmt.METADATA_FILE).exists() or _is_file(
        location.join(fmt.LEGACY_MSGPACK_FILE)
    )


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


def resolve_item(location: Location) -> Location:
    """Finds the Orbax item folder that ``location`` designates.

    Raises:
        CheckpointFormatError: nothing readable is there.
        IncompleteCheckpointError: only interrupted writes are there, or (on object stores) the
            item has no commit marker.
        StorageError: the storage cannot be reached or refuses the request.
    """
    item = _find_item(location)
    _check_committed(item)
    return item


def _find_item(location: Location) -> Location:
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


def load_metadata(location: Location) -> dict[str, Any]:
    """Reads and checks the ``_METADATA`` of an item folder (or older Orbax's msgpack tree).

    Returns:
        The document, with ``use_ocdbt`` set to how the arrays are stored: in one OCDBT
        database (``manifest.ocdbt``) or one zarr folder per array.

    Raises:
        CheckpointFormatError: it is missing, not JSON, not an Orbax tree, or says OCDBT where
            there is no OCDBT manifest.
    """
    where = location.join(fmt.METADATA_FILE)
    if not where.exists() and _is_file(location.join(fmt.LEGACY_MSGPACK_FILE)):
        from ._legacy import load_legacy_metadata

        doc = load_legacy_metadata(location)
    else:
        doc = _load_json_metadata(where)
    has_manifest = location.join(fmt.OCDBT_MANIFEST_FILE).exists()
    if doc.get("use_ocdbt") is True and not has_manifest:
        raise CheckpointFormatError(
            f"{location}: expected an OCDBT manifest ({fmt.OCDBT_MANIFEST_FILE}) as _METADATA "
            "says use_ocdbt=true, found none (the checkpoint is incomplete or damaged)"
        )
    doc["use_ocdbt"] = bool(doc.get("use_ocdbt", has_manifest)) and has_manifest
    return doc


def _load_json_metadata(where: Location) -> dict[str, Any]:
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
    return doc


def parse_tree_metadata(location: Location, tree: dict[str, Any]) -> dict[KeyPath, dict]:
    """Parses ``tree_metadata`` into {path: value_type, empty, key_types, write_shape}.

    Raises:
        CheckpointFormatError: an entry is malformed or holds an unsupported value type.
    """
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
            write_shape = value_meta.get("write_shape")
            if write_shape is not None:
                write_shape = [int(d) for d in write_shape]
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
            "write_shape": write_shape,
        }
    return entries
