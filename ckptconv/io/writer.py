"""Streamed, atomic writing of Orbax OCDBT checkpoints that plain Orbax restores.

:class:`CheckpointWriter` writes arrays one slab at a time into a temporary sibling folder of
the destination and renames it into place only once everything (data, then ``_METADATA``,
``_sharding``, ``_CHECKPOINT_METADATA``, then ``commit_success.txt``) is on disk. Memory stays
bounded: chunks are at most ``chunk_bytes`` (64 MiB by default) and writes are committed to
disk in TensorStore transactions of at most ``max_inflight_bytes``.

The layout is the one ``ocp.StandardCheckpointer`` (zarr2) and MaxText (zarr3) produce on one
host, with one difference: the OCDBT store is written directly at the item root instead of in
``ocdbt.process_0/`` followed by a merge; Orbax reads both through the root ``manifest.ocdbt``.

Limits: local filesystems only (the commit is an ``os.rename``); one writer per destination; not
thread-safe. Replacing an existing destination (``force=True``) takes two renames, so a crash
between them leaves the old checkpoint under ``.<name>.ckptconv-old-<hex>`` and no destination.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tensorstore as ts

from ..errors import CheckpointWriteError, DestinationExistsError
from . import _format as fmt
from . import _orbax_metadata as orbax_metadata
from ._zarr import array_spec, choose_chunk_shape
from .leaf import KeyPath, keystr
from .location import Location

# Orbax's OCDBT write settings (tensorstore_utils._add_ocdbt_write_options), except a smaller
# B-tree node limit, so that each of the writer's commits rewrites part of the index only.
_OCDBT_CONFIG = {
    "max_inline_value_bytes": 1024,
    "max_decoded_node_bytes": 1 << 20,
    "manifest_kind": "single",
}


class ArrayHandle:
    """One array being written; get it from :meth:`CheckpointWriter.create`.

    Attributes:
        path: the key path.
        shape: the array shape.
        dtype: the canonical dtype name.
        chunk_shape: the stored chunk shape; slabs aligned to it are written without any
            read-modify-write of a chunk.
    """

    def __init__(
        self,
        writer: CheckpointWriter,
        path: KeyPath,
        shape: tuple[int, ...],
        dtype: str,
        chunk_shape: tuple[int, ...],
        store: ts.TensorStore,
    ) -> None:
        self.path = path
        self.shape = shape
        self.dtype = dtype
        self.chunk_shape = chunk_shape
        self._writer = writer
        self._store = store
        self._written = 0

    def __repr__(self) -> str:
        return f"ArrayHandle({keystr(self.path)}, shape={self.shape}, dtype={self.dtype})"

    @property
    def size(self) -> int:
        """Number of elements of the whole array."""
        return math.prod(self.shape)

    @property
    def elements_written(self) -> int:
        """Number of elements written so far (overlapping slabs count twice)."""
        return self._written

    def write(self, index: tuple[slice, ...] | None, array: Any) -> None:
        """Writes one slab of the array.

        The data is copied before this returns, so ``array`` may be reused at once.

        Args:
            index: a tuple of slices (step 1) selecting the slab, or ``None`` for the whole
                array; missing trailing axes are taken whole.
            array: the slab's values, of exactly the slab's shape and the array's dtype.

        Raises:
            CheckpointWriteError: the index, dtype or shape does not match, or the writer is
                closed.
        """
        self._writer._check_open()
        data = np.asarray(array)
        if fmt.dtype_name(data.dtype) != self.dtype:
            raise CheckpointWriteError(
                f"{keystr(self.path)}: expected dtype {self.dtype}, found {data.dtype.name} "
                "(cast explicitly; the writer never converts silently)"
            )
        view = self._store
        if index is not None:
            try:
                view = self._store[fmt.normalize_index(index, self.shape)]
            except (IndexError, ValueError, TypeError) as e:
                raise CheckpointWriteError(
                    f"{keystr(self.path)}: slab index {index!r} does not fit shape "
                    f"{self.shape}: {fmt.one_line(e)}"
                ) from e
        if tuple(view.shape) != data.shape:
            raise CheckpointWriteError(
                f"{keystr(self.path)}: slab {index!r} has shape {tuple(view.shape)}, found data "
                f"of shape {data.shape}"
            )
        self._writer._submit(self.path, view, data)
        self._written += data.size


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
        location: the destination item folder (a local path or ``file://`` URL).
        force: replace an existing destination (only once the new one is complete).
        use_zarr3: store arrays as zarr v3 with a ``sharding_indexed`` codec (as MaxText does);
            ``False`` writes zarr v2 as ``ocp.StandardCheckpointer`` does.
        custom_metadata: JSON-serialisable user metadata, stored in ``_CHECKPOINT_METADATA``
            and ``_METADATA`` (MaxText stores ``{"scan_layers": true}``).
        chunk_bytes: the largest stored chunk, in bytes.
        target_data_file_size: the OCDBT target size of one data file, in bytes.
        max_inflight_bytes: how many bytes of written slabs TensorStore may hold in memory
            before they are committed to disk.

    Raises:
        DestinationExistsError: the destination exists and ``force`` is false.
        CheckpointWriteError: the destination is not on a local filesystem, or
            ``custom_metadata`` is not JSON-serialisable.
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
    ) -> None:
        dest = Location.parse(location)
        if dest.local_path is None:
            raise CheckpointWriteError(
                f"{dest}: expected a local destination, found a {dest.scheme}:// location; the "
                "writer commits with an atomic rename on a local filesystem"
            )
        try:
            json.dumps(custom_metadata)
        except (TypeError, ValueError) as e:
            raise CheckpointWriteError(
                f"{dest}: custom_metadata must be JSON-serialisable: {fmt.one_line(e)}"
            ) from e
        self._dest = dest
        self._force = force
        self._use_zarr3 = use_zarr3
        self._custom_metadata = custom_metadata
        self._chunk_bytes = chunk_bytes
        self._target_data_file_size = target_data_file_size
        self._max_inflight_bytes = max_inflight_bytes
        self._check_destination()
        self._state = "new"
        self._tmp: str | None = None
        self._init_ns = 0
        self._context: ts.Context | None = None
        self._kvstore: ts.KvStore | None = None
        self._txn: ts.Transaction | None = None
        self._txn_bytes = 0
        self._leaves: dict[KeyPath, dict[str, Any]] = {}
        self._keys: dict[str, KeyPath] = {}
        self._handles: dict[KeyPath, ArrayHandle] = {}
        self._created_dirs: list[str] = []  # ancestors of the destination made by _start

    def __repr__(self) -> str:
        return f"CheckpointWriter({str(self._dest)!r}, state={self._state})"

    @property
    def location(self) -> Location:
        """The destination."""
        return self._dest

    @property
    def temporary_location(self) -> Location | None:
        """The temporary folder being written while the writer is open, else ``None``."""
        return Location.parse(self._tmp) if self._tmp and self._state == "open" else None

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
        chunk = choose_chunk_shape(shape, itemsize, self._chunk_bytes)
        key = fmt.array_key(path)
        store = self._open_array(
            path, array_spec(shape, dtype_name, chunk, use_zarr3=self._use_zarr3)
        )
        handle = ArrayHandle(self, path, shape, dtype_name, chunk, store)
        self._leaves[path] = {
            "key_types": types,
            "value_type": "jax.Array",
            "chunk": chunk,
            "sharding": sharding if sharding is not None else orbax_metadata.DEFAULT_SHARDING,
            "ext_metadata": {"random_key_impl": random_key_impl} if random_key_impl else None,
        }
        self._keys[key] = path
        self._handles[path] = handle
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
        self._leaves[path] = {"key_types": types, "value_type": value_type}

    def commit(self) -> Location:
        """Finishes the checkpoint and moves it into place.

        Commits every pending write, checks that every declared array was written in full and
        that the leaves form one tree, writes the metadata files with ``commit_success.txt``
        last, then renames the temporary folder to the destination (replacing it when
        ``force``, the old one deleted only after the new one is in place).

        Returns:
            The destination.

        Raises:
            CheckpointWriteError: an array is not fully written, the tree is inconsistent, or
                there is no array. The temporary folder is removed.
            DestinationExistsError: the destination appeared meanwhile and ``force`` is false.
        """
        self._start()
        try:
            self._flush()
            self._validate()
            assert self._tmp is not None
            orbax_metadata.write_item_metadata(
                self._tmp,
                self._leaves,
                use_zarr3=self._use_zarr3,
                custom_metadata=self._custom_metadata,
                init_timestamp_ns=self._init_ns,
                destination=str(self._dest),
            )
            os.remove(os.path.join(self._tmp, fmt.INCOMPLETE_MARKER))
            orbax_metadata.fsync_dir(self._tmp)
            self._check_destination()
            self._move_into_place()
        except BaseException:
            self.abort()
            raise
        self._state = "committed"
        return self._dest

    def abort(self) -> None:
        """Discards everything written; the destination is left untouched."""
        if self._state == "open":
            if self._txn is not None:
                self._txn.abort()
                self._txn = None
            self._kvstore = None
            self._context = None
            if self._tmp is not None:
                shutil.rmtree(self._tmp, ignore_errors=True)
                self._tmp = None
            for folder in self._created_dirs:  # deepest first; only if still empty
                try:
                    os.rmdir(folder)
                except OSError:
                    break
        self._state = "aborted"

    # -- internals ----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._state == "new":
            self._start()
        if self._state != "open":
            raise CheckpointWriteError(f"{self._dest}: the writer is {self._state}")

    def _check_destination(self) -> None:
        if self._dest.exists() and not self._force:
            raise DestinationExistsError(
                f"{self._dest}: destination exists; pass --force (force=True) to replace it"
            )

    def _start(self) -> None:
        if self._state == "open":
            return
        if self._state != "new":
            raise CheckpointWriteError(f"{self._dest}: the writer is {self._state}")
        dest = str(self._dest)
        parent, name = os.path.dirname(dest), os.path.basename(dest)
        missing = parent
        while not os.path.exists(missing):
            self._created_dirs.append(missing)
            missing = os.path.dirname(missing)
        os.makedirs(parent, exist_ok=True)
        self._tmp = os.path.join(parent, f".{name}{fmt.TMP_INFIX}{secrets.token_hex(6)}")
        os.mkdir(self._tmp)
        self._state = "open"
        self._init_ns = time.time_ns()
        # The marker goes first: a folder holding it is never taken for a complete checkpoint,
        # whatever happens to its name later.
        orbax_metadata.write_file(
            os.path.join(self._tmp, fmt.INCOMPLETE_MARKER), b"ckptconv write in progress\n"
        )
        tmp = Location.parse(self._tmp)
        self._context = tmp.ts_context()
        base = tmp.kvstore_spec()
        spec = {
            "driver": "ocdbt",
            # Data files are written once under fresh names: no need for atomic file writes.
            "base": {**base, "file_io_locking": {"mode": "non_atomic"}},
            "manifest": base,
            "config": _OCDBT_CONFIG,
            "assume_config": True,
            "target_data_file_size": self._target_data_file_size,
            "cache_pool": "cache_pool#ocdbt",
        }
        self._kvstore = ts.KvStore.open(spec, context=self._context).result()

    def _declare(
        self, path: KeyPath, key_types: Sequence[int] | None
    ) -> tuple[KeyPath, tuple[int, ...]]:
        self._check_open()
        if isinstance(path, str) or not all(isinstance(k, str) for k in path):
            raise CheckpointWriteError(f"{path!r}: expected a key path, a tuple of strings")
        path = tuple(path)
        if not path:
            raise CheckpointWriteError("the empty key path cannot hold a leaf")
        if path in self._leaves:
            raise CheckpointWriteError(f"{keystr(path)}: written twice")
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
        other = self._keys.get(fmt.array_key(path))
        if other is not None:
            raise CheckpointWriteError(
                f"{keystr(path)}: its OCDBT key {fmt.array_key(path)!r} is already used by "
                f"{keystr(other)}"
            )
        return path, types

    def _open_array(self, path: KeyPath, spec: dict[str, Any]) -> ts.TensorStore:
        assert self._kvstore is not None
        key = fmt.array_key(path)
        kvstore = self._kvstore / f"{key}/"
        try:
            # The metadata document is written in the pending transaction; the returned store
            # assumes that metadata (no I/O) and is bound to the pending transaction per write.
            ts.open(
                spec,
                kvstore=kvstore,
                context=self._context,
                transaction=self._transaction(),
                create=True,
                open=False,
            ).result()
            return ts.open(
                spec, kvstore=kvstore, context=self._context, assume_metadata=True
            ).result()
        except Exception as e:
            raise CheckpointWriteError(
                f"{keystr(path)}: cannot create array {key!r}: {fmt.one_line(e)}"
            ) from e

    def _transaction(self) -> ts.Transaction:
        if self._txn is None:
            self._txn = ts.Transaction()
        return self._txn

    def _submit(self, path: KeyPath, view: ts.TensorStore, data: np.ndarray) -> None:
        # Writes are grouped in a transaction of up to max_inflight_bytes: TensorStore keeps
        # them in memory and commits them together as one OCDBT commit with a few large data
        # files, instead of one small file and one B-tree update per write.
        try:
            view.with_transaction(self._transaction()).write(data).result()
        except Exception as e:
            raise CheckpointWriteError(f"{keystr(path)}: write failed: {fmt.one_line(e)}") from e
        self._txn_bytes += data.nbytes
        if self._txn_bytes >= self._max_inflight_bytes:
            self._flush()

    def _flush(self) -> None:
        """Commits the pending transaction, if any, into the temporary folder."""
        if self._txn is None:
            return
        txn, self._txn, self._txn_bytes = self._txn, None, 0
        try:
            txn.commit_async().result()
        except Exception as e:
            raise CheckpointWriteError(
                f"{self._dest}: writing data into {self._tmp} failed: {fmt.one_line(e)}"
            ) from e

    def _validate(self) -> None:
        if not self._handles:
            raise CheckpointWriteError(
                f"{self._dest}: expected at least one array, found "
                f"{len(self._leaves)} empty leaves and no array"
            )
        for handle in self._handles.values():
            if handle.elements_written < handle.size:
                raise CheckpointWriteError(
                    f"{keystr(handle.path)}: expected all {handle.size} elements of shape "
                    f"{handle.shape} written, found {handle.elements_written}"
                )
        orbax_metadata.check_tree({p: leaf["key_types"] for p, leaf in self._leaves.items()})

    def _move_into_place(self) -> None:
        assert self._tmp is not None
        dest = str(self._dest)
        parent, name = os.path.dirname(dest), os.path.basename(dest)
        old = None
        if os.path.lexists(dest):
            old = os.path.join(parent, f".{name}.ckptconv-old-{secrets.token_hex(6)}")
            os.rename(dest, old)
        os.rename(self._tmp, dest)
        self._tmp = None
        orbax_metadata.fsync_dir(parent)
        if old is not None:
            if os.path.isdir(old) and not os.path.islink(old):
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.remove(old)
