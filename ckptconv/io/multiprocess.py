"""Writing one checkpoint from several processes, in the layout of a multi-process Orbax save.

Each process writes its share of the arrays into its own OCDBT database,
``ocdbt.process_<i>/`` inside the checkpoint being written (:class:`ProcessStoreWriter`), and
records which leaves it wrote in ``.ckptconv-leaves.process_<i>.json`` beside it. Once every
process is done, one process (:class:`MergingWriter`, a :class:`CheckpointWriter` that made
the temporary folder) joins those databases into the root ``manifest.ocdbt`` as Orbax's
``merge_ocdbt_per_process_files`` does at finalize: OCDBT copies every key range by reference,
so only a new B-tree is written and the values stay in ``ocdbt.process_<i>/d/``. It then writes
the metadata files and commits exactly as a single-process writer does (same commit protocol).

Several processes may write pieces of one array: each writes whole chunks only, never a chunk
another process writes, and each writes the array's zarr metadata document, the same bytes
every time, so whichever copy the merge keeps is right.

Nothing here coordinates processes: the caller (:mod:`ckptconv.convert.distributed`) makes
sure every process has finished before :meth:`MergingWriter.merge` runs.

Limits: both classes extend :class:`CheckpointWriter` through its internals (its commit
protocol object, its store, its leaf records and validation); a change there must be mirrored
here (``tests/io/test_multiprocess.py`` and ``tests/convert/test_distributed.py`` cover
both). Every process must see the same folder (one host, or a filesystem or object store
shared by all hosts).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import tensorstore as ts

from ..errors import CheckpointWriteError, StorageError
from . import _commit
from . import _format as fmt
from .leaf import KeyPath, keystr
from .location import Location
from .writer import CheckpointWriter

if TYPE_CHECKING:
    from ._copy import ArrayCopy
    from .reader import CheckpointReader

PROCESS_FOLDER_PREFIX = "ocdbt.process_"
_RECORDS_PREFIX = ".ckptconv-leaves.process_"
# Leaf record entries that are tuples in memory (JSON turns them into lists).
_TUPLE_FIELDS = ("key_types", "chunk", "write_shape")


def process_folder(checkpoint: str | os.PathLike[str] | Location, process_id: int) -> Location:
    """Returns where process ``process_id`` writes its OCDBT database inside ``checkpoint``."""
    return Location.parse(checkpoint).join(f"{PROCESS_FOLDER_PREFIX}{process_id}")


def _records_file(checkpoint: Location, process_id: int) -> Location:
    return checkpoint.join(f"{_RECORDS_PREFIX}{process_id}.json")


def _dump_leaves(leaves: Mapping[KeyPath, Mapping[str, Any]]) -> bytes:
    return json.dumps([[list(path), dict(leaf)] for path, leaf in leaves.items()]).encode()


def _load_leaves(data: bytes) -> dict[KeyPath, dict[str, Any]]:
    out = {}
    for path, leaf in json.loads(data):
        for name in _TUPLE_FIELDS:
            if leaf.get(name) is not None:
                leaf[name] = tuple(leaf[name])
        out[tuple(path)] = leaf
    return out


def _open_like_root(database: Location, context: ts.Context) -> ts.KvStore:
    """Opens a process's database so that OCDBT can copy its keys into the root by reference.

    TensorStore copies by reference only between databases whose base kvstores are alike,
    down to their options and context: this mirrors how the writer's store opens the root
    (:class:`~ckptconv.io._store.WriteStore`), in the root's context. Otherwise the copy is
    refused ("CopyRange not supported") rather than done by value.
    """
    base = database.kvstore_spec()
    data = dict(base)
    if database.local_path is not None:
        data["file_io_locking"] = {"mode": "non_atomic"}
    spec = {"driver": "ocdbt", "base": data, "manifest": base, "cache_pool": "cache_pool#ocdbt"}
    return ts.KvStore.open(spec, context=context).result()


class _ProcessFolder(_commit.CommitProtocol):
    """One process's database: written in place and never published on its own."""

    def __init__(self, folder: Location) -> None:
        super().__init__(folder, force=True)

    @property
    def temporary(self) -> Location | None:
        return None

    def start(self) -> Location:
        return self.dest

    def commit(self, write_metadata: Callable[[Location], None]) -> None:
        # The checkpoint's metadata covers every process: the merging writer writes it.
        pass

    def abort(self) -> None:
        try:
            self.dest.delete_tree()
        except StorageError:
            pass  # the whole checkpoint folder is discarded anyway


class _ChunkSubset:
    """A store wrapper whose :meth:`copy` copies only some chunks of an array."""

    def __init__(self, store: Any, chunks: Collection[str]) -> None:
        self._store = store
        self._chunks = chunks

    def copy(self, key: str, plan: ArrayCopy, reader: CheckpointReader) -> None:
        keys = [(s, d) for s, d in plan.chunk_keys if s in self._chunks]
        self._store.copy(key, dataclasses.replace(plan, chunk_keys=keys), reader)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


class ProcessStoreWriter(CheckpointWriter):
    """Writes one process's share of a multi-process checkpoint into ``ocdbt.process_<i>/``.

    It writes like a :class:`CheckpointWriter` (same array API, same transactions), but into
    the folder of one process inside a checkpoint that a :class:`MergingWriter` is writing;
    :meth:`commit` only makes the data durable and records the leaves it declared. Arrays
    may be written in part (other processes write the rest), so nothing is validated here:
    the merging writer checks the whole checkpoint.

    Example:
        >>> with ProcessStoreWriter(tmp_folder, process_id=1) as w:
        ...     h = w.create(("params", "w"), (8, 4), "float32", chunk_shape=(4, 4))
        ...     h.write((slice(4, 8),), rows)  # process 0 writes rows 0..3

    Args:
        checkpoint: the checkpoint folder being written (:attr:`MergingWriter.folder`).
        process_id: this process's index.
        use_zarr3: as for :class:`CheckpointWriter`; must be the merging writer's.
        chunk_bytes: as for :class:`CheckpointWriter`.
        target_data_file_size: as for :class:`CheckpointWriter`.
        max_inflight_bytes: as for :class:`CheckpointWriter`.
    """

    def __init__(
        self,
        checkpoint: str | os.PathLike[str] | Location,
        process_id: int,
        *,
        use_zarr3: bool = True,
        chunk_bytes: int = 64 << 20,
        target_data_file_size: int = 64 << 20,
        max_inflight_bytes: int = 64 << 20,
    ) -> None:
        self._checkpoint = Location.parse(checkpoint)
        self._process_id = process_id
        folder = process_folder(self._checkpoint, process_id)
        super().__init__(
            folder,
            force=True,
            use_zarr3=use_zarr3,
            chunk_bytes=chunk_bytes,
            target_data_file_size=target_data_file_size,
            max_inflight_bytes=max_inflight_bytes,
        )
        self._protocol = _ProcessFolder(folder)

    def copy_array(
        self,
        path: KeyPath,
        reader: CheckpointReader,
        source_path: KeyPath,
        *,
        axes: Sequence[int] | None = None,
        key_types: Sequence[int] | None = None,
        sharding: Mapping[str, Any] | None = None,
        random_key_impl: str | None = None,
        chunks: Collection[str] | None = None,
    ) -> tuple[int, ...]:
        """Copies a source array verbatim, or only some of its chunks.

        Args:
            path: see :meth:`CheckpointWriter.copy_array`.
            reader: see :meth:`CheckpointWriter.copy_array`.
            source_path: see :meth:`CheckpointWriter.copy_array`.
            axes: see :meth:`CheckpointWriter.copy_array`.
            key_types: see :meth:`CheckpointWriter.copy_array`.
            sharding: see :meth:`CheckpointWriter.copy_array`.
            random_key_impl: see :meth:`CheckpointWriter.copy_array`.
            chunks: the source chunk keys (relative to the array, as
                :meth:`CheckpointReader.chunk_keys` lists them) this process copies;
                ``None`` copies them all. The zarr metadata document is written either way.

        Returns:
            The output shape.
        """
        kwargs = dict(axes=axes, key_types=key_types, sharding=sharding)
        if chunks is None:
            return super().copy_array(
                path, reader, source_path, random_key_impl=random_key_impl, **kwargs
            )
        self._check_open()
        store = self._store
        # The writer copies through self._store.copy(key, plan, reader): this filters its plan.
        self._store = _ChunkSubset(store, frozenset(chunks))
        try:
            return super().copy_array(
                path, reader, source_path, random_key_impl=random_key_impl, **kwargs
            )
        finally:
            self._store = store

    def commit(self) -> Location:
        """Makes this process's data durable and records its leaves for the merging writer.

        Returns:
            This process's database folder.

        Raises:
            CheckpointWriteError: writing data or the record failed (the folder is removed).
        """
        super().commit()
        try:
            _records_file(self._checkpoint, self._process_id).write_bytes(
                _dump_leaves(self._leaves)
            )
        except (OSError, StorageError) as e:
            self._protocol.abort()
            raise CheckpointWriteError(
                f"{self._dest}: cannot record the leaves process {self._process_id} wrote: "
                f"{fmt.one_line(e)}"
            ) from e
        return self._dest

    def _validate(self) -> None:
        """Checks nothing: a process writes part of the tree (see :class:`MergingWriter`)."""


class MergingWriter(CheckpointWriter):
    """A :class:`CheckpointWriter` that takes in the databases of every process, then commits.

    Open it (``with`` or :meth:`CheckpointWriter.__enter__`) before the processes start: its
    :attr:`folder` is where they write. Once all of them have committed their
    :class:`ProcessStoreWriter`, call :meth:`merge`, then :meth:`commit` (or leave the
    ``with`` block). Arrays can also be written directly, as with any writer.

    Args are those of :class:`CheckpointWriter`.
    """

    _expected: dict[KeyPath, tuple[int, ...]] | None = None

    @property
    def folder(self) -> Location:
        """Where the checkpoint is being written (the processes write into it).

        The temporary folder, or on an object store the destination itself. Opens the writer
        if needed.
        """
        self._check_open()
        return self.temporary_location or self.location

    def merge(
        self,
        process_ids: Iterable[int],
        *,
        shapes: Mapping[KeyPath, Sequence[int]] | None = None,
    ) -> dict[KeyPath, dict[str, Any]]:
        """Joins the processes' databases into this checkpoint and takes in their leaves.

        The keys of every ``ocdbt.process_<i>`` database are copied into the root database by
        reference (in the transaction that :meth:`commit` commits), and the leaves each process
        recorded are declared here, as if this writer had written them.

        Args:
            process_ids: every process that wrote into :attr:`folder` (all of them, also those
                that wrote nothing).
            shapes: the shape of every array leaf; :meth:`commit` then checks that each array
                has every chunk of its grid (so a piece no process wrote is an error, not
                zeros).

        Returns:
            The merged leaf records, by path.

        Raises:
            CheckpointWriteError: a process left no record, two processes recorded one leaf
                differently, or a leaf is already declared here.
        """
        self._check_open()
        assert self._store is not None
        folder = self.folder
        store = self._store
        target = store.kvstore.with_transaction(store.transaction())
        merged: dict[KeyPath, dict[str, Any]] = {}
        owners: dict[KeyPath, int] = {}
        for i in process_ids:
            records = _records_file(folder, i)
            try:
                leaves = _load_leaves(records.read_bytes())
            except FileNotFoundError as e:
                raise CheckpointWriteError(
                    f"{folder}: process {i} left no record of what it wrote ({records.name})"
                ) from e
            for path, leaf in leaves.items():
                first = merged.setdefault(path, leaf)
                owners.setdefault(path, i)
                if first != leaf:
                    raise CheckpointWriteError(
                        f"{keystr(path)}: processes {owners[path]} and {i} recorded it "
                        f"differently: {first} and {leaf}"
                    )
            database = process_folder(folder, i)
            if leaves and database.join(fmt.OCDBT_MANIFEST_FILE).exists():
                _open_like_root(database, store.context).experimental_copy_range_to(target).result()
            records.delete_tree()
        for path in sorted(merged):
            leaf = merged[path]
            path, types = self._declare(path, leaf["key_types"])
            self._leaves[path] = {**leaf, "key_types": types}
            if leaf["value_type"] == "jax.Array":
                self._keys[fmt.array_key(path)] = path
                self._copied.add(path)
        if shapes is not None:
            self._expected = {tuple(p): tuple(s) for p, s in shapes.items()}
        return merged

    def _validate(self) -> None:
        super()._validate()
        if not self._expected:
            return
        assert self._store is not None
        # Every key of an array lies under its '.'-joined name: the zarr metadata document and
        # one key per chunk.
        chunks: dict[str, int] = {}
        for key in self._store.kvstore.list().result():
            name, _, rest = key.decode(errors="replace").partition("/")
            if rest not in (".zarray", "zarr.json"):
                chunks[name] = chunks.get(name, 0) + 1
        for path, shape in self._expected.items():
            leaf = self._leaves.get(path)
            if leaf is None or leaf["value_type"] != "jax.Array":
                raise CheckpointWriteError(
                    f"{keystr(path)}: expected an array, found that no process wrote it"
                )
            grid = math.prod(math.ceil(d / c) for d, c in zip(shape, leaf["chunk"], strict=True))
            found = chunks.get(fmt.array_key(path), 0)
            if found < grid:
                raise CheckpointWriteError(
                    f"{keystr(path)}: expected {grid} chunks of shape {leaf['chunk']} written "
                    f"by the processes, found {found}"
                )
