"""MaxText's default (llama2) decoder as a Flax Linen module, variables exactly as MaxText's.

The ``params`` tree is MaxText's: ``token_embedder/embedding [V, E]``,
``decoder/layers/{pre_self_attention_layer_norm/scale, self_attention/{query,key,value,out}/kernel,
post_self_attention_layer_norm/scale, mlp/{wi_0,wi_1,wo}/kernel}``, ``decoder/decoder_norm/scale``,
``decoder/logits_dense/kernel [E, V]``. With ``scan_layers`` the layers are one ``nn.scan``
module whose params are stacked at ``param_scan_axis`` (caches at axis 0); otherwise they are
``layers_0 ... layers_{L-1}``.

The ``cache`` collection holds, per layer under ``self_attention/KVCache_0``, the variables of
:func:`ckptconv.models.layout.cache_specs` in natural ``(batch, sequence, heads, head_dim)``
order (MaxText stores them transposed; the values are the same).

Calling convention (the same for the NNX twin):

- ``prefill``: ``tokens [B, T]`` with ``T <= max_prefill_predict_length``, prompts padded at the
  end, ``segment_ids`` 1 for real tokens and 0 for pads, ``positions = 0..T-1``. The cache is
  reset for all ``B`` rows: the prompt's keys (after RoPE) and values are written at ``0..T-1``,
  ``cache_ar_index``, ``cached_ar_lengths`` and ``cache_ar_segment_id`` are zeroed.
- ``autoregressive``: ``tokens [B, 1]`` (the token picked last), ``positions [B, 1]`` = the
  row's true prompt length plus the number of steps already taken. Each row's key/value is
  written at its own ``cache_ar_index``, which then advances by one (as does
  ``cached_ar_lengths``); the query attends to the prefill rows whose segment id is 1 and to the
  AR rows ``<= cache_ar_index``. At most ``max_target_length - max_prefill_predict_length`` steps
  fit after a prefill; the caller must stop there (later tokens are not written).

All math is :mod:`ckptconv.models.math`; this module only holds the variables.

Example:
    >>> cfg = ModelConfig(emb_dim=32, num_query_heads=4, num_kv_heads=1, head_dim=8,
    ...                   mlp_dim=96, num_decoder_layers=2, vocab_size=128, dtype="float32",
    ...                   max_target_length=32, max_prefill_predict_length=8)
    >>> model = Transformer(cfg)
    >>> tokens = jnp.zeros((1, 4), jnp.int32)
    >>> positions = jnp.arange(4, dtype=jnp.int32)[None]
    >>> params = model.init(jax.random.key(0), tokens, positions)["params"]
    >>> model.apply({"params": params}, tokens, positions).shape
    (1, 4, 128)
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ..errors import ModelInputError
from . import layout
from . import math as mmath
from .config import ModelConfig


class _KVCache(nn.Module):
    """The ``cache`` variables of one layer; returns them as Linen ``Variable`` objects."""

    specs: Any  # name -> layout.CacheSpec

    @nn.compact
    def __call__(self) -> dict[str, Any]:
        out = {}
        for name, spec in self.specs.items():
            if self.has_variable("cache", name):
                shape = self.get_variable("cache", name).shape
                if tuple(shape) != spec.shape:
                    raise ModelInputError(
                        f"cache variable {'/'.join(self.scope.path + (name,))} has shape "
                        f"{tuple(shape)} but this call needs {spec.shape}: the batch must "
                        "equal the cache batch"
                    )
            elif not self.is_mutable_collection("cache"):
                raise ModelInputError(
                    "prefill and autoregressive modes need a KV cache: pass mutable=['cache'] "
                    "(and the cache from init_cache() or a previous call)"
                )
            out[name] = self.variable("cache", name, jnp.zeros, spec.shape, spec.dtype)
        return out


class _Params(nn.Module):
    """Creates params named by a nested :class:`~ckptconv.models.layout.ParamSpec` tree.

    Returns the arrays in the same nested-dict shape; with ``cache_specs`` it also creates a
    ``KVCache_0`` child and returns its variables under that key.
    """

    specs: Any
    param_dtype: Any
    cache_specs: Any = None

    @nn.compact
    def __call__(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, spec in self.specs.items():
            if isinstance(spec, layout.ParamSpec):
                out[name] = self.param(name, spec.init, spec.shape, self.param_dtype)
            else:
                out[name] = _Params(spec, self.param_dtype, name=name)()
        if self.cache_specs is not None:
            out[layout.KV_CACHE_MODULE] = _KVCache(self.cache_specs, name=layout.KV_CACHE_MODULE)()
        return out


class _ModeModule(nn.Module):
    """A module of the decoder built for one mode.

    Attributes:
        config: The model config.
        model_mode: ``train``, ``prefill`` or ``autoregressive``.
    """

    config: ModelConfig
    model_mode: str = "train"


class DecoderLayer(_ModeModule):
    """One decoder layer; returns ``(y, None)`` so that it can be the body of ``nn.scan``."""

    @nn.compact
    def __call__(
        self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array | None
    ) -> tuple[jax.Array, None]:
        """Apply the layer to ``x [B, T, E]``; updates the ``cache`` collection when inferring."""
        cfg = self.config
        cache_specs = None
        if self.model_mode != "train":
            cache_specs = layout.cache_specs(cfg, x.shape[0], self.model_mode)
        params: dict[str, Any] = {}
        for name, sub in layout.layer_param_specs(cfg).items():
            with_cache = cache_specs if name == "self_attention" else None
            params[name] = _Params(sub, cfg.param_dtype, with_cache, name=name)()
        variables = None
        cache = None
        if cache_specs is not None:
            variables = params["self_attention"].pop(layout.KV_CACHE_MODULE)
            cache = {name: var.value for name, var in variables.items()}
        y, new_cache = mmath.decoder_layer(
            params, x, positions, segment_ids, config=cfg, mode=self.model_mode, cache=cache
        )
        if variables is not None and new_cache is not None:
            for name, var in variables.items():
                var.value = new_cache[name]
        return y, None


class Decoder(_ModeModule):
    """The layers (scanned or ``layers_{i}``), ``decoder_norm`` and ``logits_dense``."""

    @nn.compact
    def __call__(
        self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array | None
    ) -> jax.Array:
        """Run the layers on embedded ``x [B, T, E]``; float32 logits ``[B, T, V]``."""
        cfg = self.config
        if cfg.scan_layers:
            stack = nn.scan(
                DecoderLayer,
                variable_axes={"params": cfg.param_scan_axis, "cache": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast),
                length=cfg.num_decoder_layers,
            )
            x, _ = stack(cfg, self.model_mode, name="layers")(x, positions, segment_ids)
        else:
            for i in range(cfg.num_decoder_layers):
                x, _ = DecoderLayer(cfg, self.model_mode, name=f"layers_{i}")(
                    x, positions, segment_ids
                )
        head = {
            name: _Params(sub, cfg.param_dtype, name=name)()
            for name, sub in layout.head_param_specs(cfg).items()
        }
        return mmath.output_logits(head, x, cfg)


class Transformer(nn.Module):
    """MaxText's default decoder-only Transformer (Linen).

    Attributes:
        config: The model config.
    """

    config: ModelConfig

    @nn.compact
    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        segment_ids: jax.Array | None = None,
        *,
        model_mode: str = "train",
    ) -> jax.Array:
        """Float32 logits ``[B, T, V]``.

        Args:
            tokens: ``[B, T]`` int32 token ids.
            positions: ``[B, T]`` int32 RoPE positions (the caller's: ``0..T-1`` for a prompt,
                then the row's true prompt length plus the step for each generated token).
            segment_ids: ``[B, T]`` int32, 1 for real tokens and 0 for padding, or None (all
                real). Ignored in ``autoregressive`` mode.
            model_mode: ``train`` (no cache), ``prefill`` (writes the prompt into the cache;
                ``T <= max_prefill_predict_length``) or ``autoregressive`` (``T == 1``; writes the
                token at each row's ``cache_ar_index`` and attends to the cache). The inference
                modes need ``mutable=["cache"]``; a missing cache is created as zeros.

        Returns:
            ``[B, T, vocab_size]`` float32 logits.

        Raises:
            ModelInputError: Shapes or the mode are inconsistent, or a needed cache is absent.
        """
        cfg = self.config
        mmath.check_inputs(tokens, positions, segment_ids, model_mode)
        embedder = _Params(layout.embedder_param_specs(cfg), cfg.param_dtype, name="token_embedder")
        x = mmath.embed(embedder()["embedding"], tokens, cfg.activation_dtype)
        return Decoder(cfg, model_mode, name="decoder")(x, positions, segment_ids)


def init_cache(config: ModelConfig, batch: int, mode: str = "autoregressive") -> dict[str, Any]:
    """A zero ``cache`` collection for ``batch`` rows, shaped as :class:`Transformer` uses it.

    Args:
        config: The model config.
        batch: Cache rows (decode slots for ``autoregressive``).
        mode: ``prefill`` or ``autoregressive`` (both hold the same variables).

    Returns:
        The tree to pass as ``{"params": ..., "cache": init_cache(...)}``.

    Raises:
        ModelInputError: ``mode`` is ``train`` or unknown.
    """
    if mode not in ("prefill", "autoregressive"):
        raise ModelInputError(f"init_cache mode must be prefill or autoregressive, got {mode!r}")
    tokens = jnp.zeros((batch, 1), jnp.int32)
    shapes = jax.eval_shape(
        lambda: Transformer(config).init(jax.random.key(0), tokens, tokens, model_mode=mode)
    )["cache"]
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
