"""Writing one checkpoint from several processes, in the layout of a multi-process Orbax save.

Each process writes its share of the arrays into its own OCDBT database,
``ocdbt.process_<i>/`` inside the checkpoint being written (:class:`ProcessStoreWriter`), and
records which leaves it wrote, and exactly which regions of each array (its slabs, or the
chunks it copied), in ``.ckptconv-leaves.process_<i>.json`` beside it. Once every process is
done, one process (:class:`MergingWriter`, a :class:`CheckpointWriter` that made the temporary
folder) joins those databases into the root ``manifest.ocdbt`` as Orbax's
``merge_ocdbt_per_process_files`` does at finalize: OCDBT copies every key range by reference,
so only a new B-tree is written and the values stay in ``ocdbt.process_<i>/d/``. It then checks
that the processes' regions, joined, cover every array and that the merged database stores
every chunk of each array's grid, writes the metadata files and commits exactly as a
single-process writer does (same commit protocol).

Several processes may write pieces of one array, and each writes the array's zarr metadata
document, the same bytes every time, so whichever copy the merge keeps is right. The merge
keeps one process's copy of each chunk too, so a chunk that several processes write into must
be written whole by each of them: the merging writer refuses a chunk one process wrote in part
when another wrote into it as well.

Nothing here coordinates processes: the caller (:mod:`ckptconv.convert.distributed`) makes
sure every process has finished before :meth:`MergingWriter.merge` runs.

Limits: both classes extend :class:`CheckpointWriter` through its internals (its commit
protocol object, its store, its leaf and coverage records and validation); a change there
must be mirrored here (``tests/io/test_multiprocess.py`` and
``tests/convert/test_distributed.py`` cover both). Every process must see the same folder (one
host, or a filesystem or object store shared by all hosts).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import tensorstore as ts

from ..errors import CheckpointWriteError, StorageError
from . import _commit
from . import _format as fmt
from ._coverage import Coverage, describe_unwritten, format_region
from ._permute import ChunkKeys
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


def _dump_records(
    leaves: Mapping[KeyPath, Mapping[str, Any]], written: Mapping[KeyPath, Coverage]
) -> bytes:
    return json.dumps(
        {
            "leaves": [[list(path), dict(leaf)] for path, leaf in leaves.items()],
            "written": [[list(path), c.to_json()] for path, c in written.items()],
        }
    ).encode()


def _load_records(data: bytes) -> tuple[dict[KeyPath, dict[str, Any]], dict[KeyPath, Coverage]]:
    """Returns the leaves and the coverage of each array that one process recorded.

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
    """A store wrapper whose :meth:`copy` copies only some chunks of an array.

    Attributes:
        written: after :meth:`copy`, the output chunks it copied.
    """

    def __init__(self, store: Any, chunks: Collection[str]) -> None:
        self._store = store
        self._chunks = chunks
        self.written: Coverage | None = None

    def copy(self, key: str, plan: ArrayCopy, reader: CheckpointReader) -> None:
        keys = [(s, d) for s, d in plan.chunk_keys if s in self._chunks]
        self._store.copy(key, dataclasses.replace(plan, chunk_keys=keys), reader)
        written = Coverage(plan.shape, plan.chunk_shape)
        codec = ChunkKeys(plan.metadata, zarr3=plan.doc_name == "zarr.json")
        indices = (codec.parse(d) for _, d in keys)
        # Keys that are no chunk of the grid are copied under their own name but cover nothing.
        written.add_chunks(
            i
            for i in indices
            if i is not None and all(k < g for k, g in zip(i, written.grid, strict=True))
        )
        self.written = written

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
        subset = _ChunkSubset(store, frozenset(chunks))
        self._store = subset
        try:
            shape = super().copy_array(
                path, reader, source_path, random_key_impl=random_key_impl, **kwargs
            )
        finally:
            self._store = store
        assert subset.written is not None
        self._written[tuple(path)] = subset.written  # only these chunks, not the whole array
        return shape

    def commit(self) -> Location:
        """Makes this process's data durable and records what it wrote for the merging writer.

        The record holds the leaves declared and, for every array, the regions written (see
        :class:`~ckptconv.io._coverage.Coverage`): slabs as written, copied chunks by index.

        Returns:
            This process's database folder.

        Raises:
            CheckpointWriteError: writing data or the record failed (the folder is removed).
        """
        super().commit()
        try:
            _records_file(self._checkpoint, self._process_id).write_bytes(
                _dump_records(self._leaves, self._written)
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
    # For every array the processes wrote: (process id, what it wrote), in merge order.
    _merged_written: dict[KeyPath, list[tuple[int, Coverage]]] | None = None

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
        self._check_open()
        assert self._store is not None
        folder = self.folder
        store = self._store
        target = store.kvstore.with_transaction(store.transaction())
        merged: dict[KeyPath, dict[str, Any]] = {}
        owners: dict[KeyPath, int] = {}
        written: dict[KeyPath, list[tuple[int, Coverage]]] = {}
        for i in process_ids:
            records = _records_file(folder, i)
            try:
                leaves, coverages = _load_records(records.read_bytes())
            except FileNotFoundError as e:
                raise CheckpointWriteError(
                    f"{folder}: process {i} left no record of what it wrote ({records.name})"
                ) from e
            except ValueError as e:
                raise CheckpointWriteError(
                    f"{folder}: the record process {i} left ({records.name}) is unreadable: "
                    f"{fmt.one_line(e)}"
                ) from e
            for path, leaf in leaves.items():
                first = merged.setdefault(path, leaf)
                owners.setdefault(path, i)
                if first != leaf:
                    raise CheckpointWriteError(
                        f"{keystr(path)}: processes {owners[path]} and {i} recorded it "
                        f"differently: {first} and {leaf}"
                    )
            for path, coverage in coverages.items():
                entries = written.setdefault(path, [])
                if entries and entries[0][1].shape != coverage.shape:
                    raise CheckpointWriteError(
                        f"{keystr(path)}: processes {entries[0][0]} and {i} wrote it with "
                        f"shapes {entries[0][1].shape} and {coverage.shape}"
                    )
                entries.append((i, coverage))
            database = process_folder(folder, i)
            if leaves and database.join(fmt.OCDBT_MANIFEST_FILE).exists():
                _open_like_root(database, store.context).experimental_copy_range_to(target).result()
            records.delete_tree()
        for path in sorted(merged):
            leaf = merged[path]
            path, types = self._declare(path, leaf["key_types"])
            self._leaves[path] = {**leaf, "key_types": types}
            if leaf["value_type"] == "jax.Array":
                if path not in written:
                    raise CheckpointWriteError(
                        f"{keystr(path)}: process {owners[path]} recorded the array but not "
                        "what it wrote of it"
                    )
                self._keys[fmt.array_key(path)] = path
                self._copied.add(path)
        self._merged_written = written
        if shapes is not None:
            self._expected = {tuple(p): tuple(s) for p, s in shapes.items()}
        return merged

    def _validate(self) -> None:
        super()._validate()
        written = self._merged_written or {}
        for path, shape in (self._expected or {}).items():
            leaf = self._leaves.get(path)
            if leaf is None or leaf["value_type"] != "jax.Array":
                raise CheckpointWriteError(
                    f"{keystr(path)}: expected an array, found that no process wrote it"
                )
            entries = written.get(path)
            if entries and entries[0][1].shape != shape:
                raise CheckpointWriteError(
                    f"{keystr(path)}: expected shape {shape}, found the processes wrote shape "
                    f"{entries[0][1].shape}"
                )
        for path, entries in written.items():
            _check_joined(path, entries)
        self._check_stored(written)

    def _check_stored(self, written: Mapping[KeyPath, list[tuple[int, Coverage]]]) -> None:
        """Checks that the merged database stores every chunk of each array the processes wrote.

        The processes' records say what they wrote; this checks what the merge holds, by
        distinct chunk index on the grid (keys that are no chunk of the grid count for none).
        """
        if not written:
            return
        assert self._store is not None
        kvstore = self._store.kvstore
        # Every key of an array lies under its '.'-joined name: the zarr metadata document and
        # one key per chunk.
        stored: dict[str, list[str]] = {}
        for key in kvstore.list().result():
            name, _, rest = key.decode(errors="replace").partition("/")
            stored.setdefault(name, []).append(rest)
        docs = {
            path: kvstore.read(fmt.zarr_metadata_key(path, self._use_zarr3))
            for path, entries in written.items()
            if all(entries[0][1].grid)
        }
        for path, future in docs.items():
            grid = written[path][0][1].grid
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
            codec = ChunkKeys(doc, zarr3=self._use_zarr3)
            found = set()
            for rest in stored.get(fmt.array_key(path), ()):
                index = codec.parse(rest)
                if index is not None and all(k < g for k, g in zip(index, grid, strict=True)):
                    found.add(index)
            total = math.prod(grid)
            if len(found) < total:
                missing = next(
                    i for i in itertools.product(*(range(g) for g in grid)) if i not in found
                )
                chunk = written[path][0][1].chunk_shape
                shape = written[path][0][1].shape
                region = tuple(
                    slice(k * c, min((k + 1) * c, d))
                    for k, c, d in zip(missing, chunk, shape, strict=True)
                )
                raise CheckpointWriteError(
                    f"{keystr(path)}: expected all {total} chunks of its grid {grid} in the "
                    f"merged database, found {len(found)}: chunk {format_region(region)} is "
                    "missing"
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
