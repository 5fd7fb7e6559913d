"""The commit protocols: rename on local disks, marker last where nothing can be renamed.

``memory://`` has no atomic rename, so it takes the object-store protocol; these tests need no
server (tests/io/test_s3.py runs the same protocol against an S3 server).
"""

from __future__ import annotations

import uuid

import numpy as np
import pytest

from ckptconv.errors import DestinationExistsError, IncompleteCheckpointError
from ckptconv.io import CheckpointReader, CheckpointWriter, Location, _commit


@pytest.fixture
def mem():
    loc = Location.parse(f"memory://tests/commit/{uuid.uuid4().hex}")
    yield loc
    loc.delete_tree()


def test_protocol_follows_the_storage(tmp_path, mem):
    assert isinstance(
        _commit.for_destination(Location.parse(tmp_path), force=False), _commit.RenameCommit
    )
    assert isinstance(_commit.for_destination(mem, force=False), _commit.MarkerCommit)


def test_marker_commit_writes_in_place_with_commit_success_last(mem, monkeypatch):
    written = []
    original = Location.write_bytes

    def spy(self, data):
        written.append(self.name)
        original(self, data)

    monkeypatch.setattr(Location, "write_bytes", spy)
    dest = mem.join("ckpt")
    with CheckpointWriter(dest) as w:
        assert w.temporary_location is None
        w.write(("a",), np.arange(6, dtype=np.int32))
        # While open: the in-progress marker is there, so readers refuse the prefix.
        with pytest.raises(IncompleteCheckpointError, match=".ckptconv-incomplete"):
            CheckpointReader(dest)
    assert written[0] == ".ckptconv-incomplete"
    assert written[-1] == "commit_success.txt"
    assert written.index("_METADATA") < written.index("commit_success.txt")
    assert ".ckptconv-incomplete" not in dest.list_dir()
    np.testing.assert_array_equal(CheckpointReader(dest).read(("a",)), np.arange(6))


def test_object_store_checkpoint_without_commit_marker_is_refused(mem):
    dest = mem.join("ckpt")
    with CheckpointWriter(dest) as w:
        w.write(("a",), np.ones(3, np.float32))
    dest.join("commit_success.txt").delete_tree()
    with pytest.raises(IncompleteCheckpointError, match="no commit_success.txt") as info:
        CheckpointReader(dest)
    assert "\n" not in str(info.value)


def test_marker_in_the_step_folder_counts(mem):
    item = mem.join("run", "7", "items")
    with CheckpointWriter(item) as w:
        w.write(("a",), np.ones(3, np.float32))
    item.join("commit_success.txt").delete_tree()
    mem.join("run", "7", "commit_success.txt").write_bytes(b"ok")  # as Orbax's manager writes
    assert CheckpointReader(mem.join("run")).location == item


def test_unfinished_write_is_refused_and_only_force_replaces_it(mem):
    dest = mem.join("ckpt")
    writer = CheckpointWriter(dest)
    writer.write(("a",), np.ones(3, np.float32))  # never committed: like a killed process
    with pytest.raises(IncompleteCheckpointError, match="interrupted"):
        CheckpointReader(dest)
    with pytest.raises(DestinationExistsError, match="--force"):
        CheckpointWriter(dest)
    with CheckpointWriter(dest, force=True) as w:
        w.write(("b",), np.zeros(2, np.float32))
    assert list(CheckpointReader(dest).leaves()) == [("b",)]


def test_failed_write_leaves_nothing(mem):
    dest = mem.join("ckpt")
    with pytest.raises(RuntimeError, match="boom"):
        with CheckpointWriter(dest) as w:
            w.write(("a",), np.ones(3, np.float32))
            raise RuntimeError("boom")
    assert not dest.exists()


def test_force_deletes_the_old_objects_before_writing(mem):
    dest = mem.join("ckpt")
    with CheckpointWriter(dest) as w:
        w.write(("a",), np.ones(3, np.float32))
    dest.join("extra", "object").write_bytes(b"x")
    writer = CheckpointWriter(dest, force=True)
    writer.write(("b",), np.ones(3, np.float32))
    # Mid-write the old checkpoint is gone and the prefix is refused.
    assert dest.list_dir() != [] and "extra" not in dest.list_dir()
    assert "commit_success.txt" not in dest.list_dir()
    with pytest.raises(IncompleteCheckpointError):
        CheckpointReader(dest)
    writer.commit()
    assert list(CheckpointReader(dest).leaves()) == [("b",)]


def test_rename_commit_keeps_the_temporary_sibling(tmp_path):
    with CheckpointWriter(tmp_path / "out") as w:
        tmp = w.temporary_location
        assert tmp is not None and tmp.parent == Location.parse(tmp_path)
        assert (tmp_path / tmp.name / ".ckptconv-incomplete").exists()
        w.write(("a",), np.ones(3, np.float32))
    assert not (tmp_path / tmp.name).exists()
    assert (tmp_path / "out" / "commit_success.txt").exists()
    assert not (tmp_path / "out" / ".ckptconv-incomplete").exists()


def test_a_writer_publishes_through_an_injected_protocol(tmp_path):
    calls = []

    class Recording(_commit.RenameCommit):
        def check(self, records):
            calls.append(("check", sorted(records.leaves)))
            super().check(records)

        def commit(self, write_metadata):
            calls.append(("commit", None))
            super().commit(write_metadata)

    dest = Location.parse(tmp_path / "out")
    with CheckpointWriter(dest, commit=Recording(dest, force=False)) as w:
        w.write(("a",), np.ones(3, np.float32))
    assert calls == [("check", [("a",)]), ("commit", None)]
    np.testing.assert_array_equal(CheckpointReader(dest).read(("a",)), np.ones(3))
