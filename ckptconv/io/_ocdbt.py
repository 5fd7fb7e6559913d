"""What an OCDBT database on disk holds, and copying its files to clone it.

A checkpoint's OCDBT database is a manifest (``manifest.ocdbt``), B-tree nodes and value data
in immutable files under ``d/`` (and, for checkpoints Orbax wrote per process and merged,
under ``ocdbt.process_<n>/d/``), referenced from the B-tree by relative path, offset and
length. Copying those files byte for byte into another folder gives an identical database
there, in which keys can then be renamed without rewriting any value (OCDBT copies a key
range inside one database by reference).

Limits: only the latest version of the database is walked; a database whose B-tree refers to
files outside the folders above is reported as not clonable rather than copied partially.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

import tensorstore as ts

from . import _format as fmt
from ._oserrors import os_errors
from .location import Location

# Folders (relative to the item) whose files form the database; the per-process manifests
# under ocdbt.process_<n>/ are superseded by the merged root manifest and are not needed.
_DATA_DIR = "d"
_PROCESS_PREFIX = "ocdbt.process_"


@dataclasses.dataclass(frozen=True)
class Contents:
    """The latest version of an OCDBT database, from its B-tree alone.

    Attributes:
        files: item-relative paths of every file the B-tree refers to (nodes and values).
        value_bytes: stored bytes of each key's value (inline values count their length).
        extents: per referenced file, the end of the last byte range the B-tree refers to;
            a shorter file is truncated.
        value_files: the file holding each key's value, for values not stored inline.
    """

    files: frozenset[str]
    value_bytes: dict[bytes, int]
    extents: dict[str, int]
    value_files: dict[bytes, str]

    def bytes_under(self, prefixes: Iterable[str]) -> int:
        """Returns the stored bytes of every key that starts with one of ``prefixes``."""
        wanted = tuple(p.encode() for p in prefixes)
        if not wanted:
            return 0
        return sum(n for k, n in self.value_bytes.items() if k.startswith(wanted))


def _parse_location(text: str) -> tuple[str, int, int]:
    """Splits ``<kind>:<base path>:<file path>:<offset>:<length>`` (a dumped location).

    Returns:
        The item-relative file, the offset and the length.
    """
    _, base_path, file_path, offset, length = text.rsplit(":", 4)
    return base_path + file_path, int(offset), int(length)


def inspect(location: Location) -> Contents:
    """Walks the B-tree of the database at ``location`` (an item folder).

    Raises:
        Exception: whatever TensorStore raises for an unreadable manifest or node.
    """
    context = location.ts_context()
    base = ts.KvStore.open(location.kvstore_spec(), context=context).result()
    manifest = ts.ocdbt.dump(base, context=context).result()
    extents: dict[str, int] = {}
    sizes: dict[bytes, int] = {}
    value_files: dict[bytes, str] = {}

    def refer(location: str) -> tuple[str, int]:
        path, offset, length = _parse_location(location)
        extents[path] = max(extents.get(path, 0), offset + length)
        return path, length

    for node in manifest.get("version_tree_nodes") or ():
        refer(node["location"])
    versions = manifest.get("versions") or []
    if not versions:
        return Contents(frozenset(extents), sizes, extents, value_files)
    root = versions[-1]["root"].get("location")
    todo = [(root, b"")] if root else []
    while todo:
        node_location, prefix = todo.pop()
        refer(node_location)
        node = ts.ocdbt.dump(base, node_location, context=context).result()
        interior = node.get("height", 0) > 0
        for entry in node.get("entries", []):
            if interior:
                todo.append(
                    (entry["location"], prefix + (entry.get("subtree_common_prefix") or b""))
                )
                continue
            key = prefix + entry["key"]
            if "indirect_value" in entry:
                value_files[key], sizes[key] = refer(entry["indirect_value"])
            else:
                sizes[key] = len(entry.get("inline_value") or b"")
    return Contents(frozenset(extents), sizes, extents, value_files)


def damaged_files(folder: str, contents: Contents) -> list[str]:
    """Returns a line per referenced file that is missing or shorter than the B-tree says."""
    out = []
    for path, end in sorted(contents.extents.items()):
        try:
            size = os.path.getsize(os.path.join(folder, path))
        except OSError:
            out.append(f"{path} (missing)")
            continue
        if size < end:
            out.append(f"{path} (truncated: {size} bytes, data referenced up to byte {end})")
    return out


def database_files(folder: str) -> list[str]:
    """Returns the item-relative paths of the database files a clone copies, sorted.

    These are ``manifest.ocdbt`` and every file under ``d/`` and ``ocdbt.process_<n>/d/``.
    """
    out = [fmt.OCDBT_MANIFEST_FILE]
    roots = [_DATA_DIR] + [
        os.path.join(name, _DATA_DIR)
        for name in sorted(os.listdir(folder))
        if name.startswith(_PROCESS_PREFIX)
    ]
    for root in roots:
        top = os.path.join(folder, root)
        for dirpath, _, names in os.walk(top):
            rel = os.path.relpath(dirpath, folder)
            out.extend(os.path.join(rel, n) for n in sorted(names))
    return out


def _copy_one(src: str, dst: str) -> int:
    """Copies one file, fsynced, and returns its size.

    The copy happens in the kernel (``copy_file_range``, a reflink where the filesystem offers
    one), as ``cp`` does, falling back to reading and writing.

    Raises:
        OSError: the file could not be copied whole.
    """
    try:
        return _copy_bytes(src, dst)
    except OSError as e:
        if e.filename is None:  # a failed write (a full disk) names no file: name it
            raise OSError(e.errno, e.strerror or str(e), dst) from e
        raise


def _copy_bytes(src: str, dst: str) -> int:
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        size = os.fstat(fin.fileno()).st_size
        done = 0
        try:
            while done < size:
                n = os.copy_file_range(fin.fileno(), fout.fileno(), size - done)
                if n == 0:
                    break
                done += n
        except OSError:
            pass  # not offered between these filesystems
        if done < size:  # copy the rest through user space
            fin.seek(done)
            fout.seek(done)
            while chunk := fin.read(16 << 20):
                fout.write(chunk)
                done += len(chunk)
        if done != size:
            raise OSError(f"{src}: copied {done} of {size} bytes to {dst}")
        fout.flush()
        os.fsync(fout.fileno())
    return done


def copy_files(src_folder: str, dst_folder: str, paths: Iterable[str], *, workers: int = 8) -> int:
    """Copies item-relative ``paths`` from one folder to another, fsynced; returns the bytes.

    Folders are created (and fsynced) as needed. Several files are copied at once: measured
    here, 8 threads copy a 1.3 GB checkpoint 15-25% faster than ``cp -r``, which copies one
    file at a time.
    """
    with os_errors(dst_folder, "copying the source's data files"):
        return _copy_files(src_folder, dst_folder, list(paths), workers)


def _copy_files(src_folder: str, dst_folder: str, paths: list[str], workers: int) -> int:
    dirs: set[str] = set()
    for p in paths:
        d = os.path.dirname(p)
        while d:
            dirs.add(d)
            d = os.path.dirname(d)
    dirs = sorted(dirs)
    for d in dirs:
        os.makedirs(os.path.join(dst_folder, d), exist_ok=True)
    jobs = [(os.path.join(src_folder, p), os.path.join(dst_folder, p)) for p in paths]
    if workers <= 1 or len(jobs) <= 1:
        total = sum(_copy_one(s, d) for s, d in jobs)
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            total = sum(pool.map(lambda job: _copy_one(*job), jobs))
    # New entries must be durable before the folder is renamed into place.
    for d in [*dirs, ""]:
        fd = os.open(os.path.join(dst_folder, d), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return total
