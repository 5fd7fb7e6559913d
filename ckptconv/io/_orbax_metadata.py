"""The metadata files of an Orbax item folder, built from the leaves a writer recorded.

What each file must hold for plain Orbax (0.12.8) to restore the item, with and without a
target tree:

- ``_METADATA``: ``tree_metadata`` keyed by ``str(tuple(key names))``, each entry with
  ``key_metadata`` (``[{key, key_type}]``, 1 = list index, 2 = dict key: without a target Orbax
  rebuilds lists from key type 1) and ``value_metadata`` (``value_type`` ``"jax.Array"``,
  ``skip_deserialize`` false and ``write_shape``, the shape of one written shard; or an empty
  leaf ``{"value_type": "None" | "Dict" | "List", "skip_deserialize": true}``); plus
  ``use_ocdbt``, ``use_zarr3``, ``store_array_data_equal_to_fill_value``, ``custom_metadata``.
- ``_sharding``: ``{urlsafe_b64(array key): json string of a sharding}``. Orbax needs it to
  restore without a target (else "Sharding of jax.Array cannot be None").
- ``array_metadatas/process_0``: ``{"array_metadatas": [{"array_metadata": {param_name,
  write_shape, chunk_shape, ext_metadata}}]}``; ``ext_metadata.random_key_impl`` makes Orbax
  restore uint32 key data as a typed PRNG key.
- ``_CHECKPOINT_METADATA``: item handler, timestamps, ``custom_metadata``.
- ``commit_success.txt``: written last.
"""

from __future__ import annotations

import base64
import collections
import json
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import CheckpointWriteError
from . import _format as fmt
from .leaf import KeyPath, keystr
from .location import Location

STANDARD_HANDLER = (
    "orbax.checkpoint._src.handlers.standard_checkpoint_handler.StandardCheckpointHandler"
)
# Restores on device 0 of whatever machine restores the checkpoint without a target; a
# NamedSharding with an explicit device mesh does not depend on the device count or platform.
DEFAULT_SHARDING: Mapping[str, Any] = {
    "sharding_type": "NamedSharding",
    "shape": [1],
    "axis_names": ["replica"],
    "partition_spec": [],
    "device_mesh": {"mesh": [{"id": 0}]},
}


def sort_key(path: KeyPath, key_types: tuple[int, ...]) -> tuple:
    """Orders leaves as ``jax.tree`` flattens them: dict keys sorted, list entries by index."""
    return tuple(
        (0, int(k), "") if t == fmt.KEY_TYPE_SEQUENCE else (1, 0, k)
        for k, t in zip(path, key_types, strict=True)
    )


def check_key_path(
    path: Sequence[str], key_types: Sequence[int] | None
) -> tuple[KeyPath, tuple[int, ...]]:
    """Checks a leaf's key path and key types; returns them as tuples.

    Key types default to dict keys; a list index (key type 1) must be a decimal index.

    Raises:
        CheckpointWriteError: the path is not a non-empty tuple of strings, or a key type is
            not 1 or 2 or does not fit its key.
    """
    if isinstance(path, str) or not all(isinstance(k, str) for k in path):
        raise CheckpointWriteError(f"{path!r}: expected a key path, a tuple of strings")
    path = tuple(path)
    if not path:
        raise CheckpointWriteError("the empty key path cannot hold a leaf")
    types = tuple(key_types) if key_types is not None else (fmt.KEY_TYPE_DICT,) * len(path)
    if len(types) != len(path):
        raise CheckpointWriteError(
            f"{keystr(path)}: expected {len(path)} key types, found {len(types)}"
        )
    for key, kind in zip(path, types, strict=True):
        if kind not in (fmt.KEY_TYPE_SEQUENCE, fmt.KEY_TYPE_DICT):
            raise CheckpointWriteError(
                f"{keystr(path)}: key type {kind!r} of {key!r}: expected 1 (list index) "
                "or 2 (dict key)"
            )
        if kind == fmt.KEY_TYPE_SEQUENCE and not (key.isdigit() and str(int(key)) == key):
            raise CheckpointWriteError(
                f"{keystr(path)}: {key!r} has key type 1 (list index) but is not an index"
            )
    return path, types


def check_tree(key_types: Mapping[KeyPath, tuple[int, ...]]) -> None:
    """Checks that the leaves form one tree that Orbax can rebuild without a target.

    Raises:
        CheckpointWriteError: a leaf is also a parent, one container mixes list indices and
            dict keys or gives one key two types, or a list has gaps.
    """
    children: dict[KeyPath, dict[str, int]] = collections.defaultdict(dict)
    for path, types in key_types.items():
        for depth in range(len(path)):
            prefix, key, kind = path[:depth], path[depth], types[depth]
            if prefix in key_types:
                raise CheckpointWriteError(
                    f"{keystr(path)}: its parent {keystr(prefix)} is itself a leaf"
                )
            seen = children[prefix].setdefault(key, kind)
            if seen != kind:
                raise CheckpointWriteError(
                    f"{keystr(path[: depth + 1])}: key type {kind} here but {seen} in another leaf"
                )
    for prefix, keys in children.items():
        kinds = set(keys.values())
        if kinds == {fmt.KEY_TYPE_DICT}:
            continue
        if len(kinds) > 1:
            raise CheckpointWriteError(
                f"{keystr(prefix)}: mixes list indices and dict keys among its children"
            )
        indices = sorted(int(k) for k in keys)
        if indices != list(range(len(indices))):
            raise CheckpointWriteError(
                f"{keystr(prefix)}: a list needs entries 0..{len(indices) - 1}, "
                f"found {sorted(keys, key=int)}"
            )


def write_item_metadata(
    folder: str | Location,
    leaves: Mapping[KeyPath, Mapping[str, Any]],
    *,
    use_zarr3: bool,
    custom_metadata: Any,
    init_timestamp_ns: int,
    destination: str,
    use_ocdbt: bool = True,
) -> None:
    """Writes every metadata file of an item folder, ``commit_success.txt`` last.

    Local files are fsynced; on object stores each file is one object written through
    TensorStore.

    Args:
        folder: the item folder (the writer's temporary folder, or an object-store prefix).
        leaves: per path, ``key_types`` and ``value_type``; arrays also ``chunk``,
            ``sharding``, ``ext_metadata`` and optionally ``write_shape`` (default: ``chunk``).
        use_zarr3: recorded in ``_METADATA``.
        use_ocdbt: recorded in ``_METADATA``: arrays in one OCDBT database, else one zarr
            folder each.
        custom_metadata: recorded in ``_METADATA`` and ``_CHECKPOINT_METADATA``.
        init_timestamp_ns: when writing started.
        destination: the final path, named in ``commit_success.txt`` as Orbax does.
    """
    tree: dict[str, Any] = {}
    sharding: dict[str, str] = {}
    array_metadatas = []
    for path, leaf in sorted(leaves.items(), key=lambda it: sort_key(it[0], it[1]["key_types"])):
        key_metadata = [
            {"key": k, "key_type": t} for k, t in zip(path, leaf["key_types"], strict=True)
        ]
        if leaf["value_type"] != "jax.Array":
            value_metadata: dict[str, Any] = {
                "value_type": leaf["value_type"],
                "skip_deserialize": True,
            }
        else:
            # Orbax's write_shape is the shape of one written shard: the outer chunk, or the
            # source's (permuted) write_shape for a copied array. The global shape lives in
            # the zarr metadata.
            write_shape = list(leaf.get("write_shape") or leaf["chunk"])
            value_metadata = {
                "value_type": "jax.Array",
                "skip_deserialize": False,
                "write_shape": write_shape,
            }
            name = fmt.array_key(path)
            sharding[base64.urlsafe_b64encode(name.encode()).decode()] = json.dumps(
                dict(leaf["sharding"])
            )
            array_metadatas.append(
                {
                    "array_metadata": {
                        "param_name": name,
                        "write_shape": write_shape,
                        "chunk_shape": list(leaf["chunk"]),
                        "ext_metadata": leaf["ext_metadata"],
                    }
                }
            )
        tree[fmt.tree_key(path)] = {"key_metadata": key_metadata, "value_metadata": value_metadata}
    metadata = {
        "tree_metadata": tree,
        "use_ocdbt": use_ocdbt,
        "use_zarr3": use_zarr3,
        "store_array_data_equal_to_fill_value": True,
        "custom_metadata": custom_metadata,
    }
    checkpoint_metadata = {
        "item_handlers": STANDARD_HANDLER,
        "metrics": {},
        "performance_metrics": {},
        "init_timestamp_nsecs": init_timestamp_ns,
        "commit_timestamp_nsecs": time.time_ns(),
        "custom_metadata": custom_metadata if custom_metadata else {},
    }
    item = Location.parse(folder)
    for name, doc in (
        (f"{fmt.ARRAY_METADATAS_DIR}/process_0", {"array_metadatas": array_metadatas}),
        (fmt.SHARDING_FILE, sharding),
        (fmt.METADATA_FILE, metadata),
        (fmt.CHECKPOINT_METADATA_FILE, checkpoint_metadata),
    ):
        item.join(name).write_bytes(json.dumps(doc).encode())
    item.join(fmt.COMMIT_SUCCESS_FILE).write_bytes(
        f"Checkpoint commit was successful to {destination}".encode()
    )


def write_file(path: str, data: bytes) -> None:
    """Writes a small file and fsyncs it."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(path: str) -> None:
    """Fsyncs a folder, so that renames and new entries in it are durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
