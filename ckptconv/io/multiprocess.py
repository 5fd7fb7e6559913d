"""Writing one checkpoint from several processes, in the layout of a multi-process Orbax save.

Each process writes its share of the arrays into its own OCDBT database,
``ocdbt.process_<i>/`` inside the checkpoint being written (:class:`ProcessStoreWriter`), and
records which leaves it wrote, and exactly which regions of each array (its slabs, or the
chunks it copied), in ``.ckptconv-leaves.process_<i>.json`` beside it. Once every process is
done, one process (:class:`MergingWriter`, a writer that made the temporary folder) joins
those databases into the root ``manifest.ocdbt`` as Orbax's ``merge_ocdbt_per_process_files``
does at finalize: OCDBT copies every key range by reference, so only a new B-tree is written
and the values stay in ``ocdbt.process_<i>/d/``. It then checks that the processes' regions,
joined, cover every array and that the merged database stores every chunk of each array's
grid, writes the metadata files and commits exactly as a single-process writer does (same
commit protocol).

Both writers are a :class:`CheckpointWriter` built by composition, through its constructor:
the process writer passes a commit protocol that publishes nothing and saves the writer's
records instead (:class:`_ProcessPart`); the merging writer passes one that wraps the
destination's own protocol with the checks of the merge (:class:`_MergeCommit`), and with it
the writer's records (which the merge adds the processes' leaves to) and the opener of the
writer's store (which the merge copies the processes' databases into).

Several processes may write pieces of one array, and each writes the array's zarr metadata
document, the same bytes every time, so whichever copy the merge keeps is right. The merge
keeps one process's copy of each chunk too, so a chunk that several processes write into must
be written whole by each of them: the merging writer refuses a chunk one process wrote in part
when another wrote into it as well.

Nothing here coordinates processes: the caller (:mod:`ckptconv.convert.distributed`) makes
sure every process has finished before :meth:`MergingWriter.merge` runs.

Limits: every process must see the same folder (one host, or a filesystem or object store
shared by all hosts).
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import tensorstore as ts

from ..errors import CheckpointWriteError, StorageError
from . import _commit
from . import _format as fmt
from ._coverage import Coverage, describe_unwritten, format_region
from ._permute import ChunkKeys
from ._records import ItemRecords, load_records
from ._store import WriteStore
from .leaf import KeyPath, keystr
from .location import Location
from .writer import CheckpointWriter

PROCESS_FOLDER_PREFIX = "ocdbt.process_"
_RECORDS_PREFIX = ".ckptconv-leaves.process_"


def process_folder(checkpoint: str | os.PathLike[str] | Location, process_id: int) -> Location:
    """Returns where process ``process_id`` writes its OCDBT database inside ``checkpoint``."""
    return Location.parse(checkpoint).join(f"{PROCESS_FOLDER_PREFIX}{process_id}")


def _records_file(checkpoint: Location, process_id: int) -> Location:
    return checkpoint.join(f"{_RECORDS_PREFIX}{process_id}.json")


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


class _ProcessPart(_commit.CommitProtocol):
    """One process's database: written in place, and saved with its records, never published.

    Args:
        checkpoint: the checkpoint folder being written.
        process_id: the process's index.
        records: the records of the process's writer, saved at commit for the merge.
    """

    def __init__(self, checkpoint: Location, process_id: int, records: ItemRecords) -> None:
        super().__init__(process_folder(checkpoint, process_id), force=True)
        self._checkpoint = checkpoint
        self._process_id = process_id
        self._records = records

    @property
    def temporary(self) -> Location | None:
        return None

    def start(self) -> Location:
        return self.dest

    def check(self, records: ItemRecords) -> None:
        """Checks nothing: a process writes part of the tree (see :class:`MergingWriter`)."""

    def commit(self, write_metadata: Callable[[Location], None]) -> None:
        # The checkpoint's metadata covers every process: the merging writer writes it, from
        # the records each process leaves.
        try:
            _records_file(self._checkpoint, self._process_id).write_bytes(self._records.dump())
        except (OSError, StorageError) as e:
            raise CheckpointWriteError(
                f"{self.dest}: cannot record the leaves process {self._process_id} wrote: "
                f"{fmt.one_line(e)}"
            ) from e

    def abort(self) -> None:
        try:
            self.dest.delete_tree()
        except StorageError:
            pass  # the whole checkpoint folder is discarded anyway


class _MergeCommit(_commit.CommitProtocol):
    """The destination's protocol, after the checks of a merge of processes' databases.

    It also opens the writer's store (:meth:`open_store`) and holds the writer's records, so
    that :meth:`MergingWriter.merge` can copy into the one and add to the other.

    Args:
        inner: the destination's own protocol, which publishes the checkpoint.
        use_zarr3: the writer's zarr format.

    Attributes:
        records: the writer's records.
        store: the writer's store, once opened.
        written: for every array the processes wrote, (process id, what it wrote) in merge
            order.
        expected: the shape of every array leaf the merge must hold, if given.
    """

    def __init__(self, inner: _commit.CommitProtocol, *, use_zarr3: bool) -> None:
        super().__init__(inner.dest, force=inner.force)
        self._inner = inner
        self._use_zarr3 = use_zarr3
        self.records = ItemRecords()
        self.store: WriteStore | None = None
        self.written: dict[KeyPath, list[tuple[int, Coverage]]] = {}
        self.expected: dict[KeyPath, tuple[int, ...]] = {}

    def open_store(self, folder: Location, **options: Any) -> WriteStore:
        """Opens the writer's store (see ``open_store`` of :class:`CheckpointWriter`)."""
        self.store = WriteStore(folder, **options)
        return self.store

    @property
    def temporary(self) -> Location | None:
        return self._inner.temporary

    def check_destination(self) -> None:
        self._inner.check_destination()

    def start(self) -> Location:
        return self._inner.start()

    def check(self, records: ItemRecords) -> None:
        """Checks the item as the destination's protocol does, then what the processes wrote.

        Raises:
            CheckpointWriteError: see :meth:`MergingWriter.merge`.
        """
        self._inner.check(records)
        for path, shape in self.expected.items():
            leaf = records.leaves.get(path)
            if leaf is None or leaf["value_type"] != "jax.Array":
                raise CheckpointWriteError(
                    f"{keystr(path)}: expected an array, found that no process wrote it"
                )
            entries = self.written.get(path)
            if entries and entries[0][1].shape != shape:
                raise CheckpointWriteError(
                    f"{keystr(path)}: expected shape {shape}, found the processes wrote shape "
                    f"{entries[0][1].shape}"
                )
        for path, entries in self.written.items():
            _check_joined(path, entries)
        if self.written:
            assert self.store is not None
            _check_stored(self.store.kvstore, self.written, use_zarr3=self._use_zarr3)

    def commit(self, write_metadata: Callable[[Location], None]) -> None:
        self._inner.commit(write_metadata)

    def abort(self) -> None:
        self._inner.abort()


class ProcessStoreWriter(CheckpointWriter):
    """Writes one process's share of a multi-process checkpoint into ``ocdbt.process_<i>/``.

    It writes like a :class:`CheckpointWriter` (same array API, same transactions, also
    :meth:`~CheckpointWriter.copy_array` of only some ``chunks``), but into the folder of one
    process inside a checkpoint that a :class:`MergingWriter` is writing; :meth:`commit` only
    makes the data durable and records the leaves it declared and, for every array, the
    regions written (see :class:`~ckptconv.io._coverage.Coverage`): slabs as written, copied
    chunks by index. Arrays may be written in part (other processes write the rest), so
    nothing is validated here: the merging writer checks the whole checkpoint.

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

    Raises:
        CheckpointWriteError: (at commit) writing data or the record failed; the process's
            folder is removed.
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
        checkpoint = Location.parse(checkpoint)
        records = ItemRecords()
        super().__init__(
            process_folder(checkpoint, process_id),
            force=True,
            use_zarr3=use_zarr3,
            chunk_bytes=chunk_bytes,
            target_data_file_size=target_data_file_size,
            max_inflight_bytes=max_inflight_bytes,
            commit=_ProcessPart(checkpoint, process_id, records),
            records=records,
        )


class MergingWriter(CheckpointWriter):
    """A :class:`CheckpointWriter` that takes in the databases of every process, then commits.

    Open it (``with`` or :attr:`~CheckpointWriter.folder`) before the processes start: its
    :attr:`~CheckpointWriter.folder` is where they write. Once all of them have committed
    their :class:`ProcessStoreWriter`, call :meth:`merge`, then :meth:`commit` (or leave the
    ``with`` block). Arrays can also be written directly, as with any writer.

    Args:
        location: as for :class:`CheckpointWriter`.
        force: as for :class:`CheckpointWriter`.
        use_zarr3: as for :class:`CheckpointWriter`.
        **options: the other arguments of :class:`CheckpointWriter` (``custom_metadata``,
            ``chunk_bytes``, ``target_data_file_size``, ``max_inflight_bytes``).
    """

    def __init__(
        self,
        location: str | os.PathLike[str] | Location,
        *,
        force: bool = False,
        use_zarr3: bool = True,
        **options: Any,
    ) -> None:
        dest = Location.parse(location)
        self._merge = _MergeCommit(_commit.for_destination(dest, force=force), use_zarr3=use_zarr3)
        super().__init__(
            dest,
            force=force,
            use_zarr3=use_zarr3,
            commit=self._merge,
            records=self._merge.records,
            open_store=self._merge.open_store,
            **options,
        )

    def merge(
        self,
        process_ids: Iterable[int],
        *,
        shapes: Mapping[KeyPath, Sequence[int]] | None = None,
    ) -> dict[KeyPath, dict[str, Any]]:
        """Joins the processes' databases into this checkpoint and takes in their leaves.

        The keys of every ``ocdbt.process_<i>`` database are copied into the root database by
        reference (in the transaction that :meth:`commit` commits), and the leaves each process
        recorded are declared here, as if this writer had written them. :meth:`commit` then
        refuses any array with a region that no process wrote, a chunk that one process wrote
        in part while another wrote into it, or a chunk of its grid missing from the merged
        database.

        Args:
            process_ids: every process that wrote into :attr:`folder` (all of them, also those
                that wrote nothing).
            shapes: the shape of every array leaf; :meth:`commit` then also checks that each
                of them was written, in that shape.

        Returns:
            The merged leaf records, by path.

        Raises:
            CheckpointWriteError: a process left no record or a malformed one, two processes
                recorded one leaf differently (its metadata or its shape), or a leaf is
                already declared here.
        """
        folder = self.folder
        store = self._merge.store
        assert store is not None
        target = store.kvstore.with_transaction(store.transaction())
        merged: dict[KeyPath, dict[str, Any]] = {}
        owners: dict[KeyPath, int] = {}
        written: dict[KeyPath, list[tuple[int, Coverage]]] = {}
        for i in process_ids:
            leaves, coverages = _read_record(folder, i)
            _join_leaves(merged, owners, leaves, i)
            _join_written(written, coverages, i)
            database = process_folder(folder, i)
            if leaves and database.join(fmt.OCDBT_MANIFEST_FILE).exists():
                _open_like_root(database, store.context).experimental_copy_range_to(target).result()
            _records_file(folder, i).delete_tree()
        records = self._merge.records
        for path in sorted(merged):
            leaf = merged[path]
            path, types = records.check_new(path, leaf["key_types"])
            if leaf["value_type"] == "jax.Array" and path not in written:
                raise CheckpointWriteError(
                    f"{keystr(path)}: process {owners[path]} recorded the array but not "
                    "what it wrote of it"
                )
            records.add(path, {**leaf, "key_types": types})
        self._merge.written = written
        if shapes is not None:
            self._merge.expected = {tuple(p): tuple(s) for p, s in shapes.items()}
        return merged


def _read_record(
    folder: Location, process_id: int
) -> tuple[dict[KeyPath, dict[str, Any]], dict[KeyPath, Coverage]]:
    """Returns the leaves and the coverage of each array that one process recorded.

    Raises:
        CheckpointWriteError: the process left no record, or a malformed one.
    """
    records = _records_file(folder, process_id)
    try:
        return load_records(records.read_bytes())
    except FileNotFoundError as e:
        raise CheckpointWriteError(
            f"{folder}: process {process_id} left no record of what it wrote ({records.name})"
        ) from e
    except ValueError as e:
        raise CheckpointWriteError(
            f"{folder}: the record process {process_id} left ({records.name}) is unreadable: "
            f"{fmt.one_line(e)}"
        ) from e


def _join_leaves(
    merged: dict[KeyPath, dict[str, Any]],
    owners: dict[KeyPath, int],
    leaves: Mapping[KeyPath, dict[str, Any]],
    process_id: int,
) -> None:
    """Adds one process's leaf records to ``merged`` (by the first process recording each).

    Raises:
        CheckpointWriteError: the process recorded a leaf differently from an earlier one.
    """
    for path, leaf in leaves.items():
        first = merged.setdefault(path, leaf)
        owners.setdefault(path, process_id)
        if first != leaf:
            raise CheckpointWriteError(
                f"{keystr(path)}: processes {owners[path]} and {process_id} recorded it "
                f"differently: {first} and {leaf}"
            )


def _join_written(
    written: dict[KeyPath, list[tuple[int, Coverage]]],
    coverages: Mapping[KeyPath, Coverage],
    process_id: int,
) -> None:
    """Adds what one process wrote of each array to ``written``.

    Raises:
        CheckpointWriteError: the process wrote an array in another shape than an earlier one.
    """
    for path, coverage in coverages.items():
        entries = written.setdefault(path, [])
        if entries and entries[0][1].shape != coverage.shape:
            raise CheckpointWriteError(
                f"{keystr(path)}: processes {entries[0][0]} and {process_id} wrote it with "
                f"shapes {entries[0][1].shape} and {coverage.shape}"
            )
        entries.append((process_id, coverage))


def _check_stored(
    kvstore: ts.KvStore,
    written: Mapping[KeyPath, list[tuple[int, Coverage]]],
    *,
    use_zarr3: bool,
) -> None:
    """Checks that the merged database stores every chunk of each array the processes wrote.

    The processes' records say what they wrote; this checks what the merge holds, by
    distinct chunk index on the grid (keys that are no chunk of the grid count for none).

    Raises:
        CheckpointWriteError: an array's zarr metadata or a chunk of its grid is missing.
    """
    # Every key of an array lies under its '.'-joined name: the zarr metadata document and
    # one key per chunk.
    stored: dict[str, list[str]] = {}
    for key in kvstore.list().result():
        name, _, rest = key.decode(errors="replace").partition("/")
        stored.setdefault(name, []).append(rest)
    docs = {
        path: kvstore.read(fmt.zarr_metadata_key(path, use_zarr3))
        for path, entries in written.items()
        if all(entries[0][1].grid)
    }
    for path, future in docs.items():
        first = written[path][0][1]
        try:
            result = future.result()
            doc = json.loads(result.value) if result.state == "value" else None
        except Exception as e:
            raise CheckpointWriteError(
                f"{keystr(path)}: cannot read its zarr metadata from the merged database: "
                f"{fmt.one_line(e)}"
            ) from e
        if not isinstance(doc, dict) or "shape" not in doc:
            raise CheckpointWriteError(
                f"{keystr(path)}: expected its zarr metadata in the merged database, found none"
            )
        codec = ChunkKeys(doc, zarr3=use_zarr3)
        found = {codec.grid_index(rest, first.grid) for rest in stored.get(fmt.array_key(path), ())}
        found.discard(None)
        total = math.prod(first.grid)
        if len(found) < total:
            missing = next(
                i for i in itertools.product(*(range(g) for g in first.grid)) if i not in found
            )
            region = tuple(
                slice(k * c, min((k + 1) * c, d))
                for k, c, d in zip(missing, first.chunk_shape, first.shape, strict=True)
            )
            raise CheckpointWriteError(
                f"{keystr(path)}: expected all {total} chunks of its grid {first.grid} in the "
                f"merged database, found {len(found)}: chunk {format_region(region)} is missing"
            )


def _check_joined(path: KeyPath, entries: list[tuple[int, Coverage]]) -> None:
    """Checks that the processes' writes into one array cover it, sharing whole chunks only.

    Raises:
        CheckpointWriteError: a region no process wrote, or a chunk that one process wrote in
            part while another wrote into it (the merge keeps one process's copy of a chunk).
    """
    first = entries[0][1]
    joined = Coverage(first.shape, first.chunk_shape)
    for _, coverage in entries:
        joined.include(coverage)
    region = joined.unwritten()
    ids = ", ".join(str(i) for i, _ in entries)
    if region is not None:
        raise CheckpointWriteError(
            f"{keystr(path)}: {describe_unwritten(joined.shape, region)} (written by "
            f"process{'es' if len(entries) > 1 else ''} {ids})"
        )
    for i, coverage in entries:
        # The joined writes cover this chunk, so another process wrote the rest of it.
        chunk = coverage.partial_chunk()
        if chunk is not None:
            raise CheckpointWriteError(
                f"{keystr(path)}: process {i} wrote chunk {format_region(chunk)} in part and "
                "another process wrote into it too; expected each process to write whole "
                "chunks where they share one (the merge keeps one process's copy of a chunk)"
            )
