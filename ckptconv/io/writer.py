"""Streamed, atomic writing of Orbax checkpoints that plain Orbax restores.

:class:`CheckpointWriter` writes arrays one slab at a time, into one OCDBT database (Orbax's
default) or one zarr folder per array (``use_ocdbt=False``, as Pathways needs), and publishes
the checkpoint only once everything (data, then ``_METADATA``, ``_sharding``,
``_CHECKPOINT_METADATA``, then ``commit_success.txt``) is stored: on a local disk by renaming a
temporary sibling folder into place, on an object store by writing in place with
``commit_success.txt`` last (see :mod:`ckptconv.io._commit`). Memory stays bounded: chunks are
at most ``chunk_bytes`` and writes are committed in TensorStore transactions of about
``max_inflight_bytes``, each in the background while the next one fills.

Arrays that only change name or axis order are copied without decoding
(:meth:`CheckpointWriter.copy_array`): their encoded chunks are reused and the axis order is
expressed in the zarr metadata. Either the source's OCDBT files are first cloned in the kernel
(:meth:`CheckpointWriter.clone_for`, when most of the source is copied) and keys renamed by
reference, or each chunk's stored bytes are read and written under the new key.

The OCDBT layout is ``ocp.StandardCheckpointer``'s (zarr2) and MaxText's (zarr3) on one host,
except that the store is written at the item root instead of ``ocdbt.process_0/`` plus a
merge; Orbax reads both through the root ``manifest.ocdbt``.

Limits: one writer per destination; not thread-safe. Replacing a local destination
(``force=True``) takes two renames; a crash between them leaves the old checkpoint under
``.<name>.ckptconv-old-<hex>``. On an object store ``force`` deletes the old checkpoint before
writing. A zarr3 array copied with its axes permuted carries a ``transpose`` codec: TensorStore,
hence Orbax, reads it; a reader implementing only part of zarr v3 may not.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import tensorstore as ts

from ..errors import CheckpointWriteError, CkptconvError
from . import _commit
from . import _format as fmt
from . import _orbax_metadata as orbax_metadata
from ._copy import plan_copy
from ._coverage import Coverage
from ._records import ItemRecords, array_record
from ._store import WriteStore, clone_pays
from ._zarr import array_spec, choose_chunk_shape, tiles
from .handle import ArrayHandle
from .leaf import KeyPath, keystr
from .location import Location

if TYPE_CHECKING:
    from .reader import CheckpointReader
    from .sources.base import CheckpointSource


class CheckpointWriter:
    """Writes a new Orbax checkpoint item, array by array, and commits it atomically.

    Use it as a context manager: the checkpoint is committed when the block ends normally and
    discarded (the destination untouched) when it raises.

    Example:
        >>> with CheckpointWriter("/tmp/out", use_zarr3=True) as w:
        ...     w.write(("params", "w"), np.ones((4, 4), np.float32))
        ...     w.write(("opt_state", "0", "count"), np.int32(0), key_types=(2, 1, 2))
        ...     w.write_empty(("opt_state", "1"), key_types=(2, 1))
        ...     emb = w.create(("params", "emb"), (32768, 64), "bfloat16")
        ...     for start in range(0, 32768, 4096):
        ...         emb.write((slice(start, start + 4096),), rows[start : start + 4096])

    Args:
        location: the destination item folder: a local path or a ``file://``, ``s3://``,
            ``gs://`` or ``memory://`` URL.
        force: replace an existing destination (only once the new one is complete).
        use_zarr3: store arrays as zarr v3 with a ``sharding_indexed`` codec (as MaxText does);
            ``False`` writes zarr v2 as ``ocp.StandardCheckpointer`` does.
        custom_metadata: JSON-serialisable user metadata, stored in ``_CHECKPOINT_METADATA``
            and ``_METADATA`` (MaxText stores ``{"scan_layers": true}``).
        chunk_bytes: the largest stored chunk, in bytes.
        target_data_file_size: the OCDBT target size of one data file, in bytes.
        max_inflight_bytes: how many bytes of written slabs TensorStore may hold in memory
            before they are committed to disk.
        use_ocdbt: store arrays in one OCDBT database; ``False``: one zarr folder per array.
        commit: how the checkpoint is published (a
            :class:`~ckptconv.io._commit.CommitProtocol` for ``location``); default: the one
            of the destination's storage (:func:`~ckptconv.io._commit.for_destination`, with
            ``force``). Variants writing part of a checkpoint, or merging parts, pass theirs.
        records: where declared leaves and written regions are recorded; default: new
            records. A variant that declares leaves another writer stored passes its own.
        open_store: opens the store written into, called with the folder the protocol
            started and :class:`~ckptconv.io._store.WriteStore`'s keyword arguments; default:
            ``WriteStore``. A variant that writes into the store itself passes its own.

    Raises:
        DestinationExistsError: the destination exists and ``force`` is false.
        CheckpointWriteError: ``custom_metadata`` is not JSON-serialisable.
        StorageError: the destination's storage cannot be reached or refuses the request.
    """

    def __init__(
        self,
        location: str | os.PathLike[str] | Location,
        *,
        force: bool = False,
        use_zarr3: bool = True,
        custom_metadata: Any = None,
        chunk_bytes: int = 64 << 20,
        target_data_file_size: int = 64 << 20,
        max_inflight_bytes: int = 64 << 20,
        use_ocdbt: bool = True,
        commit: _commit.CommitProtocol | None = None,
        records: ItemRecords | None = None,
        open_store: Callable[..., WriteStore] | None = None,
    ) -> None:
        dest = Location.parse(location)
        try:
            json.dumps(custom_metadata)
        except (TypeError, ValueError) as e:
            raise CheckpointWriteError(
                f"{dest}: custom_metadata must be JSON-serialisable: {fmt.one_line(e)}"
            ) from e
        self._dest = dest
        self._use_zarr3 = use_zarr3
        self._use_ocdbt = use_ocdbt
        self._custom_metadata = custom_metadata
        self._chunk_bytes = chunk_bytes
        self._target_data_file_size = target_data_file_size
        self._max_inflight_bytes = max_inflight_bytes
        self._protocol = (
            commit if commit is not None else _commit.for_destination(dest, force=force)
        )
        self._protocol.check_destination()
        self._records = ItemRecords() if records is None else records
        self._open_store = open_store
        self._state = "new"
        self._work: Location | None = None  # where data and metadata are being written
        self._init_ns = 0
        self._store: WriteStore | None = None

    def __repr__(self) -> str:
        return f"CheckpointWriter({str(self._dest)!r}, state={self._state})"

    @property
    def location(self) -> Location:
        """The destination."""
        return self._dest

    @property
    def temporary_location(self) -> Location | None:
        """The temporary folder being written while the writer is open, else ``None``.

        Object stores have none: the destination itself is written, committed by its marker.
        """
        return self._protocol.temporary if self._state == "open" else None

    @property
    def folder(self) -> Location:
        """Where data and metadata are being written; opens the writer if needed.

        The temporary folder, or on an object store the destination itself.

        Raises:
            CheckpointWriteError: the writer is committed or aborted.
        """
        self._check_open()
        assert self._work is not None
        return self._work

    def __enter__(self) -> CheckpointWriter:
        self._start()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            self.abort()
        elif self._state in ("new", "open"):
            self.commit()
        return False

    # -- public writing API -------------------------------------------------------------------

    def create(
        self,
        path: KeyPath,
        shape: Sequence[int],
        dtype: Any,
        *,
        key_types: Sequence[int] | None = None,
        sharding: Mapping[str, Any] | None = None,
        random_key_impl: str | None = None,
        chunk_shape: Sequence[int] | None = None,
        inner_chunk_shape: Sequence[int] | None = None,
    ) -> ArrayHandle:
        """Declares one array and returns a handle to write it slab by slab.

        Args:
            path: the key path, all strings (list indices as ``"0"``, ``"1"``, ...).
            shape: the array shape (``()`` for a scalar).
            dtype: a numpy dtype or name (``"bfloat16"`` included).
            key_types: the Orbax key type of each path component: 1 for a list index, 2 for a
                dict key. Default: all dict keys. Give 1 for list entries so that Orbax
                restores a list without a target.
            sharding: the Orbax sharding JSON (``{"sharding_type": "NamedSharding", ...}``)
                recorded in ``_sharding`` for restoring without a target; default: on device 0.
            random_key_impl: for typed PRNG keys stored as their uint32 key data, the key
                implementation (e.g. ``"threefry2x32"``), so that Orbax restores a typed key.
            chunk_shape: the stored chunk shape; default: at most ``chunk_bytes``, splitting
                the leading axes first. Slabs that cover whole chunks are written without
                reading anything back.
            inner_chunk_shape: zarr3 only: the chunks inside each stored chunk (those of its
                ``sharding_indexed`` codec), each dividing ``chunk_shape``; default: one.

        Returns:
            The array's handle; every element must be written before :meth:`commit`.

        Raises:
            CheckpointWriteError: the path is already written, or an argument is invalid.
        """
        path, types = self._declare(path, key_types)
        shape = tuple(int(d) for d in shape)
        if any(d < 0 for d in shape):
            raise CheckpointWriteError(f"{keystr(path)}: negative dimension in shape {shape}")
        try:
            dtype_name = fmt.dtype_name(dtype)
            itemsize = fmt.numpy_dtype(dtype_name).itemsize
        except (TypeError, AttributeError) as e:
            raise CheckpointWriteError(f"{keystr(path)}: unknown dtype {dtype!r}") from e
        if chunk_shape is None:
            chunk = choose_chunk_shape(shape, itemsize, self._chunk_bytes)
        else:
            chunk = tuple(int(c) for c in chunk_shape)
            if len(chunk) != len(shape) or any(c < 1 for c in chunk):
                raise CheckpointWriteError(
                    f"{keystr(path)}: chunk shape {chunk} does not fit shape {shape}"
                )
        inner = None if inner_chunk_shape is None else tuple(int(c) for c in inner_chunk_shape)
        if inner is not None and not (self._use_zarr3 and tiles(inner, chunk)):
            raise CheckpointWriteError(
                f"{keystr(path)}: inner chunk shape {inner} must divide {chunk} (zarr3 only)"
            )
        spec = array_spec(shape, dtype_name, chunk, use_zarr3=self._use_zarr3, inner_chunk=inner)
        store = self._open_array(path, spec)
        handle = ArrayHandle(self, path, shape, dtype_name, chunk, store)
        record = array_record(types, chunk, sharding, random_key_impl)
        self._records.add(path, record, handle.coverage)
        return handle

    def write(
        self,
        path: KeyPath,
        array: Any,
        *,
        key_types: Sequence[int] | None = None,
        sharding: Mapping[str, Any] | None = None,
        random_key_impl: str | None = None,
    ) -> None:
        """Writes one whole array (a numpy array, numpy scalar or anything ``np.asarray`` takes).

        For an array larger than ``max_inflight_bytes``, prefer :meth:`create` and slabs: the
        whole array is otherwise held twice in memory (the caller's and TensorStore's copy).

        Args:
            path: the key path, see :meth:`create`.
            array: the values, stored in their own dtype.
            key_types: see :meth:`create`.
            sharding: see :meth:`create`.
            random_key_impl: see :meth:`create`.

        Raises:
            CheckpointWriteError: the path is already written, or an argument is invalid.
        """
        data = np.asarray(array)
        handle = self.create(
            path,
            data.shape,
            data.dtype,
            key_types=key_types,
            sharding=sharding,
            random_key_impl=random_key_impl,
        )
        handle.write(None, data)

    def write_empty(
        self,
        path: KeyPath,
        *,
        key_types: Sequence[int] | None = None,
        value_type: str = "None",
    ) -> None:
        """Records an empty leaf, which Orbax stores with ``skip_deserialize``.

        ``"None"`` restores as ``None`` without a target and as the target's value (e.g. an
        optax ``EmptyState()``) with one; ``"Dict"`` and ``"List"`` restore as ``{}`` / ``[]``.

        Args:
            path: the key path, see :meth:`create`.
            key_types: see :meth:`create`.
            value_type: ``"None"``, ``"Dict"`` or ``"List"``.

        Raises:
            CheckpointWriteError: the path is already written, or an argument is invalid.
        """
        if value_type not in fmt.EMPTY_VALUE_TYPES:
            raise CheckpointWriteError(
                f"{keystr(tuple(path))}: value_type must be one of {fmt.EMPTY_VALUE_TYPES}, "
                f"found {value_type!r}"
            )
        path, types = self._declare(path, key_types)
        self._records.add(path, {"key_types": types, "value_type": value_type})

    def clone_from(self, reader: CheckpointReader) -> bool:
        """Starts the checkpoint as a copy of ``reader``'s OCDBT database, to copy arrays cheaply.

        The database files are copied as they are (in the kernel, fsynced) and the source's
        keys are moved out of sight, so the checkpoint holds only the leaves declared
        afterwards. :meth:`copy_array` from this reader then renames keys inside the database
        by reference instead of reading and writing chunk bytes; every other array is written
        as usual. Data of source arrays that are not copied remains in the copied files,
        unreferenced: call this only when most of the source is copied.

        Args:
            reader: the source checkpoint, on a local filesystem.

        Returns:
            Whether the database was cloned; ``False`` (and nothing done) for a source that is
            not local, whose zarr format differs from this writer's, or whose B-tree refers to
            files outside the folders that are copied.

        Raises:
            CheckpointWriteError: something was already written, or copying failed.
            CheckpointFormatError: a data file of the source is missing or truncated (files
                are copied unread, so this is checked against the B-tree first).
        """
        self._check_open()
        assert self._store is not None
        if self._records.leaves or self._store.cloned_from is not None:
            raise CheckpointWriteError(
                f"{self._dest}: clone_from must be called once, before anything is written"
            )
        if reader.use_zarr3 != self._use_zarr3:
            return False
        try:
            return self._store.clone(reader)
        except CkptconvError:
            raise
        except Exception as e:
            raise CheckpointWriteError(
                f"{self._dest}: cloning the database of {reader.location} into {self._work} "
                f"failed: {fmt.one_line(e)}"
            ) from e

    def clone_for(self, source: CheckpointSource, source_paths: Iterable[KeyPath]) -> bool:
        """Clones ``source``'s database (:meth:`clone_from`) when copying ``source_paths`` pays.

        It pays for a local OCDBT source whose arrays at ``source_paths`` (those
        :meth:`copy_array` will copy) hold nearly all the bytes its B-tree refers to (see
        :func:`~ckptconv.io._store.clone_pays`).

        Example:
            >>> with CheckpointWriter("nnx_ckpt") as w:
            ...     w.clone_for(open_source("linen_ckpt"), [("params", "w")])
            True

        Returns:
            Whether it cloned.

        Raises:
            CheckpointWriteError: something was already written, or copying failed.
            CheckpointFormatError: the source's B-tree cannot be walked or a data file is
                damaged.
        """
        paths = [tuple(p) for p in source_paths]
        return self._use_ocdbt and clone_pays(source, paths) and self.clone_from(source)  # type: ignore[arg-type]

    def can_copy(
        self, reader: CheckpointReader, path: KeyPath, axes: Sequence[int] | None = None
    ) -> bool:
        """Whether :meth:`copy_array` can write ``np.transpose(source, axes)`` verbatim.

        It can when the source's zarr format is this writer's and that format can express the
        axis order over the stored chunks (always for zarr3; for zarr2 only as C or F order).

        Raises:
            LayoutError: ``path`` is not an array leaf of the source.
            CheckpointFormatError: a chunk of the source array is not stored.
            ValueError: ``axes`` is not a permutation of the array's axes.
        """
        return plan_copy(reader, path, axes, use_zarr3=self._use_zarr3) is not None

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
        """Writes ``np.transpose(source, axes)`` by copying the source's encoded chunks.

        Nothing is decoded, so the values are bit-identical to the source's. From the reader
        given to :meth:`clone_from`, keys are renamed by reference; from any other, stored
        chunk bytes are read and written, a few reads in flight at a time. With ``chunks``
        only those chunks are copied: the rest of the array must be written otherwise (by
        another process of a multi-process write, see :mod:`ckptconv.io.multiprocess`).

        Example:
            >>> reader = CheckpointReader("linen_ckpt")
            >>> with CheckpointWriter("nnx_ckpt") as w:
            ...     w.copy_array(("model", "w", "value"), reader, ("params", "w"), axes=(1, 0))
            (64, 32)

        Args:
            path: the output key path, see :meth:`create`.
            reader: the source checkpoint.
            source_path: the source array's key path.
            axes: the axis permutation, as for ``np.transpose``; ``None`` keeps the axes.
            key_types: see :meth:`create`.
            sharding: see :meth:`create`.
            random_key_impl: see :meth:`create`.
            chunks: the source chunk keys to copy (relative to the array, as
                :meth:`CheckpointReader.chunk_keys` lists them); ``None`` copies them all.
                The zarr metadata document is written either way.

        Returns:
            The output shape.

        Raises:
            CheckpointWriteError: the array cannot be copied verbatim (see :meth:`can_copy`),
                the path is already written, an argument is invalid, or the copy failed.
            CheckpointFormatError: a chunk of the source array is missing or unreadable.
            LayoutError: ``source_path`` is not an array leaf of the source.
        """
        path, types = self._declare(path, key_types)
        assert self._store is not None
        try:
            plan = plan_copy(reader, source_path, axes, use_zarr3=self._use_zarr3)
        except CkptconvError:
            raise
        except ValueError as e:  # axes is not a permutation of the source's axes
            raise CheckpointWriteError(f"{keystr(path)}: {fmt.one_line(e)}") from e
        if plan is None:
            raise CheckpointWriteError(
                f"{keystr(path)}: {keystr(tuple(source_path))} of {reader.location} cannot be "
                f"copied verbatim with axes {None if axes is None else list(axes)} "
                f"({'zarr3' if reader.use_zarr3 else 'zarr2'} source, "
                f"{'zarr3' if self._use_zarr3 else 'zarr2'} destination)"
            )
        if chunks is not None:
            plan = plan.only(chunks)
        key = fmt.array_key(path)
        try:
            self._store.copy(key, plan, reader)
            self._store.write_value(f"{key}/{plan.doc_name}", json.dumps(plan.metadata).encode())
        except CkptconvError:
            raise
        except Exception as e:
            raise CheckpointWriteError(
                f"{keystr(path)}: copying {keystr(tuple(source_path))} failed: {fmt.one_line(e)}"
            ) from e
        record = array_record(
            types, plan.chunk_shape, sharding, random_key_impl, write_shape=plan.write_shape
        )
        coverage = Coverage(plan.shape, plan.chunk_shape)
        if chunks is None:
            coverage.add_all()  # plan_copy found every chunk of the grid stored
        else:
            coverage.add_chunks(plan.grid_chunks())
        self._records.add(path, record, coverage)
        return plan.shape

    def commit(self) -> Location:
        """Finishes the checkpoint and moves it into place.

        Commits every pending write, checks that every declared array was written in full and
        that the leaves form one tree (the commit protocol's ``check``), writes the metadata
        files with ``commit_success.txt`` last, then (on a local disk) renames the temporary
        folder to the destination (replacing it when ``force``, the old one deleted only after
        the new one is in place).
        On an object store the checkpoint is complete once ``commit_success.txt`` is written.

        Returns:
            The destination.

        Raises:
            CheckpointWriteError: an array has a region no slab wrote (the message names the
                first one; overlapping slabs count once), the tree is inconsistent, or there
                is no array. The temporary folder is removed.
            DestinationExistsError: the destination appeared meanwhile and ``force`` is false.
        """
        self._start()
        assert self._store is not None
        try:
            self._store.drain_copies(0)
            self._store.drop_clone_leftovers()
            self._store.flush(wait=True)
            self._protocol.check(self._records)
            self._protocol.commit(
                lambda folder: orbax_metadata.write_item_metadata(
                    folder,
                    self._records.leaves,
                    use_zarr3=self._use_zarr3,
                    custom_metadata=self._custom_metadata,
                    init_timestamp_ns=self._init_ns,
                    destination=str(self._dest),
                    use_ocdbt=self._use_ocdbt,
                )
            )
            self._work = None
        except BaseException:
            self.abort()
            raise
        self._state = "committed"
        return self._dest

    def abort(self) -> None:
        """Discards everything written; the destination is left untouched."""
        if self._state == "open":
            if self._store is not None:
                self._store.abort()
                self._store = None
            self._protocol.abort()
            self._work = None
        self._state = "aborted"

    # -- internals ----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._state == "new":
            self._start()
        if self._state != "open":
            raise CheckpointWriteError(f"{self._dest}: the writer is {self._state}")

    def _start(self) -> None:
        if self._state == "open":
            return
        if self._state != "new":
            raise CheckpointWriteError(f"{self._dest}: the writer is {self._state}")
        # The protocol writes the in-progress marker first (see _commit).
        self._work = self._protocol.start()
        self._state = "open"
        self._init_ns = time.time_ns()
        try:
            self._store = (self._open_store or WriteStore)(
                self._work,
                target_data_file_size=self._target_data_file_size,
                max_inflight_bytes=self._max_inflight_bytes,
                where=str(self._dest),
                use_ocdbt=self._use_ocdbt,
            )
        except BaseException as e:
            work = self._work
            self.abort()  # removes the temporary folder the protocol made
            if isinstance(e, CkptconvError) or not isinstance(e, Exception):
                raise
            raise CheckpointWriteError(
                f"{self._dest}: cannot open the OCDBT store in {work}: {fmt.one_line(e)}"
            ) from e

    def _declare(
        self, path: KeyPath, key_types: Sequence[int] | None
    ) -> tuple[KeyPath, tuple[int, ...]]:
        self._check_open()
        return self._records.check_new(path, key_types)

    def _open_array(self, path: KeyPath, spec: dict[str, Any]) -> ts.TensorStore:
        assert self._store is not None
        key = fmt.array_key(path)
        kvstore = self._store.kvstore / f"{key}/"
        context = self._store.context
        try:
            # The metadata document is written in the pending transaction; the returned store
            # assumes that metadata (no I/O) and is bound to the pending transaction per write.
            ts.open(
                spec,
                kvstore=kvstore,
                context=context,
                transaction=self._store.transaction(),
                create=True,
                open=False,
            ).result()
            return ts.open(spec, kvstore=kvstore, context=context, assume_metadata=True).result()
        except Exception as e:
            raise CheckpointWriteError(
                f"{keystr(path)}: cannot create array {key!r}: {fmt.one_line(e)}"
            ) from e

    def _submit(self, path: KeyPath, view: ts.TensorStore, data: np.ndarray) -> None:
        # Writes are grouped in a transaction of up to max_inflight_bytes: TensorStore keeps
        # them in memory and commits them together as one OCDBT commit with a few large data
        # files, instead of one small file and one B-tree update per write.
        assert self._store is not None
        self._store.write_slab(view, data, keystr(path))
