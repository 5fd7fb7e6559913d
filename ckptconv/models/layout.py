"""One table of the decoder's variables, shared by the Linen model and its NNX twin.

Every parameter's path, per-layer shape, MaxText logical axis names and initializer, and every
KV-cache variable's name, shape, dtype and logical axis names, are defined here once. The Linen
module and the NNX module build their trees from these tables, so the two cannot drift apart.

Parameter paths are MaxText's (``params/token_embedder/embedding``,
``params/decoder/layers/self_attention/query/kernel``, ...). The cache lives under each layer's
``self_attention/KVCache_0`` (MaxText's name), in natural ``(batch, sequence, heads, head_dim)``
order rather than MaxText's transposed storage order.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from ..errors import ConfigError
from .config import ModelConfig

LAYERS_AXIS = "layers"
"""Logical name of the stacked-layer axis (MaxText's ``layers`` rule maps it to ``stage``)."""

CACHE_BATCH = "cache_batch"
CACHE_BATCH_PREFILL = "cache_batch_prefill"
CACHE_SEQUENCE = "cache_sequence"
CACHE_HEADS = "cache_heads"
CACHE_KV = "cache_kv"

MODES = ("train", "prefill", "autoregressive")

KV_CACHE_MODULE = "KVCache_0"
"""Name of the cache module under each layer's ``self_attention`` (as in MaxText)."""

Initializer = Callable[[jax.Array, tuple[int, ...], Any], jax.Array]


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One parameter of one layer (or of the model outside the layers).

    Attributes:
        shape: Unstacked shape.
        axes: MaxText logical axis names, one per dimension of ``shape``.
        init: ``init(key, shape, dtype) -> array``.
    """

    shape: tuple[int, ...]
    axes: tuple[str, ...]
    init: Initializer


@dataclasses.dataclass(frozen=True)
class CacheSpec:
    """One KV-cache variable of one layer.

    Attributes:
        shape: Unstacked shape; the batch dimension is always axis 0.
        dtype: Element dtype.
        axes: Logical axis names, one per dimension of ``shape``.
    """

    shape: tuple[int, ...]
    dtype: Any
    axes: tuple[str, ...]


def _fan_in_init(fan_in: int, scale: float = 1.0) -> Initializer:
    # Variance scale**2 / fan_in, as MaxText's nd_dense_init(1.0, "fan_in", ...). A plain normal
    # rather than MaxText's truncated normal: it compiles several times faster on CPU, and
    # initial values only matter until real weights are loaded.
    stddev = scale / math.sqrt(fan_in)

    def init(key: jax.Array, shape: tuple[int, ...], dtype: Any) -> jax.Array:
        return (jax.random.normal(key, shape, jnp.float32) * stddev).astype(dtype)

    return init


def _ones(key: jax.Array, shape: tuple[int, ...], dtype: Any) -> jax.Array:
    del key
    return jnp.ones(shape, dtype)


def _normal(key: jax.Array, shape: tuple[int, ...], dtype: Any) -> jax.Array:
    return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def layer_param_specs(config: ModelConfig) -> dict[str, Any]:
    """Nested dict of :class:`ParamSpec` for one decoder layer, keyed like MaxText's tree."""
    e, h, kv, d, m = (
        config.emb_dim,
        config.num_query_heads,
        config.num_kv_heads,
        config.head_dim,
        config.mlp_dim,
    )
    return {
        "pre_self_attention_layer_norm": {"scale": ParamSpec((e,), ("norm",), _ones)},
        "self_attention": {
            # MaxText folds 1/sqrt(head_dim) into the query initializer, not into the forward.
            "query": {
                "kernel": ParamSpec(
                    (e, h, d), ("embed", "q_heads", "kv"), _fan_in_init(e, 1 / math.sqrt(d))
                )
            },
            "key": {
                "kernel": ParamSpec(
                    (e, kv, d), ("embed", "kv_heads", "kv_head_dim"), _fan_in_init(e)
                )
            },
            "value": {
                "kernel": ParamSpec(
                    (e, kv, d), ("embed", "kv_heads", "kv_head_dim"), _fan_in_init(e)
                )
            },
            "out": {"kernel": ParamSpec((h, d, e), ("heads", "kv", "embed"), _fan_in_init(h * d))},
        },
        "post_self_attention_layer_norm": {"scale": ParamSpec((e,), ("norm",), _ones)},
        "mlp": {
            "wi_0": {"kernel": ParamSpec((e, m), ("embed", "mlp"), _fan_in_init(e))},
            "wi_1": {"kernel": ParamSpec((e, m), ("embed", "mlp"), _fan_in_init(e))},
            "wo": {"kernel": ParamSpec((m, e), ("mlp", "embed"), _fan_in_init(m))},
        },
    }


def embedder_param_specs(config: ModelConfig) -> dict[str, Any]:
    """Specs of ``token_embedder``."""
    return {
        "embedding": ParamSpec((config.vocab_size, config.emb_dim), ("vocab", "embed"), _normal)
    }


def head_param_specs(config: ModelConfig) -> dict[str, Any]:
    """Specs of the decoder's parameters after the layers (``decoder_norm``, ``logits_dense``)."""
    e, v = config.emb_dim, config.vocab_size
    return {
        "decoder_norm": {"scale": ParamSpec((e,), ("norm",), _ones)},
        "logits_dense": {"kernel": ParamSpec((e, v), ("embed", "vocab"), _fan_in_init(e))},
    }


def cache_batch_name(mode: str) -> str:
    """Logical name of the cache batch axis: ``cache_batch_prefill`` or ``cache_batch``."""
    return CACHE_BATCH_PREFILL if mode == "prefill" else CACHE_BATCH


def cache_specs(config: ModelConfig, batch: int, mode: str) -> dict[str, CacheSpec]:
    """The KV-cache variables of one layer for ``batch`` rows, named as in MaxText.

    Both inference modes hold the same variables (as MaxText does), so a prefill-mode cache can
    be copied row by row into an autoregressive-mode cache; only the batch axis name differs.

    Args:
        config: The model config.
        batch: Cache rows (decode slots in autoregressive mode).
        mode: ``prefill`` or ``autoregressive``.

    Returns:
        Variable name -> :class:`CacheSpec`.

    Raises:
        ConfigError: ``max_target_length`` does not exceed ``max_prefill_predict_length`` (no
            room for an autoregressive cache, as MaxText also requires).
    """
    if config.ar_cache_length < 1:
        raise ConfigError(
            f"config key 'max_target_length' ({config.max_target_length}) must exceed "
            f"'max_prefill_predict_length' ({config.max_prefill_predict_length}) for a KV cache"
        )
    b = cache_batch_name(mode)
    p, s = config.max_prefill_predict_length, config.ar_cache_length
    kv, d = config.num_kv_heads, config.head_dim
    act = config.activation_dtype
    kv_axes = (b, CACHE_SEQUENCE, CACHE_HEADS, CACHE_KV)
    return {
        "cached_prefill_key": CacheSpec((batch, p, kv, d), act, kv_axes),
        "cached_prefill_value": CacheSpec((batch, p, kv, d), act, kv_axes),
        "cache_prefill_segment_id": CacheSpec((batch, p), jnp.int32, (b, CACHE_SEQUENCE)),
        "cached_ar_key": CacheSpec((batch, s, kv, d), act, kv_axes),
        "cached_ar_value": CacheSpec((batch, s, kv, d), act, kv_axes),
        "cache_ar_segment_id": CacheSpec((batch, s), jnp.int32, (b, CACHE_SEQUENCE)),
        "cache_ar_index": CacheSpec((batch,), jnp.int32, (b,)),
        "cached_ar_lengths": CacheSpec((batch,), jnp.int32, (b,)),
    }
