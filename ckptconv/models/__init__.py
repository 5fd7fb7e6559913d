"""Model definitions: :class:`ModelConfig`, the Linen decoder and its NNX twin.

``linen.Transformer`` holds MaxText's exact variable tree; ``nnx.Transformer`` holds the same
parameters as ``nnx.Param`` (with logical sharding names) and its KV cache as ``nnx.Cache``.
Both compute with :mod:`ckptconv.models.math`, so their float32 logits agree bit for bit.
"""

from . import layout as layout
from . import linen as linen
from . import math as math
from . import nnx as nnx
from .config import ModelConfig as ModelConfig
from .nnx import from_linen_params as from_linen_params
from .nnx import load_linen_params as load_linen_params
from .nnx import to_linen_params as to_linen_params
