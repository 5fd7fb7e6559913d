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
