"""OS failures of the write path: one-line StorageErrors naming the path, nothing left behind."""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess

import numpy as np
import pytest

import ckptconv
from ckptconv.errors import StorageError
from ckptconv.io import CheckpointWriter, Location, _commit
from ckptconv.io._oserrors import describe, os_errors


def _tree_hash(folder) -> str:
    h = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(folder)):
        dirs.sort()
        for name in sorted(files):
            p = os.path.join(root, name)
            h.update(p.encode())
            with open(p, "rb") as f:
                h.update(f.read())
    return h.hexdigest()


def test_describe_names_path_expected_and_found():
    e = OSError(errno.ENOSPC, "No space left on device", "/x/d/file")
    msg = describe(e, "/x/out", "writing data")
    assert msg == (
        "/x/out: writing data failed: expected free space at /x/d/file, "
        "found the disk is full (no space left on device)"
    )
    odd = describe(OSError(errno.EIO, "Input/output error"), "/x/out", "reading")
    assert odd == "/x/out: reading failed: Input/output error at /x/out"


def test_os_errors_wraps_but_lets_domain_errors_through():
    with pytest.raises(StorageError, match="^p: doing failed: expected a folder at q"):
        with os_errors("p", "doing"):
            raise NotADirectoryError(errno.ENOTDIR, "Not a directory", "q")
    from ckptconv.errors import DestinationExistsError

    with pytest.raises(DestinationExistsError):
        with os_errors("p", "doing"):
            raise DestinationExistsError("exists")


def test_a_file_where_the_parent_folder_should_be(tmp_path):
    (tmp_path / "afile").write_bytes(b"")
    with pytest.raises(StorageError) as info:
        with CheckpointWriter(tmp_path / "afile" / "out") as w:
            w.write(("a",), np.ones(3, np.float32))
    msg = str(info.value)
    assert "\n" not in msg
    assert f"expected nothing or a folder at {tmp_path / 'afile'}, found a file" in msg
    assert sorted(os.listdir(tmp_path)) == ["afile"]


def test_missing_parents_made_by_a_failed_start_are_removed(tmp_path, monkeypatch):
    real_mkdir = os.mkdir

    def failing_mkdir(path, *args, **kwargs):
        if ".ckptconv-tmp-" in os.fspath(path):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", failing_mkdir)
    with pytest.raises(StorageError, match="found permission denied"):
        CheckpointWriter(tmp_path / "a" / "b" / "out").__enter__()
    assert os.listdir(tmp_path) == []


def test_failed_rename_into_place_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    dest = tmp_path / "out"
    with CheckpointWriter(dest) as w:
        w.write(("a",), np.zeros(3, np.float32))
    before = _tree_hash(dest)
    real_rename = os.rename

    def failing_rename(src, dst):
        if ".ckptconv-tmp-" in os.fspath(src):
            raise OSError(errno.EIO, "Input/output error", os.fspath(src))
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", failing_rename)
    with pytest.raises(StorageError, match="moving the finished checkpoint into place failed"):
        with CheckpointWriter(dest, force=True) as w:
            w.write(("a",), np.ones(3, np.float32))
    monkeypatch.undo()
    assert _tree_hash(dest) == before
    assert os.listdir(tmp_path) == ["out"]


def test_protocol_abort_removes_the_temporary_folder_after_a_failed_commit(tmp_path):
    proto = _commit.RenameCommit(Location.parse(tmp_path / "out"), force=False)
    proto.start()

    def broken(folder):
        raise OSError(errno.ENOSPC, "No space left on device", str(folder))

    with pytest.raises(StorageError, match="writing the metadata files failed"):
        proto.commit(broken)
    proto.abort()
    assert os.listdir(tmp_path) == []


@pytest.fixture
def small_disk(tmp_path):
    """A 300 KiB tmpfs (needs root to mount); the fixture checkpoints do not fit in it."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs to fill needs root; this run is not root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(mnt)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


@pytest.mark.parametrize(
    "options",
    [
        ckptconv.ConvertOptions(),  # clones the source's data files
        ckptconv.ConvertOptions(dtype="bfloat16"),  # decodes and writes through TensorStore
    ],
    ids=["clone", "decode"],
)
def test_full_disk_fails_cleanly(small_disk, maxtext_fixtures, options):
    src = maxtext_fixtures / "A" / "ckpt"
    before = _tree_hash(src)
    with pytest.raises(StorageError if options.dtype is None else ckptconv.CkptconvError) as info:
        ckptconv.convert(src, small_disk / "out", options=options)
    msg = str(info.value)
    assert "\n" not in msg
    assert str(small_disk) in msg
    assert "no space left on device" in msg.lower()
    assert os.listdir(small_disk) == []
    assert _tree_hash(src) == before
