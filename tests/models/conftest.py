"""Shared fixtures of the model tests: tiny configs and the real MaxText fixtures' params."""

import functools
import json
import pathlib
import warnings

import numpy as np
import orbax.checkpoint as ocp
import pytest

from ckptconv.models import ModelConfig

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
    max_target_length=24,
    max_prefill_predict_length=8,
)


@pytest.fixture(scope="session")
def tiny_config():
    """Factory of a tiny float32 config (fixture-B-like sizes); keyword overrides allowed."""

    def make(**changes):
        return ModelConfig(**{**TINY, **changes})

    return make


@functools.cache
def _load(root: str, name: str):
    folder = pathlib.Path(root) / name
    config = ModelConfig.from_maxtext(json.loads((folder / "config.json").read_text()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sharding info not provided" on restore
        restored = ocp.PyTreeCheckpointer().restore(str((folder / "ckpt").resolve()))
    params = restored["params"]["params"]
    reference = dict(np.load(folder / "reference.npz"))
    return config, params, reference


@pytest.fixture(scope="session")
def maxtext_model(maxtext_fixtures):
    """``maxtext_model("A") -> (config, linen params, reference.npz dict)``, loaded once."""
    return lambda name: _load(str(maxtext_fixtures), name)


@pytest.fixture(scope="session")
def random_linen_params():
    """``random_linen_params(config, seed=0)``: a Linen params tree of random values, fast.

    Shapes come from ``jax.eval_shape`` of ``init`` (no compile); values from numpy, so tests
    do not pay for compiling random initializers.
    """
    import jax
    import jax.numpy as jnp

    from ckptconv.models import linen

    def make(config, seed=0):
        tokens = jnp.zeros((1, 2), jnp.int32)
        shapes = jax.eval_shape(linen.Transformer(config).init, jax.random.key(0), tokens, tokens)
        rng = np.random.default_rng(seed)

        def value(path, s):
            noise = rng.standard_normal(s.shape).astype(np.float32)
            if jax.tree_util.keystr(path).endswith("['scale']"):
                return jnp.asarray(1 + 0.1 * noise, s.dtype)
            return jnp.asarray(noise / np.sqrt(s.shape[0]), s.dtype)

        return jax.tree_util.tree_map_with_path(value, shapes["params"])

    return make
