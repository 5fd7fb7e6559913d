"""Shared helpers of the io tests, handed out as fixtures (test modules are not importable)."""

import pathlib
import shutil

import jax
import numpy as np
import pytest


def _parse_layout(path: pathlib.Path) -> dict:
    out = {}
    for line in path.read_text().splitlines():
        key, *rest = line.split("\t")
        if rest == ["<empty>"]:
            out[tuple(key.split("/"))] = None
        else:
            fields = dict(item.split("=", 1) for item in rest)
            shape = tuple(int(d) for d in fields["shape"].strip("()").split(",") if d.strip())
            out[tuple(key.split("/"))] = (shape, fields["dtype"])
    return out


def _tree_get(tree, path):
    for key in path:
        tree = tree[int(key)] if isinstance(tree, (list, tuple)) else tree[key]
    return tree


def _as_numpy(value) -> np.ndarray:
    if jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
        value = jax.random.key_data(value)
    return np.asarray(value)


@pytest.fixture
def parse_layout():
    """Parses a fixture's layout.txt into {path: (shape, dtype) or None}."""
    return _parse_layout


@pytest.fixture
def tree_get():
    """Gets a leaf of a restored tree by string key path (list entries by index)."""
    return _tree_get


@pytest.fixture
def as_numpy():
    """A restored value as numpy, typed PRNG keys as their key data."""
    return _as_numpy


@pytest.fixture
def fixture_copy(maxtext_fixtures, tmp_path):
    """Copies a fixture checkpoint (``"A"`` or ``"B"``) to tmp_path and returns the copy."""

    def copy(name: str, dest: str = "ckpt") -> pathlib.Path:
        target = tmp_path / dest
        shutil.copytree(maxtext_fixtures / name / "ckpt", target)
        return target

    return copy
