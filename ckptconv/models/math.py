"""The decoder's math as plain ``jnp`` functions, shared by the Linen model and its NNX twin.

Both twins gather their parameters into the same nested dicts and call :func:`decoder_layer`,
:func:`embed` and :func:`output_logits` from here, so the same operations run in the same
order and their float32 logits agree bit for bit. The functions reproduce MaxText's default
(llama2) decoder as pinned down by ``tests/fixtures/maxtext/README.md``:

- RMSNorm in float32, ``y = x * rsqrt(mean(x^2) + eps)`` cast to the activation dtype, times
  the scale.
- RoPE on split halves, timescale ``min * (max / min) ** (2i / D)``, sin/cos in float32 then
  cast to the activation dtype.
- Attention with grouped-query heads (query head ``h`` uses kv head ``h // (H / KV)``), no
  runtime ``1/sqrt(D)``, masked scores set to ``-0.7 * float32 max``, softmax in the activation
  dtype and normalised after the value product (MaxText's ``compute_local_attention``); the
  autoregressive step combines a prefill-cache chunk and an AR-cache chunk exactly as MaxText's
  ``normalize_attention`` does.
- MLP ``(silu(x @ wi_0) * (x @ wi_1)) @ wo``; residuals around attention and MLP.

Everything broadcasts explicitly (the tests run with ``jax_numpy_rank_promotion="raise"``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..errors import ModelInputError
from .config import ModelConfig
from .layout import MODES

MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
"""Score given to masked query/key pairs (MaxText's ``DEFAULT_MASK_VALUE``)."""

Params = Mapping[str, Any]
Cache = dict[str, jax.Array]


def _lead(x: jax.Array, ndim: int) -> jax.Array:
    """Reshape a vector to broadcast against the last axis of a rank-``ndim`` array."""
    return jnp.reshape(x, (1,) * (ndim - 1) + (-1,))


def rms_norm(x: jax.Array, scale: jax.Array, eps: float, dtype: Any = None) -> jax.Array:
    """RMSNorm over the last axis, computed in float32.

    Args:
        x: Activations ``[..., E]``.
        scale: ``[E]``.
        eps: Epsilon added to the mean square.
        dtype: Output dtype (default: ``x.dtype``).

    Returns:
        ``(x * rsqrt(mean(x^2) + eps)).astype(dtype) * scale.astype(dtype)``.
    """
    dtype = x.dtype if dtype is None else dtype
    xf = x.astype(jnp.float32)
    mean2 = jnp.mean(jax.lax.square(xf), axis=-1, keepdims=True)
    y = (xf * jax.lax.rsqrt(mean2 + eps)).astype(dtype)
    return y * _lead(scale.astype(dtype), y.ndim)


def rope(
    x: jax.Array,
    positions: jax.Array,
    head_dim: int,
    min_timescale: float = 1.0,
    max_timescale: float = 10000.0,
) -> jax.Array:
    """Rotary position embedding on split halves (MaxText's ``RotaryEmbedding``).

    Args:
        x: ``[B, T, N, D]`` queries or keys.
        positions: ``[B, T]`` integer positions.
        head_dim: ``D`` (even).
        min_timescale: Timescale of the first frequency.
        max_timescale: Timescale limit of the last frequency.

    Returns:
        ``x * cos + rotate_half(x) * sin`` with ``rotate_half(x1, x2) = (-x2, x1)``.
    """
    half = head_dim // 2
    fraction = 2 * jnp.arange(half, dtype=jnp.float32) / head_dim
    timescale = min_timescale * (max_timescale / min_timescale) ** fraction
    angle = positions.astype(jnp.float32)[:, :, None, None] / timescale[None, None, None, :]
    sin = jnp.sin(angle).astype(x.dtype)
    cos = jnp.cos(angle).astype(x.dtype)
    first, second = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)


def attention_chunk(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Unnormalised attention over one chunk of keys (MaxText's ``compute_local_attention``).

    Args:
        q: ``[B, T, H, D]``.
        k: ``[B, S, KV, D]``; ``H`` must be a multiple of ``KV``.
        v: ``[B, S, KV, D]``.
        mask: ``[B, T, S]`` booleans, true where query ``t`` may see key ``s``.

    Returns:
        ``(out, max, sum)``: ``out [B, T, H, D]`` the exponent-weighted values,
        ``max [B, T, H, 1]`` the per-row score maximum, ``sum [B, T, H, 1]`` the per-row sum of
        ``exp(score - max)``. ``out / sum`` is the attention output.
    """
    b, t, h, d = q.shape
    kv = k.shape[2]
    g = h // kv
    grouped = jnp.reshape(q, (b, t, kv, g, d))
    scores = jnp.einsum("btkgd,bskd->bkgts", grouped, k)
    masked = jnp.asarray(MASK_VALUE, scores.dtype)
    scores = jnp.where(mask[:, None, None, :, :], scores, masked)
    local_max = jnp.max(scores, axis=-1, keepdims=True)
    local_exps = jnp.exp(scores - local_max)
    local_sum = jnp.sum(local_exps, axis=-1, keepdims=True)
    local_out = jnp.einsum("bkgts,bskd->btkgd", local_exps, v)
    local_out = jnp.reshape(local_out, (b, t, h, d))

    def stat(x: jax.Array) -> jax.Array:  # [B, KV, G, T, 1] -> [B, T, H, 1]
        return jnp.reshape(jnp.moveaxis(x, -2, 1), (b, t, h, 1))

    return local_out, stat(local_max), stat(local_sum)


def combine_chunks(chunks: Sequence[tuple[jax.Array, jax.Array, jax.Array]]) -> jax.Array:
    """Normalise and combine :func:`attention_chunk` results (MaxText's ``normalize_attention``).

    Args:
        chunks: ``(out, max, sum)`` triples over disjoint key sets.

    Returns:
        ``[B, T, H, D]`` attention over the union of the chunks' keys.
    """
    if len(chunks) == 1:
        out, _, total = chunks[0]
        return out / total
    global_max = chunks[0][1]
    for _, local_max, _ in chunks[1:]:
        global_max = jnp.maximum(global_max, local_max)
    global_sum = sum(jnp.exp(m - global_max) * s for _, m, s in chunks)
    result = 0
    for out, local_max, _ in chunks:
        result = result + jnp.exp(local_max - global_max) / global_sum * out
    return result


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Grouped-query dot-product attention, no ``1/sqrt(D)``, normalised after ``exp @ v``.

    Args:
        q: ``[B, T, H, D]``.
        k: ``[B, S, KV, D]``.
        v: ``[B, S, KV, D]``.
        mask: ``[B, T, S]`` booleans.

    Returns:
        ``[B, T, H, D]``.
    """
    return combine_chunks([attention_chunk(q, k, v, mask)])


def causal_mask(length: int, segment_ids: jax.Array | None, batch: int) -> jax.Array:
    """``[B, T, T]`` mask: key ``s <= t`` and, when given, the same segment id."""
    idx = jnp.arange(length)
    mask = jnp.broadcast_to((idx[None, :] <= idx[:, None])[None], (batch, length, length))
    if segment_ids is not None:
        mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
    return mask


def mlp(x: jax.Array, wi_0: jax.Array, wi_1: jax.Array, wo: jax.Array) -> jax.Array:
    """``(silu(x @ wi_0) * (x @ wi_1)) @ wo`` in ``x``'s dtype."""
    dtype = x.dtype
    gate = jnp.einsum("bte,em->btm", x, wi_0.astype(dtype))
    up = jnp.einsum("bte,em->btm", x, wi_1.astype(dtype))
    return jnp.einsum("btm,me->bte", jax.nn.silu(gate) * up, wo.astype(dtype))


def embed(embedding: jax.Array, tokens: jax.Array, dtype: Any) -> jax.Array:
    """Row gather of ``embedding [V, E]`` at ``tokens [B, T]``, in ``dtype`` (no scaling)."""
    return jnp.take(embedding.astype(dtype), tokens, axis=0)


def output_logits(params: Params, x: jax.Array, config: ModelConfig) -> jax.Array:
    """``decoder_norm`` then ``logits_dense``; float32 logits ``[B, T, V]``.

    Args:
        params: ``{"decoder_norm": {"scale"}, "logits_dense": {"kernel"}}``.
        x: ``[B, T, E]`` output of the last layer.
        config: The model config.
    """
    dtype = config.activation_dtype
    y = rms_norm(x, params["decoder_norm"]["scale"], config.normalization_layer_epsilon, dtype)
    kernel = params["logits_dense"]["kernel"].astype(dtype)
    return jnp.einsum("bte,ev->btv", y, kernel).astype(jnp.float32)


def _pad_to(x: jax.Array, length: int) -> jax.Array:
    pad = [(0, 0)] * x.ndim
    pad[1] = (0, length - x.shape[1])
    return jnp.pad(x, pad)


def _prefill_update(
    cache: Cache, k: jax.Array, v: jax.Array, segment_ids: jax.Array, prefill_length: int
) -> Cache:
    """Start a fresh cache from a prompt: prefill rows written, AR bookkeeping reset."""
    t = k.shape[1]
    if t > prefill_length:
        raise ModelInputError(
            f"prefill of {t} tokens exceeds max_prefill_predict_length={prefill_length}"
        )
    new = dict(cache)
    new["cached_prefill_key"] = _pad_to(k, prefill_length).astype(cache["cached_prefill_key"].dtype)
    new["cached_prefill_value"] = _pad_to(v, prefill_length).astype(
        cache["cached_prefill_value"].dtype
    )
    new["cache_prefill_segment_id"] = _pad_to(segment_ids.astype(jnp.int32), prefill_length)
    # Stale AR keys/values may stay: they are masked by index until overwritten.
    new["cache_ar_segment_id"] = jnp.zeros_like(cache["cache_ar_segment_id"])
    new["cache_ar_index"] = jnp.zeros_like(cache["cache_ar_index"])
    new["cached_ar_lengths"] = jnp.zeros_like(cache["cached_ar_lengths"])
    return new


def _autoregressive_update(cache: Cache, k: jax.Array, v: jax.Array) -> Cache:
    """Write one token per row at that row's ``cache_ar_index`` and advance the index."""
    index = cache["cache_ar_index"]
    rows = jnp.arange(index.shape[0])
    # A per-row scatter: each row writes at its own index; an index past the end writes
    # nothing (mode="drop"), and XLA updates a donated cache in place.
    new = dict(cache)
    for name, x in (("cached_ar_key", k), ("cached_ar_value", v)):
        new[name] = cache[name].at[rows, index].set(x[:, 0].astype(cache[name].dtype), mode="drop")
    new["cache_ar_segment_id"] = (
        cache["cache_ar_segment_id"].at[rows, index].set(jnp.int32(1), mode="drop")
    )
    new["cache_ar_index"] = index + 1
    new["cached_ar_lengths"] = cache["cached_ar_lengths"] + 1
    return new


def self_attention(
    params: Params,
    x: jax.Array,
    positions: jax.Array,
    segment_ids: jax.Array | None,
    *,
    config: ModelConfig,
    mode: str,
    cache: Cache | None = None,
) -> tuple[jax.Array, Cache | None]:
    """Attention block of one layer, with its KV-cache update.

    Args:
        params: ``{"query", "key", "value", "out"}``, each ``{"kernel": array}``.
        x: ``[B, T, E]`` normalised activations.
        positions: ``[B, T]`` RoPE positions.
        segment_ids: ``[B, T]`` (1 valid, 0 pad) or None (all valid); unused in
            ``autoregressive`` mode.
        config: The model config.
        mode: ``train`` (no cache), ``prefill`` (causal attention over the prompt; the cache is
            reset and the prompt's keys/values written) or ``autoregressive`` (``T == 1``: the
            token's key/value is written at each row's ``cache_ar_index`` and the query attends
            to the valid prefill rows and AR rows ``<= cache_ar_index``; a row whose index has
            reached the AR cache length is not written, so callers stop decoding there).
        cache: One layer's cache variables (see :func:`~ckptconv.models.layout.cache_specs`);
            required unless ``mode == "train"``.

    Returns:
        ``(out [B, T, E], new_cache)``; ``new_cache`` is None in train mode.
    """
    dtype = config.activation_dtype
    x = x.astype(dtype)
    b, t, _ = x.shape
    q = jnp.einsum("bte,ehd->bthd", x, params["query"]["kernel"].astype(dtype))
    k = jnp.einsum("bte,ehd->bthd", x, params["key"]["kernel"].astype(dtype))
    v = jnp.einsum("bte,ehd->bthd", x, params["value"]["kernel"].astype(dtype))
    ts = (config.rope_min_timescale, config.rope_max_timescale)
    q = rope(q, positions, config.head_dim, *ts)
    k = rope(k, positions, config.head_dim, *ts)

    new_cache = None
    if mode in ("train", "prefill"):
        out = attention(q, k, v, causal_mask(t, segment_ids, b))
        if mode == "prefill":
            if cache is None:
                raise ModelInputError("prefill mode needs a KV cache")
            seg = jnp.ones((b, t), jnp.int32) if segment_ids is None else segment_ids
            new_cache = _prefill_update(cache, k, v, seg, config.max_prefill_predict_length)
    elif mode == "autoregressive":
        if cache is None:
            raise ModelInputError("autoregressive mode needs a KV cache")
        if t != 1:
            raise ModelInputError(f"autoregressive mode takes one token per row, got {t}")
        index = cache["cache_ar_index"]
        new_cache = _autoregressive_update(cache, k, v)
        prefill_mask = (new_cache["cache_prefill_segment_id"] == 1)[:, None, :]
        ar_positions = jnp.arange(new_cache["cached_ar_key"].shape[1], dtype=jnp.int32)
        ar_mask = (ar_positions[None, :] <= index[:, None])[:, None, :]
        prefill_chunk = attention_chunk(
            q,
            new_cache["cached_prefill_key"].astype(dtype),
            new_cache["cached_prefill_value"].astype(dtype),
            prefill_mask,
        )
        ar_chunk = attention_chunk(
            q,
            new_cache["cached_ar_key"].astype(dtype),
            new_cache["cached_ar_value"].astype(dtype),
            ar_mask,
        )
        out = combine_chunks([prefill_chunk, ar_chunk]).astype(dtype)
    else:
        raise ModelInputError(
            f"model_mode must be one of train, prefill, autoregressive; got {mode!r}"
        )
    projected = jnp.einsum("bthd,hde->bte", out, params["out"]["kernel"].astype(dtype))
    return projected, new_cache


def decoder_layer(
    params: Params,
    x: jax.Array,
    positions: jax.Array,
    segment_ids: jax.Array | None,
    *,
    config: ModelConfig,
    mode: str,
    cache: Cache | None = None,
) -> tuple[jax.Array, Cache | None]:
    """One llama2 decoder layer: ``h = x + attn(norm(x))``; ``out = h + mlp(norm(h))``.

    Args:
        params: One layer's params, keyed as MaxText's tree (``pre_self_attention_layer_norm``,
            ``self_attention``, ``post_self_attention_layer_norm``, ``mlp``).
        x: ``[B, T, E]``.
        positions: ``[B, T]``.
        segment_ids: ``[B, T]`` or None.
        config: The model config.
        mode: ``train``, ``prefill`` or ``autoregressive`` (see :func:`self_attention`).
        cache: This layer's cache dict, or None in train mode.

    Returns:
        ``(out [B, T, E], new_cache)``.
    """
    dtype = config.activation_dtype
    eps = config.normalization_layer_epsilon
    x = x.astype(dtype)
    normed = rms_norm(x, params["pre_self_attention_layer_norm"]["scale"], eps, dtype)
    attn, new_cache = self_attention(
        params["self_attention"],
        normed,
        positions,
        segment_ids,
        config=config,
        mode=mode,
        cache=cache,
    )
    h = x + attn
    normed = rms_norm(h, params["post_self_attention_layer_norm"]["scale"], eps, dtype)
    p = params["mlp"]
    out = h + mlp(normed, p["wi_0"]["kernel"], p["wi_1"]["kernel"], p["wo"]["kernel"])
    return out, new_cache


def check_inputs(
    tokens: jax.Array,
    positions: jax.Array,
    segment_ids: jax.Array | None,
    mode: str,
) -> None:
    """Raise :class:`~ckptconv.errors.ModelInputError` for inconsistent call arguments."""
    if mode not in MODES:
        raise ModelInputError(f"model_mode must be one of {', '.join(MODES)}; got {mode!r}")
    if tokens.ndim != 2:
        raise ModelInputError(f"tokens must be [batch, length], got shape {tokens.shape}")
    if positions.shape != tokens.shape:
        raise ModelInputError(
            f"positions shape {positions.shape} differs from tokens shape {tokens.shape}"
        )
    if segment_ids is not None and segment_ids.shape != tokens.shape:
        raise ModelInputError(
            f"segment_ids shape {segment_ids.shape} differs from tokens shape {tokens.shape}"
        )
    if mode == "autoregressive" and tokens.shape[1] != 1:
        raise ModelInputError(
            f"autoregressive mode takes one token per row, got tokens shape {tokens.shape}"
        )
