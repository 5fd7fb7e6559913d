"""The source protocol: what every readable checkpoint format answers.

A source is one checkpoint, opened lazily: its leaves (path, shape, dtype) come from metadata
alone, and arrays are read one slab at a time. Formats that store encoded chunks which another
checkpoint can reuse verbatim (Orbax OCDBT and zarr folders) also answer the optional copy
capability; callers ask :func:`can_copy_chunks` instead of looking at the format.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np

from ..leaf import KeyPath, Leaf
from ..location import Location


@runtime_checkable
class CheckpointSource(Protocol):
    """A readable checkpoint, in the style of Orbax v1's ``CheckpointLayout``.

    Attributes:
        location: where the checkpoint is (after resolving step folders and the like).
        format_name: the format's registry name (``"ocdbt"``, ``"zarr"``, ``"msgpack"``).
        use_zarr3: the zarr version a converted output keeps by default (``True`` for formats
            without zarr arrays).
        custom_metadata: user metadata saved with the checkpoint (``{}`` when none).
    """

    location: Location
    format_name: str
    use_zarr3: bool
    custom_metadata: Any

    def leaves(self) -> dict[KeyPath, Leaf]:
        """Every leaf with shape and dtype (``None`` shape: an empty leaf), from metadata."""
        ...

    def chunk_shape(self, path: KeyPath) -> tuple[int, ...]:
        """The stored chunk shape of an array: reading any element decodes at least this box."""
        ...

    def ext_metadata(self, path: KeyPath) -> dict[str, Any] | None:
        """Orbax's per-array ``ext_metadata`` (``{"random_key_impl": ...}``), or ``None``."""
        ...

    def read(self, path: KeyPath, index: tuple[slice, ...] | None = None) -> np.ndarray:
        """One array, or one slab of it (a tuple of step-1 slices), in its stored dtype."""
        ...


def can_copy_chunks(source: CheckpointSource) -> bool:
    """Whether ``source`` offers encoded chunks for verbatim copies (the optional capability)."""
    return all(
        callable(getattr(source, name, None))
        for name in ("chunk_keys", "zarr_metadata", "stores_chunks", "chunk_index", "array_key")
    )
