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
import functools
import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

from ..errors import CkptconvError, DestinationExistsError, PlanError
from ..io import Location, can_copy_verbatim, one_line
from ..io.multiprocess import MergingWriter, ProcessStoreWriter
from ..io.sources import CheckpointSource, open_source
from ._group import (
    DEFAULT_TIMEOUT,
    GroupStoppedError,
    ProcessGroup,
    ProcessGroupError,
    initialize,
)
from .execute import Progress, execute
from .plan import DEFAULT_OPTIONS, ConvertOptions, Plan, require_target
from .run import INFLIGHT_BYTES, ConvertResult, check_paths, convert, make_plan
from .schedule import DEFAULT_SLAB_BYTES, Piece, Task, schedule

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


def split_work(
    plan: Plan,
    source: CheckpointSource,
    num_processes: int,
    *,
    slab_bytes: int = DEFAULT_SLAB_BYTES,
) -> list[Task]:
    """The schedule every process computes: :func:`~ckptconv.convert.schedule.schedule`.

    Copies are those the processes' writers can make (same zarr format as the source).

    Example:
        >>> tasks = split_work(make_plan(source, "linen-to-nnx"), source, 4)
        >>> sum(p.nbytes for t in tasks for p in t.pieces if p.process == 2)
    """
    return schedule(
        plan,
        source,
        can_copy=functools.partial(can_copy_verbatim, use_zarr3=source.use_zarr3),
        num_processes=num_processes,
        slab_bytes=slab_bytes,
    )


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
    writers: dict[str, Any] = {}  # "merging" (process 0) and "process", once opened
    try:
        source = open_source(src)
        plan = make_plan(source, direction, options)
        require_target(plan, target)
        dst_loc = Location.parse(dst)
        check_paths(source.location, dst_loc)
        if not force and dst_loc.exists():
            raise DestinationExistsError(
                f"{dst_loc}: destination exists; pass --force (force=True) to replace it"
            )
        tasks = split_work(plan, source, group.num_processes, slab_bytes=slab_bytes)
        # Every process has checked its input before anything is created (on an object store
        # the destination is written in place, so a late check would find process 0's write).
        group.barrier("planned")
        writer = _open_writers(group, writers, dst_loc, source, plan, force)

        def tick() -> None:
            group.check()
            group.report_progress()

        done = execute(
            tasks, source, writer, process_id=group.process_id, progress=progress, tick=tick
        )
        _commit_all(group, writers, plan, dst_loc)
    except GroupStoppedError:
        _stop(group, writers.get("process"), writers.get("merging"))
        raise
    except BaseException as e:
        reason = one_line(e) if isinstance(e, CkptconvError) else f"{type(e).__name__}: {e}"
        group.fail(reason)
        _stop(group, writers.get("process"), writers.get("merging"))
        raise
    return DistributedResult.finished(
        plan,
        dst_loc,
        start,
        done,
        process_id=group.process_id,
        num_processes=group.num_processes,
    )


def _open_writers(
    group: ProcessGroup,
    writers: dict[str, Any],
    dst_loc: Location,
    source: CheckpointSource,
    plan: Plan,
    force: bool,
) -> ProcessStoreWriter:
    """Process 0 opens the checkpoint (its folder is published); each opens its own store."""
    if group.is_leader:
        merging = writers["merging"] = MergingWriter(
            dst_loc,
            force=force,
            use_zarr3=source.use_zarr3,
            custom_metadata=plan.custom_metadata,
            max_inflight_bytes=INFLIGHT_BYTES,
        )
        folder = merging.folder
        group.publish("folder", str(folder))
    else:
        folder = Location.parse(group.wait_for("folder"))
    writers["process"] = ProcessStoreWriter(
        folder, group.process_id, use_zarr3=source.use_zarr3, max_inflight_bytes=INFLIGHT_BYTES
    )
    return writers["process"]


def _commit_all(
    group: ProcessGroup, writers: dict[str, Any], plan: Plan, dst_loc: Location
) -> None:
    """Each process commits its store; after a barrier process 0 merges and commits."""
    writers["process"].commit()
    group.barrier("written")
    merging = writers.get("merging")
    if merging is not None:
        shapes = {o.path: o.expr.shape for o in plan.leaves if o.expr is not None}
        merging.merge(range(group.num_processes), shapes=shapes)
        merging.commit()
        group.publish("committed", str(dst_loc))
    else:
        group.wait_for("committed")


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
    if kwargs.pop("output_format", "ocdbt") != "ocdbt":
        # Each process writes its own OCDBT database, joined at commit; per-array folders
        # would need every process to write into the same folders, which is not done yet.
        raise PlanError("--format zarr: supported in one process only; drop --num-processes")
    with _sigterm_raises(group):
        return convert_distributed(src, dst, group=group, **kwargs)
