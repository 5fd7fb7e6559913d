"""Flax TrainState checkpoints: training continues in NNX; batch_stats land as nnx.BatchNorm's."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from flax.training import train_state

import ckptconv
from ckptconv.convert import compare, convert
from ckptconv.io import CheckpointReader
from ckptconv.models import linen as linen_models
from ckptconv.models import nnx as nnx_models


def save(path, tree):
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(path, tree)
    ckptr.wait_until_finished()


def test_training_continues_in_nnx(tmp_path, make_config):
    config = make_config(scan_layers=True, param_scan_axis=1, nnx_scan_axis=0)
    model = linen_models.Transformer(config)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, (2, 9)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(8, dtype=jnp.int32), (2, 8))
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    params = model.init(jax.random.key(0), inputs, positions)["params"]
    tx = optax.adamw(1e-2)
    state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)

    def linen_loss(p):
        logits = model.apply({"params": p}, inputs, positions)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    @jax.jit
    def linen_step(state):
        return state.apply_gradients(grads=jax.grad(linen_loss)(state.params))

    for _ in range(3):
        state = linen_step(state)
    save(tmp_path / "linen", state)
    convert(tmp_path / "linen", tmp_path / "nnx")

    nnx_model = nnx_models.Transformer(config, rngs=nnx.Rngs(1))
    optimizer = nnx.Optimizer(nnx_model, tx, wrt=nnx.Param)
    ckptconv.restore(tmp_path / "nnx", nnx_model, optimizer)
    assert int(optimizer.step.value) == 3

    @nnx.jit
    def nnx_step(m, opt):
        def loss(m):
            logits = m(inputs, positions)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        opt.update(m, nnx.grad(loss)(m))

    for _ in range(2):
        state = linen_step(state)
        nnx_step(nnx_model, optimizer)
    got = nnx_models.to_linen_params(nnx_model)
    flat_l = jax.tree_util.tree_leaves_with_path(state.params)
    flat_n = dict(jax.tree_util.tree_leaves_with_path(got))
    assert len(flat_l) == len(flat_n)
    for path, x in flat_l:
        np.testing.assert_allclose(
            np.asarray(flat_n[path]),
            np.asarray(x),
            atol=1e-6,
            rtol=0,
            err_msg=jax.tree_util.keystr(path),
        )


def test_flax_train_state_with_batch_stats_round_trips(tmp_path, bn_net):
    net, x = bn_net.LinenNet(), bn_net.X
    state = bn_net.trained_state(2)
    save(tmp_path / "linen", state)
    result = convert(tmp_path / "linen", tmp_path / "nnx")
    assert result.plan.source_layout == "flax"
    leaves = CheckpointReader(tmp_path / "nnx").leaves()
    for name in ("scale", "bias", "mean", "var"):
        assert ("model", "BatchNorm_0", name, "value") in leaves

    # the merged tree is exactly what nnx.BatchNorm holds: it restores strictly
    model = bn_net.NNXNet(nnx.Rngs(0))
    ckptconv.restore(tmp_path / "nnx", model)
    np.testing.assert_array_equal(
        np.asarray(model.BatchNorm_0.mean.value),
        np.asarray(state.batch_stats["BatchNorm_0"]["mean"]),
    )
    y_linen = net.apply({"params": state.params, "batch_stats": state.batch_stats}, x, train=False)
    model.eval()
    h = model.Dense_0(x)
    y_nnx = model.Dense_1(model.BatchNorm_0(h))
    np.testing.assert_array_equal(np.asarray(y_nnx), np.asarray(y_linen))

    convert(tmp_path / "nnx", tmp_path / "back", direction="nnx-to-linen")
    assert compare(tmp_path / "linen", tmp_path / "back").bit_exact
    restored = ocp.PyTreeCheckpointer().restore(str(tmp_path / "back"))
    np.testing.assert_array_equal(
        np.asarray(restored["batch_stats"]["BatchNorm_0"]["var"]),
        np.asarray(state.batch_stats["BatchNorm_0"]["var"]),
    )
