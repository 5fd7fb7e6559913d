"""What a :class:`~ckptconv.io.CheckpointWriter` has declared and written, leaf by leaf.

:class:`ItemRecords` holds the Orbax record of every leaf declared (what ``_METADATA`` and
``_sharding`` are written from) and, for every array, exactly which regions were written (a
:class:`~ckptconv.io._coverage.Coverage`). The writer fills it; its commit protocol checks it
before publishing (:meth:`ItemRecords.validate`). A writer variant that declares leaves
another writer stored (the merge of a multi-process write) passes the writer its own records
and adds to them; one that writes part of a checkpoint saves them (:meth:`ItemRecords.dump`)
for the process that merges.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import CheckpointWriteError
from . import _format as fmt
from . import _orbax_metadata as orbax_metadata
from ._coverage import Coverage, describe_unwritten
from .leaf import KeyPath, keystr

# Leaf record entries that are tuples in memory (JSON turns them into lists).
_TUPLE_FIELDS = ("key_types", "chunk", "write_shape")


class ItemRecords:
    """The leaves of one checkpoint item being written, and what was written of each array.

    Attributes:
        leaves: the Orbax record of every declared leaf, by path: ``key_types``,
            ``value_type`` (``"jax.Array"`` for an array) and, for arrays, ``chunk``,
            ``sharding``, ``ext_metadata`` and optionally ``write_shape``.
        written: for every array written through this record, what was written of it.
    """

    def __init__(self) -> None:
        self.leaves: dict[KeyPath, dict[str, Any]] = {}
        self.written: dict[KeyPath, Coverage] = {}
        self._keys: dict[str, KeyPath] = {}  # the array key of every array leaf

    def check_new(
        self, path: KeyPath, key_types: Sequence[int] | None
    ) -> tuple[KeyPath, tuple[int, ...]]:
        """Checks that ``path`` can be declared; returns it and its key types, normalised.

        Raises:
            CheckpointWriteError: the path is invalid, already declared, or its array key is
                another leaf's.
        """
        path, types = orbax_metadata.check_key_path(path, key_types)
        if path in self.leaves:
            raise CheckpointWriteError(f"{keystr(path)}: written twice")
        other = self._keys.get(fmt.array_key(path))
        if other is not None:
            raise CheckpointWriteError(
                f"{keystr(path)}: its OCDBT key {fmt.array_key(path)!r} is already used by "
                f"{keystr(other)}"
            )
        return path, types

    def add(self, path: KeyPath, record: dict[str, Any], written: Coverage | None = None) -> None:
        """Declares a leaf (checked by :meth:`check_new`) with its Orbax record.

        Args:
            path: the leaf's path.
            record: its record (see :attr:`leaves`).
            written: for an array, what was written of it; ``None`` for an empty leaf, or for
                an array whose writes the caller checks itself.
        """
        self.leaves[path] = record
        if record["value_type"] == "jax.Array":
            self._keys[fmt.array_key(path)] = path
        if written is not None:
            self.written[path] = written

    def validate(self, where: str) -> None:
        """Checks a complete item: one array at least, every array written in full, one tree.

        Args:
            where: how to name the checkpoint in errors.

        Raises:
            CheckpointWriteError: there is no array, an array has a region never written (the
                message names the first one), or the leaves do not form one tree.
        """
        if not any(leaf["value_type"] == "jax.Array" for leaf in self.leaves.values()):
            raise CheckpointWriteError(
                f"{where}: expected at least one array, found "
                f"{len(self.leaves)} empty leaves and no array"
            )
        for path, coverage in self.written.items():
            region = coverage.unwritten()
            if region is not None:
                raise CheckpointWriteError(
                    f"{keystr(path)}: {describe_unwritten(coverage.shape, region)}"
                )
        orbax_metadata.check_tree({p: leaf["key_types"] for p, leaf in self.leaves.items()})

    def dump(self) -> bytes:
        """Returns the leaves and what was written, as JSON (see :func:`load_records`)."""
        return json.dumps(
            {
                "leaves": [[list(path), dict(leaf)] for path, leaf in self.leaves.items()],
                "written": [[list(path), c.to_json()] for path, c in self.written.items()],
            }
        ).encode()


def array_record(
    key_types: tuple[int, ...],
    chunk: tuple[int, ...],
    sharding: Mapping[str, Any] | None,
    random_key_impl: str | None,
    *,
    write_shape: tuple[int, ...] | None = None,
) -> dict[str, Any]:
    """The Orbax record of an array leaf, as writers make it (see :attr:`ItemRecords.leaves`)."""
    record: dict[str, Any] = {"key_types": key_types, "value_type": "jax.Array", "chunk": chunk}
    if write_shape is not None:
        record["write_shape"] = write_shape
    record["sharding"] = sharding if sharding is not None else orbax_metadata.DEFAULT_SHARDING
    record["ext_metadata"] = {"random_key_impl": random_key_impl} if random_key_impl else None
    return record


def load_records(data: bytes) -> tuple[dict[KeyPath, dict[str, Any]], dict[KeyPath, Coverage]]:
    """Returns the leaves and the coverage of each array of a :meth:`ItemRecords.dump`.

    Raises:
        ValueError: the record is malformed.
    """
    try:
        records = json.loads(data)
        leaves = {}
        for path, leaf in records["leaves"]:
            for name in _TUPLE_FIELDS:
                if leaf.get(name) is not None:
                    leaf[name] = tuple(leaf[name])
            leaves[tuple(path)] = leaf
        written = {tuple(path): Coverage.from_json(c) for path, c in records["written"]}
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"malformed record: {fmt.one_line(e)}") from e
    return leaves, written
