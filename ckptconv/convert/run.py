"""Executing a conversion plan: stream one output leaf (or one layer of it) at a time.

The source is only read. The destination is written by :class:`~ckptconv.io.CheckpointWriter`
into a temporary sibling that is renamed into place only once complete, so an interrupted
conversion never leaves a destination that looks complete.
"""

from __future__ import annotations

import dataclasses
import os
import resource
import time
from collections.abc import Callable

import numpy as np

from ..errors import DestinationExistsError, PlanError
from ..io import CheckpointReader, CheckpointWriter, Location
from .expr import Stack, evaluate
from .plan import (
    DEFAULT_OPTIONS,
    ConvertOptions,
    Plan,
    check_against,
    plan_linen_to_nnx,
    plan_nnx_to_linen,
)

Progress = Callable[[int, int, str], None]
"""Called after each leaf with (bytes done, bytes total, leaf path)."""


@dataclasses.dataclass(frozen=True)
class ConvertResult:
    """What a conversion did.

    Attributes:
        plan: the executed plan.
        destination: where the output was written (``None`` for a dry run).
        seconds: wall time of the write.
        bytes_written: array bytes written.
        peak_rss_bytes: the process's peak resident set size so far.
    """

    plan: Plan
    destination: str | None
    seconds: float
    bytes_written: int
    peak_rss_bytes: int

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
        }


def peak_rss_bytes() -> int:
    """Returns this process's peak resident set size in bytes (Linux ``ru_maxrss``)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _check_paths(src: Location, dst: Location) -> None:
    if src.local_path is not None and dst.local_path is not None:
        s = os.path.realpath(src.local_path)
        d = os.path.realpath(dst.local_path)
        if d == s or d.startswith(s.rstrip(os.sep) + os.sep):
            raise DestinationExistsError(
                f"{dst}: the destination must not be the source or lie inside it ({src})"
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

    Returns:
        What was done.

    Raises:
        CkptconvError: for bad input; the destination is then untouched.

    Example:
        >>> convert("ckpt/2/items", "nnx_ckpt")  # doctest: +SKIP
    """
    reader = CheckpointReader(src)
    plan = make_plan(reader, direction, options)
    if target is not None:
        problems = check_against(plan.output_leaves(), target)
        if problems:
            shown = "; ".join(str(p) for p in problems[:5])
            more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
            raise PlanError(f"output does not match the target: {shown}{more}")
    if dst is None:
        return ConvertResult(plan, None, 0.0, 0, peak_rss_bytes())
    dst_loc = Location.parse(dst)
    _check_paths(reader.location, dst_loc)
    start = time.perf_counter()
    total = plan.nbytes
    done = 0
    with CheckpointWriter(
        dst_loc, force=force, use_zarr3=reader.use_zarr3, custom_metadata=plan.custom_metadata
    ) as writer:
        for out in plan.leaves:
            if out.expr is None:
                writer.write_empty(out.path, key_types=out.key_types)
                continue
            expr = out.expr
            key_impl = _key_impl(reader, expr)
            if isinstance(expr, Stack):
                # Stream a stack layer by layer: memory holds one layer, not the stack.
                handle = writer.create(
                    out.path,
                    expr.shape,
                    expr.dtype,
                    key_types=out.key_types,
                    random_key_impl=key_impl,
                )
                for i, x in enumerate(expr.xs):
                    layer = np.expand_dims(evaluate(x, reader.read), expr.axis)
                    index = (slice(None),) * expr.axis + (slice(i, i + 1),)
                    handle.write(index, layer)
            else:
                writer.write(
                    out.path,
                    evaluate(expr, reader.read),
                    key_types=out.key_types,
                    random_key_impl=key_impl,
                )
            done += _nbytes(expr.shape, expr.dtype)
            if progress is not None:
                progress(done, total, "/".join(out.path))
    return ConvertResult(plan, str(dst_loc), time.perf_counter() - start, done, peak_rss_bytes())


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
