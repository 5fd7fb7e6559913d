"""A :class:`ckptconv.models.ModelAdapter` for tunix's NNX Llama 3 (code ckptconv did not write).

Use it as ``--model examples.tunix_llama3:adapter`` (from the repository root) or copy it.

Installing tunix: its model modules need only flax, jax, einops and jaxtyping at import time,
but the ``tunix`` package's ``__init__`` imports its trainers (and their many dependencies).
So install it without them (``pip install --no-deps google-tunix einops jaxtyping``) and
import the model module without running ``tunix/__init__``: :func:`import_llama3` registers
empty parent packages first. This relies on tunix's file layout (tested with 0.1.7). tunix's
import turns ``flax_always_shard_variable`` off for the whole process; this example restores
it, and turns it off only while it builds tunix's model.

The model takes an explicit cache, one dict per layer, ``{"k", "v": [B, S, K, H],
"end_index": [B]}``, and an explicit attention mask; it writes every row at one shared
``end_index``. The engine decodes slots at different positions, so :meth:`nnx_decode` runs the
model once per row (a one-row cache whose ``end_index`` is the row's position) and masks keys
by position. The sizes are tiny: this is a test of the protocol, not a pretrained model.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx


def import_llama3() -> Any:
    """``tunix.models.llama3.model``, imported without ``tunix/__init__``."""
    if "tunix.models.llama3.model" in sys.modules:
        return sys.modules["tunix.models.llama3.model"]
    spec = importlib.util.find_spec("tunix")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("tunix is not installed: pip install --no-deps google-tunix")
    root = list(spec.submodule_search_locations)[0]
    for name, sub in (
        ("tunix", ""),
        ("tunix.models", "models"),
        ("tunix.models.llama3", "models/llama3"),
    ):
        if name not in sys.modules:
            pkg = types.ModuleType(name)
            pkg.__path__ = [os.path.join(root, sub)]
            sys.modules[name] = pkg
    import flax

    # tunix's import turns flax_always_shard_variable off for the whole process; put it back,
    # so that importing this example changes nothing for other models.
    saved = getattr(flax.config, "flax_always_shard_variable", None)
    try:
        from tunix.models.llama3 import model
    finally:
        if saved is not None:
            flax.config.update("flax_always_shard_variable", saved)
    return model


def _without_variable_sharding(make: Any) -> Any:
    """``make()`` with ``flax_always_shard_variable`` off, as tunix sets it for itself.

    tunix's params carry mesh-axis annotations, which flax would otherwise place eagerly (and
    refuse without a mesh). The setting is restored afterwards, so other models are unchanged.
    """
    import flax

    saved = getattr(flax.config, "flax_always_shard_variable", None)
    if saved is None:
        return make()
    flax.config.update("flax_always_shard_variable", False)
    try:
        return make()
    finally:
        flax.config.update("flax_always_shard_variable", saved)


def tiny_config(lib: Any) -> Any:
    """A two-layer Llama 3 of a few thousand parameters."""
    return lib.ModelConfig(
        num_layers=2,
        vocab_size=64,
        embed_dim=32,
        hidden_dim=64,
        num_heads=4,
        head_dim=8,
        num_kv_heads=2,
        rope_theta=10_000,
        norm_eps=1e-5,
    )


def _mask(q_pos: jax.Array, length: int) -> jax.Array:
    """``[B, L, S]``: key ``s`` is visible to a query at position ``p`` where ``s <= p``."""
    return jnp.arange(length)[None, None, :] <= q_pos[:, :, None]


class TunixLlama3Adapter:
    """tunix's ``Llama3`` through the explicit-cache protocol.

    Args:
        seed: Seed of the random weights.
        max_prefill_length: Longest prompt the engine takes.
        max_target_length: Prompt plus generated tokens (the cache length).
    """

    def __init__(self, seed: int = 0, *, max_prefill_length: int = 8, max_target_length: int = 24):
        self.lib = import_llama3()
        self.config = tiny_config(self.lib)
        self.seed = seed
        self.vocab_size = self.config.vocab_size
        self.max_prefill_length = max_prefill_length
        self.max_target_length = max_target_length

    def nnx_model(self) -> Any:
        """The model with random weights."""
        return _without_variable_sharding(
            lambda: self.lib.Llama3(self.config, rngs=nnx.Rngs(self.seed))
        )

    def nnx_forward(self, model: Any, tokens: jax.Array, positions: jax.Array) -> jax.Array:
        """The full causal forward pass (no cache), masking by position."""
        mask = positions[:, None, :] <= positions[:, :, None]
        logits, _ = model(tokens, positions, None, mask)
        return logits

    def linen_forward(self, params: Any, tokens: jax.Array, positions: jax.Array) -> jax.Array:
        """The same model on a plain params tree (what a Linen-side checkpoint stores)."""
        graphdef, state = nnx.split(self.nnx_model())
        nnx.replace_by_pure_dict(state, _int_keys(params, nnx.to_pure_dict(state)))
        return self.nnx_forward(nnx.merge(graphdef, state), tokens, positions)

    def init_cache(self, model: Any, *, batch: int, max_length: int) -> Any:
        """A zero cache, one dict per layer."""
        c = self.config
        kv = jnp.zeros((batch, max_length, c.num_kv_heads, c.head_dim), jnp.float32)
        end = jnp.zeros((batch,), jnp.int32)
        return {f"layer_{i}": {"k": kv, "v": kv, "end_index": end} for i in range(c.num_layers)}

    def cache_batch_axes(self, cache: Any) -> Any:
        """Every leaf's batch axis is first."""
        return jax.tree.map(lambda _: 0, cache)

    def nnx_decode(
        self, model: Any, tokens: jax.Array, positions: jax.Array, cache: Any
    ) -> tuple[jax.Array, Any]:
        """One call per row, each writing at its own position (see module)."""
        logits, rows = [], []
        length = cache["layer_0"]["k"].shape[1]
        for b in range(tokens.shape[0]):
            row = jax.tree.map(lambda x, b=b: x[b : b + 1], cache)
            start = positions[b : b + 1, 0].astype(jnp.int32)
            row = {name: {**layer, "end_index": start} for name, layer in row.items()}
            out, row = model(
                tokens[b : b + 1], positions[b : b + 1], row, _mask(positions[b : b + 1], length)
            )
            logits.append(out)
            rows.append(row)
        new = jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *rows)
        return jnp.concatenate(logits, axis=0), new


def _int_keys(tree: Any, like: Any) -> Any:
    """``tree`` with the keys of ``like`` (checkpoints store the ModuleList's ints as strings)."""
    if not isinstance(like, dict):
        return tree
    return {k: _int_keys(tree[str(k)] if str(k) in tree else tree[k], v) for k, v in like.items()}


def adapter() -> TunixLlama3Adapter:
    """The adapter with seed 0 (for ``--model examples.tunix_llama3:adapter``)."""
    return TunixLlama3Adapter()
