"""Shared fixtures of the engine tests: a tiny config, random params, converted fixtures."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ckptconv.convert import convert
from ckptconv.engine import Engine
from ckptconv.models import ModelConfig, linen

TINY = dict(
    emb_dim=32,
    num_query_heads=4,
    num_kv_heads=2,
    head_dim=8,
    mlp_dim=64,
    num_decoder_layers=2,
    vocab_size=64,
    dtype="float32",
    weight_dtype="float32",
    max_target_length=40,
    max_prefill_predict_length=16,
)


@pytest.fixture(scope="session")
def tiny_config():
    return ModelConfig(**TINY)


def random_linen_params(config, seed=0):
    """A Linen params tree of random values (numpy, no compiled initializers)."""
    tokens = jnp.zeros((1, 2), jnp.int32)
    shapes = jax.eval_shape(linen.Transformer(config).init, jax.random.key(0), tokens, tokens)
    rng = np.random.default_rng(seed)

    def value(path, s):
        noise = rng.standard_normal(s.shape).astype(np.float32)
        if jax.tree_util.keystr(path).endswith("['scale']"):
            return (1 + 0.1 * noise).astype(s.dtype)
        return (noise / np.sqrt(s.shape[0])).astype(s.dtype)

    return jax.tree_util.tree_map_with_path(value, shapes["params"])


@pytest.fixture(scope="session")
def make_linen_params():
    """``make_linen_params(config, seed=0)``: random Linen params, fast."""
    return random_linen_params


@pytest.fixture(scope="session")
def tiny_params(tiny_config):
    return random_linen_params(tiny_config, seed=0)


@pytest.fixture(scope="session")
def engine1(tiny_config):
    """A one-device, four-slot engine, shared so that its programs compile once."""
    return Engine(tiny_config, max_concurrent_decodes=4)


@pytest.fixture(scope="session")
def params1(engine1, tiny_params):
    return engine1.load_params(tiny_params)


@pytest.fixture(scope="session")
def fixture_config(maxtext_fixtures):
    return lambda name: ModelConfig.load(maxtext_fixtures / name / "config.json")


@pytest.fixture(scope="session")
def reference(maxtext_fixtures):
    return lambda name: dict(np.load(maxtext_fixtures / name / "reference.npz"))


@pytest.fixture(scope="session")
def nnx_ckpts(maxtext_fixtures, tmp_path_factory) -> dict[str, pathlib.Path]:
    """Fixtures A and B converted to NNX checkpoints (as ``ckptconv linen-to-nnx`` does)."""
    root = tmp_path_factory.mktemp("nnx")
    out = {}
    for name in ("A", "B"):
        convert(maxtext_fixtures / name / "ckpt", root / name)
        out[name] = root / name
    return out
