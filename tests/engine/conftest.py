"""Shared fixtures of the engine tests: a tiny config, random params, converted fixtures."""

import pathlib

import numpy as np
import pytest

from ckptconv.convert import convert
from ckptconv.engine import Engine
from ckptconv.models import ModelConfig


@pytest.fixture(scope="session")
def tiny_config(make_config):
    return make_config(max_target_length=40, max_prefill_predict_length=16)


@pytest.fixture(scope="session")
def make_linen_params(random_linen_params):
    """``make_linen_params(config, seed=0)``: random Linen params, fast."""
    return random_linen_params


@pytest.fixture(scope="session")
def tiny_params(tiny_config, random_linen_params):
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
