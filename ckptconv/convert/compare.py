"""Comparing two checkpoints leaf by leaf, across layouts.

The second checkpoint is mapped onto the first one's layout with the same plans the converter
uses (so a Linen checkpoint compares with its NNX conversion), then every matched leaf is read
one at a time and compared: bit-exact by default, or within ``atol``/``rtol``.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from ..errors import LayoutError
from ..io.leaf import KeyPath, Leaf, keystr
from ..io.sources import CheckpointSource, open_source
from .expr import Expr, Src, evaluate
from .layouts import matching_layouts
from .mapping import Mapping
from .plan import ConvertOptions, parse_source, plan_linen_to_nnx, plan_nnx_to_linen, recorded_info
from .rules import is_scanned


@dataclasses.dataclass(frozen=True)
class LeafDiff:
    """The comparison of one matched leaf."""

    path: str
    shape_a: tuple[int, ...] | None
    shape_b: tuple[int, ...] | None
    dtype_a: str | None
    dtype_b: str | None
    max_abs_diff: float
    bit_exact: bool
    within_tolerance: bool


@dataclasses.dataclass(frozen=True)
class CompareResult:
    """Result of :func:`compare`."""

    a: str
    b: str
    leaves: list[LeafDiff]
    only_in_a: list[str]
    only_in_b: list[str]

    @property
    def equal(self) -> bool:
        """Whether every leaf matched and agreed within tolerance."""
        return (
            not self.only_in_a
            and not self.only_in_b
            and all(d.within_tolerance for d in self.leaves)
        )

    @property
    def bit_exact(self) -> bool:
        """Whether every leaf matched with identical bytes."""
        return self.equal and all(d.bit_exact for d in self.leaves)

    def to_dict(self) -> dict:
        """Returns a JSON-serialisable report."""
        return {**dataclasses.asdict(self), "equal": self.equal, "bit_exact": self.bit_exact}


def _view_b_as_a(
    ra: CheckpointSource, rb: CheckpointSource, mapping: Mapping | None = None
) -> dict[KeyPath, Expr | None]:
    """Maps B's leaves onto A's layout: ``{path in A's layout: expression over B}``."""
    la, lb = ra.leaves(), rb.leaves()
    layout_b = mapping.layout if mapping else None
    tree_a = parse_source(la, ra.custom_metadata, None, str(ra.location))
    name_a = tree_a.info["source_layout"]
    name_b = parse_source(lb, rb.custom_metadata, layout_b, str(rb.location)).info["source_layout"]
    if mapping is not None and (name_a != "nnx" or name_b == "nnx"):
        raise LayoutError(
            f"{rb.location}: --mapping maps a Linen checkpoint onto an NNX one; found "
            f"{name_a} and {name_b}"
        )
    if name_a == name_b:
        return {
            p: (None if leaf.empty else Src(p, leaf.shape, leaf.dtype)) for p, leaf in lb.items()
        }
    scanned = is_scanned(tree_a)
    info_a = recorded_info(ra.custom_metadata)
    if name_a == "nnx" and mapping is not None:
        plan = plan_linen_to_nnx(lb, rb.custom_metadata, ConvertOptions(mapping=mapping))
    elif name_a == "nnx":
        opts = ConvertOptions(scan_layers=scanned, nnx_scan_axis=info_a.get("nnx_scan_axis"))
        plan = plan_linen_to_nnx(lb, rb.custom_metadata, opts, where=str(rb.location))
    elif name_b == "nnx":
        opts = ConvertOptions(target_layout=name_a, scan_layers=scanned)
        plan = plan_nnx_to_linen(lb, rb.custom_metadata, opts, where=str(rb.location))
    else:
        raise LayoutError(
            f"{rb.location}: cannot compare a {name_b} checkpoint with a {name_a} one "
            "directly; convert one of them to nnx first"
        )
    return {o.path: o.expr for o in plan.leaves}


def _is_nnx(source: CheckpointSource) -> bool:
    return [m.name for m in matching_layouts(source.leaves())] == ["nnx"]


SLAB_BYTES = 64 << 20
"""Bytes of one side of a leaf read at a time: memory does not grow with the largest array."""


def _compare_leaf(
    ra: CheckpointSource,
    rb: CheckpointSource,
    path: KeyPath,
    expr: Expr,
    atol: float,
    rtol: float,
) -> tuple[float, bool, bool]:
    """Compares one leaf slab by slab along axis 0: (max |diff|, bit-exact, within tolerance)."""
    shape = expr.shape
    row = max(1, Leaf(path, shape[1:], expr.dtype).nbytes) if shape else 1
    step = max(1, SLAB_BYTES // row)
    diff, exact, ok = 0.0, True, True
    for start in range(0, shape[0], step) if shape else [None]:
        index = None if start is None else (slice(start, min(start + step, shape[0])),)
        x = ra.read(path, index)
        y = evaluate(expr, rb.read, index=index)
        if x.tobytes() == y.tobytes():
            continue
        exact = False
        xf, yf = x.astype(np.float64), y.astype(np.float64)
        if x.size:
            diff = max(diff, float(np.max(np.abs(xf - yf))))
        close = bool(np.allclose(yf, xf, atol=atol, rtol=rtol, equal_nan=True))
        ok = ok and close and (atol > 0 or rtol > 0)
    return diff, exact, ok


def compare(
    a: str | os.PathLike,
    b: str | os.PathLike,
    *,
    atol: float = 0.0,
    rtol: float = 0.0,
    mapping: Mapping | None = None,
) -> CompareResult:
    """Compares checkpoint ``b`` with checkpoint ``a``, mapping ``b`` onto ``a``'s layout.

    Args:
        a: the reference checkpoint.
        b: the checkpoint to compare (any layout convertible to ``a``'s).
        atol: absolute tolerance (0: bit-exact comparison).
        rtol: relative tolerance.
        mapping: a mapping file's rules from the Linen one of ``a`` and ``b`` onto the NNX
            one (either order): the Linen side is viewed through it.

    Returns:
        The per-leaf report and the unmatched paths.

    Example:
        >>> compare("linen_ckpt", "nnx_ckpt").bit_exact  # doctest: +SKIP
        True
    """
    ra, rb = open_source(a), open_source(b)
    if mapping is not None and _is_nnx(rb) and not _is_nnx(ra):
        swapped = compare(b, a, atol=atol, rtol=rtol, mapping=mapping)
        return dataclasses.replace(
            swapped,
            a=swapped.b,
            b=swapped.a,
            only_in_a=swapped.only_in_b,
            only_in_b=swapped.only_in_a,
        )
    view = _view_b_as_a(ra, rb, mapping)
    la = ra.leaves()
    diffs: list[LeafDiff] = []
    for path in sorted(set(la) & set(view)):
        leaf, expr = la[path], view[path]
        if leaf.empty or expr is None:
            same = leaf.empty and expr is None
            diffs.append(
                LeafDiff(
                    keystr(path),
                    leaf.shape,
                    None if expr is None else expr.shape,
                    leaf.dtype,
                    None if expr is None else expr.dtype,
                    0.0 if same else float("inf"),
                    same,
                    same,
                )
            )
            continue
        if leaf.shape != expr.shape or leaf.dtype != expr.dtype:
            diffs.append(
                LeafDiff(
                    keystr(path),
                    leaf.shape,
                    expr.shape,
                    leaf.dtype,
                    expr.dtype,
                    float("inf"),
                    False,
                    False,
                )
            )
            continue
        diff, exact, ok = _compare_leaf(ra, rb, path, expr, atol, rtol)
        diffs.append(
            LeafDiff(keystr(path), leaf.shape, expr.shape, leaf.dtype, expr.dtype, diff, exact, ok)
        )
    return CompareResult(
        str(ra.location),
        str(rb.location),
        diffs,
        sorted(keystr(p) for p in set(la) - set(view)),
        sorted(keystr(p) for p in set(view) - set(la)),
    )
