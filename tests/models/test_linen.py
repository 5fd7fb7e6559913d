import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ckptconv.errors import ModelInputError
from ckptconv.models import layout, linen


def _shapes(tree):
    return jax.tree.map(lambda a: tuple(a.shape), tree)


def _forward(config):
    model = linen.Transformer(config)
    return jax.jit(lambda p, t, pos, seg=None: model.apply({"params": p}, t, pos, seg))


@pytest.mark.parametrize("name", ["A", "B"])
def test_param_tree_is_maxtexts(maxtext_model, name):
    config, params, _ = maxtext_model(name)
    tokens = jnp.zeros((1, 2), jnp.int32)
    init = jax.eval_shape(linen.Transformer(config).init, jax.random.key(0), tokens, tokens)
    assert set(init) == {"params"}
    assert _shapes(init["params"]) == _shapes(params)
    layer_key = "layers" if config.scan_layers else "layers_0"
    assert set(params["decoder"]) == (
        {"decoder_norm", "logits_dense", "layers"}
        if config.scan_layers
        else {"decoder_norm", "logits_dense", "layers_0", "layers_1", "layers_2"}
    )
    assert set(params["decoder"][layer_key]) == set(layout.layer_param_specs(config))


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("name", ["A", "B"])
def test_reproduces_maxtext_logits(maxtext_model, name, jit):
    config, params, reference = maxtext_model(name)
    tokens = jnp.asarray(reference["tokens"])
    positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
    model = linen.Transformer(config)
    apply = jax.jit(model.apply) if jit else model.apply
    logits = apply({"params": params}, tokens, positions)
    assert logits.dtype == jnp.float32
    assert logits.shape == reference["logits"].shape
    np.testing.assert_allclose(np.asarray(logits), reference["logits"], atol=1e-5, rtol=0)


def greedy(forward, params, prompt, steps):
    """Greedy extension with full forward passes over a fixed-size, end-padded buffer."""
    n = prompt.shape[1]
    buffer = np.zeros((1, n + steps), np.int32)
    buffer[0, :n] = prompt[0]
    positions = jnp.arange(n + steps, dtype=jnp.int32)[None]
    picked = []
    for i in range(steps):
        logits = forward(params, jnp.asarray(buffer), positions)  # causal: pads are unseen
        token = int(jnp.argmax(logits[0, n + i - 1]))
        buffer[0, n + i] = token
        picked.append(token)
    return picked


@pytest.mark.parametrize("name", ["A", "B"])
def test_reproduces_maxtext_greedy_tokens(maxtext_model, name):
    config, params, reference = maxtext_model(name)
    picked = greedy(_forward(config), params, reference["tokens"], len(reference["greedy"]))
    assert picked == reference["greedy"].tolist()


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unscanned"])
def test_kv_cache_decoding_matches_full_forward(
    tiny_config, random_linen_params, decode_inputs, pad_prompts, scan
):
    config = tiny_config(scan_layers=scan)
    params = random_linen_params(config)
    lengths, steps = [5, 3], 6
    full = decode_inputs(config, lengths, steps)
    prompt, _, segments = pad_prompts(config, full, lengths)
    model = linen.Transformer(config)
    reference = _forward(config)(
        params, jnp.asarray(full), jnp.broadcast_to(jnp.arange(full.shape[1]), full.shape)
    )

    prefill = jax.jit(
        lambda p, t, pos, seg: model.apply(
            {"params": p}, t, pos, seg, model_mode="prefill", mutable=["cache"]
        )
    )
    step = jax.jit(
        lambda p, c, t, pos: model.apply(
            {"params": p, "cache": c}, t, pos, model_mode="autoregressive", mutable=["cache"]
        )
    )
    positions = np.broadcast_to(np.arange(prompt.shape[1], dtype=np.int32), prompt.shape)
    logits, variables = prefill(params, prompt, positions, segments)
    cache = variables["cache"]
    for row, n in enumerate(lengths):
        np.testing.assert_allclose(logits[row, :n], reference[row, :n], atol=1e-5, rtol=0)
    for s in range(steps):
        rows = np.arange(len(lengths))
        at = np.asarray(lengths) + s
        logits, variables = step(
            params, cache, full[rows, at][:, None], at[:, None].astype(np.int32)
        )
        cache = variables["cache"]
        np.testing.assert_allclose(logits[:, 0], reference[rows, at], atol=1e-5, rtol=0)
    kv = cache["decoder"]["layers" if scan else "layers_1"]["self_attention"]["KVCache_0"]
    np.testing.assert_array_equal(kv["cache_ar_index"], np.full(kv["cache_ar_index"].shape, steps))
    np.testing.assert_array_equal(kv["cached_ar_lengths"], kv["cache_ar_index"])


@pytest.mark.parametrize("mode", ["prefill", "autoregressive"])
def test_init_cache_layout(tiny_config, mode):
    config = tiny_config()
    cache = linen.init_cache(config, 3, mode)
    kv = cache["decoder"]["layers"]["self_attention"]["KVCache_0"]
    specs = layout.cache_specs(config, 3, mode)
    assert set(kv) == set(specs)
    for name, spec in specs.items():
        assert kv[name].shape == (config.num_decoder_layers, *spec.shape), name
        assert kv[name].dtype == spec.dtype
        assert not np.asarray(kv[name]).any()
    assert kv["cached_ar_key"].shape == (2, 3, 16, 2, 8)  # [L, B, max_target - P, KV, D]
    assert kv["cached_prefill_key"].shape == (2, 3, 8, 2, 8)  # [L, B, P, KV, D]
    unscanned = linen.init_cache(tiny_config(scan_layers=False), 3, mode)
    assert set(unscanned["decoder"]) == {"layers_0", "layers_1"}


def test_cache_errors(tiny_config, random_linen_params):
    config = tiny_config()
    params = random_linen_params(config)
    model = linen.Transformer(config)
    tokens = jnp.zeros((2, 1), jnp.int32)
    with pytest.raises(ModelInputError, match="mutable"):
        model.apply({"params": params}, tokens, tokens, model_mode="autoregressive")
    cache = linen.init_cache(config, 3)
    with pytest.raises(ModelInputError, match="batch"):
        model.apply(
            {"params": params, "cache": cache}, tokens, tokens,
            model_mode="autoregressive", mutable=["cache"],
        )  # fmt: skip
    with pytest.raises(ModelInputError, match="one token"):
        model.apply(
            {"params": params, "cache": cache}, jnp.zeros((3, 2), jnp.int32),
            jnp.zeros((3, 2), jnp.int32), model_mode="autoregressive", mutable=["cache"],
        )  # fmt: skip
    with pytest.raises(ModelInputError, match="init_cache"):
        linen.init_cache(config, 1, "train")
