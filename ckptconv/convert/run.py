"""Converting one checkpoint in one process: plan, schedule, execute, commit.

The schedule (:mod:`ckptconv.convert.schedule`) gives each output leaf one of two paths, and
the executor (:mod:`ckptconv.convert.execute`) runs it; a multi-process conversion
(:mod:`ckptconv.convert.distributed`) runs the same two with N processes:

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
the whole process (see :func:`~ckptconv.convert.execute.return_freed_memory`).
"""

from __future__ import annotations

import dataclasses
import os
import resource
import time
from typing import TYPE_CHECKING, Any

from ..errors import DestinationExistsError, PlanError
from ..io import CheckpointWriter, Location
from ..io.sources import CheckpointSource, open_source
from .execute import Progress, execute
from .plan import (
    DEFAULT_OPTIONS,
    ConvertOptions,
    Plan,
    plan_linen_to_nnx,
    plan_nnx_to_linen,
    require_target,
)
from .schedule import DEFAULT_SLAB_BYTES, schedule

if TYPE_CHECKING:  # ckptconv.sharding builds on this module: its types only
    from ..sharding.reshard import ShardFor

# Writes are committed in transactions of about this many bytes: a slab is written piece by
# piece, so the writer holds a few pieces rather than whole slabs.
INFLIGHT_BYTES = 16 << 20


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
        shardings: the output's shardings (``shard_for``), else ``None``.
    """

    plan: Plan
    destination: str | None
    seconds: float
    bytes_written: int
    peak_rss_bytes: int
    copied_leaves: int = 0
    cloned: bool = False
    shardings: Any = None

    @classmethod
    def finished(cls, plan: Plan, destination, start: float, done, cloned: bool = False, **kw):
        """The result of a write that began at ``start`` (``perf_counter``) and did ``done``."""
        return cls(
            plan,
            str(destination),
            time.perf_counter() - start,
            done.nbytes,
            peak_rss_bytes(),
            copied_leaves=done.copied_leaves,
            cloned=cloned,
            **kw,
        )

    def to_dict(self) -> dict:
        """Returns a JSON-serialisable summary (``--json``)."""
        extra = {} if self.shardings is None else self.shardings.to_dict()
        return extra | {
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


def check_paths(src: Location, dst: Location) -> None:
    """Refuses a destination that is the source, lies inside it, or (object stores) holds it.

    Raises:
        DestinationExistsError: naming both.
    """
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


OUTPUT_FORMATS = {"ocdbt": True, "zarr": False}


def check_output_format(name: str) -> bool:
    """Returns whether ``name`` (``--format``) stores arrays in OCDBT.

    Raises:
        PlanError: an unknown format.
    """
    if name not in OUTPUT_FORMATS:
        raise PlanError(
            f"--format {name}: expected one of {', '.join(OUTPUT_FORMATS)} (the output's storage)"
        )
    return OUTPUT_FORMATS[name]


def make_plan(
    source: CheckpointSource, direction: str, options: ConvertOptions = DEFAULT_OPTIONS
) -> Plan:
    """Plans a conversion of ``source``'s checkpoint in ``direction`` from metadata alone."""
    fn = {"linen-to-nnx": plan_linen_to_nnx, "nnx-to-linen": plan_nnx_to_linen}[direction]
    return fn(source.leaves(), source.custom_metadata, options, where=str(source.location))


def open_writer(
    source: CheckpointSource,
    dst: Location,
    custom_metadata: dict | None,
    *,
    force: bool,
    use_ocdbt: bool,
) -> CheckpointWriter:
    """The writer of a streamed rewrite of ``source`` into ``dst`` (same zarr version)."""
    return CheckpointWriter(
        dst,
        force=force,
        use_zarr3=source.use_zarr3,
        custom_metadata=custom_metadata,
        max_inflight_bytes=INFLIGHT_BYTES,
        use_ocdbt=use_ocdbt,
    )


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
    output_format: str = "ocdbt",
    shard_for: ShardFor | None = None,
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
        output_format: ``"ocdbt"`` (Orbax's default: one database) or ``"zarr"`` (one zarr
            folder per array, ``use_ocdbt=False``, which Pathways needs). Chunks are copied
            verbatim into either where the transform allows.
        shard_for: pre-shard the output for a mesh in the same pass
            (:class:`~ckptconv.sharding.reshard.ShardFor`): each array is stored with one
            chunk per device shard and its ``_sharding``, as ``ckptconv reshard`` writes it.
            The shardings are chosen from the plan's output leaves before anything is written.

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
    use_ocdbt = check_output_format(output_format)
    source = open_source(src)
    plan = make_plan(source, direction, options)
    require_target(plan, target)
    shardings = None if shard_for is None else shard_for.for_plan(plan, source)
    if dst is None:
        return ConvertResult(plan, None, 0.0, 0, peak_rss_bytes(), shardings=shardings)
    dst_loc = Location.parse(dst)
    check_paths(source.location, dst_loc)
    start = time.perf_counter()
    with open_writer(
        source, dst_loc, plan.custom_metadata, force=force, use_ocdbt=use_ocdbt
    ) as writer:
        can_copy, chunks, out = writer.can_copy, None, writer
        if shardings is not None:
            can_copy, chunks = shardings.can_copy(writer, plan), shardings.chunks
            out = shardings.wrap(writer)
        tasks = schedule(
            plan, source, can_copy=can_copy if fast else None, slab_bytes=slab_bytes, chunks=chunks
        )
        copied = [t.source[0].path for t in tasks if t.source is not None]
        cloned = writer.clone_for(source, copied)
        done = execute(tasks, source, out, progress=progress)
    return ConvertResult.finished(plan, dst_loc, start, done, cloned, shardings=shardings)
