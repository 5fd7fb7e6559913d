"""Where a checkpoint lives: one value type for local paths, ``file://`` and ``memory://`` URLs.

A :class:`Location` is a storage scheme plus a normalised path. Everything that depends on the
scheme (the TensorStore kvstore spec, existence checks, small-file reads and listings) goes
through one backend object per scheme, chosen from ``_BACKENDS``. Adding ``s3://bucket/prefix``
or ``gs://bucket/prefix`` later means adding one backend class here (TensorStore's ``s3`` and
``gcs`` kvstore drivers) and one entry in that registry; the reader only talks to
:class:`Location`.

Limits: ``memory://`` locations live in one process-wide TensorStore context (see
:meth:`Location.ts_context`); they are meant for tests and are readable by
:class:`~ckptconv.io.CheckpointReader`, while :class:`~ckptconv.io.CheckpointWriter` needs a
local filesystem for its atomic rename.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import posixpath
import threading
import urllib.parse
from typing import Any, Protocol

import tensorstore as ts

from ..errors import CheckpointFormatError

# The same TensorStore context settings Orbax uses for OCDBT checkpoints: a bounded cache for
# B-tree nodes so that opening many arrays of one checkpoint reads the index once.
_CONTEXT_SPEC: dict[str, Any] = {
    "file_io_concurrency": {"limit": 128},
    "cache_pool#ocdbt": {"total_bytes_limit": 100_000_000},
}


class _Backend(Protocol):
    """What a storage scheme provides. One implementation per scheme, see ``_BACKENDS``."""

    def normalize(self, path: str) -> str:
        """Returns the canonical path for the text after ``scheme://`` (or a plain path)."""
        ...

    def render(self, path: str) -> str:
        """Returns the user-facing form of a location, as ``str(location)`` prints it."""
        ...

    def kvstore_spec(self, path: str) -> dict[str, Any]:
        """Returns the TensorStore kvstore spec of the folder ``path``."""
        ...

    def ts_context(self) -> ts.Context:
        """Returns the TensorStore context to open kvstores of this scheme with."""
        ...

    def exists(self, path: str) -> bool:
        """Whether a file or folder exists at ``path``."""
        ...

    def is_dir(self, path: str) -> bool:
        """Whether ``path`` is a folder (a key prefix with at least one key under it)."""
        ...

    def read_bytes(self, path: str) -> bytes:
        """Returns the content of the file ``path``; raises ``FileNotFoundError`` if absent."""
        ...

    def list_dir(self, path: str) -> list[str]:
        """Returns the names of the immediate children of the folder ``path``, sorted."""
        ...


class _FileBackend:
    """Local filesystem paths, spelled plainly or as ``file://`` URLs."""

    def normalize(self, path: str) -> str:
        return os.path.abspath(os.path.expanduser(path))

    def render(self, path: str) -> str:
        return path

    def kvstore_spec(self, path: str) -> dict[str, Any]:
        return {"driver": "file", "path": path.rstrip("/") + "/"}

    def ts_context(self) -> ts.Context:
        # A fresh context per reader: a checkpoint replaced in place (``force``) must not be
        # served from another reader's B-tree cache.
        return ts.Context(_CONTEXT_SPEC)

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def is_dir(self, path: str) -> bool:
        return os.path.isdir(path)

    def read_bytes(self, path: str) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    def list_dir(self, path: str) -> list[str]:
        return sorted(os.listdir(path))


class _MemoryBackend:
    """TensorStore's in-memory kvstore, shared by every ``memory://`` location of the process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._context: ts.Context | None = None
        self._root: ts.KvStore | None = None

    def normalize(self, path: str) -> str:
        norm = posixpath.normpath("/" + path).lstrip("/")
        return "" if norm == "." else norm

    def render(self, path: str) -> str:
        return f"memory://{path}"

    def kvstore_spec(self, path: str) -> dict[str, Any]:
        return {"driver": "memory", "path": path + "/" if path else ""}

    def ts_context(self) -> ts.Context:
        # The memory kvstore's content belongs to a context resource: every memory:// location
        # must use the same context to see the same keys.
        with self._lock:
            if self._context is None:
                self._context = ts.Context(_CONTEXT_SPEC)
            return self._context

    def _store(self) -> ts.KvStore:
        if self._root is None:
            self._root = ts.KvStore.open({"driver": "memory"}, context=self.ts_context()).result()
        return self._root

    def _keys_under(self, prefix: str) -> list[bytes]:
        start = prefix.encode()
        return list(self._store().list(ts.KvStore.KeyRange(start, start + b"\xff")).result())

    def exists(self, path: str) -> bool:
        return self._store().read(path).result().state == "value" or self.is_dir(path)

    def is_dir(self, path: str) -> bool:
        return bool(self._keys_under(path + "/" if path else ""))

    def read_bytes(self, path: str) -> bytes:
        result = self._store().read(path).result()
        if result.state != "value":
            raise FileNotFoundError(f"memory://{path}")
        return bytes(result.value)

    def list_dir(self, path: str) -> list[str]:
        prefix = path + "/" if path else ""
        names = {k.decode()[len(prefix) :].split("/", 1)[0] for k in self._keys_under(prefix)}
        return sorted(names)


_BACKENDS: dict[str, _Backend] = {"file": _FileBackend(), "memory": _MemoryBackend()}


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

    Attributes:
        scheme: the storage scheme, ``"file"`` or ``"memory"``.
        path: the normalised path within the scheme: absolute for ``file``, relative to the
            in-memory store's root for ``memory``.
    """

    scheme: str
    path: str

    @classmethod
    def parse(cls, value: str | os.PathLike[str] | Location) -> Location:
        """Returns the location a path or URL names.

        Plain paths and ``file://`` URLs become absolute local paths; ``memory://name`` names a
        folder in the process-wide in-memory store.

        Args:
            value: a path, a ``file://`` or ``memory://`` URL, or a :class:`Location`.

        Returns:
            The parsed location.

        Raises:
            CheckpointFormatError: the URL scheme is not supported.
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
        backend = _BACKENDS.get(scheme)
        if backend is None:
            raise CheckpointFormatError(
                f"{text}: expected a local path or one of the schemes "
                f"{', '.join(s + '://' for s in sorted(_BACKENDS))}, found {scheme}://"
            )
        return cls(scheme, backend.normalize(rest))

    @property
    def _backend(self) -> _Backend:
        return _BACKENDS[self.scheme]

    def __str__(self) -> str:
        return self._backend.render(self.path)

    @property
    def name(self) -> str:
        """The last path component (``""`` for a root)."""
        return posixpath.basename(self.path)

    @property
    def parent(self) -> Location:
        """The folder that holds this location."""
        return Location(self.scheme, self._backend.normalize(posixpath.dirname(self.path)))

    @property
    def local_path(self) -> pathlib.Path | None:
        """The local filesystem path, or ``None`` when the location is not on local disk."""
        return pathlib.Path(self.path) if self.scheme == "file" else None

    def join(self, *parts: str) -> Location:
        """Returns the location of ``parts`` below this one.

        Args:
            *parts: path components, each may contain ``/``.

        Returns:
            The joined location.
        """
        return Location(self.scheme, self._backend.normalize(posixpath.join(self.path, *parts)))

    def kvstore_spec(self) -> dict[str, Any]:
        """Returns the TensorStore kvstore spec of this location as a folder.

        Returns:
            A JSON spec such as ``{"driver": "file", "path": "/abs/ckpt/"}``, ready to be the
            ``base`` of an ``ocdbt`` kvstore.
        """
        return self._backend.kvstore_spec(self.path)

    def ts_context(self) -> ts.Context:
        """Returns a TensorStore context to open this location's kvstores with.

        Returns:
            A new context for local files; the process-wide shared one for ``memory://``.
        """
        return self._backend.ts_context()

    def exists(self) -> bool:
        """Whether a file or folder exists here."""
        return self._backend.exists(self.path)

    def is_dir(self) -> bool:
        """Whether a folder exists here."""
        return self._backend.is_dir(self.path)

    def read_bytes(self) -> bytes:
        """Returns the content of the file here.

        Raises:
            FileNotFoundError: there is no file here.
        """
        return self._backend.read_bytes(self.path)

    def list_dir(self) -> list[str]:
        """Returns the sorted names of the files and folders directly in this folder."""
        return self._backend.list_dir(self.path)
