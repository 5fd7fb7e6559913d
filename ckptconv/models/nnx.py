"""NNX twin of :mod:`ckptconv.models.linen`: the same math, parameters held as ``nnx.Param``.

``nnx.to_pure_dict(nnx.state(model, nnx.Param))`` has the same structure and shapes as the Linen
``params`` tree when ``nnx_scan_axis == param_scan_axis`` (``token_embedder/embedding``,
``decoder/layers/self_attention/query/kernel``, ..., or ``decoder/layers_{i}/...`` unscanned).
Both twins call :func:`ckptconv.models.math.decoder_layer` on the same nested param dicts, so
with the same weights their float32 logits are bit-identical.

Sharding metadata: every ``nnx.Param`` carries MaxText's logical axis names as
``out_sharding`` (with ``layers`` inserted at the stacked axis by ``nnx.vmap``); every
``nnx.Cache`` carries ``(cache_batch_prefill | cache_batch, cache_sequence, cache_heads,
cache_kv)`` (segment ids: ``(batch, cache_sequence)``; index and lengths: ``(batch,)``), with
``layers`` at axis 0 when stacked. Variables are built with ``eager_sharding=False``: the names
are logical, so a mesh and rules (``ckptconv.sharding``) turn them into real shardings later.

Calling convention: as for the Linen model (see :mod:`ckptconv.models.linen`); a model built
in one inference mode can be called in the other through ``model_mode=`` (both hold the same
cache variables), so one ``cache_batch``-row model can prefill and decode. An engine that
prefills with a separate batch-1 ``prefill`` model copies every cache variable into a slot of the
``autoregressive`` model along the axis named ``cache_batch`` (prefill axis
``cache_batch_prefill``, same position); that resets the slot's AR index too.

Limits: the KV cache is sized at construction (``cache_batch`` rows); an inference call must use
exactly that batch.

Example:
    >>> cfg = ModelConfig(emb_dim=32, num_query_heads=4, num_kv_heads=1, head_dim=8,
    ...                   mlp_dim=96, num_decoder_layers=2, vocab_size=128, dtype="float32",
    ...                   max_target_length=32, max_prefill_predict_length=8)
    >>> model = Transformer(cfg, rngs=nnx.Rngs(0))
    >>> tokens = jnp.zeros((1, 4), jnp.int32)
    >>> model(tokens, jnp.arange(4, dtype=jnp.int32)[None]).shape
    (1, 4, 128)
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ..errors import ConfigError, LayoutError, ModelInputError
from . import layout
from . import math as mmath
from .config import ModelConfig


class _Group(nnx.Module):
    """Params named by a nested :class:`~ckptconv.models.layout.ParamSpec` tree."""

    def __init__(self, specs: Mapping[str, Any], dtype: Any, rngs: nnx.Rngs):
        for name, spec in specs.items():
            if isinstance(spec, layout.ParamSpec):
                value = spec.init(rngs.params(), spec.shape, dtype)
                child: Any = nnx.Param(value, out_sharding=spec.axes, eager_sharding=False)
            else:
                child = _Group(spec, dtype, rngs)
            setattr(self, name, child)


class KVCache(nnx.Module):
    """One layer's KV cache as ``nnx.Cache`` variables (see :func:`layout.cache_specs`)."""

    def __init__(self, config: ModelConfig, batch: int, mode: str):
        for name, spec in layout.cache_specs(config, batch, mode).items():
            var = nnx.Cache(
                jnp.zeros(spec.shape, spec.dtype), out_sharding=spec.axes, eager_sharding=False
            )
            setattr(self, name, var)

    def as_dict(self) -> dict[str, jax.Array]:
        """The current values by variable name."""
        return {name: var.get_value() for name, var in self._variables().items()}

    def assign(self, values: Mapping[str, jax.Array]) -> None:
        """Overwrite the variables with ``values`` (same names)."""
        for name, var in self._variables().items():
            var.set_value(values[name])

    def _variables(self) -> dict[str, nnx.Cache]:
        return {k: v for k, v in vars(self).items() if isinstance(v, nnx.Cache)}


class _Block(nnx.Module, abc.ABC):
    """A part of the decoder (one layer, or all of them) built for one mode.

    Subclasses create their variables in :meth:`_build` and compute in :meth:`_apply`; both
    take the same construction and call arguments, as the Linen twin's ``_ModeModule`` do.

    Args:
        config: The model config.
        rngs: Parameter initialisation keys.
        model_mode: ``train`` (no KV cache), ``prefill`` or ``autoregressive``.
        cache_batch: KV cache rows (unused in train mode).
    """

    def __init__(
        self,
        config: ModelConfig,
        *,
        rngs: nnx.Rngs,
        model_mode: str = "train",
        cache_batch: int = 1,
    ):
        self.config = config
        self._build(rngs, model_mode, cache_batch)

    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        segment_ids: jax.Array | None,
        *,
        model_mode: str = "train",
    ) -> jax.Array:
        """Apply the block to embedded ``x [B, T, E]`` (see :meth:`_apply`)."""
        return self._apply(x, positions, segment_ids, model_mode)

    @abc.abstractmethod
    def _build(self, rngs: nnx.Rngs, model_mode: str, cache_batch: int) -> None:
        """Creates the block's variables."""

    @abc.abstractmethod
    def _apply(
        self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array | None, mode: str
    ) -> jax.Array:
        """Computes the block on embedded ``x``."""


class DecoderLayer(_Block):
    """One decoder layer, with MaxText's submodule names.

    ``pre_self_attention_layer_norm``, ``self_attention`` (with ``KVCache_0`` when built for
    inference), ``post_self_attention_layer_norm`` and ``mlp``.
    """

    def _build(self, rngs: nnx.Rngs, model_mode: str, cache_batch: int) -> None:
        for name, sub in layout.layer_param_specs(self.config).items():
            setattr(self, name, _Group(sub, self.config.param_dtype, rngs))
        if model_mode != "train":
            setattr(
                self.self_attention,
                layout.KV_CACHE_MODULE,
                KVCache(self.config, cache_batch, model_mode),
            )

    def _apply(
        self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array | None, mode: str
    ) -> jax.Array:
        """Apply the layer to ``x [B, T, E]``; updates ``KVCache_0`` when inferring."""
        params = nnx.to_pure_dict(nnx.state(self, nnx.Param))
        kv = getattr(self.self_attention, layout.KV_CACHE_MODULE, None)
        cache = None
        if mode != "train":
            if kv is None:
                raise ModelInputError(f"model_mode={mode!r} needs a model built with a KV cache")
            cache = kv.as_dict()
        y, new_cache = mmath.decoder_layer(
            params, x, positions, segment_ids, config=self.config, mode=mode, cache=cache
        )
        if new_cache is not None:
            kv.assign(new_cache)
        return y


def _stacked_layers(
    config: ModelConfig, rngs: nnx.Rngs, model_mode: str, cache_batch: int
) -> DecoderLayer:
    axes = nnx.StateAxes({nnx.Param: config.nnx_scan_axis, nnx.Cache: 0})

    @nnx.split_rngs(splits=config.num_decoder_layers)
    @nnx.vmap(
        in_axes=(0,),
        out_axes=axes,
        transform_metadata={nnx.PARTITION_NAME: layout.LAYERS_AXIS},
    )
    def make(layer_rngs: nnx.Rngs) -> DecoderLayer:
        return DecoderLayer(config, rngs=layer_rngs, model_mode=model_mode, cache_batch=cache_batch)

    return make(rngs)


class Decoder(_Block):
    """The layers (``layers`` stacked, or ``layers_{i}``), ``decoder_norm``, ``logits_dense``."""

    def _build(self, rngs: nnx.Rngs, model_mode: str, cache_batch: int) -> None:
        config = self.config
        if config.scan_layers:
            self.layers = _stacked_layers(config, rngs, model_mode, cache_batch)
        else:
            for i in range(config.num_decoder_layers):
                layer = DecoderLayer(
                    config, rngs=rngs, model_mode=model_mode, cache_batch=cache_batch
                )
                setattr(self, f"layers_{i}", layer)
        for name, sub in layout.head_param_specs(config).items():
            setattr(self, name, _Group(sub, config.param_dtype, rngs))

    def _scan(
        self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array | None, mode: str
    ) -> jax.Array:
        graphdef, params, caches = nnx.split(self.layers, nnx.Param, nnx.Cache)
        # Scan over layer 0..L-1 on axis 0, as nn.scan does with params moved from their axis.
        axis = self.config.nnx_scan_axis
        params = jax.tree.map(lambda a: jnp.moveaxis(a, axis, 0), params)

        def body(carry: jax.Array, layer_state: tuple[Any, Any]) -> tuple[jax.Array, Any]:
            layer = nnx.merge(graphdef, *layer_state)
            y = layer(carry, positions, segment_ids, model_mode=mode)
            return y, nnx.state(layer, nnx.Cache)

        x, new_caches = jax.lax.scan(body, x, (params, caches))
        if mode != "train":
            nnx.update(self.layers, new_caches)
        return x

    def _apply(
        self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array | None, mode: str
    ) -> jax.Array:
        """Run the layers on embedded ``x [B, T, E]``; float32 logits ``[B, T, V]``."""
        cfg = self.config
        if cfg.scan_layers:
            x = self._scan(x, positions, segment_ids, mode)
        else:
            for i in range(cfg.num_decoder_layers):
                x = getattr(self, f"layers_{i}")(x, positions, segment_ids, model_mode=mode)
        head = {
            "decoder_norm": {"scale": self.decoder_norm.scale.get_value()},
            "logits_dense": {"kernel": self.logits_dense.kernel.get_value()},
        }
        return mmath.output_logits(head, x, cfg)


class Transformer(nnx.Module):
    """MaxText's default decoder-only Transformer (NNX), twin of the Linen ``Transformer``.

    Args:
        config: The model config.
        rngs: Parameter initialisation keys.
        model_mode: ``train`` (no KV cache), ``prefill`` or ``autoregressive``: the mode calls
            default to, and the logical batch name of the cache (``cache_batch_prefill`` or
            ``cache_batch``). Any inference mode creates the full cache (prefill and AR parts).
        cache_batch: Cache rows: decode slots for ``autoregressive`` (required there), the
            prefill batch for ``prefill`` (default 1).

    Raises:
        ConfigError: ``model_mode`` is unknown, or ``cache_batch`` is missing or not positive.
    """

    def __init__(
        self,
        config: ModelConfig,
        *,
        rngs: nnx.Rngs,
        model_mode: str = "train",
        cache_batch: int | None = None,
    ):
        if model_mode not in layout.MODES:
            raise ConfigError(
                f"model_mode must be one of {', '.join(layout.MODES)}, got {model_mode!r}"
            )
        if cache_batch is None:
            if model_mode == "autoregressive":
                raise ConfigError(
                    "model_mode='autoregressive' needs cache_batch (the decode slots)"
                )
            cache_batch = 1
        if cache_batch <= 0:
            raise ConfigError(f"cache_batch must be positive, got {cache_batch}")
        self.config = config
        self.model_mode = model_mode
        self.cache_batch = cache_batch if model_mode != "train" else None
        self.token_embedder = _Group(layout.embedder_param_specs(config), config.param_dtype, rngs)
        self.decoder = Decoder(config, rngs=rngs, model_mode=model_mode, cache_batch=cache_batch)

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        segment_ids: jax.Array | None = None,
        *,
        model_mode: str | None = None,
    ) -> jax.Array:
        """Float32 logits ``[B, T, V]``; same calling convention as the Linen ``Transformer``.

        Args:
            tokens: ``[B, T]`` int32.
            positions: ``[B, T]`` int32 RoPE positions.
            segment_ids: ``[B, T]`` int32 (1 real, 0 pad) or None; ignored in autoregressive mode.
            model_mode: Overrides the construction mode for this call (``train`` always works;
                the inference modes need a model built with a cache and ``B == cache_batch``).

        Raises:
            ModelInputError: Shapes, mode or batch are inconsistent with the model.
        """
        mode = self.model_mode if model_mode is None else model_mode
        mmath.check_inputs(tokens, positions, segment_ids, mode)
        if mode != "train":
            if self.cache_batch is None:
                raise ModelInputError(f"model_mode={mode!r} needs a model built with a KV cache")
            if tokens.shape[0] != self.cache_batch:
                raise ModelInputError(
                    f"batch {tokens.shape[0]} differs from the KV cache batch {self.cache_batch}"
                )
        x = mmath.embed(
            self.token_embedder.embedding.get_value(), tokens, self.config.activation_dtype
        )
        return self.decoder(x, positions, segment_ids, model_mode=mode)


def _move_stacked(tree: Any, config: ModelConfig, source: int, destination: int) -> Any:
    """Move the layer axis of every array under ``decoder/layers`` (no-op when equal/unscanned)."""
    if not config.scan_layers or source == destination:
        return tree
    if not isinstance(tree.get("decoder"), Mapping) or "layers" not in tree["decoder"]:
        # Not the scanned layout the config expects: _check_same_tree names the difference.
        return tree
    out = dict(tree)
    decoder = dict(out["decoder"])
    decoder["layers"] = jax.tree.map(
        lambda a: jnp.moveaxis(a, source, destination), decoder["layers"]
    )
    out["decoder"] = decoder
    return out


def load_linen_params(model: Transformer, linen_params: Mapping[str, Any]) -> Transformer:
    """Put a Linen ``params`` tree (MaxText layout) into an NNX :class:`Transformer`, in place.

    The stacked layer axis is moved from ``param_scan_axis`` to ``nnx_scan_axis`` first. Arrays
    are taken as they are (no cast): a shape or dtype mismatch is an error, not a conversion.

    Args:
        model: The NNX twin (any mode).
        linen_params: The Linen tree under ``params`` (``{"token_embedder": ..., "decoder":
            ...}``); a ``{"params": {...}}`` wrapper is unwrapped.

    Returns:
        ``model``, updated.

    Raises:
        LayoutError: The trees differ in keys, shapes or dtypes (the message names the path).

    Example:
        >>> from ckptconv.models import linen
        >>> cfg = ModelConfig(emb_dim=32, num_query_heads=4, num_kv_heads=1, head_dim=8,
        ...                   mlp_dim=96, num_decoder_layers=2, vocab_size=128)
        >>> tokens = jnp.zeros((1, 4), jnp.int32)
        >>> params = linen.Transformer(cfg).init(jax.random.key(0), tokens, tokens)["params"]
        >>> model = load_linen_params(Transformer(cfg, rngs=nnx.Rngs(0)), params)
        >>> model.decoder.layers.mlp.wo.kernel.shape  # layer axis moved from 1 to 0
        (2, 96, 32)
    """
    if set(linen_params) == {"params"}:
        linen_params = linen_params["params"]
    cfg = model.config
    tree = _move_stacked(dict(linen_params), cfg, cfg.param_scan_axis, cfg.nnx_scan_axis)
    state = nnx.state(model, nnx.Param)
    expected = nnx.to_pure_dict(state)
    _check_same_tree(expected, tree)
    nnx.replace_by_pure_dict(state, tree)
    nnx.update(model, state)
    return model


def from_linen_params(
    config: ModelConfig,
    linen_params: Mapping[str, Any],
    *,
    model_mode: str = "train",
    cache_batch: int | None = None,
) -> Transformer:
    """Build an NNX :class:`Transformer` holding ``linen_params``, without a random init.

    The model is traced abstractly (``nnx.eval_shape``), its caches are filled with zeros and
    its params with ``linen_params`` (see :func:`load_linen_params`), so no initializer runs.

    Args:
        config: The model config.
        linen_params: The Linen tree under ``params`` (or wrapped in ``{"params": ...}``).
        model_mode: As for :class:`Transformer`.
        cache_batch: As for :class:`Transformer`.

    Returns:
        The model, every variable concrete.

    Raises:
        ConfigError: ``model_mode`` or ``cache_batch`` is invalid.
        LayoutError: ``linen_params`` does not match the model.
    """
    model = nnx.eval_shape(
        lambda: Transformer(
            config, rngs=nnx.Rngs(0), model_mode=model_mode, cache_batch=cache_batch
        )
    )
    caches = nnx.state(model, nnx.Cache)
    nnx.update(model, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), caches))
    return load_linen_params(model, linen_params)


def to_linen_params(model: Transformer) -> dict[str, Any]:
    """The NNX model's params as a Linen ``params`` tree (layer axis at ``param_scan_axis``)."""
    cfg = model.config
    tree = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return _move_stacked(tree, cfg, cfg.nnx_scan_axis, cfg.param_scan_axis)


def _check_same_tree(expected: Any, got: Any) -> None:
    want = dict(jax.tree_util.tree_flatten_with_path(expected)[0])
    have = dict(jax.tree_util.tree_flatten_with_path(got)[0])
    for path in want.keys() - have.keys():
        raise LayoutError(f"Linen params lack {jax.tree_util.keystr(path)} that the NNX model has")
    for path in have.keys() - want.keys():
        raise LayoutError(
            f"Linen params have {jax.tree_util.keystr(path)} that the NNX model lacks"
        )
    for path, leaf in want.items():
        other = have[path]
        if tuple(other.shape) != tuple(leaf.shape) or other.dtype != leaf.dtype:
            raise LayoutError(
                f"Linen param {jax.tree_util.keystr(path)} is {other.dtype}{list(other.shape)} "
                f"but the NNX model expects {leaf.dtype}{list(leaf.shape)} (after moving the "
                "layer axis)"
            )
