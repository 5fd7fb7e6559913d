"""Per-process OCDBT databases merged into one checkpoint that plain Orbax restores."""

from __future__ import annotations

import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorstore as ts

from ckptconv.errors import CheckpointWriteError
from ckptconv.io import CheckpointReader, CheckpointWriter
from ckptconv.io.multiprocess import MergingWriter, ProcessStoreWriter

pytestmark = pytest.mark.filterwarnings("ignore:Sharding info not provided")

W = ("params", "w")
ROWS = np.random.default_rng(0).standard_normal((64, 256)).astype(np.float32)


def write_halves(folder, *, skip_second: bool = False, use_zarr3: bool = True) -> None:
    """Process 0 writes rows 0..31 of W and the step, process 1 rows 32..63."""
    for i in (0, 1):
        with ProcessStoreWriter(folder, i, use_zarr3=use_zarr3) as w:
            h = w.create(W, ROWS.shape, "float32", chunk_shape=(32, 256))
            if i == 0:
                h.write((slice(0, 32),), ROWS[:32])
                w.write(("step",), np.int32(3))
            elif not skip_second:
                h.write((slice(32, 64),), ROWS[32:])


def assert_merge_refused(tmp_path, write, processes, shapes=None, *, match) -> None:
    """A merge of ``processes`` after ``write(merging)`` raises, and leaves nothing behind.

    ``write`` gets the :class:`MergingWriter` of ``tmp_path / "out"``; the merge must raise a
    :class:`CheckpointWriteError` matching ``match``, and ``tmp_path`` must hold only what it
    held before.
    """
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(CheckpointWriteError, match=match):
        with MergingWriter(tmp_path / "out") as merging:
            write(merging)
            merging.merge(processes, shapes=shapes)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize("use_zarr3", [True, False], ids=["zarr3", "zarr2"])
def test_merged_processes_restore_with_orbax(tmp_path, use_zarr3):
    dst = tmp_path / "out"
    with MergingWriter(dst, use_zarr3=use_zarr3) as merging:
        write_halves(merging.folder.local_path, use_zarr3=use_zarr3)
        merged = merging.merge([0, 1], shapes={W: ROWS.shape, ("step",): ()})
    assert set(merged) == {W, ("step",)}
    assert sorted(p.name for p in dst.iterdir() if p.name.startswith("ocdbt.")) == [
        "ocdbt.process_0",
        "ocdbt.process_1",
    ]
    restored = ocp.PyTreeCheckpointer().restore(str(dst))
    np.testing.assert_array_equal(np.asarray(restored["params"]["w"]), ROWS)
    assert int(restored["step"]) == 3
    # The root database refers to the processes' values; it holds only its B-tree.
    root_bytes = sum(f.stat().st_size for f in (dst / "d").iterdir())
    assert root_bytes < 4096 < ROWS.nbytes / 8


def test_a_piece_no_process_wrote_is_an_error(tmp_path):
    assert_merge_refused(
        tmp_path,
        lambda merging: write_halves(merging.folder.local_path, skip_second=True),
        [0, 1],
        {W: ROWS.shape, ("step",): ()},
        match=r"^params/w: expected every element of shape \(64, 256\) written, found region "
        r"\[32:64, 0:256\] unwritten \(written by processes 0, 1\)$",
    )


def test_a_process_without_record_is_an_error(tmp_path):
    assert_merge_refused(
        tmp_path,
        lambda merging: write_halves(merging.folder.local_path),
        [0, 1, 2],
        match="process 2 left no record",
    )


@pytest.fixture
def two_chunk_source(tmp_path) -> CheckpointReader:
    """A reader of the checkpoint ``tmp_path / "src"``, holding W in two chunks of 32 rows."""
    with CheckpointWriter(tmp_path / "src", chunk_bytes=32 * 256 * 4) as w:
        w.write(W, ROWS)
    reader = CheckpointReader(tmp_path / "src")
    assert len(reader.chunk_keys(W)) == 2
    return reader


def test_copy_of_some_chunks(tmp_path, two_chunk_source):
    reader = two_chunk_source
    keys = reader.chunk_keys(W)
    dst = tmp_path / "out"
    with MergingWriter(dst) as merging:
        for i, key in enumerate(keys):
            with ProcessStoreWriter(merging.folder, i) as w:
                w.copy_array(("model", "w"), reader, W, axes=(1, 0), chunks={key})
        merging.merge([0, 1], shapes={("model", "w"): (256, 64)})
    np.testing.assert_array_equal(CheckpointReader(dst).read(("model", "w")), ROWS.T)


def write_rows(folder, shares, *, chunk_rows=8) -> None:
    """Process i writes rows ``shares[i]`` (a (start, stop) pair, or several) of W."""
    for i, rows in enumerate(shares):
        with ProcessStoreWriter(folder, i) as w:
            h = w.create(W, ROWS.shape, "float32", chunk_shape=(chunk_rows, 256))
            for start, stop in [rows] if isinstance(rows[0], int) else rows:
                h.write((slice(start, stop),), ROWS[start:stop])


def test_shares_that_leave_a_gap_are_refused(tmp_path):
    assert_merge_refused(
        tmp_path,
        lambda merging: write_rows(merging.folder.local_path, [(0, 32), (40, 64)]),
        [0, 1],
        {W: ROWS.shape},
        match=r"found region \[32:40, 0:256\] unwritten",
    )


def test_overlapping_shares_of_whole_chunks_commit(tmp_path):
    dst = tmp_path / "out"
    with MergingWriter(dst) as merging:
        # Rows 24..39 (two chunks) are written by both, whole.
        write_rows(merging.folder.local_path, [(0, 40), [(24, 40), (40, 64)]])
        merging.merge([0, 1], shapes={W: ROWS.shape})
    np.testing.assert_array_equal(CheckpointReader(dst).read(W), ROWS)


def test_a_chunk_shared_in_part_is_refused(tmp_path):
    # Together the shares cover W, but the merge would keep only one process's copy of rows
    # 32..63, with the other process's rows missing from it.
    assert_merge_refused(
        tmp_path,
        lambda merging: write_rows(merging.folder.local_path, [(0, 40), (36, 64)], chunk_rows=32),
        [0, 1],
        {W: ROWS.shape},
        match=r"process 0 wrote chunk \[32:64, 0:256\] in part and another process wrote",
    )


def test_a_recorded_shape_must_be_the_expected_one(tmp_path):
    assert_merge_refused(
        tmp_path,
        lambda merging: write_rows(merging.folder.local_path, [(0, 64)]),
        [0],
        {W: (64, 128)},
        match=r"expected shape \(64, 128\), found",
    )


def test_stored_chunks_are_counted_by_index_on_the_grid(tmp_path):
    """Data lost from a process's database is found, and stray keys do not stand in for it."""

    def write_then_lose_and_stray(merging):
        folder = merging.folder.local_path
        write_halves(folder)
        stray = ts.KvStore.open(
            {"driver": "ocdbt", "base": f"file://{folder}/ocdbt.process_0/"}
        ).result()
        for key in ("params.w/c/5/0", "params.w/c/0", "params.w/extra"):
            stray.write(key, b"x").result()
        (folder / "ocdbt.process_1" / "manifest.ocdbt").unlink()

    assert_merge_refused(
        tmp_path,
        write_then_lose_and_stray,
        [0, 1],
        {W: ROWS.shape, ("step",): ()},
        match=r"expected all 2 chunks of its grid \(2, 1\) in the merged database, found 1: "
        r"chunk \[32:64, 0:256\] is missing",
    )


def test_copied_chunks_that_leave_a_gap_are_refused(tmp_path, two_chunk_source):
    reader = two_chunk_source
    keys = reader.chunk_keys(W)

    def copy_one_chunk_of_two(merging):
        for i, chunks in enumerate([{keys[0]}, set()]):
            with ProcessStoreWriter(merging.folder, i) as w:
                w.copy_array(("model", "w"), reader, W, axes=(1, 0), chunks=chunks)

    assert_merge_refused(
        tmp_path, copy_one_chunk_of_two, [0, 1], match=r"region \[0:256, 32:64\] unwritten"
    )
