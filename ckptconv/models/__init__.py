"""Model definitions: :class:`ModelConfig`, the Linen decoder, its NNX twin, and adapters.

``linen.Transformer`` holds MaxText's exact variable tree; ``nnx.Transformer`` holds the same
parameters as ``nnx.Param`` (with logical sharding names) and its KV cache as ``nnx.Cache``.
Both compute with :mod:`ckptconv.models.math`, so their float32 logits agree bit for bit.
:class:`ModelAdapter` is how the engine, verify, decode and annotate reach any NNX model; the
twins are :class:`ReferenceAdapter`, the registered default.
"""

from . import layout as layout
from . import linen as linen
from . import math as math
from . import nnx as nnx
from .adapter import ModelAdapter as ModelAdapter
from .adapter import as_adapter as as_adapter
from .adapter import get_adapter as get_adapter
from .adapter import load_adapter as load_adapter
from .adapter import register_adapter as register_adapter
from .config import ModelConfig as ModelConfig
from .nnx import from_linen_params as from_linen_params
from .nnx import load_linen_params as load_linen_params
from .nnx import to_linen_params as to_linen_params
from .reference_adapter import ReferenceAdapter as ReferenceAdapter
