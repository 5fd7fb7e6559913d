"""The storage backends behind :class:`~ckptconv.io.Location`: one class per URL scheme.

- ``file``: plain paths and ``file://`` URLs (TensorStore's ``file`` kvstore);
- ``s3://bucket/prefix``: Amazon S3 and S3-compatible stores (TensorStore's ``s3`` kvstore);
- ``gs://bucket/prefix``: Google Cloud Storage (TensorStore's ``gcs`` kvstore);
- ``memory://name``: TensorStore's in-memory kvstore, for tests.

Each provides the TensorStore kvstore spec and context of a path, and the few file operations
ckptconv needs outside array data (existence, small reads and writes, listings, deletion). On
kvstore-based schemes a folder is a key prefix.

S3 settings are taken the way the AWS tools take them: credentials from
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` (/ ``AWS_SESSION_TOKEN``) when set, else from
TensorStore's default AWS chain (``AWS_PROFILE``, ``~/.aws/credentials`` and ``config``, instance
metadata); the endpoint from :func:`configure_s3` (the CLI's ``--s3-endpoint``), else
``AWS_ENDPOINT_URL_S3``, else ``AWS_ENDPOINT_URL``; the region from :func:`configure_s3`, else
``AWS_REGION``, else ``AWS_DEFAULT_REGION``. GCS uses Google's application default credentials.

Requests to object stores are retried 6 times, 0.1 s to 2 s apart, so an unreachable endpoint
fails in a few seconds instead of after TensorStore's default of about 15 minutes; every failed
request made here is raised as a one-line :class:`~ckptconv.errors.StorageError` that says what
went wrong (bucket missing, credentials refused, endpoint unreachable).

Limits: listing a prefix lists every key below it (one request per 1,000 keys on S3). Only the
``s3`` backend is tested against a server (moto); ``gs`` is built the same way on TensorStore's
``gcs`` driver and checked for its specs only.
"""

from __future__ import annotations

import abc
import os
import posixpath
import shutil
import threading
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import tensorstore as ts

from ..errors import CheckpointFormatError, StorageError
from ._format import one_line

_T = TypeVar("_T")

# The same TensorStore context settings Orbax uses for OCDBT checkpoints: a bounded cache for
# B-tree nodes so that opening many arrays of one checkpoint reads the index once.
_CONTEXT_SPEC: dict[str, Any] = {
    "file_io_concurrency": {"limit": 128},
    "cache_pool#ocdbt": {"total_bytes_limit": 100_000_000},
}

# Retries of object-store requests: 6 attempts, 0.1 s doubling to 2 s apart (about 5 s in
# all). TensorStore's defaults (32 attempts up to 32 s apart) keep a command hanging for
# about 15 minutes on a wrong endpoint.
OBJECT_STORE_RETRIES: dict[str, Any] = {
    "max_retries": 6,
    "initial_delay": "100ms",
    "max_delay": "2s",
}

# Stalled transfers (connected, no bytes) are abandoned and retried after this long, as JAX
# configures TensorStore on Cloud TPU; environment values set by the user win.
_CURL_DEFAULTS = {
    "TENSORSTORE_CURL_LOW_SPEED_TIME_SECONDS": "60",
    "TENSORSTORE_CURL_LOW_SPEED_LIMIT_BYTES": "256",
}

_s3_settings: dict[str, str] = {}


def configure_s3(*, endpoint: str | None = None, region: str | None = None) -> None:
    """Sets the S3 endpoint and region of ``s3://`` locations, over the environment.

    Example:
        >>> configure_s3(endpoint="http://127.0.0.1:9000")  # a MinIO or moto server

    Args:
        endpoint: an ``http(s)://host:port`` URL of an S3-compatible server; ``None`` keeps
            ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` (or AWS itself).
        region: the region to sign requests for; ``None`` keeps ``AWS_REGION`` /
            ``AWS_DEFAULT_REGION``.

    Raises:
        CheckpointFormatError: the endpoint is not an http or https URL.
    """
    if endpoint is not None and not endpoint.startswith(("http://", "https://")):
        raise CheckpointFormatError(
            f"S3 endpoint {endpoint!r}: expected an http:// or https:// URL"
        )
    for key, value in (("endpoint", endpoint), ("region", region)):
        if value:
            _s3_settings[key] = value
        else:
            _s3_settings.pop(key, None)


# Where an S3 setting comes from when configure_s3 did not set it, in order.
_S3_ENV = {
    "endpoint": ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"),
    "region": ("AWS_REGION", "AWS_DEFAULT_REGION"),
}


def _s3_setting(key: str) -> str | None:
    """The first non-empty of ``configure_s3``'s value and the environment variables."""
    for value in (_s3_settings.get(key), *(os.environ.get(name) for name in _S3_ENV[key])):
        if value:
            return value
    return None


def _s3_endpoint() -> str | None:
    return _s3_setting("endpoint")


def _s3_region() -> str | None:
    return _s3_setting("region")


class Backend(Protocol):
    """What a storage scheme provides. One implementation per scheme, see ``BACKENDS``."""

    atomic_rename: bool

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

    def write_bytes(self, path: str, data: bytes) -> None:
        """Writes the file ``path`` durably, creating folders as needed."""
        ...

    def delete_tree(self, path: str) -> None:
        """Deletes the file or the whole folder ``path``; nothing there is not an error."""
        ...


class _FileBackend:
    """Local filesystem paths, spelled plainly or as ``file://`` URLs."""

    atomic_rename = True

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

    def write_bytes(self, path: str, data: bytes) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    def delete_tree(self, path: str) -> None:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)


class _KvBackend(abc.ABC):
    """A scheme whose files are keys of TensorStore kvstores: folders are key prefixes.

    Subclasses say which kvstore holds a path (:meth:`_store`) and may say how to report a
    failed request (:meth:`_error`).
    """

    atomic_rename = False
    scheme = ""

    def normalize(self, path: str) -> str:
        """Returns the canonical key path: ``.`` and ``..`` resolved, no '/' at either end."""
        norm = posixpath.normpath("/" + path).strip("/")
        return "" if norm == "." else norm

    def render(self, path: str) -> str:
        """Returns the user-facing form of a location."""
        return f"{self.scheme}://{path}"

    @abc.abstractmethod
    def _store(self, path: str) -> tuple[ts.KvStore, str]:
        """Returns the kvstore that holds ``path`` and the key of ``path`` in it."""

    def _error(self, path: str, doing: str, e: Exception) -> Exception:
        return StorageError(f"{self.render(path)}: {doing} failed: {one_line(e)}")

    def _call(self, path: str, doing: str, fn: Callable[[ts.KvStore, str], _T]) -> _T:
        try:
            store, key = self._store(path)
            return fn(store, key)
        except (FileNotFoundError, StorageError):
            raise
        except Exception as e:  # TensorStore reports every I/O failure this way.
            raise self._error(path, doing, e) from e

    @staticmethod
    def _folder(store: ts.KvStore, key: str) -> ts.KvStore:
        """The kvstore of the keys under the folder ``key`` (the whole store for ``""``).

        Its keys are relative to the folder, so listing it or deleting its whole key range
        touches exactly the keys that start with ``key + "/"``.
        """
        return store / (key + "/") if key else store

    def exists(self, path: str) -> bool:
        def run(store: ts.KvStore, key: str) -> bool:
            if key and store.read(key).result().state == "value":
                return True
            return bool(self._folder(store, key).list().result())

        return self._call(path, "checking what is there", run)

    def is_dir(self, path: str) -> bool:
        return self._call(
            path, "listing", lambda store, key: bool(self._folder(store, key).list().result())
        )

    def read_bytes(self, path: str) -> bytes:
        def run(store: ts.KvStore, key: str) -> bytes:
            result = store.read(key).result()
            if result.state != "value":
                raise FileNotFoundError(self.render(path))
            return bytes(result.value)

        return self._call(path, "reading", run)

    def list_dir(self, path: str) -> list[str]:
        def run(store: ts.KvStore, key: str) -> list[str]:
            keys = self._folder(store, key).list().result()
            return sorted({k.decode().split("/", 1)[0] for k in keys})

        return self._call(path, "listing", run)

    def write_bytes(self, path: str, data: bytes) -> None:
        self._call(path, "writing", lambda store, key: store.write(key, data).result())

    def delete_tree(self, path: str) -> None:
        def run(store: ts.KvStore, key: str) -> None:
            self._folder(store, key).delete_range(ts.KvStore.KeyRange()).result()
            if key:  # the range of exactly one key
                one = ts.KvStore.KeyRange(key.encode(), key.encode() + b"\x00")
                store.delete_range(one).result()

        self._call(path, "deleting", run)


class _MemoryBackend(_KvBackend):
    """TensorStore's in-memory kvstore, shared by every ``memory://`` location of the process."""

    scheme = "memory"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._context: ts.Context | None = None
        self._root: ts.KvStore | None = None

    def kvstore_spec(self, path: str) -> dict[str, Any]:
        return {"driver": "memory", "path": path + "/" if path else ""}

    def ts_context(self) -> ts.Context:
        # The memory kvstore's content belongs to a context resource: every memory:// location
        # must use the same context to see the same keys.
        with self._lock:
            if self._context is None:
                self._context = ts.Context(_CONTEXT_SPEC)
            return self._context

    def _store(self, path: str) -> tuple[ts.KvStore, str]:
        if self._root is None:
            self._root = ts.KvStore.open({"driver": "memory"}, context=self.ts_context()).result()
        return self._root, path


class ObjectStoreBackend(_KvBackend):
    """A bucket-based object store: paths are ``bucket/prefix``, one kvstore per bucket."""

    scheme = ""
    driver = ""
    retries_resource = ""
    credentials_hint = ""

    def split(self, path: str) -> tuple[str, str]:
        """Returns ``(bucket, key prefix)`` of a path."""
        bucket, _, key = path.partition("/")
        return bucket, key

    def bucket_spec(self, bucket: str) -> dict[str, Any]:
        """Returns the kvstore spec of a whole bucket."""
        return {"driver": self.driver, "bucket": bucket}

    def where(self) -> str:
        """Names the service in messages (the endpoint, when one is set)."""
        return self.scheme + "://"

    def kvstore_spec(self, path: str) -> dict[str, Any]:
        bucket, key = self.split(path)
        return {**self.bucket_spec(bucket), "path": key + "/" if key else ""}

    def context_spec(self) -> dict[str, Any]:
        """Returns the TensorStore context spec of this scheme's kvstores."""
        return {**_CONTEXT_SPEC, self.retries_resource: dict(OBJECT_STORE_RETRIES)}

    def ts_context(self) -> ts.Context:
        for name, value in _CURL_DEFAULTS.items():
            os.environ.setdefault(name, value)
        # Fresh per call: credentials and endpoint are read from the environment anew.
        return ts.Context(self.context_spec())

    def _store(self, path: str) -> tuple[ts.KvStore, str]:
        bucket, key = self.split(path)
        store = ts.KvStore.open(self.bucket_spec(bucket), context=self.ts_context()).result()
        return store, key

    def _error(self, path: str, doing: str, e: Exception) -> Exception:
        msg = one_line(e)
        bucket, _ = self.split(path)
        here = self.render(path)
        if "NoSuchBucket" in msg or "bucket does not exist" in msg.lower():
            return StorageError(f"{here}: bucket {bucket!r} does not exist at {self.where()}")
        if any(
            s in msg for s in ("PERMISSION_DENIED", "UNAUTHENTICATED", "AccessDenied", "Forbidden")
        ):
            return StorageError(
                f"{here}: {self.where()} refused the credentials while {doing} ({msg}); "
                f"check {self.credentials_hint}"
            )
        if "credentials" in msg.lower():
            return StorageError(
                f"{here}: no usable credentials ({msg}); set {self.credentials_hint}"
            )
        if "retry attempts failed" in msg or "UNAVAILABLE" in msg or "CURL error" in msg:
            return StorageError(f"{here}: cannot reach {self.where()} while {doing} ({msg})")
        return StorageError(f"{here}: {doing} failed at {self.where()}: {msg}")


class _S3Backend(ObjectStoreBackend):
    """Amazon S3 and S3-compatible servers, through TensorStore's ``s3`` kvstore."""

    scheme = "s3"
    driver = "s3"
    retries_resource = "s3_request_retries"
    credentials_hint = (
        "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, or AWS_PROFILE and ~/.aws/credentials"
    )

    def bucket_spec(self, bucket: str) -> dict[str, Any]:
        spec: dict[str, Any] = {"driver": "s3", "bucket": bucket}
        endpoint, region = _s3_endpoint(), _s3_region()
        if endpoint:
            spec["endpoint"] = endpoint
        if region:
            spec["aws_region"] = region
        return spec

    def where(self) -> str:
        endpoint = _s3_endpoint()
        return f"the S3 endpoint {endpoint}" if endpoint else "S3"

    def context_spec(self) -> dict[str, Any]:
        spec = super().context_spec()
        if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
            # The environment provider alone: the default chain would also look for
            # ~/.aws files and log an error line for each one that is missing.
            spec["aws_credentials"] = {"type": "environment"}
        return spec


class _GcsBackend(ObjectStoreBackend):
    """Google Cloud Storage, through TensorStore's ``gcs`` kvstore."""

    scheme = "gs"
    driver = "gcs"
    retries_resource = "gcs_request_retries"
    credentials_hint = "GOOGLE_APPLICATION_CREDENTIALS or `gcloud auth application-default login`"

    def where(self) -> str:
        return "Google Cloud Storage"


BACKENDS: dict[str, Backend] = {
    "file": _FileBackend(),
    "memory": _MemoryBackend(),
    "s3": _S3Backend(),
    "gs": _GcsBackend(),
}
