"""Names and conventions of the Orbax on-disk format, shared by the reader and the writer.

Measured on orbax-checkpoint 0.12.8 (see the facts in ``shared/design.md``).
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from .leaf import KeyPath

METADATA_FILE = "_METADATA"
CHECKPOINT_METADATA_FILE = "_CHECKPOINT_METADATA"
SHARDING_FILE = "_sharding"
ARRAY_METADATAS_DIR = "array_metadatas"
OCDBT_MANIFEST_FILE = "manifest.ocdbt"
COMMIT_SUCCESS_FILE = "commit_success.txt"
LEGACY_MSGPACK_FILE = "checkpoint"

# ckptconv's own markers of a partial write: the writer's temporary folder is named
# ``.<name>.ckptconv-tmp-<hex>`` and holds INCOMPLETE_MARKER until just before its rename.
TMP_INFIX = ".ckptconv-tmp-"
INCOMPLETE_MARKER = ".ckptconv-incomplete"
_CKPTCONV_TMP_RE = re.compile(r"\.ckptconv-tmp-[0-9a-f]+$")
# Orbax's temporary folders: ``<step>.orbax-checkpoint-tmp-<n>`` (and the same suffix on items).
_ORBAX_TMP_RE = re.compile(r"\.orbax-checkpoint-tmp(-\d+)?$")

# Item folder names of a CheckpointManager step, in the order they are tried.
STEP_ITEM_NAMES = ("items", "default", "state")

KEY_TYPE_SEQUENCE = 1
KEY_TYPE_DICT = 2

# value_type strings Orbax writes for leaves that hold one array in the OCDBT store.
ARRAY_VALUE_TYPES = frozenset({"jax.Array", "np.ndarray", "scalar"})
# value_type strings Orbax writes (with skip_deserialize) for empty leaves.
EMPTY_VALUE_TYPES = ("None", "Dict", "List")


def is_temporary_name(name: str) -> bool:
    """Whether a folder name is a ckptconv or Orbax temporary (uncommitted) folder."""
    return bool(_CKPTCONV_TMP_RE.search(name) or _ORBAX_TMP_RE.search(name))


def array_key(path: KeyPath) -> str:
    """Returns the OCDBT key prefix Orbax stores the array at: the '.'-joined key path."""
    return ".".join(path)


def tree_key(path: KeyPath) -> str:
    """Returns the ``tree_metadata`` key Orbax writes: the repr of the tuple of key names."""
    return str(tuple(path))


def zarr_metadata_key(path: KeyPath, use_zarr3: bool) -> str:
    """Returns the OCDBT key of an array's zarr metadata document."""
    return f"{array_key(path)}/{'zarr.json' if use_zarr3 else '.zarray'}"


def dtype_name(dtype: Any) -> str:
    """Returns the canonical name of a numpy or ml_dtypes dtype (``"bfloat16"``, ``"int32"``)."""
    if isinstance(dtype, str):
        try:
            return np.dtype(dtype).name
        except TypeError:
            import ml_dtypes

            if hasattr(ml_dtypes, dtype):
                return np.dtype(getattr(ml_dtypes, dtype)).name
            raise
    return np.dtype(dtype).name


def numpy_dtype(name: str) -> np.dtype:
    """Returns the numpy dtype object of a canonical dtype name, ml_dtypes included."""
    try:
        return np.dtype(name)
    except TypeError:
        import ml_dtypes

        if not isinstance(name, str) or not hasattr(ml_dtypes, name):
            raise TypeError(f"data type {name!r} not understood") from None
        return np.dtype(getattr(ml_dtypes, name))


def dtype_itemsize(name: str) -> int:
    """Bytes per element of a canonical dtype name (``"bfloat16"``: 2)."""
    return numpy_dtype(name).itemsize


# TensorStore appends annotations such as `` [http_response_code='403']`` and a whole HTTP
# response body to its error messages; a one-line message keeps the part before them.
_TS_ANNOTATION = re.compile(r"\s\[[\w\-]+='")


def one_line(text: object) -> str:
    """Collapses an exception message onto one line, without TensorStore's annotations."""
    flat = " ".join(str(text).split())
    match = _TS_ANNOTATION.search(flat)
    return flat[: match.start()] if match and match.start() > 0 else flat


def normalize_index(index: tuple[Any, ...], shape: tuple[int, ...]) -> tuple[slice, ...]:
    """Returns ``index`` (a tuple of slices, one slab) as explicit in-bounds slices.

    Missing trailing entries select whole axes; negative bounds count from the end as in numpy.

    Raises:
        ValueError: an entry is not a slice with step 1, or reaches outside ``shape``.
    """
    if not isinstance(index, tuple):
        index = (index,)
    if len(index) > len(shape):
        raise ValueError(f"index {index!r} has {len(index)} entries for {len(shape)} axes")
    out = []
    padded = index + (slice(None),) * (len(shape) - len(index))
    for axis, (entry, dim) in enumerate(zip(padded, shape, strict=True)):
        if not isinstance(entry, slice) or entry.step not in (None, 1):
            raise ValueError(f"axis {axis}: expected a slice with step 1, found {entry!r}")
        for bound in (entry.start, entry.stop):
            if bound is not None and not -dim <= bound <= dim:
                raise ValueError(f"axis {axis}: {entry!r} reaches outside [0, {dim})")
        start, stop, _ = entry.indices(dim)
        out.append(slice(start, max(start, stop)))
    return tuple(out)
