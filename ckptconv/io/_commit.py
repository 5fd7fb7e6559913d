"""How a :class:`~ckptconv.io.CheckpointWriter` makes a finished checkpoint visible.

Two protocols, chosen by :func:`for_destination` from the destination's storage:

- :class:`RenameCommit` (local disks): everything is written into a temporary sibling
  ``.<name>.ckptconv-tmp-<hex>`` that holds ckptconv's in-progress marker until the end; the
  metadata files go in with ``commit_success.txt`` last, the marker is removed, and the folder
  is renamed into place (an existing destination is renamed aside first and deleted after).
- :class:`MarkerCommit` (object stores and ``memory://``, which cannot rename a folder
  atomically): everything is written in place, in this order: the in-progress marker; the
  OCDBT data (manifest and data files); then, once every transaction is committed, the marker
  is deleted and the metadata files are written, ``commit_success.txt`` (the marker Orbax
  itself writes on GCS) last. Readers refuse an object-store checkpoint without
  ``commit_success.txt`` (see :mod:`ckptconv.io._item`), so a write interrupted at any point
  leaves a prefix that every command refuses as incomplete.

Replacing an existing destination (``force``) on an object store deletes its objects before
anything is written (``commit_success.txt`` first, so the old checkpoint turns incomplete
before any of its data goes): there is no rename to swap a new checkpoint in, and writing to a
fresh sub-prefix would leave a checkpoint that plain Orbax cannot find at the destination. The
old checkpoint is therefore gone once a forced write starts, even if that write then fails;
without ``force`` an existing destination, complete or not, is never touched.

Limits: one writer per destination; a crash while a local destination is replaced (between
two renames) leaves the old checkpoint under ``.<name>.ckptconv-old-<hex>`` and no destination.
"""

from __future__ import annotations

import abc
import os
import secrets
import shutil
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..errors import DestinationExistsError, StorageError
from . import _format as fmt
from . import _orbax_metadata as orbax_metadata
from ._oserrors import os_errors
from .location import Location

if TYPE_CHECKING:
    from ._records import ItemRecords

_IN_PROGRESS = b"ckptconv write in progress\n"


class CommitProtocol(abc.ABC):
    """Where a checkpoint is written while incomplete, and how it is published.

    A :class:`~ckptconv.io.CheckpointWriter` calls, in order: :meth:`check_destination` (when
    constructed), :meth:`start` (when opened), then at commit, once every write is durable,
    :meth:`check` and :meth:`commit`; or :meth:`abort` when anything fails. Writer variants
    (:mod:`ckptconv.io.multiprocess`) pass their own protocol to the writer.

    Args:
        dest: the destination item folder.
        force: replace an existing destination.
    """

    def __init__(self, dest: Location, *, force: bool) -> None:
        self.dest = dest
        self.force = force

    def check_destination(self) -> None:
        """Refuses an existing destination unless ``force``.

        Raises:
            DestinationExistsError: the destination exists and ``force`` is false.
            StorageError: the destination's storage cannot be reached.
        """
        if not self.force and self.dest.exists():
            raise DestinationExistsError(
                f"{self.dest}: destination exists; pass --force (force=True) to replace it"
            )

    @property
    @abc.abstractmethod
    def temporary(self) -> Location | None:
        """The temporary folder being written, if the protocol uses one."""

    @abc.abstractmethod
    def start(self) -> Location:
        """Prepares the write; returns the folder that data and metadata go into."""

    def check(self, records: ItemRecords) -> None:
        """Refuses an item that is not ready to be published.

        By default a complete item: at least one array, every array written in full, the
        leaves one tree (:meth:`~ckptconv.io._records.ItemRecords.validate`). A protocol that
        publishes part of a checkpoint checks less; one that merges parts checks more.

        Raises:
            CheckpointWriteError: the item is incomplete or inconsistent.
        """
        records.validate(str(self.dest))

    @abc.abstractmethod
    def commit(self, write_metadata: Callable[[Location], None]) -> None:
        """Publishes the checkpoint once its data is durable.

        Args:
            write_metadata: writes the metadata files into the given folder,
                ``commit_success.txt`` last.
        """

    @abc.abstractmethod
    def abort(self) -> None:
        """Discards what was written (best effort); an untouched destination stays so."""


class RenameCommit(CommitProtocol):
    """Local disks: write a temporary sibling, then rename it into place."""

    def __init__(self, dest: Location, *, force: bool) -> None:
        super().__init__(dest, force=force)
        self._tmp: str | None = None
        self._created_dirs: list[str] = []  # ancestors of the destination made by start()

    @property
    def temporary(self) -> Location | None:
        return None if self._tmp is None else Location.parse(self._tmp)

    def start(self) -> Location:
        try:
            with os_errors(self.dest, "creating the temporary folder"):
                return self._start()
        except BaseException:
            self.abort()
            raise

    def _start(self) -> Location:
        dest = str(self.dest.local_path)
        parent, name = os.path.dirname(dest), os.path.basename(dest)
        missing = parent
        while not os.path.lexists(missing):
            self._created_dirs.append(missing)
            missing = os.path.dirname(missing)
        os.makedirs(parent, exist_ok=True)
        self._tmp = os.path.join(parent, f".{name}{fmt.TMP_INFIX}{secrets.token_hex(6)}")
        os.mkdir(self._tmp)
        # The marker goes first: a folder holding it is never taken for a complete checkpoint,
        # whatever happens to its name later.
        orbax_metadata.write_file(os.path.join(self._tmp, fmt.INCOMPLETE_MARKER), _IN_PROGRESS)
        return Location.parse(self._tmp)

    def commit(self, write_metadata: Callable[[Location], None]) -> None:
        if self._tmp is None:
            raise StorageError(f"{self.dest}: commit without a started write")
        with os_errors(self.dest, "writing the metadata files"):
            write_metadata(Location.parse(self._tmp))
            os.remove(os.path.join(self._tmp, fmt.INCOMPLETE_MARKER))
            orbax_metadata.fsync_dir(self._tmp)
        self.check_destination()
        with os_errors(self.dest, "moving the finished checkpoint into place"):
            self._move_into_place()

    def abort(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
        for folder in self._created_dirs:  # deepest first; only if still empty
            try:
                os.rmdir(folder)
            except FileNotFoundError:
                continue  # start() failed before making it
            except OSError:
                break
        self._created_dirs = []

    def _move_into_place(self) -> None:
        assert self._tmp is not None
        dest = str(self.dest.local_path)
        parent, name = os.path.dirname(dest), os.path.basename(dest)
        old = None
        if os.path.lexists(dest):
            old = os.path.join(parent, f".{name}.ckptconv-old-{secrets.token_hex(6)}")
            os.rename(dest, old)
        try:
            os.rename(self._tmp, dest)
        except OSError:
            if old is not None:  # put the old checkpoint back: never leave no destination
                os.rename(old, dest)
            raise
        self._tmp = None
        orbax_metadata.fsync_dir(parent)
        if old is not None:
            if os.path.isdir(old) and not os.path.islink(old):
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.remove(old)


class MarkerCommit(CommitProtocol):
    """Object stores: write in place; ``commit_success.txt`` last makes it complete."""

    def __init__(self, dest: Location, *, force: bool) -> None:
        super().__init__(dest, force=force)
        self._started = False

    @property
    def temporary(self) -> Location | None:
        return None

    def start(self) -> Location:
        self.check_destination()
        if self.force:
            # The old commit marker goes first: from then on readers refuse what is left.
            self.dest.join(fmt.COMMIT_SUCCESS_FILE).delete_tree()
            self.dest.delete_tree()
        self._started = True
        self.dest.join(fmt.INCOMPLETE_MARKER).write_bytes(_IN_PROGRESS)
        return self.dest

    def commit(self, write_metadata: Callable[[Location], None]) -> None:
        # Data is durable here (every transaction committed). Without the in-progress marker
        # the prefix is still refused until commit_success.txt, written last, exists.
        self.dest.join(fmt.INCOMPLETE_MARKER).delete_tree()
        write_metadata(self.dest)
        self._started = False

    def abort(self) -> None:
        if not self._started:
            return
        self._started = False
        try:
            self.dest.delete_tree()
        except StorageError:
            pass  # unreachable now: what is left has no commit marker and stays refused


def for_destination(dest: Location, *, force: bool) -> CommitProtocol:
    """Returns the commit protocol for a destination's storage.

    Args:
        dest: the destination item folder.
        force: replace an existing destination.

    Returns:
        :class:`RenameCommit` on a local disk, :class:`MarkerCommit` elsewhere.
    """
    cls = RenameCommit if dest.has_atomic_rename else MarkerCommit
    return cls(dest, force=force)
