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


def _decode_inputs(config, lengths, steps, seed=0):
    rng = np.random.default_rng(seed)
    full = rng.integers(1, config.vocab_size, size=(len(lengths), max(lengths) + steps))
    return full.astype(np.int32)


def _pad_prompts(config, full, lengths):
    p = config.max_prefill_predict_length
    prompt = np.zeros((len(lengths), p), np.int32)
    segments = np.zeros((len(lengths), p), np.int32)
    for row, n in enumerate(lengths):
        prompt[row, :n] = full[row, :n]
        segments[row, :n] = 1
    positions = np.broadcast_to(np.arange(p, dtype=np.int32), prompt.shape)
    return prompt, positions, segments


@pytest.fixture(scope="session")
def decode_inputs():
    """``decode_inputs(config, lengths, steps, seed=0)``: random int32 token rows.

    One row per prompt length, ``max(lengths) + steps`` long (ids from 1, never the pad 0).
    """
    return _decode_inputs


@pytest.fixture(scope="session")
def pad_prompts():
    """``pad_prompts(config, full, lengths) -> (prompt, positions, segments)``, end-padded.

    Each row's first ``lengths[row]`` tokens padded to ``max_prefill_predict_length``, segment
    ids 1 for real tokens and 0 for pads, positions ``0..P-1``.
    """
    return _pad_prompts
