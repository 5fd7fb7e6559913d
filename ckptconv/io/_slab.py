"""Checking a slab index against an array's shape, as every reader of arrays does."""

from __future__ import annotations

from typing import Any

from ..errors import LayoutError
from . import _format as fmt
from .leaf import KeyPath, keystr


def slab_box(
    where: object, path: KeyPath, index: tuple[slice, ...] | None, shape: tuple[int, ...]
) -> tuple[slice, ...]:
    """Returns ``index`` as explicit in-bounds slices of an array of ``shape``.

    Args:
        where: the checkpoint read (named first in the message).
        path: the array's key path.
        index: a tuple of step-1 slices, missing trailing axes taken whole; ``None`` (or
            ``()``) selects the whole array.
        shape: the array's shape.

    Raises:
        LayoutError: ``index`` does not fit ``shape`` (it is not a tuple of step-1 slices, or
            reaches outside the array).
    """
    box: Any = () if index is None else index
    try:
        return fmt.normalize_index(box, shape)
    except (IndexError, ValueError, TypeError) as e:
        raise LayoutError(
            f"{where}: slab {index!r} does not fit array {keystr(path)} of shape "
            f"{shape}: {fmt.one_line(e)}"
        ) from e
