"""Shared by the sharding tests: the reference decoder's logical names and a mesh drop-out."""

import pytest
from jax.sharding import PartitionSpec


@pytest.fixture(scope="session")
def reference_logical_names() -> list[str]:
    """Every logical name the reference decoder's params and KV caches carry."""
    return [
        "embed",
        "vocab",
        "heads",
        "q_heads",
        "kv_heads",
        "kv_head_dim",
        "head_dim",
        "mlp",
        "norm",
        "layers",
        "cache_batch",
        "cache_batch_prefill",
        "cache_sequence",
        "cache_heads",
        "cache_kv",
    ]


def _drop(spec, mesh) -> PartitionSpec:
    out = []
    for entry in spec:
        axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        kept = tuple(a for a in axes if mesh.shape.get(a, 1) > 1)
        out.append(None if not kept else kept[0] if len(kept) == 1 else kept)
    return PartitionSpec(*out)


@pytest.fixture(scope="session")
def drop():
    """``drop(spec, mesh)``: flax's spec with mesh axes absent or of size 1 removed.

    The reference mesh drop-out, written independently of the package.
    """
    return _drop
