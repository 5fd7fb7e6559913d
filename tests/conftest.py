"""Test-wide setup: 8 simulated CPU devices, set once before JAX is imported."""

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
MAXTEXT_FIXTURES = FIXTURES / "maxtext"


@pytest.fixture(scope="session")
def maxtext_fixtures() -> pathlib.Path:
    """Folder of the real MaxText fixtures A and B copied into the repository."""
    return MAXTEXT_FIXTURES


def pytest_configure(config):  # noqa: D103
    if jax.device_count() != 8:
        raise RuntimeError(f"tests need 8 simulated CPU devices, JAX sees {jax.device_count()}")


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
def make_config():
    """``make_config(**changes)``: a tiny float32 ModelConfig (fixture-B-like sizes)."""
    from ckptconv.models import ModelConfig

    return lambda **changes: ModelConfig(**{**TINY, **changes})


@pytest.fixture(scope="session")
def random_linen_params():
    """``random_linen_params(config, seed=0)``: a Linen params tree of random values, fast.

    Shapes come from ``jax.eval_shape`` of ``init`` (no compile); values from numpy, so tests
    do not pay for compiling random initializers.
    """
    import jax.numpy as jnp
    import numpy as np

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
