import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ckptconv.errors import ModelInputError
from ckptconv.models import layout
from ckptconv.models import math as mm

RNG = np.random.default_rng(0)


def _rand(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def test_mask_value():
    assert mm.MASK_VALUE == pytest.approx(-0.7 * np.finfo(np.float32).max)


def test_rms_norm_matches_float64_reference():
    x, scale = _rand(2, 3, 16), _rand(16)
    got = mm.rms_norm(jnp.asarray(x), jnp.asarray(scale), 1e-5)
    x64 = x.astype(np.float64)
    want = x64 / np.sqrt(np.mean(x64**2, axis=-1, keepdims=True) + 1e-5) * scale
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-6, rtol=1e-6)


def test_rms_norm_computes_in_float32_and_casts():
    x = jnp.asarray(_rand(2, 3, 16), jnp.bfloat16)
    got = mm.rms_norm(x, jnp.ones(16), 1e-5, jnp.bfloat16)
    assert got.dtype == jnp.bfloat16


def _rope_reference(x, positions, min_ts=1.0, max_ts=10000.0):
    d = x.shape[-1]
    timescale = min_ts * (max_ts / min_ts) ** (2 * np.arange(d // 2) / d)
    angle = positions[:, :, None, None].astype(np.float64) / timescale
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    rotated = np.concatenate([-x2, x1], axis=-1)
    cos = np.concatenate([np.cos(angle)] * 2, axis=-1)
    sin = np.concatenate([np.sin(angle)] * 2, axis=-1)
    return x * cos + rotated * sin


def test_rope_split_halves():
    x = _rand(2, 5, 3, 8)
    positions = np.array([[0, 1, 2, 3, 4], [7, 9, 11, 13, 40]], np.int32)
    got = mm.rope(jnp.asarray(x), jnp.asarray(positions), 8)
    np.testing.assert_allclose(np.asarray(got), _rope_reference(x, positions), atol=2e-5)
    # position 0 is the identity
    np.testing.assert_array_equal(np.asarray(got)[0, 0], x[0, 0])


def test_rope_scores_depend_on_relative_position():
    q, k = _rand(1, 1, 1, 16), _rand(1, 1, 1, 16)

    def score(pq, pk):
        rq = mm.rope(jnp.asarray(q), jnp.array([[pq]], jnp.int32), 16)
        rk = mm.rope(jnp.asarray(k), jnp.array([[pk]], jnp.int32), 16)
        return float(jnp.sum(rq * rk))

    assert score(5, 3) == pytest.approx(score(12, 10), abs=1e-4)


def _attention_reference(q, k, v, mask):
    h, kv = q.shape[2], k.shape[2]
    k = np.repeat(k, h // kv, axis=2).astype(np.float64)  # query head i -> kv head i // (h/kv)
    v = np.repeat(v, h // kv, axis=2).astype(np.float64)
    scores = np.einsum("bthd,bshd->bhts", q.astype(np.float64), k)  # no 1/sqrt(d)
    scores = np.where(mask[:, None], scores, -0.7 * np.finfo(np.float32).max)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return np.einsum("bhts,bshd->bthd", weights, v)


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2), (4, 1)])
def test_attention_gqa_matches_reference(heads, kv_heads):
    q, k, v = _rand(2, 5, heads, 8), _rand(2, 7, kv_heads, 8), _rand(2, 7, kv_heads, 8)
    mask = RNG.random((2, 5, 7)) < 0.7
    mask[..., 0] = True
    got = mm.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(got), _attention_reference(q, k, v, mask), atol=1e-5)


def test_chunks_combine_to_full_attention():
    q, k, v = _rand(2, 1, 4, 8), _rand(2, 9, 2, 8), _rand(2, 9, 2, 8)
    mask = RNG.random((2, 1, 9)) < 0.6
    mask[:, :, 0] = True
    mask[:, :, 8] = True
    args = [jnp.asarray(a) for a in (q, k, v)]
    full = mm.attention(*args, jnp.asarray(mask))
    a = mm.attention_chunk(q, k[:, :4], v[:, :4], jnp.asarray(mask[..., :4]))
    b = mm.attention_chunk(q, k[:, 4:], v[:, 4:], jnp.asarray(mask[..., 4:]))
    np.testing.assert_allclose(np.asarray(mm.combine_chunks([a, b])), np.asarray(full), atol=1e-6)


def test_causal_mask_with_segments():
    seg = jnp.array([[1, 1, 1, 0], [1, 1, 1, 1]], jnp.int32)
    mask = np.asarray(mm.causal_mask(4, seg, 2))
    assert mask.shape == (2, 4, 4)
    np.testing.assert_array_equal(mask[1], np.tril(np.ones((4, 4), bool)))
    assert not mask[0, 3, :3].any() and mask[0, 3, 3]  # a pad sees only pads
    assert not mask[0, 2, 3]


def test_mlp_matches_reference():
    x, w0, w1, wo = _rand(2, 3, 8), _rand(8, 16), _rand(8, 16), _rand(16, 8)
    got = mm.mlp(*(jnp.asarray(a) for a in (x, w0, w1, wo)))
    gate = x @ w0
    want = (gate / (1 + np.exp(-gate)) * (x @ w1)) @ wo
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=1e-5)


def test_embed_is_plain_gather():
    table = _rand(10, 4)
    got = mm.embed(jnp.asarray(table), jnp.array([[3, 0, 9]], jnp.int32), jnp.float32)
    np.testing.assert_array_equal(np.asarray(got)[0], table[[3, 0, 9]])


def _layer_params(config):
    return jax.tree.map(
        lambda s: jnp.asarray(0.2 * _rand(*s.shape)),
        layout.layer_param_specs(config),
        is_leaf=lambda x: isinstance(x, layout.ParamSpec),
    )


def _layer(config, mode):
    return jax.jit(functools.partial(mm.decoder_layer, config=config, mode=mode))


def _zero_cache(config, batch):
    return {
        name: jnp.zeros(spec.shape, spec.dtype)
        for name, spec in layout.cache_specs(config, batch, "autoregressive").items()
    }


def test_prefill_then_autoregressive_cache_updates(tiny_config):
    config = tiny_config()
    params = _layer_params(config)
    x = jnp.asarray(_rand(2, 5, config.emb_dim))
    positions = jnp.broadcast_to(jnp.arange(5, dtype=jnp.int32), (2, 5))
    seg = jnp.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], jnp.int32)
    stale = {**_zero_cache(config, 2), "cache_ar_index": jnp.array([3, 4], jnp.int32)}
    _, cache = _layer(config, "prefill")(params, x, positions, seg, cache=stale)
    p = config.max_prefill_predict_length
    assert cache["cached_prefill_key"].shape == (2, p, config.num_kv_heads, config.head_dim)
    np.testing.assert_array_equal(cache["cache_prefill_segment_id"][:, 5:], 0)
    np.testing.assert_array_equal(cache["cache_prefill_segment_id"][:, :5], seg)
    np.testing.assert_array_equal(cache["cache_ar_index"], [0, 0])  # reset by prefill

    cache = {**cache, "cache_ar_index": jnp.array([0, 2], jnp.int32)}
    step = jnp.asarray(_rand(2, 1, config.emb_dim))
    ar = _layer(config, "autoregressive")
    _, new = ar(params, step, jnp.array([[5], [3]], jnp.int32), None, cache=cache)
    np.testing.assert_array_equal(new["cache_ar_index"], [1, 3])
    np.testing.assert_array_equal(new["cached_ar_lengths"], [1, 1])
    np.testing.assert_array_equal(new["cache_ar_segment_id"][0, :3], [1, 0, 0])
    np.testing.assert_array_equal(new["cache_ar_segment_id"][1, :3], [0, 0, 1])
    assert np.abs(np.asarray(new["cached_ar_key"][1, 2])).sum() > 0
    np.testing.assert_array_equal(new["cached_ar_key"][1, 0], 0)


def test_mode_errors(tiny_config):
    config = tiny_config()
    params = _layer_params(config)
    x = jnp.zeros((1, 2, config.emb_dim))
    pos = jnp.zeros((1, 2), jnp.int32)
    with pytest.raises(ModelInputError, match="one token"):
        _layer(config, "autoregressive")(params, x, pos, None, cache=_zero_cache(config, 1))
    with pytest.raises(ModelInputError, match="needs a KV cache"):
        _layer(config, "prefill")(params, x, pos, None)
    long = jnp.zeros((1, 9, config.emb_dim))
    with pytest.raises(ModelInputError, match="max_prefill_predict_length"):
        _layer(config, "prefill")(
            params, long, jnp.zeros((1, 9), jnp.int32), None, cache=_zero_cache(config, 1)
        )
    with pytest.raises(ModelInputError, match="model_mode"):
        mm.check_inputs(pos, pos, None, "decode")
    with pytest.raises(ModelInputError, match="positions"):
        mm.check_inputs(pos, pos[:, :1], None, "train")
