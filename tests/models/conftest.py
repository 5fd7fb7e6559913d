"""Shared fixtures of the model tests: tiny configs and the real MaxText fixtures' params."""

import functools
import json
import pathlib
import warnings

import numpy as np
import orbax.checkpoint as ocp
import pytest

from ckptconv.models import ModelConfig


@pytest.fixture(scope="session")
def tiny_config(make_config):
    """Factory of a tiny float32 config (fixture-B-like sizes); keyword overrides allowed."""
    return make_config


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
