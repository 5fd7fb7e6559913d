"""Executing a conversion plan: copy what needs no decoding, stream the rest in slabs.

Each output leaf takes one of two paths:

- copied: a leaf that is a source leaf as stored or with its axes permuted (renames, the scan
  axis move) reuses the source's encoded chunks, the axis order being expressed in the zarr
  metadata (zarr3: a ``transpose`` codec; zarr2: C or F order only, so a 3-d axis move of a
  zarr2 source is decoded). When copied leaves hold most of the source's stored bytes, the
  writer first clones the source's OCDBT database (a file copy, as ``cp`` does) and renames
  keys by reference; otherwise it reads and writes the stored chunk bytes.
- decoded: casts, stacking, unstacking (and axis orders zarr2 cannot express) read values in
  slabs laid on the source's chunk grid, of at most ``slab_bytes``, and encode them again.
  Memory holds a few slabs and transactions, not whole arrays.

Both paths give bit-identical values; ``fast=False`` decodes everything (the reference path).

The source is only read. The destination is written by :class:`~ckptconv.io.CheckpointWriter`
into a temporary sibling that is renamed into place only once complete, so an interrupted
conversion never leaves a destination that looks complete.

Unstacking decodes each chunk of a stacked source once and hands every layer its piece.

Limits: a source chunk larger than ``slab_bytes`` is decoded whole (TensorStore decodes a
chunk to read any part of it) for each slab that reads from it, so memory then grows with
that chunk and time with the number of slabs in it; reading a 64 MiB chunk alone takes about
240 MB for a moment. Copied arrays are not decoded, so chunk bytes that are garbled but of the
right length are carried over as they are (the output is exactly as damaged as the source;
``fast=False`` or :func:`~ckptconv.convert.compare` decodes everything); missing chunks and
missing or truncated data files are detected. A decoding conversion tunes glibc's malloc for
the whole process (see :func:`_return_freed_memory`).
"""

from __future__ import annotations

import ctypes
import dataclasses
import math
import os
import resource
import sys
import time
from collections.abc import Callable

import numpy as np

from ..errors import DestinationExistsError
from ..io import ArrayHandle, CheckpointReader, CheckpointWriter, Location
from ..io import _format as fmt
from ..io._zarr import choose_chunk_shape
from .expr import (
    Cast,
    Expr,
    Src,
    Take,
    evaluate,
    permuted_source,
    slab_boxes,
    source_chunk_box,
)
from .layouts import OutLeaf
from .plan import (
    DEFAULT_OPTIONS,
    ConvertOptions,
    Plan,
    plan_linen_to_nnx,
    plan_nnx_to_linen,
    require_target,
)

Progress = Callable[[int, int, str], None]
"""Called after each leaf with (bytes done, bytes total, leaf path)."""

DEFAULT_SLAB_BYTES = 64 << 20
# Decoded outputs are stored in chunks of at most this size, which tile the slabs, and
# committed in transactions of about _INFLIGHT_BYTES: a slab is written piece by piece, so
# the writer holds a few pieces rather than whole slabs.
_OUT_CHUNK_BYTES = 8 << 20
_INFLIGHT_BYTES = 16 << 20
# glibc mallopt parameters (malloc.h).
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
_allocator_tuned = False
# Clone the source database only when at most this fraction of the data its B-tree refers to
# would be left unreferenced in the output (data of source arrays that are decoded or dropped).
CLONE_MAX_UNUSED_FRACTION = 0.1


@dataclasses.dataclass(frozen=True)
class ConvertResult:
    """What a conversion did.

    Attributes:
        plan: the executed plan.
        destination: where the output was written (``None`` for a dry run).
        seconds: wall time of the write.
        bytes_written: array bytes written (decoded size).
        peak_rss_bytes: the process's peak resident set size so far.
        copied_leaves: output arrays copied without decoding.
        cloned: whether the source's database files were cloned into the output.
    """

    plan: Plan
    destination: str | None
    seconds: float
    bytes_written: int
    peak_rss_bytes: int
    copied_leaves: int = 0
    cloned: bool = False

    def to_dict(self) -> dict:
        """Returns a JSON-serialisable summary (``--json``)."""
        return {
            "direction": self.plan.direction,
            "source_layout": self.plan.source_layout,
            "target_layout": self.plan.target_layout,
            "destination": self.destination,
            "leaves": len(self.plan.leaves),
            "bytes": self.bytes_written,
            "seconds": round(self.seconds, 4),
            "peak_rss_mb": round(self.peak_rss_bytes / 2**20, 1),
            "copied_leaves": self.copied_leaves,
            "cloned": self.cloned,
        }


def peak_rss_bytes() -> int:
    """Returns this process's peak resident set size in bytes (Linux ``ru_maxrss``)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _return_freed_memory() -> None:
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


def _check_paths(src: Location, dst: Location) -> None:
    if src.local_path is not None and dst.local_path is not None:
        s = os.path.realpath(src.local_path)
        d = os.path.realpath(dst.local_path)
        if d == s or d.startswith(s.rstrip(os.sep) + os.sep):
            raise DestinationExistsError(
                f"{dst}: the destination must not be the source or lie inside it ({src})"
            )
    elif dst.is_within(src):
        raise DestinationExistsError(
            f"{dst}: the destination must not be the source or lie inside it ({src})"
        )
    elif not dst.has_atomic_rename and src.is_within(dst):
        # An object store is written in place: replacing it would delete the source first.
        raise DestinationExistsError(
            f"{dst}: the destination must not hold the source ({src}) on an object store"
        )


def make_plan(
    reader: CheckpointReader, direction: str, options: ConvertOptions = DEFAULT_OPTIONS
) -> Plan:
    """Plans a conversion of ``reader``'s checkpoint in ``direction`` from metadata alone."""
    fn = {"linen-to-nnx": plan_linen_to_nnx, "nnx-to-linen": plan_nnx_to_linen}[direction]
    return fn(reader.leaves(), reader.custom_metadata, options, where=str(reader.location))


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike | None,
    *,
    direction: str = "linen-to-nnx",
    options: ConvertOptions = DEFAULT_OPTIONS,
    force: bool = False,
    target: dict | None = None,
    progress: Progress | None = None,
    fast: bool = True,
    slab_bytes: int = DEFAULT_SLAB_BYTES,
) -> ConvertResult:
    """Converts the checkpoint at ``src`` and writes it to ``dst``.

    Args:
        src: the source checkpoint (item directory or CheckpointManager step folder).
        dst: the destination; ``None`` plans only (a dry run).
        direction: ``linen-to-nnx`` or ``nnx-to-linen``.
        options: rules and layouts.
        force: replace an existing destination.
        target: ``{path: (shape, dtype)}`` the output must match (see
            :func:`~ckptconv.convert.plan.abstract_tree_leaves`); checked before writing.
        progress: called after each leaf.
        fast: copy renamed and axis-permuted arrays without decoding them; ``False``
            decodes and re-encodes every array (same values, slower).
        slab_bytes: the largest slab of a decoded array held at once, in bytes.

    Note:
        When more than a few MB must be decoded, this sets glibc's malloc mmap threshold to
        1 MiB and its arena count to 2 for the rest of the process, which keeps freed decode
        buffers from staying resident (about 200 MB of peak RSS).

    Returns:
        What was done.

    Raises:
        CkptconvError: for bad input; the destination is then untouched.

    Example:
        >>> convert("ckpt/2/items", "nnx_ckpt")  # doctest: +SKIP
    """
    reader = CheckpointReader(src)
    plan = make_plan(reader, direction, options)
    require_target(plan, target)
    if dst is None:
        return ConvertResult(plan, None, 0.0, 0, peak_rss_bytes())
    dst_loc = Location.parse(dst)
    _check_paths(reader.location, dst_loc)
    start = time.perf_counter()
    total = plan.nbytes
    done = 0
    with CheckpointWriter(
        dst_loc,
        force=force,
        use_zarr3=reader.use_zarr3,
        custom_metadata=plan.custom_metadata,
        max_inflight_bytes=_INFLIGHT_BYTES,
    ) as writer:
        copies = _copyable(plan.leaves, reader, writer) if fast else {}
        cloned = bool(copies) and _worth_cloning(reader, copies) and writer.clone_from(reader)
        decoded = sum(
            _nbytes(o.expr.shape, o.expr.dtype)
            for o in plan.leaves
            if o.expr and o.path not in copies
        )
        if decoded > _OUT_CHUNK_BYTES:
            _return_freed_memory()
        groups = _layer_groups([o for o in plan.leaves if o.path not in copies])
        finished: set[tuple[str, ...]] = set()
        for out in plan.leaves:
            if out.path in finished:
                continue
            if out.expr is None:
                writer.write_empty(out.path, key_types=out.key_types)
                batch = [out]
            elif out.path in copies:
                src, axes = copies[out.path]
                writer.copy_array(
                    out.path,
                    reader,
                    src.path,
                    axes=axes,
                    key_types=out.key_types,
                    random_key_impl=_key_impl(reader, out.expr),
                )
                batch = [out]
            elif out.path in groups:
                batch = groups[out.path]
                _write_layers(writer, reader, batch, slab_bytes)
            else:
                _write_decoded(writer, reader, out, slab_bytes)
                batch = [out]
            for leaf in batch:
                finished.add(leaf.path)
                if leaf.expr is not None:
                    done += _nbytes(leaf.expr.shape, leaf.expr.dtype)
                if progress is not None:
                    progress(done, total, "/".join(leaf.path))
    return ConvertResult(
        plan,
        str(dst_loc),
        time.perf_counter() - start,
        done,
        peak_rss_bytes(),
        copied_leaves=len(copies),
        cloned=cloned,
    )


def _copyable(
    leaves: list[OutLeaf], reader: CheckpointReader, writer: CheckpointWriter
) -> dict[tuple[str, ...], tuple[Src, tuple[int, ...]]]:
    """The output leaves that are a source array with permuted axes, which the writer can copy."""
    out = {}
    for leaf in leaves:
        found = None if leaf.expr is None else permuted_source(leaf.expr)
        if found is not None and writer.can_copy(reader, found[0].path, found[1]):
            out[leaf.path] = found
    return out


def _worth_cloning(
    reader: CheckpointReader, copies: dict[tuple[str, ...], tuple[Src, tuple[int, ...]]]
) -> bool:
    """Whether the copied arrays hold most of the data the source's B-tree refers to.

    Bytes the source's files hold but its B-tree does not refer to (left by rewrites) are
    not counted: a clone carries them over exactly as ``cp -r`` would.
    """
    if reader.location.local_path is None or not reader.use_ocdbt:
        return False
    contents = reader.ocdbt_contents()
    total = sum(contents.value_bytes.values())
    prefixes = {fmt.array_key(src.path) + "/" for src, _ in copies.values()}
    unused = total - contents.bytes_under(prefixes)
    return unused <= CLONE_MAX_UNUSED_FRACTION * total


def _slab_shape(
    shape: tuple[int, ...], box: tuple[int, ...], itemsize: int, slab_bytes: int
) -> tuple[int, ...]:
    """A slab shape on the source chunk grid ``box``, as large as fits in ``slab_bytes``.

    A box larger than the budget is split (its source chunk is then read by several slabs);
    a smaller one grows by whole boxes along the trailing axes first.
    """
    if math.prod(box) * itemsize > slab_bytes:
        return choose_chunk_shape(box, itemsize, slab_bytes)
    out = list(box)
    for axis in reversed(range(len(out))):
        room = slab_bytes // max(1, math.prod(out) * itemsize)
        factor = min(room, math.ceil(shape[axis] / out[axis]))
        if factor > 1:
            out[axis] = min(shape[axis], out[axis] * factor)
    return tuple(out)


def _tile_shape(slab: tuple[int, ...], itemsize: int, max_bytes: int) -> tuple[int, ...]:
    """A chunk shape of at most ``max_bytes`` that tiles ``slab`` exactly.

    Leading axes are split first, each by a divisor of its length, so every chunk of the
    output is written by one slab only, never read back and rewritten.
    """
    out = list(slab)
    for axis in range(len(out)):
        rest = math.prod(out[axis + 1 :]) * itemsize
        if out[axis] * rest <= max_bytes:
            break
        if rest <= max_bytes:
            fit = max_bytes // rest
            out[axis] = max(d for d in range(1, min(fit, out[axis]) + 1) if out[axis] % d == 0)
            break
        out[axis] = 1
    return tuple(max(1, d) for d in out)


def _write_tiled(handle: ArrayHandle, index: tuple[slice, ...], data, chunk) -> None:
    """Writes the slab ``data`` at ``index`` one output chunk at a time."""
    for sub in slab_boxes(data.shape, chunk):
        at = tuple(
            slice(i.start + s.start, i.start + s.stop) for i, s in zip(index, sub, strict=True)
        )
        handle.write(at, data[sub])


def _write_decoded(
    writer: CheckpointWriter,
    reader: CheckpointReader,
    out: OutLeaf,
    slab_bytes: int,
    *,
    only: Callable[[tuple[slice, ...]], bool] | None = None,
) -> None:
    """Writes one output leaf by evaluating its expression slab by slab.

    ``only`` (multi-process conversion) selects the slabs this process writes.
    """
    expr: Expr = out.expr  # type: ignore[assignment]
    itemsize = fmt.numpy_dtype(expr.dtype).itemsize
    box = source_chunk_box(expr, reader.chunk_shape)
    slab = _slab_shape(expr.shape, box, itemsize, slab_bytes)
    chunk = _tile_shape(slab, itemsize, _OUT_CHUNK_BYTES)
    handle = writer.create(
        out.path,
        expr.shape,
        expr.dtype,
        key_types=out.key_types,
        random_key_impl=_key_impl(reader, expr),
        chunk_shape=chunk,
    )
    for index in slab_boxes(expr.shape, slab):
        if only is not None and not only(index):
            continue
        _write_tiled(handle, index, evaluate(expr, reader.read, index=index), chunk)


def _layer_of(expr: Expr | None) -> tuple[Expr, int, int, str | None] | None:
    """``(stack, axis, index, cast dtype)`` when ``expr`` is one layer of a stacked array."""
    dtype = None
    if isinstance(expr, Cast):
        expr, dtype = expr.x, expr.dtype
    if isinstance(expr, Take):
        return expr.x, expr.axis, expr.index, dtype
    return None


def _layer_groups(leaves: list[OutLeaf]) -> dict[tuple[str, ...], list[OutLeaf]]:
    """Groups the output leaves that are layers of one stacked expression (unstacking).

    Returns:
        For every leaf of a group of two or more, the group's leaves in plan order.
    """
    found: dict[tuple, list[OutLeaf]] = {}
    for leaf in leaves:
        layer = _layer_of(leaf.expr)
        if layer is not None:
            stacked, axis, _, dtype = layer
            found.setdefault((stacked, axis, dtype), []).append(leaf)
    return {leaf.path: group for group in found.values() if len(group) > 1 for leaf in group}


def _write_layers(
    writer: CheckpointWriter,
    reader: CheckpointReader,
    group: list[OutLeaf],
    slab_bytes: int,
    *,
    only: Callable[[tuple[slice, ...]], bool] | None = None,
) -> None:
    """Writes several layers of one stacked expression, reading each source chunk once.

    Slabs of the stacked array follow its source chunk grid; each slab is decoded once and
    split among the layers it holds, so a chunk holding every layer is not decoded per layer.
    ``only`` (multi-process conversion) selects the slabs of the stack this process writes.
    """
    layers = {}
    for leaf in group:
        stacked, axis, index, _ = _layer_of(leaf.expr)  # type: ignore[misc]
        layers[index] = leaf
    itemsize = fmt.numpy_dtype(stacked.dtype).itemsize
    box = source_chunk_box(stacked, reader.chunk_shape)
    slab = _slab_shape(stacked.shape, box, itemsize, slab_bytes)
    out_slab = slab[:axis] + slab[axis + 1 :]
    handles: dict[int, tuple[ArrayHandle, tuple[int, ...]]] = {}
    for index, leaf in layers.items():
        expr: Expr = leaf.expr  # type: ignore[assignment]
        chunk = _tile_shape(out_slab, fmt.numpy_dtype(expr.dtype).itemsize, _OUT_CHUNK_BYTES)
        handle = writer.create(
            leaf.path,
            expr.shape,
            expr.dtype,
            key_types=leaf.key_types,
            random_key_impl=_key_impl(reader, expr),
            chunk_shape=chunk,
        )
        handles[index] = handle, chunk
    for index in slab_boxes(stacked.shape, slab):
        if only is not None and not only(index):
            continue
        first, stop = index[axis].start, index[axis].stop
        wanted = [i for i in range(first, stop) if i in handles]
        if not wanted:
            continue
        data = evaluate(stacked, reader.read, index=index)
        rest = index[:axis] + index[axis + 1 :]
        for i in wanted:
            handle, chunk = handles[i]
            piece = np.take(data, i - first, axis=axis)
            if piece.dtype != fmt.numpy_dtype(handle.dtype):
                piece = piece.astype(fmt.numpy_dtype(handle.dtype))
            _write_tiled(handle, rest, piece, chunk)
        del data, piece  # free this slab before the next one is read


def _key_impl(reader: CheckpointReader, expr) -> str | None:
    """The PRNG implementation Orbax recorded for typed-key sources (kept on the output)."""
    impls = set()
    for path in expr.sources():
        ext = reader.ext_metadata(path) or {}
        impls.add(ext.get("random_key_impl"))
    return impls.pop() if len(impls) == 1 else None


def _nbytes(shape, dtype) -> int:
    from ..io.leaf import Leaf

    return Leaf((), tuple(shape), dtype).nbytes
