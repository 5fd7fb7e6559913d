"""ckptconv: move JAX models from Flax Linen to Flax NNX, bit-exactly.

The curated public API. Conversion needs only TensorStore and numpy, so it is imported
eagerly; the parts that need JAX and Flax (models, sharding, engine) load on first use.

Example:
    >>> import ckptconv
    >>> ckptconv.convert("maxtext/2/items", "nnx_ckpt")  # doctest: +SKIP
    >>> ckptconv.compare("maxtext/2/items", "nnx_ckpt").bit_exact  # doctest: +SKIP
    True
"""

from __future__ import annotations

import importlib
import importlib.metadata
from typing import Any

from . import errors as errors
from .convert import CompareResult as CompareResult
from .convert import ConvertOptions as ConvertOptions
from .convert import ConvertResult as ConvertResult
from .convert import Plan as Plan
from .convert import compare as compare
from .convert import convert as convert
from .errors import CkptconvError as CkptconvError
from .io import CheckpointReader as CheckpointReader
from .io import CheckpointWriter as CheckpointWriter
from .nnx_restore import restore as restore

__version__ = importlib.metadata.version("ckptconv")

_LAZY = {
    "ModelConfig": "ckptconv.models",
    "LogicalAxisRules": "ckptconv.sharding",
    "make_mesh": "ckptconv.sharding",
    "get_preset": "ckptconv.sharding",
    "param_partition_specs": "ckptconv.sharding",
    "prefill_kv_cache_partition_specs": "ckptconv.sharding",
    "ar_kv_cache_partition_specs": "ckptconv.sharding",
    "named_shardings": "ckptconv.sharding",
    "Engine": "ckptconv.engine",
}


def __getattr__(name: str) -> Any:
    """Loads the JAX-heavy parts of the public API on first use."""
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ckptconv' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY))
