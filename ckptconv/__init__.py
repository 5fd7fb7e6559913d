"""ckptconv: move JAX models from Flax Linen to Flax NNX, bit-exactly.

The public API is re-exported here; submodules hold the implementation.
"""

from . import errors as errors
from .errors import CkptconvError as CkptconvError

__version__ = "0.1.0"
