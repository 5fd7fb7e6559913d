"""The schedule: per output leaf, how it is written, and by which process.

One function, :func:`schedule`, decides for every output leaf of a plan one of four kinds:

- ``empty``: no data (an empty optimizer state), recorded by process 0;
- ``copy``: a source array, renamed or with its axes permuted, that the writer can copy as
  stored (encoded chunks reused; the writer says so through ``can_copy``);
- ``decode``: an expression evaluated in slabs laid on the source's chunk grid, each of at
  most ``slab_bytes``, and encoded again (casts, stacking, axis orders a format cannot
  express, a chunk grid other than the source's);
- ``layers``: every layer unstacked from one stacked array, written from the same slabs so
  that each source chunk is decoded once for all the layers it holds.

The work is cut into pieces (a chunk key for copies, a slab's bounds for the rest) and the
pieces are split between ``num_processes`` processes by bytes, copies and decoding each in
contiguous runs, in plan order. A one-process conversion is the case ``num_processes=1``:
every piece goes to process 0, so single- and multi-process conversions run the same
schedule through the same executor (:mod:`ckptconv.convert.execute`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence

from ..errors import PlanError
from ..io import KeyPath, Leaf, choose_chunk_shape, dtype_itemsize
from ..io.sources import CheckpointSource
from .expr import Cast, Expr, Src, Take, permuted_source, slab_boxes, source_chunk_box
from .layouts import OutLeaf
from .plan import Plan

DEFAULT_SLAB_BYTES = 64 << 20
# Decoded outputs are stored in chunks of at most this size, which tile the slabs (so a chunk
# is written by one slab only, never read back).
OUT_CHUNK_BYTES = 8 << 20

Bounds = tuple[tuple[int, int], ...]
CanCopy = Callable[[CheckpointSource, KeyPath, Sequence[int]], bool]


@dataclasses.dataclass(frozen=True)
class Piece:
    """One unit of work and the process that does it.

    Attributes:
        key: a source chunk key (relative to the array) for a copy; the slab's
            ``((start, stop), ...)`` bounds for a decoded array or a stack of layers.
        nbytes: its decoded size, which the split balances.
        process: the process that writes it.
    """

    key: str | Bounds
    nbytes: int
    process: int = 0

    @property
    def index(self) -> tuple[slice, ...]:
        """The slab as slices (decode and layers pieces)."""
        return tuple(slice(a, b) for a, b in self.key)  # type: ignore[misc]


@dataclasses.dataclass(frozen=True)
class Task:
    """One output leaf, or the layers unstacked from one array, and its pieces.

    Attributes:
        kind: ``"empty"``, ``"copy"``, ``"decode"`` or ``"layers"`` (see the module doc).
        leaves: the output leaves: one, or every layer of a ``"layers"`` task.
        pieces: the work, in the order it is done.
        source: for a copy, the source array and the axis permutation.
        chunks: for ``decode`` and ``layers``, each leaf's output chunk shape.
        stacked: for ``layers``, the stacked expression and its layer axis.
    """

    kind: str
    leaves: tuple[OutLeaf, ...]
    pieces: tuple[Piece, ...] = ()
    source: tuple[Src, tuple[int, ...]] | None = None
    chunks: tuple[tuple[int, ...], ...] = ()
    stacked: tuple[Expr, int] | None = None

    @property
    def writers(self) -> frozenset[int]:
        """The processes that declare the leaves: those with a piece, else process 0 alone."""
        return frozenset(p.process for p in self.pieces) or frozenset({0})

    def pieces_of(self, process: int) -> list[Piece]:
        """The pieces ``process`` writes."""
        return [p for p in self.pieces if p.process == process]


def schedule(
    plan: Plan,
    source: CheckpointSource,
    *,
    can_copy: CanCopy | None,
    num_processes: int = 1,
    slab_bytes: int = DEFAULT_SLAB_BYTES,
    chunks: Mapping[KeyPath, Sequence[int]] | None = None,
) -> list[Task]:
    """Decides how every output leaf of ``plan`` is written, and splits the work.

    Every process of a multi-process conversion computes the same schedule from the same
    inputs.

    Example:
        >>> with CheckpointWriter("nnx_ckpt") as writer:  # doctest: +SKIP
        ...     tasks = schedule(plan, source, can_copy=writer.can_copy)

    Args:
        plan: the conversion plan.
        source: the source checkpoint (metadata and chunk listings are read).
        can_copy: the writer's answer to "can you copy this source array with these axes
            verbatim?"; ``None`` decodes everything (the reference path).
        num_processes: how many processes share the work.
        slab_bytes: the largest decoded slab held at once, in bytes.
        chunks: the stored chunk shape of some output leaves, by path (e.g. one device's
            shard, to pre-shard for a mesh). Such a leaf is copied only when the source's
            chunk grid, permuted, already is that shape; otherwise it is decoded on its own
            (never grouped with the other layers of its stack), in slabs made of whole
            output chunks (and of whole source chunks when both fit in ``slab_bytes``). A
            chunk larger than ``slab_bytes`` is written by several slabs. Other leaves get
            chunks of at most ``OUT_CHUNK_BYTES`` that tile their slabs.

    Returns:
        The tasks in plan order, every piece assigned.

    Raises:
        PlanError: ``num_processes`` is below 1.
    """
    if num_processes < 1:
        raise PlanError(f"expected at least one process, found {num_processes}")
    wanted = {tuple(p): tuple(int(c) for c in shape) for p, shape in (chunks or {}).items()}
    copies = {}
    for leaf in plan.leaves:
        found = None if leaf.expr is None or can_copy is None else permuted_source(leaf.expr)
        if (
            found is not None
            and _keeps_chunks(source, found, wanted.get(leaf.path))
            and can_copy(source, found[0].path, found[1])
        ):
            copies[leaf.path] = found
    groups = _layer_groups([o for o in plan.leaves if o.path not in copies | wanted.keys()])
    drafts: list[Task] = []
    finished: set[KeyPath] = set()
    for out in plan.leaves:
        if out.path in finished:
            continue
        if out.expr is None:
            task = Task("empty", (out,))
        elif out.path in copies:
            found = copies[out.path]
            task = Task("copy", (out,), _copied_chunks(source, found[0]), source=found)
        elif out.path in groups:
            task = _layers_task(source, tuple(groups[out.path]), slab_bytes)
        else:
            task = _decode_task(source, out, slab_bytes, wanted.get(out.path))
        drafts.append(task)
        finished.update(leaf.path for leaf in task.leaves)
    return _split(drafts, num_processes)


def _split(drafts: list[Task], num_processes: int) -> list[Task]:
    """Assigns every piece: copies and decoding each split by bytes in contiguous runs."""
    owners: dict[tuple[int, int], int] = {}
    for kinds in (("copy",), ("decode", "layers")):
        refs = [
            (t, j) for t, d in enumerate(drafts) if d.kind in kinds for j in range(len(d.pieces))
        ]
        sizes = [drafts[t].pieces[j].nbytes for t, j in refs]
        owners.update(zip(refs, _assign(sizes, num_processes), strict=True))
    return [
        dataclasses.replace(
            task,
            pieces=tuple(
                dataclasses.replace(p, process=owners[(t, j)]) for j, p in enumerate(task.pieces)
            ),
        )
        for t, task in enumerate(drafts)
    ]


def _assign(sizes: list[int], num_processes: int) -> list[int]:
    """Splits a sequence of sizes into ``num_processes`` contiguous runs of about equal sum.

    Each item goes to the process whose share holds the item's midpoint.
    """
    total = sum(sizes)
    out = []
    before = 0
    for size in sizes:
        owner = (2 * before + size) * num_processes // (2 * total) if total else 0
        out.append(min(num_processes - 1, owner))
        before += size
    return out


def _bounds(index: tuple[slice, ...]) -> Bounds:
    return tuple((s.start, s.stop) for s in index)


def _itemsize(dtype: str) -> int:
    return dtype_itemsize(dtype)


def nbytes(expr: Expr) -> int:
    """Decoded bytes of an expression's value."""
    return Leaf((), tuple(expr.shape), expr.dtype).nbytes


def _copied_chunks(source: CheckpointSource, src: Src) -> tuple[Piece, ...]:
    """The stored chunks of a copied source array, with their decoded bytes.

    Keys that are not chunks of the grid (kept as they are by a copy) count 0 bytes.
    """
    leaf = source.leaves()[src.path]
    chunk = source.chunk_shape(src.path)
    itemsize = _itemsize(leaf.dtype)  # type: ignore[arg-type]
    out = []
    for key in source.chunk_keys(src.path):  # type: ignore[attr-defined]
        index = source.chunk_index(src.path, key)  # type: ignore[attr-defined]
        extent = 0
        if index is not None:
            extent = itemsize * math.prod(
                max(0, min(c, d - i * c)) for i, c, d in zip(index, chunk, leaf.shape, strict=True)
            )
        out.append(Piece(key, extent))
    return tuple(out)


def slab_shape(
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


def tile_shape(slab: tuple[int, ...], itemsize: int, max_bytes: int = OUT_CHUNK_BYTES):
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


def _keeps_chunks(
    source: CheckpointSource, found: tuple[Src, tuple[int, ...]], chunk: tuple[int, ...] | None
) -> bool:
    """Whether copying ``found`` gives the wanted chunk shape (``None``: any is fine)."""
    if chunk is None:
        return True
    stored = source.chunk_shape(found[0].path)
    return tuple(stored[a] for a in found[1]) == chunk


def aligned_slab_shape(
    shape: tuple[int, ...],
    box: tuple[int, ...],
    chunk: tuple[int, ...],
    itemsize: int,
    slab_bytes: int,
) -> tuple[int, ...]:
    """A slab shape made of whole output chunks ``chunk``, read from source chunks ``box``.

    When a cell covering whole source and output chunks (their least common multiple on
    each axis, clipped to the array) fits in ``slab_bytes``, slabs are made of such cells;
    otherwise of whole output chunks; an output chunk larger than the budget is split.

    Example:
        >>> aligned_slab_shape((8, 8), (8, 2), (4, 4), 4, 64)
        (4, 4)
        >>> aligned_slab_shape((8, 8), (8, 2), (4, 4), 4, 1024)
        (8, 8)
    """
    joint = tuple(min(d, math.lcm(b, c)) for d, b, c in zip(shape, box, chunk, strict=True))
    if math.prod(joint) * itemsize <= slab_bytes:
        return slab_shape(shape, joint, itemsize, slab_bytes)
    return slab_shape(
        shape, tuple(min(d, c) for d, c in zip(shape, chunk, strict=True)), itemsize, slab_bytes
    )


def streamed_slabs(
    expr: Expr, chunk_of: Callable[[KeyPath], Sequence[int]], slab_bytes: int
) -> list[tuple[slice, ...]] | None:
    """Slabs of ``expr`` that read each large source chunk once, front to back.

    When ``expr`` is one source array (as stored, with its axes permuted, or cast) whose chunk
    holds more than ``slab_bytes`` (in the larger of both dtypes), each chunk is cut into runs
    of whole rows in C order (leading axes split first), chunk after chunk. The reader streams
    such runs
    (:mod:`ckptconv.io._stream`), so the chunk is decoded once and never held whole.

    Example:
        >>> src = Src(("w",), (4, 6), "float32")
        >>> streamed_slabs(MoveAxis(src, 1, 0), lambda p: (4, 6), 48)[:2]
        [(slice(0, 6, None), slice(0, 2, None)), (slice(0, 6, None), slice(2, 4, None))]

    Returns:
        The slabs in ``expr``'s coordinates, or ``None`` when slabs made of whole chunks do.
    """
    found = permuted_source(expr.x if isinstance(expr, Cast) else expr)
    if found is None:
        return None
    src, axes = found
    chunk = tuple(chunk_of(src.path))
    itemsize = max(_itemsize(src.dtype), _itemsize(expr.dtype))
    if math.prod(chunk) * itemsize <= slab_bytes:
        return None
    run = choose_chunk_shape(chunk, itemsize, slab_bytes)
    out = []
    for cell in slab_boxes(src.shape, chunk):
        for sub in slab_boxes([s.stop - s.start for s in cell], run):
            box = [
                slice(c.start + s.start, c.start + s.stop) for c, s in zip(cell, sub, strict=True)
            ]
            out.append(tuple(box[a] for a in axes))
    return out


def _extent(index: tuple[slice, ...]) -> tuple[int, ...]:
    return tuple(s.stop - s.start for s in index)


def _decode_task(
    source: CheckpointSource, out: OutLeaf, slab_bytes: int, chunk: tuple[int, ...] | None
) -> Task:
    expr: Expr = out.expr  # type: ignore[assignment]
    itemsize = _itemsize(expr.dtype)
    boxes = streamed_slabs(expr, source.chunk_shape, slab_bytes)
    if boxes is not None:
        chunk = chunk or tile_shape(_extent(boxes[0]), itemsize)
    else:
        box = source_chunk_box(expr, source.chunk_shape)
        if chunk is None:
            slab = slab_shape(expr.shape, box, itemsize, slab_bytes)
            chunk = tile_shape(slab, itemsize)
        else:
            slab = aligned_slab_shape(expr.shape, box, chunk, itemsize, slab_bytes)
        boxes = slab_boxes(expr.shape, slab)
    pieces = tuple(Piece(_bounds(index), math.prod(_extent(index)) * itemsize) for index in boxes)
    return Task("decode", (out,), pieces, chunks=(chunk,))


def layer_of(expr: Expr | None) -> tuple[Expr, int, int, str | None] | None:
    """``(stack, axis, index, cast dtype)`` when ``expr`` is one layer of a stacked array."""
    dtype = None
    if isinstance(expr, Cast):
        expr, dtype = expr.x, expr.dtype
    if isinstance(expr, Take):
        return expr.x, expr.axis, expr.index, dtype
    return None


def _layer_groups(leaves: list[OutLeaf]) -> dict[KeyPath, list[OutLeaf]]:
    """Groups the output leaves that are layers of one stacked expression (unstacking).

    Returns:
        For every leaf of a group of two or more, the group's leaves in plan order.
    """
    found: dict[tuple, list[OutLeaf]] = {}
    for leaf in leaves:
        layer = layer_of(leaf.expr)
        if layer is not None:
            stacked, axis, _, dtype = layer
            found.setdefault((stacked, axis, dtype), []).append(leaf)
    return {leaf.path: group for group in found.values() if len(group) > 1 for leaf in group}


def _layers_task(source: CheckpointSource, group: tuple[OutLeaf, ...], slab_bytes: int) -> Task:
    """Slabs of the stacked array, each worth the bytes of the group's layers it holds."""
    stacked, axis, _, _ = layer_of(group[0].expr)  # type: ignore[misc]
    wanted = {layer_of(leaf.expr)[2] for leaf in group}  # type: ignore[index]
    itemsize = _itemsize(stacked.dtype)
    boxes = streamed_slabs(stacked, source.chunk_shape, slab_bytes)
    if boxes is None:
        box = source_chunk_box(stacked, source.chunk_shape)
        boxes = slab_boxes(stacked.shape, slab_shape(stacked.shape, box, itemsize, slab_bytes))
    slab = _extent(boxes[0])
    out_slab = slab[:axis] + slab[axis + 1 :]
    pieces = []
    for index in boxes:
        held = index[axis]
        layers = sum(1 for i in range(held.start, held.stop) if i in wanted)
        per_layer = math.prod(s.stop - s.start for a, s in enumerate(index) if a != axis)
        if layers:
            pieces.append(Piece(_bounds(index), layers * per_layer * itemsize))
    chunks = tuple(tile_shape(out_slab, _itemsize(leaf.expr.dtype)) for leaf in group)  # type: ignore[union-attr]
    return Task("layers", group, tuple(pieces), chunks=chunks, stacked=(stacked, axis))
