"""The executor: one process writes its pieces of a schedule into a writer.

The same code runs a one-process conversion (every piece is process 0's, the writer is a
:class:`~ckptconv.io.CheckpointWriter`) and each process of a multi-process one (its pieces,
into its :class:`~ckptconv.io.multiprocess.ProcessStoreWriter`). Copies go through the writer's
``copy_array`` (encoded chunks reused); decoded slabs are evaluated from the source one at a
time and written one output chunk at a time, so memory holds a slab and a few chunks.
"""

from __future__ import annotations

import ctypes
import dataclasses
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from ..io import ArrayHandle, numpy_dtype
from ..io.sources import CheckpointSource
from .expr import Expr, evaluate, slab_boxes
from .layouts import OutLeaf
from .schedule import OUT_CHUNK_BYTES, Piece, Task, layer_of

Progress = Callable[[int, int, str], None]
"""Called after each task with (bytes done, bytes total, leaf path)."""

# glibc mallopt parameters (malloc.h).
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
_allocator_tuned = False


@dataclasses.dataclass(frozen=True)
class Executed:
    """What one process wrote.

    Attributes:
        nbytes: decoded bytes of the pieces it wrote.
        copied_leaves: arrays (or parts of arrays) it copied without decoding.
    """

    nbytes: int
    copied_leaves: int


def return_freed_memory() -> None:
    """Makes glibc's malloc hand large freed buffers back to the system (process-wide, once).

    TensorStore decodes and encodes chunks in worker threads. With glibc's defaults, buffers
    of a few MB up to 32 MB come from per-thread arenas and stay resident once freed, which
    adds about 200 MB to the peak of a decoding conversion. A 1 MiB mmap threshold and two
    arenas keep them out, at no measurable cost in speed. Other C libraries are left alone.
    """
    global _allocator_tuned
    if _allocator_tuned or not sys.platform.startswith("linux"):
        return
    _allocator_tuned = True
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return
    mallopt(_M_MMAP_THRESHOLD, 1 << 20)
    mallopt(_M_ARENA_MAX, 2)


def execute(
    tasks: list[Task],
    source: CheckpointSource,
    writer: Any,
    *,
    process_id: int = 0,
    progress: Progress | None = None,
    tick: Callable[[], None] | None = None,
) -> Executed:
    """Writes ``process_id``'s pieces of every task.

    Args:
        tasks: the schedule (:func:`~ckptconv.convert.schedule.schedule`).
        source: the source checkpoint.
        writer: a writer open for this process (``create``, ``write_empty``, ``copy_array``).
        process_id: this process's index in the schedule.
        progress: called after each task with this process's bytes done and total.
        tick: called before each piece (multi-process: checks that no other process failed
            and reports progress).

    Returns:
        What this process wrote.
    """
    mine = [t.pieces_of(process_id) for t in tasks]
    total = sum(p.nbytes for pieces in mine for p in pieces)
    decoded = sum(
        p.nbytes for t, ps in zip(tasks, mine, strict=True) if t.kind != "copy" for p in ps
    )
    if decoded > OUT_CHUNK_BYTES:
        return_freed_memory()
    tick = tick or (lambda: None)
    done = copied = 0
    for task, pieces in zip(tasks, mine, strict=True):
        if not pieces and process_id not in task.writers:
            continue
        out = task.leaves[0]
        if task.kind == "empty":
            writer.write_empty(out.path, key_types=out.key_types)
        elif task.kind == "copy":
            tick()
            _copy(writer, source, task, pieces)
            copied += 1
        elif task.kind == "decode":
            _decode(writer, source, task, pieces, tick)
        else:
            _layers(writer, source, task, pieces, tick)
        done += sum(p.nbytes for p in pieces)
        if progress is not None:
            progress(done, total, "/".join(out.path))
    return Executed(done, copied)


def _copy(writer: Any, source: CheckpointSource, task: Task, pieces: list[Piece]) -> None:
    out = task.leaves[0]
    src, axes = task.source  # type: ignore[misc]
    subset = {} if len(pieces) == len(task.pieces) else {"chunks": {p.key for p in pieces}}
    writer.copy_array(
        out.path,
        source,
        src.path,
        axes=axes,
        key_types=out.key_types,
        random_key_impl=key_impl(source, out.expr),
        **subset,
    )


def _create(writer: Any, source: CheckpointSource, leaf: OutLeaf, chunk) -> ArrayHandle:
    expr: Expr = leaf.expr  # type: ignore[assignment]
    return writer.create(
        leaf.path,
        expr.shape,
        expr.dtype,
        key_types=leaf.key_types,
        random_key_impl=key_impl(source, expr),
        chunk_shape=chunk,
    )


def _decode(writer, source: CheckpointSource, task: Task, pieces: list[Piece], tick) -> None:
    """Evaluates the leaf's expression slab by slab (this process's slabs)."""
    leaf, chunk = task.leaves[0], task.chunks[0]
    handle = _create(writer, source, leaf, chunk)
    for piece in pieces:
        tick()
        index = piece.index
        _write_tiled(handle, index, evaluate(leaf.expr, source.read, index=index), chunk)


def _layers(writer, source: CheckpointSource, task: Task, pieces: list[Piece], tick) -> None:
    """Writes layers of one stacked expression, decoding each slab of the stack once.

    Each slab is split among the layers it holds, so a chunk holding every layer is not
    decoded once per layer.
    """
    stacked, axis = task.stacked  # type: ignore[misc]
    handles: dict[int, tuple[ArrayHandle, tuple[int, ...]]] = {}
    for leaf, chunk in zip(task.leaves, task.chunks, strict=True):
        handles[layer_of(leaf.expr)[2]] = _create(writer, source, leaf, chunk), chunk  # type: ignore[index]
    for piece in pieces:
        tick()
        index = piece.index
        first, stop = index[axis].start, index[axis].stop
        data = evaluate(stacked, source.read, index=index)
        rest = index[:axis] + index[axis + 1 :]
        for i in range(first, stop):
            if i not in handles:
                continue
            handle, chunk = handles[i]
            layer = np.take(data, i - first, axis=axis)
            if layer.dtype != numpy_dtype(handle.dtype):
                layer = layer.astype(numpy_dtype(handle.dtype))
            _write_tiled(handle, rest, layer, chunk)
        del data  # free this slab before the next one is read


def _write_tiled(handle: ArrayHandle, index: tuple[slice, ...], data, chunk) -> None:
    """Writes the slab ``data`` at ``index`` one output chunk at a time."""
    for sub in slab_boxes(data.shape, chunk):
        at = tuple(
            slice(i.start + s.start, i.start + s.stop) for i, s in zip(index, sub, strict=True)
        )
        handle.write(at, data[sub])


def key_impl(source: CheckpointSource, expr) -> str | None:
    """The PRNG implementation Orbax recorded for typed-key sources (kept on the output)."""
    impls = set()
    for path in expr.sources():
        ext = source.ext_metadata(path) or {}
        impls.add(ext.get("random_key_impl"))
    return impls.pop() if len(impls) == 1 else None
