"""Converting one checkpoint with several processes, on one host or many.

Every process reads the source's metadata and computes the same plan, then the same split of
the work (:func:`split_work`): the chunks of arrays that are copied without decoding, and the
slabs of arrays that are decoded (casts, stacking, unstacking), each class divided between the
processes by bytes, in plan order, so that each process gets about ``1/N`` of the copying and
``1/N`` of the decoding, in contiguous runs. Each process writes its share into its own OCDBT
database inside the checkpoint being written (``ocdbt.process_<i>/``, as Orbax lays out a
multi-process save; see :mod:`ckptconv.io.multiprocess`). After a barrier, process 0 joins the
databases under the root ``manifest.ocdbt`` (by reference), checks that every chunk of every
array was written, writes the metadata and the commit marker, and renames the checkpoint into
place, exactly as a single-process conversion does. The values are the same, bit for bit, as
those :func:`~ckptconv.convert.convert` writes.

If a process fails, it records why before stopping; the others stop at their next check (at
least once per slab or copied array) with ``process <i> of <n> failed: <reason>``, process 0
deletes the unfinished folder, and nothing is committed. Every wait gives up once no process
has made progress for the group's timeout. A process killed outright is noticed by
jax.distributed after its heartbeat timeout, which then terminates the others (see
:mod:`._group`; ``ckptconv launch`` stops them at once); the unfinished
``.<name>.ckptconv-tmp-<hex>`` folder then stays, as after a killed single-process run.

Limits: the single-process fast path that clones the source's data files (``cp``-like) is not
used: each process reads and rewrites its chunks' stored bytes instead, which is several times
slower than the clone (see BENCHMARKS.md): run conversions that only rename and move axes in
one process. Every process must see the source and the destination folder at the same paths.
Start the processes with ``ckptconv launch`` on one host, or with any launcher that sets the
jax.distributed settings (``--coordinator``, ``--num-processes``, ``--process-id``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator

from ..errors import CkptconvError, DestinationExistsError, PlanError
from ..io import CheckpointReader, Location
from ..io import _format as fmt
from ..io._copy import plan_copy
from ..io._permute import ChunkKeys
from ..io.multiprocess import MergingWriter, ProcessStoreWriter
from ._group import (
    DEFAULT_TIMEOUT,
    GroupStoppedError,
    ProcessGroup,
    ProcessGroupError,
    initialize,
)
from .expr import Src, permuted_source, slab_boxes, source_chunk_box
from .layouts import OutLeaf
from .plan import DEFAULT_OPTIONS, ConvertOptions, Plan, require_target
from .run import (
    _INFLIGHT_BYTES,
    _OUT_CHUNK_BYTES,
    DEFAULT_SLAB_BYTES,
    ConvertResult,
    Progress,
    _check_paths,
    _key_impl,
    _layer_groups,
    _layer_of,
    _return_freed_memory,
    _slab_shape,
    _write_decoded,
    _write_layers,
    convert,
    make_plan,
    peak_rss_bytes,
)

__all__ = [
    "ConversionInterrupted",
    "DistributedResult",
    "GroupStoppedError",
    "Piece",
    "ProcessGroup",
    "ProcessGroupError",
    "ProcessSettings",
    "Task",
    "convert_distributed",
    "convert_in_processes",
    "initialize",
    "split_work",
]

# How long process 0, failing, waits for the others to stop writing before deleting the folder
# (a process that died never says so; launch sends SIGKILL 3 s after SIGTERM).
_STOP_WAIT_SECONDS = 2.0

SlabKey = tuple[tuple[int, int], ...]


@dataclasses.dataclass(frozen=True)
class Piece:
    """One unit of work and the process that does it.

    Attributes:
        key: a source chunk key (relative to the array) for a copy; the slab's
            ``((start, stop), ...)`` bounds for a decoded array or a stack of layers.
        nbytes: its size (decoded bytes), which the split balances.
        process: the process that writes it.
    """

    key: str | SlabKey
    nbytes: int
    process: int


@dataclasses.dataclass(frozen=True)
class Task:
    """One output leaf, or the layers unstacked from one array, and its pieces.

    Attributes:
        kind: ``"empty"`` (no data), ``"copy"`` (chunks copied verbatim), ``"decode"``
            (slabs evaluated and encoded) or ``"layers"`` (slabs of a stacked array, each split
            among the layers it holds).
        leaves: the output leaves: one, or every layer of a ``"layers"`` task.
        pieces: the work, in the order it is done.
        source: for a copy, the source array and the axis permutation.
    """

    kind: str
    leaves: tuple[OutLeaf, ...]
    pieces: tuple[Piece, ...] = ()
    source: tuple[Src, tuple[int, ...]] | None = None

    @property
    def writers(self) -> frozenset[int]:
        """The processes that declare the leaves: those with a piece, else process 0 alone."""
        return frozenset(p.process for p in self.pieces) or frozenset({0})


@dataclasses.dataclass(frozen=True)
class DistributedResult(ConvertResult):
    """What one process of a multi-process conversion did (its share; see ConvertResult).

    Attributes:
        process_id: this process's index.
        num_processes: how many processes converted.
    """

    process_id: int = 0
    num_processes: int = 1

    def to_dict(self) -> dict:
        """Returns a JSON-serialisable summary of this process's share (``--json``)."""
        return {
            **super().to_dict(),
            "process_id": self.process_id,
            "num_processes": self.num_processes,
        }


@dataclasses.dataclass(frozen=True)
class ProcessSettings:
    """How to join a multi-process conversion (see :func:`initialize`).

    Attributes:
        coordinator: ``HOST:PORT`` of process 0; ``None`` reads ``JAX_COORDINATOR_ADDRESS``.
        num_processes: how many processes; ``None`` reads ``JAX_NUM_PROCESSES``, else asks
            the cluster environment (SLURM, Open MPI, ...) as jax.distributed does.
        process_id: this process's index; ``None`` reads ``JAX_PROCESS_ID``, else asks the
            cluster environment.
        timeout: seconds any wait goes on while no process makes progress.
    """

    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    timeout: float = DEFAULT_TIMEOUT


class ConversionInterrupted(CkptconvError):
    """This process was asked to stop (SIGTERM) in the middle of a conversion.

    Attributes:
        exit_code: the CLI's exit status for it, as for a process killed by SIGTERM (143).
    """

    exit_code = 128 + signal.SIGTERM


def _bounds(index: tuple[slice, ...]) -> SlabKey:
    return tuple((s.start, s.stop) for s in index)


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


def split_work(
    plan: Plan,
    reader: CheckpointReader,
    num_processes: int,
    *,
    slab_bytes: int = DEFAULT_SLAB_BYTES,
) -> list[Task]:
    """Splits a plan's work between processes, the same way in every process.

    Leaves are handled as :func:`~ckptconv.convert.convert` handles them (empty, copied,
    decoded, or unstacked together), with its slab shapes. Copied chunks and decoded slabs are
    two classes, each divided by bytes into contiguous runs, one per process; empty leaves
    (no data) go to process 0.

    Example:
        >>> tasks = split_work(make_plan(reader, "linen-to-nnx"), reader, 4)
        >>> sum(p.nbytes for t in tasks for p in t.pieces if p.process == 2)

    Args:
        plan: the conversion plan.
        reader: the source checkpoint (metadata and chunk listings are read).
        num_processes: how many processes share the work.
        slab_bytes: the largest decoded slab, as for :func:`~ckptconv.convert.convert`.

    Returns:
        The tasks in plan order, every piece assigned.
    """
    if num_processes < 1:
        raise PlanError(f"expected at least one process, found {num_processes}")
    copies = {}
    for leaf in plan.leaves:
        found = None if leaf.expr is None else permuted_source(leaf.expr)
        if found is not None:
            copy = plan_copy(reader, found[0].path, found[1], use_zarr3=reader.use_zarr3)
            if copy is not None:
                copies[leaf.path] = found, copy
    groups = _layer_groups([o for o in plan.leaves if o.path not in copies])
    # (kind, leaves, source, [(key, nbytes)]) in plan order.
    drafts: list[tuple[str, tuple[OutLeaf, ...], tuple | None, list[tuple]]] = []
    finished: set[tuple[str, ...]] = set()
    for out in plan.leaves:
        if out.path in finished:
            continue
        if out.expr is None:
            drafts.append(("empty", (out,), None, []))
        elif out.path in copies:
            found, copy = copies[out.path]
            drafts.append(("copy", (out,), found, _copied_chunks(reader, found[0])))
        elif out.path in groups:
            batch = tuple(groups[out.path])
            drafts.append(("layers", batch, None, _layer_slabs(reader, batch, slab_bytes)))
        else:
            drafts.append(("decode", (out,), None, _decoded_slabs(reader, out, slab_bytes)))
        finished.update(leaf.path for leaf in drafts[-1][1])
    owners: dict[tuple[int, int], int] = {}
    for kinds in (("copy",), ("decode", "layers")):
        refs = [(t, j) for t, d in enumerate(drafts) if d[0] in kinds for j in range(len(d[3]))]
        sizes = [drafts[t][3][j][1] for t, j in refs]
        owners.update(zip(refs, _assign(sizes, num_processes), strict=True))
    return [
        Task(
            kind,
            leaves,
            tuple(Piece(key, n, owners[(t, j)]) for j, (key, n) in enumerate(pieces)),
            source,
        )
        for t, (kind, leaves, source, pieces) in enumerate(drafts)
    ]


def _copied_chunks(reader: CheckpointReader, src: Src) -> list[tuple]:
    """The stored chunks of a copied source array, with their decoded bytes.

    Keys that are not chunks of the grid (kept as they are by a copy) count 0 bytes.
    """
    leaf = reader.leaves()[src.path]
    assert leaf.shape is not None and leaf.dtype is not None
    chunk = reader.chunk_shape(src.path)
    itemsize = fmt.numpy_dtype(leaf.dtype).itemsize
    keys = ChunkKeys(reader.zarr_metadata(src.path), zarr3=reader.use_zarr3)
    out = []
    for key in reader.chunk_keys(src.path):
        index = keys.parse(key)
        extent = 0
        if index is not None:
            extent = itemsize * math.prod(
                max(0, min(c, d - i * c)) for i, c, d in zip(index, chunk, leaf.shape, strict=True)
            )
        out.append((key, extent))
    return out


def _decoded_slabs(reader: CheckpointReader, out: OutLeaf, slab_bytes: int) -> list[tuple]:
    """The slabs ``_write_decoded`` writes for ``out``, with their bytes."""
    expr = out.expr
    assert expr is not None
    itemsize = fmt.numpy_dtype(expr.dtype).itemsize
    box = source_chunk_box(expr, reader.chunk_shape)
    slab = _slab_shape(expr.shape, box, itemsize, slab_bytes)
    return [
        (_bounds(index), math.prod(s.stop - s.start for s in index) * itemsize)
        for index in slab_boxes(expr.shape, slab)
    ]


def _layer_slabs(
    reader: CheckpointReader, group: tuple[OutLeaf, ...], slab_bytes: int
) -> list[tuple]:
    """The slabs of the stacked array ``_write_layers`` reads for ``group``, with their bytes.

    A slab's bytes are those of the layers of the group it holds (none: 0).
    """
    layers = set()
    for leaf in group:
        stacked, axis, index, _ = _layer_of(leaf.expr)  # type: ignore[misc]
        layers.add(index)
    itemsize = fmt.numpy_dtype(stacked.dtype).itemsize
    box = source_chunk_box(stacked, reader.chunk_shape)
    slab = _slab_shape(stacked.shape, box, itemsize, slab_bytes)
    out = []
    for index in slab_boxes(stacked.shape, slab):
        held = index[axis]
        wanted = sum(1 for i in range(held.start, held.stop) if i in layers)
        per_layer = math.prod(s.stop - s.start for a, s in enumerate(index) if a != axis)
        out.append((_bounds(index), wanted * per_layer * itemsize))
    return out


def _only(task: Task, process_id: int, tick: Callable[[], None]) -> Callable[[tuple], bool]:
    """The slab filter handed to the writing functions: this process's slabs of ``task``."""
    owners = {p.key: p.process for p in task.pieces}

    def only(index: tuple[slice, ...]) -> bool:
        key = _bounds(index)
        if key not in owners:
            # The split mirrors the slab shapes of run.py; a slab it does not know would be
            # written by nobody.
            raise PlanError(
                f"{'/'.join(task.leaves[0].path)}: slab {key} is not in the work split "
                "(the split and the writer disagree on slab shapes)"
            )
        if owners[key] != process_id:
            return False
        tick()
        return True

    return only


def _write_share(
    writer: ProcessStoreWriter,
    reader: CheckpointReader,
    tasks: list[Task],
    group: ProcessGroup,
    slab_bytes: int,
    progress: Progress | None,
) -> tuple[int, int]:
    """Writes this process's pieces of every task; returns (bytes, copied leaves)."""
    rank = group.process_id

    def tick() -> None:
        group.check()
        group.report_progress()

    total = sum(p.nbytes for t in tasks for p in t.pieces if p.process == rank)
    decoded = sum(
        p.nbytes for t in tasks if t.kind != "copy" for p in t.pieces if p.process == rank
    )
    if decoded > _OUT_CHUNK_BYTES:
        _return_freed_memory()
    done = copied = 0
    for task in tasks:
        mine = [p for p in task.pieces if p.process == rank]
        if not mine and rank not in task.writers:
            continue
        out = task.leaves[0]
        if task.kind == "empty":
            writer.write_empty(out.path, key_types=out.key_types)
        elif task.kind == "copy":
            assert task.source is not None
            src, axes = task.source
            tick()
            writer.copy_array(
                out.path,
                reader,
                src.path,
                axes=axes,
                key_types=out.key_types,
                random_key_impl=_key_impl(reader, out.expr),
                chunks={p.key for p in mine},  # type: ignore[misc]
            )
            copied += 1
        elif task.kind == "decode":
            _write_decoded(writer, reader, out, slab_bytes, only=_only(task, rank, tick))
        else:
            layers = list(task.leaves)
            _write_layers(writer, reader, layers, slab_bytes, only=_only(task, rank, tick))
        done += sum(p.nbytes for p in mine)
        if progress is not None:
            progress(done, total, "/".join(out.path))
    return done, copied


def convert_distributed(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    group: ProcessGroup,
    direction: str = "linen-to-nnx",
    options: ConvertOptions = DEFAULT_OPTIONS,
    force: bool = False,
    target: dict | None = None,
    progress: Progress | None = None,
    slab_bytes: int = DEFAULT_SLAB_BYTES,
) -> DistributedResult:
    """Converts the checkpoint at ``src`` into ``dst``; every process of ``group`` calls this.

    Every process must pass the same arguments (``progress`` aside), and make the same calls
    on ``group`` in the same order. Each returns once the checkpoint is committed (or raises:
    then nothing is committed).

    Example:
        >>> group = initialize()  # settings from the environment, e.g. ckptconv launch
        >>> convert_distributed("ckpt/2/items", "nnx_ckpt", group=group)  # doctest: +SKIP

    Args:
        src: the source checkpoint, as for :func:`~ckptconv.convert.convert`.
        dst: the destination, as for :func:`~ckptconv.convert.convert`.
        group: the processes taking part (see :func:`initialize`).
        direction: ``linen-to-nnx`` or ``nnx-to-linen``.
        options: rules and layouts.
        force: replace an existing destination.
        target: ``{path: (shape, dtype)}`` the output must match; checked before writing.
        progress: called after each task with this process's (bytes done, bytes total, path).
        slab_bytes: the largest slab of a decoded array held at once, in bytes.

    Returns:
        What this process did (its share of the bytes, its own time and peak RSS).

    Raises:
        CkptconvError: for bad input (every process raises it); nothing is written.
        GroupStoppedError: another process failed, or the processes stopped making progress.
    """
    start = time.perf_counter()
    group = group.subgroup()  # this conversion's own keys, so that a group can be reused
    writer: ProcessStoreWriter | None = None
    merging: MergingWriter | None = None
    try:
        reader = CheckpointReader(src)
        plan = make_plan(reader, direction, options)
        require_target(plan, target)
        dst_loc = Location.parse(dst)
        _check_paths(reader.location, dst_loc)
        if not force and dst_loc.exists():
            raise DestinationExistsError(
                f"{dst_loc}: destination exists; pass --force (force=True) to replace it"
            )
        tasks = split_work(plan, reader, group.num_processes, slab_bytes=slab_bytes)
        # Every process has checked its input before anything is created (on an object store
        # the destination is written in place, so a late check would find process 0's write).
        group.barrier("planned")
        if group.is_leader:
            merging = MergingWriter(
                dst_loc,
                force=force,
                use_zarr3=reader.use_zarr3,
                custom_metadata=plan.custom_metadata,
                max_inflight_bytes=_INFLIGHT_BYTES,
            )
            folder = merging.folder
            group.publish("folder", str(folder))
        else:
            folder = Location.parse(group.wait_for("folder"))
        writer = ProcessStoreWriter(
            folder,
            group.process_id,
            use_zarr3=reader.use_zarr3,
            max_inflight_bytes=_INFLIGHT_BYTES,
        )
        done, copied = _write_share(writer, reader, tasks, group, slab_bytes, progress)
        writer.commit()
        group.barrier("written")
        if merging is not None:
            shapes = {o.path: o.expr.shape for o in plan.leaves if o.expr is not None}
            merging.merge(range(group.num_processes), shapes=shapes)
            merging.commit()
            group.publish("committed", str(dst_loc))
        else:
            group.wait_for("committed")
    except GroupStoppedError:
        _stop(group, writer, merging)
        raise
    except BaseException as e:
        reason = fmt.one_line(e) if isinstance(e, CkptconvError) else f"{type(e).__name__}: {e}"
        group.fail(reason)
        _stop(group, writer, merging)
        raise
    return DistributedResult(
        plan,
        str(dst_loc),
        time.perf_counter() - start,
        done,
        peak_rss_bytes(),
        copied_leaves=copied,
        cloned=False,
        process_id=group.process_id,
        num_processes=group.num_processes,
    )


def _stop(
    group: ProcessGroup, writer: ProcessStoreWriter | None, merging: MergingWriter | None
) -> None:
    """Discards this process's writing; process 0 then deletes the unfinished folder."""
    if writer is not None:
        writer.abort()
    group.stopped()
    if merging is not None:
        group.wait_stopped(_STOP_WAIT_SECONDS)
        merging.abort()
    elif writer is not None:
        # Process 0 may have deleted the folder already; writes still in flight here may have
        # made it again, empty but for this process's folder, now deleted.
        _remove_if_empty(writer.location.parent)


def _remove_if_empty(folder: Location) -> None:
    if folder.local_path is not None:
        with contextlib.suppress(OSError):
            os.rmdir(folder.local_path)


@contextlib.contextmanager
def _sigterm_raises(group: ProcessGroup) -> Iterator[None]:
    """Turns SIGTERM into :class:`ConversionInterrupted`, so the writers clean up."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise ConversionInterrupted(
            f"process {group.process_id} of {group.num_processes} was terminated (SIGTERM)"
        )

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def convert_in_processes(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    processes: ProcessSettings,
    **kwargs,
) -> ConvertResult:
    """Joins the multi-process job ``processes`` describes and converts (the CLI's entry).

    With one process this is :func:`~ckptconv.convert.convert` (fast path included).

    Args:
        src: the source checkpoint.
        dst: the destination.
        processes: the jax.distributed settings.
        **kwargs: the other arguments of :func:`convert_distributed`.

    Returns:
        What this process did.

    Raises:
        CkptconvError: see :func:`convert_distributed`; also :class:`ConversionInterrupted`
            when this process receives SIGTERM (its writing is discarded first).
    """
    if processes.num_processes == 1:
        return convert(src, dst, **kwargs)
    group = initialize(
        processes.coordinator,
        processes.num_processes,
        processes.process_id,
        timeout=processes.timeout,
    )
    if group.num_processes == 1:
        return convert(src, dst, **kwargs)
    with _sigterm_raises(group):
        return convert_distributed(src, dst, group=group, **kwargs)
