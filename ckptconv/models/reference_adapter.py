"""The reference decoder's twins (Linen and NNX) as one :class:`~ckptconv.models.ModelAdapter`.

Registered as the default adapter: ``--model-config CFG`` selects ``ReferenceAdapter(CFG)``.
It supports the engine through ``nnx.Cache`` variables (see :mod:`ckptconv.models.adapter`),
and loads Linen params (checkpoints converted in memory, or trees) for the engine.
"""

from __future__ import annotations

from operator import attrgetter
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, traverse_util

from . import linen
from . import nnx as mnnx
from .adapter import DEFAULT, register_adapter
from .config import ModelConfig

STALE_AR = ("cached_ar_key", "cached_ar_value")
"""AR keys and values a prefix leaves out: the engine's insert resets the slot's AR index,
which masks them."""


def _config_field(name: str, doc: str) -> property:
    """A read-only property that reads ``self.config.<name>``.

    Args:
        name: The :class:`~ckptconv.models.config.ModelConfig` field.
        doc: The property's docstring.

    Returns:
        The property.
    """
    return property(attrgetter(f"config.{name}"), doc=doc)


class ReferenceAdapter:
    """The reference decoder for ``config``.

    Args:
        config: The model config.

    Example:
        >>> adapter = ReferenceAdapter(ModelConfig(vocab_size=64))
        >>> adapter.vocab_size
        64
    """

    prefix_filter = nnx.All(nnx.Cache, nnx.Not(nnx.Any(*(nnx.PathContains(n) for n in STALE_AR))))
    """The prefill cache variables a prefix carries (all but the AR keys and values)."""

    def __init__(self, config: ModelConfig):
        self.config = config

    def __repr__(self) -> str:
        return f"ReferenceAdapter({self.config!r})"

    # -- sizes --------------------------------------------------------------------------------
    vocab_size = _config_field("vocab_size", "The vocabulary size.")
    max_prefill_length = _config_field(
        "max_prefill_predict_length", "Longest prompt (``max_prefill_predict_length``)."
    )
    max_target_length = _config_field("max_target_length", "Prompt plus generated tokens.")
    activation_dtype = _config_field(
        "activation_dtype", "The activation dtype (sets the decode check's tolerance)."
    )
    dtype_name = _config_field("dtype", "The activation dtype's name, as the config spells it.")

    # -- the ModelAdapter protocol ------------------------------------------------------------
    def nnx_model(self) -> mnnx.Transformer:
        """The NNX twin in train mode (no cache), abstract."""
        return nnx.eval_shape(lambda: mnnx.Transformer(self.config, rngs=nnx.Rngs(0)))

    def nnx_forward(self, model: mnnx.Transformer, tokens: Any, positions: Any) -> jax.Array:
        """The NNX twin's full forward pass (train mode)."""
        return model(tokens, positions)

    def linen_forward(self, params: Any, tokens: Any, positions: Any) -> jax.Array:
        """The Linen ``Transformer`` on its ``params`` tree."""
        return linen.Transformer(self.config).apply({"params": params}, tokens, positions)

    # -- the engine's nnx.Cache protocol ------------------------------------------------------
    def nnx_cached_model(self, *, mode: str, batch: int) -> mnnx.Transformer:
        """The NNX twin built for ``mode`` with ``batch`` cache rows, abstract."""
        return nnx.eval_shape(
            lambda: mnnx.Transformer(
                self.config, rngs=nnx.Rngs(0), model_mode=mode, cache_batch=batch
            )
        )

    def nnx_prefill(
        self, model: mnnx.Transformer, tokens: Any, positions: Any, segment_ids: Any
    ) -> jax.Array:
        """Prefill one padded prompt."""
        return model(tokens, positions, segment_ids, model_mode="prefill")

    def nnx_generate(self, model: mnnx.Transformer, tokens: Any, positions: Any) -> jax.Array:
        """One decode step for every slot."""
        return model(tokens, positions, model_mode="autoregressive")

    # -- Linen params for the engine ----------------------------------------------------------
    def linen_param_shapes(self) -> dict[tuple[str, ...], Any]:
        """The Linen model's params as ``{path: ShapeDtypeStruct}`` (traced)."""
        tokens = jnp.zeros((1, 1), jnp.int32)
        init = linen.Transformer(self.config).init
        shapes = jax.eval_shape(init, jax.random.key(0), tokens, tokens)["params"]
        return traverse_util.flatten_dict(dict(shapes))

    def from_linen_params(self, params: Any) -> Any:
        """A Linen ``params`` tree as the NNX twin's ``nnx.Param`` state."""
        return nnx.state(mnnx.from_linen_params(self.config, params), nnx.Param)

    def convert_options(self) -> dict[str, Any]:
        """``ConvertOptions`` fields that convert this config's Linen checkpoints."""
        c = self.config
        return {
            "scan_layers": c.scan_layers,
            "linen_scan_axis": c.param_scan_axis,
            "nnx_scan_axis": c.nnx_scan_axis,
        }


register_adapter(DEFAULT, ReferenceAdapter)
