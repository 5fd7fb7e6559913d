"""Older Orbax item folders: the tree in a msgpack ``checkpoint`` file instead of ``_METADATA``.

Orbax's ``PyTreeCheckpointHandler`` once wrote the tree structure as a Flax msgpack document
(the ``checkpoint`` file, through its ``MsgpackHandler``): each array written by TensorStore is a
``PLACEHOLDER://<name>`` string naming its folder (or OCDBT key prefix), and small values may
be stored inline (Flax's ndarray extension type). Orbax still restores these
(``PyTreeCheckpointHandler._read_aggregate_file``). This module turns such a file into the
``_METADATA`` shape the reader parses, so both kinds go through one path.

The file holds the structure only (placeholders and small inline values), so it is read whole.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import CheckpointFormatError
from . import _format as fmt
from .location import Location

PLACEHOLDER_PREFIX = "PLACEHOLDER://"
# Flax's msgpack extension types (flax.serialization._MsgpackExtType).
_EXT_NDARRAY = 1
_EXT_COMPLEX = 2
_EXT_NPSCALAR = 3


def _ext_hook(code: int, data: bytes) -> Any:
    import msgpack

    if code in (_EXT_NDARRAY, _EXT_NPSCALAR):
        shape, dtype, buffer = msgpack.unpackb(data, raw=False)
        array = np.frombuffer(buffer, dtype=fmt.numpy_dtype(dtype)).reshape(shape)
        return array.copy()
    if code == _EXT_COMPLEX:
        real, imag = msgpack.unpackb(data, raw=False)
        return np.asarray(complex(real, imag))
    raise ValueError(f"unknown msgpack extension type {code}")


def load_legacy_metadata(location: Location) -> dict[str, Any]:
    """Builds a ``_METADATA``-shaped document from an older Orbax ``checkpoint`` file.

    Returns:
        ``{"tree_metadata": ..., "use_zarr3": ..., "legacy_keys": {tree key: array key},
        "inline": {tree key: numpy array}}``; ``use_ocdbt`` is decided by the caller.

    Raises:
        CheckpointFormatError: the file is not a msgpack tree of placeholders and values.
    """
    import msgpack

    where = location.join(fmt.LEGACY_MSGPACK_FILE)
    try:
        raw = where.read_bytes()
        tree = msgpack.unpackb(raw, ext_hook=_ext_hook, raw=False, strict_map_key=False)
    except OSError as e:
        raise CheckpointFormatError(f"{where}: cannot read ({fmt.one_line(e)})") from e
    except Exception as e:  # msgpack reports truncation and garbage with several types
        raise CheckpointFormatError(
            f"{where}: expected Orbax's msgpack tree (placeholders and values), found bytes "
            f"that do not decode: {fmt.one_line(e)}"
        ) from e
    if not isinstance(tree, (dict, list)):
        raise CheckpointFormatError(
            f"{where}: expected a msgpack map of the checkpoint tree, found a {type(tree).__name__}"
        )
    tree_metadata: dict[str, Any] = {}
    keys: dict[str, str] = {}
    inline: dict[str, np.ndarray] = {}
    for path, types, value in _walk(tree, (), ()):
        tree_key = fmt.tree_key(path)
        entry = {
            "key_metadata": [{"key": k, "key_type": t} for k, t in zip(path, types, strict=True)],
            "value_metadata": {"value_type": "jax.Array", "skip_deserialize": False},
        }
        if isinstance(value, str) and value.startswith(PLACEHOLDER_PREFIX):
            keys[tree_key] = value[len(PLACEHOLDER_PREFIX) :]
        elif value is None or (isinstance(value, (dict, list)) and not value):
            kind = "None" if value is None else ("Dict" if isinstance(value, dict) else "List")
            entry["value_metadata"] = {"value_type": kind, "skip_deserialize": True}
        elif isinstance(value, (np.ndarray, np.generic, bool, int, float)):
            inline[tree_key] = np.asarray(value)
        else:
            raise CheckpointFormatError(
                f"{where}: leaf {'/'.join(path)}: expected a {PLACEHOLDER_PREFIX} array, a "
                f"number or an empty node, found a {type(value).__name__}"
            )
        tree_metadata[tree_key] = entry
    return {
        "tree_metadata": tree_metadata,
        "use_zarr3": _uses_zarr3(location, keys.values()),
        "legacy_keys": keys,
        "inline": inline,
    }


def _walk(node: Any, path: tuple[str, ...], types: tuple[int, ...]):
    items = (
        [(str(k), v, fmt.KEY_TYPE_DICT) for k, v in node.items()]
        if isinstance(node, dict)
        else [(str(i), v, fmt.KEY_TYPE_SEQUENCE) for i, v in enumerate(node)]
    )
    for key, value, kind in items:
        if isinstance(value, (dict, list)) and value:
            yield from _walk(value, (*path, key), (*types, kind))
        else:
            yield (*path, key), (*types, kind), value


def _uses_zarr3(location: Location, names) -> bool:
    for name in names:
        if location.join(name, "zarr.json").exists():
            return True
        if location.join(name, ".zarray").exists():
            return False
    return False
