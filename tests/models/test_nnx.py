import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ckptconv.errors import ConfigError, LayoutError, ModelInputError
from ckptconv.models import (
    from_linen_params,
    layout,
    linen,
    load_linen_params,
    to_linen_params,
)
from ckptconv.models import nnx as mnnx


def _is_var(x):
    return isinstance(x, nnx.Variable)


def _shapes(tree):
    return jax.tree.map(lambda a: tuple(a.shape), tree)


def _linen_shapes(config):
    tokens = jnp.zeros((1, 2), jnp.int32)
    init = jax.eval_shape(linen.Transformer(config).init, jax.random.key(0), tokens, tokens)
    return _shapes(init["params"])


def _abstract(config, **kwargs):
    return nnx.eval_shape(lambda: mnnx.Transformer(config, rngs=nnx.Rngs(0), **kwargs))


@pytest.mark.parametrize(
    "changes",
    [dict(), dict(param_scan_axis=0), dict(scan_layers=False)],
    ids=["scan_axis1", "scan_axis0", "unscanned"],
)
def test_pure_dict_equals_linen_params_when_axes_match(tiny_config, changes):
    config = tiny_config(**changes)
    config = config.replace(nnx_scan_axis=config.param_scan_axis)
    pure = nnx.to_pure_dict(nnx.state(_abstract(config), nnx.Param))
    assert _shapes(pure) == _linen_shapes(config)
    if not config.scan_layers:
        assert {"layers_0", "layers_1"} <= set(pure["decoder"])


def test_stacked_axis_differs_when_axes_differ(tiny_config):
    config = tiny_config(param_scan_axis=1, nnx_scan_axis=0)
    pure = _shapes(nnx.state(_abstract(config), nnx.Param))
    linen_shapes = _linen_shapes(config)
    wo = ("decoder", "layers", "mlp", "wo", "kernel")
    got, want = pure, linen_shapes
    for key in wo:
        got, want = got[key], want[key]
    assert got == (2, 64, 32) and want == (64, 2, 32)


def _expected_axes(spec_axes, stacked_at):
    axes = list(spec_axes)
    if stacked_at is not None:
        axes.insert(stacked_at, layout.LAYERS_AXIS)
    return tuple(axes)


@pytest.mark.parametrize(
    "changes", [dict(nnx_scan_axis=0), dict(nnx_scan_axis=1), dict(scan_layers=False)]
)
@pytest.mark.parametrize("mode", ["prefill", "autoregressive"])
def test_sharding_names_on_every_variable(tiny_config, changes, mode):
    config = tiny_config(**changes)
    model = _abstract(config, model_mode=mode, cache_batch=2)
    stacked_at = config.nnx_scan_axis if config.scan_layers else None
    layer_specs = layout.layer_param_specs(config)
    params = nnx.state(model, nnx.Param).flat_state()
    assert len(params) == 3 + 9 * (1 if config.scan_layers else config.num_decoder_layers)
    for path, var in params:
        assert var.out_sharding is not None, path
        assert len(var.out_sharding) == len(var.shape), path
        if path[1].startswith("layers"):
            spec = layer_specs
            for key in path[2:]:
                spec = spec[key]
            assert var.out_sharding == _expected_axes(spec.axes, stacked_at), path
        else:
            assert layout.LAYERS_AXIS not in var.out_sharding, path
    assert params  # and every cache variable, with the mode's batch name
    cache_specs = layout.cache_specs(config, 2, mode)
    caches = nnx.state(model, nnx.Cache).flat_state()
    assert len(caches) == len(cache_specs) * (1 if config.scan_layers else 2)
    batch = "cache_batch_prefill" if mode == "prefill" else "cache_batch"
    for path, var in caches:
        spec = cache_specs[path[-1]]
        want = _expected_axes(spec.axes, 0 if config.scan_layers else None)
        assert var.out_sharding == want, path
        assert batch in var.out_sharding
        assert var.shape[var.out_sharding.index(batch)] == 2


@pytest.mark.parametrize(
    "name, nnx_axis", [("A", 0), ("A", 1), ("B", 0)], ids=["A-axis0", "A-axis1", "B-unscanned"]
)
def test_logits_bit_identical_to_linen(maxtext_model, name, nnx_axis):
    config, params, reference = maxtext_model(name)
    config = config.replace(nnx_scan_axis=nnx_axis)
    model = from_linen_params(config, params)
    tokens = jnp.asarray(reference["tokens"])
    positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
    linen_model = linen.Transformer(config)

    eager_linen = linen_model.apply({"params": params}, tokens, positions)
    eager_nnx = model(tokens, positions)
    assert eager_nnx.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(eager_nnx), np.asarray(eager_linen))

    jit_linen = jax.jit(linen_model.apply)({"params": params}, tokens, positions)
    jit_nnx = nnx.jit(lambda m, t, p: m(t, p))(model, tokens, positions)
    np.testing.assert_array_equal(np.asarray(jit_nnx), np.asarray(jit_linen))
    np.testing.assert_allclose(np.asarray(jit_nnx), reference["logits"], atol=1e-5, rtol=0)


def test_load_linen_params_into_initialised_model(tiny_config, random_linen_params):
    config = tiny_config()
    params = random_linen_params(config)
    model = mnnx.Transformer(config, rngs=nnx.Rngs(0))
    assert load_linen_params(model, {"params": params}) is model
    back = to_linen_params(model)
    jax.tree.map(np.testing.assert_array_equal, back, params)
    tokens = jnp.array([[3, 1, 4, 1, 5]], jnp.int32)
    positions = jnp.arange(5, dtype=jnp.int32)[None]
    np.testing.assert_array_equal(
        np.asarray(model(tokens, positions)),
        np.asarray(linen.Transformer(config).apply({"params": params}, tokens, positions)),
    )


def test_to_linen_params_round_trips_fixture(maxtext_model):
    config, params, _ = maxtext_model("A")
    model = from_linen_params(config, params)  # nnx_scan_axis 0, param_scan_axis 1
    assert model.decoder.layers.mlp.wi_0.kernel.shape == (2, 64, 128)
    back = to_linen_params(model)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    jax.tree.map(np.testing.assert_array_equal, back, params)


def test_load_errors_name_the_path(tiny_config, random_linen_params):
    config = tiny_config()
    params = random_linen_params(config)
    model = _abstract(config)
    bad = jax.tree.map(lambda a: a, params)
    bad["decoder"]["decoder_norm"]["scale"] = jnp.zeros((3,))
    with pytest.raises(LayoutError, match=r"\['decoder'\]\['decoder_norm'\]\['scale'\]"):
        load_linen_params(model, bad)
    missing = jax.tree.map(lambda a: a, params)
    del missing["decoder"]["logits_dense"]
    with pytest.raises(LayoutError, match="logits_dense"):
        load_linen_params(model, missing)
    wrong_dtype = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    with pytest.raises(LayoutError, match="bfloat16"):
        load_linen_params(model, wrong_dtype)


def test_construction_and_call_errors(tiny_config):
    config = tiny_config()
    with pytest.raises(ConfigError, match="cache_batch"):
        mnnx.Transformer(config, rngs=nnx.Rngs(0), model_mode="autoregressive")
    with pytest.raises(ConfigError, match="model_mode"):
        mnnx.Transformer(config, rngs=nnx.Rngs(0), model_mode="decode")
    model = _abstract(config)
    tokens = jnp.zeros((1, 2), jnp.int32)
    with pytest.raises(ModelInputError, match="KV cache"):
        model(tokens, tokens, model_mode="prefill")
    ar = _abstract(config, model_mode="autoregressive", cache_batch=4)
    with pytest.raises(ModelInputError, match="cache batch"):
        ar(jnp.zeros((2, 1), jnp.int32), jnp.zeros((2, 1), jnp.int32))


@nnx.jit(static_argnames="mode")
def _call(model, tokens, positions, segments=None, *, mode):
    return model(tokens, positions, segments, model_mode=mode)


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unscanned"])
def test_kv_cache_decoding_bit_identical_to_linen(
    tiny_config, random_linen_params, scan, decode_inputs, pad_prompts
):
    config = tiny_config(scan_layers=scan, nnx_scan_axis=1)
    params = random_linen_params(config, seed=1)
    lengths, steps = [5, 3], 6
    full = decode_inputs(config, lengths, steps)
    prompt, positions, segments = pad_prompts(config, full, lengths)
    reference = nnx.jit(lambda m, t, p: m(t, p))(
        from_linen_params(config, params),
        full,
        np.broadcast_to(np.arange(full.shape[1]), full.shape),
    )

    model = from_linen_params(config, params, model_mode="autoregressive", cache_batch=2)
    linen_model = linen.Transformer(config)
    # Params are arguments, not closed-over constants, so XLA compiles the same program as
    # for the NNX model (constant folding could otherwise change the last bit).
    linen_prefill = jax.jit(
        lambda v, t, p, s: linen_model.apply(v, t, p, s, model_mode="prefill", mutable=["cache"])
    )
    linen_step = jax.jit(
        lambda v, t, p: linen_model.apply(v, t, p, model_mode="autoregressive", mutable=["cache"])
    )

    logits = _call(model, prompt, positions, segments, mode="prefill")
    want, variables = linen_prefill({"params": params}, prompt, positions, segments)
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(want))
    for row, n in enumerate(lengths):
        np.testing.assert_allclose(logits[row, :n], reference[row, :n], atol=1e-5, rtol=0)
    cache = variables["cache"]
    rows = np.arange(len(lengths))
    for s in range(steps):
        at = np.asarray(lengths) + s
        token, position = full[rows, at][:, None], at[:, None].astype(np.int32)
        logits = _call(model, token, position, mode="autoregressive")
        want, variables = linen_step({"params": params, "cache": cache}, token, position)
        cache = variables["cache"]
        np.testing.assert_array_equal(np.asarray(logits), np.asarray(want))
        np.testing.assert_allclose(logits[:, 0], reference[rows, at], atol=1e-5, rtol=0)
    # the NNX cache holds exactly what the Linen cache holds
    nnx_cache = nnx.to_pure_dict(nnx.state(model, nnx.Cache))
    jax.tree.map(np.testing.assert_array_equal, nnx_cache, cache)


def _insert(ar_model, prefill_model, slot):
    """What an engine's insert does: copy a batch-1 prefill cache into one decode slot."""
    source = dict(nnx.state(prefill_model, nnx.Cache).flat_state())
    for path, var in nnx.state(ar_model, nnx.Cache).flat_state():
        axis = var.out_sharding.index(layout.CACHE_BATCH)
        row = source[path]
        assert row.out_sharding[axis] == layout.CACHE_BATCH_PREFILL
        var.set_value(
            jax.lax.dynamic_update_slice_in_dim(var.get_value(), row.get_value(), slot, axis)
        )


def test_prefill_model_then_insert_into_decode_slots(
    tiny_config, random_linen_params, decode_inputs, pad_prompts
):
    config = tiny_config()
    params = random_linen_params(config, seed=2)
    lengths, steps, slots = [4, 7], 5, 3
    full = decode_inputs(config, lengths, steps, seed=3)
    reference = nnx.jit(lambda m, t, p: m(t, p))(
        from_linen_params(config, params),
        full,
        np.broadcast_to(np.arange(full.shape[1]), full.shape),
    )
    ar = from_linen_params(config, params, model_mode="autoregressive", cache_batch=slots)
    used = [2, 0]  # prompt row -> decode slot
    for row, n in enumerate(lengths):
        prefill = from_linen_params(config, params, model_mode="prefill")
        prompt, positions, segments = pad_prompts(config, full[row : row + 1], [n])
        logits = _call(prefill, prompt, positions, segments, mode="prefill")
        np.testing.assert_allclose(logits[0, :n], reference[row, :n], atol=1e-5, rtol=0)
        _insert(ar, prefill, used[row])
    for s in range(steps):
        token = np.zeros((slots, 1), np.int32)
        position = np.zeros((slots, 1), np.int32)
        for row, n in enumerate(lengths):
            token[used[row], 0], position[used[row], 0] = full[row, n + s], n + s
        logits = _call(ar, token, position, mode="autoregressive")
        for row, n in enumerate(lengths):
            np.testing.assert_allclose(
                logits[used[row], 0], reference[row, n + s], atol=1e-5, rtol=0
            )


def test_bfloat16_activations_bit_identical(tiny_config, random_linen_params):
    config = tiny_config(dtype="bfloat16", scan_layers=True, nnx_scan_axis=0)
    params = random_linen_params(config, seed=4)
    tokens = jnp.array([[3, 1, 4, 1, 5, 9]], jnp.int32)
    positions = jnp.arange(6, dtype=jnp.int32)[None]
    want = jax.jit(linen.Transformer(config).apply)({"params": params}, tokens, positions)
    model = from_linen_params(config, params, model_mode="prefill")
    got = _call(model, tokens, positions, mode="prefill")
    assert got.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    kv = model.decoder.layers.self_attention.KVCache_0
    assert kv.cached_prefill_key.dtype == jnp.bfloat16


def test_kv_cache_needs_room_for_decoding(tiny_config):
    config = tiny_config(max_target_length=8, max_prefill_predict_length=8)
    _abstract(config)  # train mode has no cache: fine
    with pytest.raises(ConfigError, match="max_target_length"):
        _abstract(config, model_mode="prefill")


def test_unscanned_tree_into_scanned_model_names_the_path(tiny_config, random_linen_params):
    from ckptconv.errors import LayoutError
    from ckptconv.models import from_linen_params

    unscanned = random_linen_params(tiny_config(scan_layers=False))
    with pytest.raises(LayoutError, match="layers"):
        from_linen_params(tiny_config(scan_layers=True), unscanned)
