"""The metadata of one checkpoint leaf, shared by the reader, the writer and the planner."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

KeyPath = tuple[str, ...]


def keystr(path: KeyPath) -> str:
    """Returns the '/'-joined form of a key path, as ckptconv prints it in messages."""
    return "/".join(path) if path else "<root>"


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One leaf of a checkpoint tree, known from metadata alone.

    Attributes:
        path: the key path, e.g. ``("params", "params", "decoder", "decoder_norm", "scale")``.
        shape: the array shape, or ``None`` for an empty leaf (a ``None`` / empty optax state
            that Orbax stores with ``skip_deserialize``).
        dtype: the numpy dtype name (``"float32"``, ``"bfloat16"``, ...), or ``None`` when empty.
    """

    path: KeyPath
    shape: tuple[int, ...] | None
    dtype: str | None

    @property
    def empty(self) -> bool:
        """Whether this leaf holds no array (an empty optimizer state or ``None``)."""
        return self.shape is None

    @property
    def nbytes(self) -> int:
        """Size of the decoded array in bytes (0 for an empty leaf)."""
        if self.shape is None or self.dtype is None:
            return 0
        return math.prod(self.shape) * np.dtype(_np_dtype(self.dtype)).itemsize


def _np_dtype(name: str):
    if name == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype(name)
