"""Where a checkpoint lives: one value type for local paths and TensorStore kvstore URLs.

A :class:`Location` is a storage scheme plus a normalised path: a plain path or ``file://``
URL, ``s3://bucket/prefix``, ``gs://bucket/prefix``, or ``memory://name`` (for tests).
Everything that depends on the scheme (the TensorStore kvstore spec and context, existence
checks, small-file reads and writes, listings, deletion) goes through one backend object per
scheme, chosen from the registry in :mod:`ckptconv.io._backends`; the reader, the writer and
the commit protocol only talk to :class:`Location`, so every command accepts every scheme.

Object stores have no atomic rename: :attr:`Location.has_atomic_rename` tells the writer to
commit with a marker object instead (see :mod:`ckptconv.io._commit`). S3 endpoint, region and
credentials come from the AWS environment or :func:`configure_s3`.

Limits: ``memory://`` locations live in one process-wide TensorStore context (see
:meth:`Location.ts_context`); they are meant for tests.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import posixpath
import urllib.parse
from typing import Any

import tensorstore as ts

from ..errors import CheckpointFormatError
from ._backends import BACKENDS, Backend, ObjectStoreBackend
from ._backends import configure_s3 as configure_s3


@dataclasses.dataclass(frozen=True)
class Location:
    """Where a checkpoint (or one file or folder of it) lives.

    Build one with :meth:`parse`; it is immutable and hashable.

    Example:
        >>> loc = Location.parse("/tmp/ckpt")
        >>> str(loc.join("_METADATA"))
        '/tmp/ckpt/_METADATA'
        >>> loc.kvstore_spec()
        {'driver': 'file', 'path': '/tmp/ckpt/'}
        >>> Location.parse("s3://bucket/run/ckpt").kvstore_spec()["path"]
        'run/ckpt/'

    Attributes:
        scheme: the storage scheme: ``"file"``, ``"s3"``, ``"gs"`` or ``"memory"``.
        path: the normalised path within the scheme: absolute for ``file``,
            ``bucket/prefix`` for ``s3`` and ``gs``, relative to the in-memory store's root
            for ``memory``.
    """

    scheme: str
    path: str

    @classmethod
    def parse(cls, value: str | os.PathLike[str] | Location) -> Location:
        """Returns the location a path or URL names.

        Plain paths and ``file://`` URLs become absolute local paths; ``s3://bucket/prefix``
        and ``gs://bucket/prefix`` name a prefix in a bucket; ``memory://name`` names a folder
        in the process-wide in-memory store.

        Args:
            value: a path, a ``file://``, ``s3://``, ``gs://`` or ``memory://`` URL, or a
                :class:`Location`.

        Returns:
            The parsed location.

        Raises:
            CheckpointFormatError: the URL scheme is not supported, or an object-store URL
                names no bucket.
        """
        if isinstance(value, Location):
            return value
        text = os.fspath(value)
        scheme, sep, rest = text.partition("://")
        if not sep:
            scheme, rest = "file", text
        elif scheme == "file":
            host, slash, tail = rest.partition("/")
            if host not in ("", "localhost"):
                raise CheckpointFormatError(
                    f"{text}: expected a local file:// URL (file:///path), found host {host!r}"
                )
            rest = urllib.parse.unquote(slash + tail)
        backend = BACKENDS.get(scheme)
        if backend is None:
            raise CheckpointFormatError(
                f"{text}: expected a local path or one of the schemes "
                f"{', '.join(s + '://' for s in sorted(BACKENDS))}, found {scheme}://"
            )
        path = backend.normalize(rest)
        if isinstance(backend, ObjectStoreBackend) and rest.split("/", 1)[0] in ("", ".", ".."):
            raise CheckpointFormatError(
                f"{text}: expected {scheme}://BUCKET/PREFIX, found no bucket name"
            )
        return cls(scheme, path)

    @property
    def _backend(self) -> Backend:
        return BACKENDS[self.scheme]

    def __str__(self) -> str:
        return self._backend.render(self.path)

    @property
    def name(self) -> str:
        """The last path component (``""`` for a root)."""
        return posixpath.basename(self.path)

    @property
    def parent(self) -> Location:
        """The folder that holds this location (an object store's bucket is its own parent)."""
        parent = self._backend.normalize(posixpath.dirname(self.path))
        if not parent and isinstance(self._backend, ObjectStoreBackend):
            parent = self.path  # a bucket: no location names more than one bucket
        return Location(self.scheme, parent)

    @property
    def local_path(self) -> pathlib.Path | None:
        """The local filesystem path, or ``None`` when the location is not on local disk."""
        return pathlib.Path(self.path) if self.scheme == "file" else None

    @property
    def has_atomic_rename(self) -> bool:
        """Whether a folder can be renamed into place atomically (local disks only).

        Where it cannot (object stores, ``memory://``), a checkpoint is complete only once its
        commit marker exists.
        """
        return self._backend.atomic_rename

    def join(self, *parts: str) -> Location:
        """Returns the location of ``parts`` below this one.

        Args:
            *parts: path components, each may contain ``/``.

        Returns:
            The joined location.
        """
        return Location(self.scheme, self._backend.normalize(posixpath.join(self.path, *parts)))

    def is_within(self, other: Location) -> bool:
        """Whether this location is ``other`` or lies below it (same scheme, path prefix)."""
        if self.scheme != other.scheme:
            return False
        base = other.path.rstrip("/")
        return self.path == other.path or self.path.startswith(base + "/")

    def kvstore_spec(self) -> dict[str, Any]:
        """Returns the TensorStore kvstore spec of this location as a folder.

        Returns:
            A JSON spec such as ``{"driver": "file", "path": "/abs/ckpt/"}`` or ``{"driver":
            "s3", "bucket": "b", "path": "run/ckpt/", "endpoint": ...}``, ready to be the
            ``base`` of an ``ocdbt`` kvstore.
        """
        return self._backend.kvstore_spec(self.path)

    def ts_context(self) -> ts.Context:
        """Returns a TensorStore context to open this location's kvstores with.

        Returns:
            A new context for local files and object stores (with this module's retry and
            credential settings); the process-wide shared one for ``memory://``.
        """
        return self._backend.ts_context()

    def exists(self) -> bool:
        """Whether a file or folder exists here.

        Raises:
            StorageError: the storage cannot be reached or refuses the request.
        """
        return self._backend.exists(self.path)

    def is_dir(self) -> bool:
        """Whether a folder exists here.

        Raises:
            StorageError: the storage cannot be reached or refuses the request.
        """
        return self._backend.is_dir(self.path)

    def read_bytes(self) -> bytes:
        """Returns the content of the file here.

        Raises:
            FileNotFoundError: there is no file here.
            StorageError: the storage cannot be reached or refuses the request.
        """
        return self._backend.read_bytes(self.path)

    def list_dir(self) -> list[str]:
        """Returns the sorted names of the files and folders directly in this folder.

        Raises:
            StorageError: the storage cannot be reached or refuses the request.
        """
        return self._backend.list_dir(self.path)

    def write_bytes(self, data: bytes) -> None:
        """Writes the file here, durably (local files are fsynced), replacing any.

        Raises:
            StorageError: the storage cannot be reached or refuses the request.
        """
        self._backend.write_bytes(self.path, data)

    def delete_tree(self) -> None:
        """Deletes the file or the whole folder here; nothing here is not an error.

        Raises:
            StorageError: the storage cannot be reached or refuses the request.
        """
        self._backend.delete_tree(self.path)
