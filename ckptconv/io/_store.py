"""The OCDBT store a :class:`~ckptconv.io.CheckpointWriter` writes into, and its transactions.

Writes are grouped into TensorStore transactions of about ``max_inflight_bytes``; each is
committed in the background while the next one fills (one commit at a time), so encoding and
writing overlap with producing the next data. Verbatim array copies go through the same
transactions: by reference inside a cloned database, or as read-then-write of stored chunk
bytes with reads in flight bounded by ``max_inflight_bytes``.

The store is any :class:`~ckptconv.io.Location`: a local folder (the writer's temporary
folder) or an object-store prefix written in place. Cloning copies local files, so it is
offered only from a local source into a local store; elsewhere verbatim copies read and
write the stored chunk bytes through TensorStore.
"""

from __future__ import annotations

import collections
import secrets
from typing import TYPE_CHECKING, Any

import numpy as np
import tensorstore as ts

from ..errors import CheckpointFormatError, CheckpointWriteError
from . import _format as fmt
from . import _ocdbt
from ._copy import ArrayCopy
from .location import Location

if TYPE_CHECKING:
    from .reader import CheckpointReader

# Orbax's OCDBT write settings (tensorstore_utils._add_ocdbt_write_options), except a smaller
# B-tree node limit, so that each of the writer's commits rewrites part of the index only.
_OCDBT_CONFIG = {
    "max_inline_value_bytes": 1024,
    "max_decoded_node_bytes": 1 << 20,
    "manifest_kind": "single",
}

# Clone the source database only when at most this fraction of the data its B-tree refers to
# would be left unreferenced in the output (data of source arrays that are decoded or dropped).
CLONE_MAX_UNUSED_FRACTION = 0.1

# A key range that holds exactly one key: the kvstore's own path (relative key b"").
_ONE_KEY = ts.KvStore.KeyRange(b"", b"\x00")


def clone_pays(source: Any, paths: list[tuple[str, ...]]) -> bool:
    """Whether cloning ``source``'s database pays for copying the arrays at ``paths``.

    Only for a local OCDBT source, when those arrays hold all but at most
    ``CLONE_MAX_UNUSED_FRACTION`` of the bytes its B-tree refers to (the rest would be carried
    along unreferenced). Bytes its files hold that the B-tree does not refer to are not
    counted: a clone carries them over exactly as ``cp -r`` would.
    """
    if not paths or source.location.local_path is None or not getattr(source, "use_ocdbt", False):
        return False
    contents = source.ocdbt_contents()
    total = sum(contents.value_bytes.values())
    unused = total - contents.bytes_under({source.array_key(p) + "/" for p in paths})
    return unused <= CLONE_MAX_UNUSED_FRACTION * total


class WriteStore:
    """An OCDBT store in a folder, written in background-committed transactions.

    Args:
        folder: the folder of the store: the writer's temporary folder on a local disk, or
            the destination itself on an object store.
        target_data_file_size: the OCDBT target size of one data file, in bytes.
        max_inflight_bytes: the size of one transaction, and the most bytes of value-copy
            reads in flight.
        where: how to name the checkpoint in errors.
        use_ocdbt: write one OCDBT database (Orbax's default); ``False`` writes each array in
            its own zarr folder of ``folder`` (Orbax's ``use_ocdbt=False``, which Pathways
            needs), through the same transactions.
    """

    def __init__(
        self,
        folder: str | Location,
        *,
        target_data_file_size: int,
        max_inflight_bytes: int,
        where: str,
        use_ocdbt: bool = True,
    ) -> None:
        self._folder = Location.parse(folder)
        self.use_ocdbt = use_ocdbt
        self._target_data_file_size = target_data_file_size
        self._max_inflight_bytes = max_inflight_bytes
        self._where = where
        self._context: ts.Context | None = None
        self._kvstore: ts.KvStore | None = None
        self._txn: ts.Transaction | None = None
        self._txn_bytes = 0
        self._commit: ts.Future | None = None
        # Value copies: (read future, destination key, budgeted bytes, source description).
        self._copies: collections.deque[tuple[ts.Future, str, int, str]] = collections.deque()
        self._copy_bytes = 0
        self.cloned_from: Location | None = None
        self._stage = ""
        self._open(cloned=False)

    @property
    def context(self) -> ts.Context:
        """The TensorStore context every array of the store is opened with."""
        assert self._context is not None
        return self._context

    @property
    def kvstore(self) -> ts.KvStore:
        """The OCDBT kvstore, outside any transaction."""
        assert self._kvstore is not None
        return self._kvstore

    def transaction(self) -> ts.Transaction:
        """Returns the transaction being filled (a new one after each commit)."""
        if self._txn is None:
            self._txn = ts.Transaction()
        return self._txn

    def _open(self, *, cloned: bool) -> None:
        self._context = self._folder.ts_context()
        base = self._folder.kvstore_spec()
        if not self.use_ocdbt:
            self._kvstore = ts.KvStore.open(base, context=self._context).result()
            return
        data = dict(base)
        if self._folder.local_path is not None:
            # Data files are written once under fresh names: no need for atomic file writes.
            data["file_io_locking"] = {"mode": "non_atomic"}
        spec: dict[str, Any] = {
            "driver": "ocdbt",
            "base": data,
            "manifest": base,
            "target_data_file_size": self._target_data_file_size,
            "cache_pool": "cache_pool#ocdbt",
        }
        if not cloned:  # a clone keeps the source database's own configuration
            spec.update(config=_OCDBT_CONFIG, assume_config=True)
        self._kvstore = ts.KvStore.open(spec, context=self._context).result()

    def clone(self, reader: CheckpointReader) -> bool:
        """Replaces the (still empty) store by a copy of ``reader``'s database.

        Every source key is then moved under a staging prefix (by reference), which
        :meth:`drop_clone_leftovers` deletes at the end, so the store starts empty of keys.

        Returns:
            Whether it cloned (see :meth:`CheckpointWriter.clone_from`); never for a source or
            a store that is not on a local disk (the clone is a local file copy).
        """
        src = reader.location
        dest = self._folder.local_path
        if src.local_path is None or dest is None or not reader.use_ocdbt or not self.use_ocdbt:
            return False
        # Files are copied unread: check first that none is missing or truncated.
        reader.check_data_files()
        contents = reader.ocdbt_contents()
        files = _ocdbt.database_files(src.local_path)
        stage = f".ckptconv-staging-{secrets.token_hex(8)}/"
        if not contents.files <= set(files) or any(
            k.startswith(stage.encode()) for k in contents.value_bytes
        ):
            return False
        self._kvstore = None
        _ocdbt.copy_files(src.local_path, str(dest), files)
        self._open(cloned=True)
        # Every key but those under the staging prefix: before it, and from the first key
        # after it (which ends in '0', the byte after '/'). TensorStore's Python API has no
        # helper for the keys outside a prefix.
        outside = [
            ts.KvStore.KeyRange(b"", stage.encode()),
            ts.KvStore.KeyRange(stage[:-1].encode() + b"0", b""),
        ]
        # Two commits, copies then deletes, so nothing depends on the order inside one.
        txn = ts.Transaction()
        for rng in outside:
            self.kvstore.experimental_copy_range_to(
                self.kvstore.with_transaction(txn) / stage, source_range=rng
            ).result()
        txn.commit_async().result()
        txn = ts.Transaction()
        for rng in outside:
            self.kvstore.with_transaction(txn).delete_range(rng).result()
        txn.commit_async().result()
        self.cloned_from = src
        self._stage = stage
        return True

    def drop_clone_leftovers(self) -> None:
        """Deletes the staged keys of a cloned source (those not copied stay unreferenced)."""
        if self.cloned_from is not None:
            (self._kv_txn() / self._stage).delete_range(ts.KvStore.KeyRange()).result()

    def write_slab(self, view: ts.TensorStore, data: np.ndarray, where: str) -> None:
        """Writes one slab of an array opened on this store, in the current transaction."""
        try:
            view.with_transaction(self.transaction()).write(data).result()
        except Exception as e:
            raise CheckpointWriteError(f"{where}: write failed: {fmt.one_line(e)}") from e
        self._add(data.nbytes)

    def write_value(self, key: str, value: bytes) -> None:
        """Writes one key's value (a small document) in the current transaction."""
        self._kv_txn().write(key, value).result()
        self._add(len(value))

    def copy(self, key: str, plan: ArrayCopy, reader: CheckpointReader) -> None:
        """Copies the chunks of ``plan`` under ``key``.

        From the cloned source, by reference; from any other, by reading and writing values.
        """
        if self.cloned_from is not None and reader.location == self.cloned_from:
            target = self._kv_txn()
            pending = [
                (self.kvstore / f"{self._stage}{plan.source_key}/{s}").experimental_copy_range_to(
                    target / f"{key}/{d}", source_range=_ONE_KEY
                )
                for s, d in plan.chunk_keys
            ]
            for future in pending:
                future.result()
            return
        source = reader.kvstore
        for s, d in plan.chunk_keys:
            where = f"{reader.location}: chunk {plan.source_key}/{s}"
            read = source.read(f"{plan.source_key}/{s}")
            self._copies.append((read, f"{key}/{d}", plan.chunk_nbytes, where))
            self._copy_bytes += plan.chunk_nbytes
            self.drain_copies(self._max_inflight_bytes)

    def drain_copies(self, budget: int) -> None:
        """Writes finished value copies until at most ``budget`` bytes of reads are pending."""
        while self._copies and self._copy_bytes > budget:
            future, key, nbytes, where = self._copies.popleft()
            self._copy_bytes -= nbytes
            try:
                result = future.result()
            except Exception as e:
                raise CheckpointFormatError(f"{where}: cannot be read: {fmt.one_line(e)}") from e
            if result.state != "value":
                raise CheckpointFormatError(f"{where}: missing from the source")
            self.write_value(key, result.value)

    def flush(self, *, wait: bool = False) -> None:
        """Starts committing the pending transaction, if any.

        One transaction commits at a time: the previous commit is waited for first. With
        ``wait``, returns only once everything is committed.

        Raises:
            CheckpointWriteError: a commit failed.
        """
        if self._txn is not None:
            txn, self._txn, self._txn_bytes = self._txn, None, 0
            self._wait_commit()
            self._commit = txn.commit_async()
        if wait:
            self._wait_commit()

    def abort(self) -> None:
        """Drops pending writes and waits for a background commit (its folder goes next)."""
        if self._txn is not None:
            self._txn.abort()
            self._txn = None
        self._copies.clear()
        if self._commit is not None:
            try:
                self._commit.result()
            except Exception:  # Discarded anyway; the caller's error is what matters.
                pass
            self._commit = None
        self._kvstore = None
        self._context = None

    def _kv_txn(self) -> ts.KvStore:
        return self.kvstore.with_transaction(self.transaction())

    def _add(self, nbytes: int) -> None:
        self._txn_bytes += nbytes
        if self._txn_bytes >= self._max_inflight_bytes:
            self.flush()

    def _wait_commit(self) -> None:
        if self._commit is None:
            return
        commit, self._commit = self._commit, None
        try:
            commit.result()
        except Exception as e:
            raise CheckpointWriteError(
                f"{self._where}: writing data into {self._folder} failed: {fmt.one_line(e)}"
            ) from e
