"""Shared by the conversion tests: a small Linen net with BatchNorm, its NNX twin, a trainer."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx
from flax.training import train_state


class LinenNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = True):
        x = nn.Dense(6)(x)
        x = nn.BatchNorm(use_running_average=not train)(x)
        return nn.Dense(3)(x)


class NNXNet(nnx.Module):
    def __init__(self, rngs):
        self.Dense_0 = nnx.Linear(4, 6, rngs=rngs)
        self.BatchNorm_0 = nnx.BatchNorm(6, rngs=rngs)
        self.Dense_1 = nnx.Linear(6, 3, rngs=rngs)

    def __call__(self, x):
        return self.Dense_1(self.BatchNorm_0(self.Dense_0(x)))


class BNState(train_state.TrainState):
    batch_stats: dict


X = jnp.asarray(np.random.default_rng(0).standard_normal((5, 4)), jnp.float32)
TX = optax.adamw(1e-2)


@jax.jit
def linen_step(state):
    def loss(p):
        y, upd = LinenNet().apply(
            {"params": p, "batch_stats": state.batch_stats}, X, mutable=["batch_stats"]
        )
        return (y**2).mean(), upd

    grads, upd = jax.grad(loss, has_aux=True)(state.params)
    return state.apply_gradients(grads=grads).replace(batch_stats=upd["batch_stats"])


def trained_state(steps: int = 2) -> BNState:
    variables = LinenNet().init(jax.random.key(0), X)
    state = BNState.create(
        apply_fn=LinenNet().apply,
        params=variables["params"],
        tx=TX,
        batch_stats=variables["batch_stats"],
    )
    for _ in range(steps):
        state = linen_step(state)
    return state


@pytest.fixture(scope="session")
def bn_net():
    """The BatchNorm net: ``LinenNet`` (Dense 4->6, BatchNorm, Dense 6->3), ``NNXNet`` (the same
    tree in NNX), the input ``X``, the optimizer ``TX`` (adamw), ``linen_step(state)`` (one jitted
    step of a ``BNState`` TrainState) and ``trained_state(steps)`` (``steps`` steps from init).
    """
    net = types.SimpleNamespace(LinenNet=LinenNet, NNXNet=NNXNet, X=X, TX=TX)
    net.linen_step, net.trained_state = linen_step, trained_state
    return net
