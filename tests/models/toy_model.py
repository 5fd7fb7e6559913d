"""A toy NNX decoder written for the tests, with an explicit cache whose batch axis is not first.

One attention layer (one head) plus an MLP-free residual, sinusoidal position features, and an
explicit cache ``{"k": [T, B, D], "v": [T, B, D]}`` (time first, batch second: a layout the
reference decoder does not use). ``adapter()`` is importable as ``toy_model:adapter``.
``linen_forward`` is the same math on a plain params tree shaped as Flax Linen's ``nn.Embed`` /
``nn.Dense`` would store it, so a Linen checkpoint of it converts to this model's NNX tree.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

VOCAB, DIM = 32, 16


def _features(positions):
    freqs = 1.0 / (10.0 ** (jnp.arange(DIM // 2, dtype=jnp.float32) / (DIM // 2)))
    angles = positions[..., None].astype(jnp.float32) * freqs.reshape(1, 1, -1)
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


def _attend(q, k, v, q_pos, k_pos, wo):
    """``q [B, L, D]`` against ``k, v [B, T, D]``; key ``t`` is visible where its position
    ``k_pos [B, T]`` is at most the query's ``q_pos [B, L]``."""
    scores = jnp.einsum("bld,btd->blt", q, k) / jnp.sqrt(jnp.float32(DIM))
    visible = k_pos[:, None, :] <= q_pos[:, :, None]
    scores = jnp.where(visible, scores, -1e30)
    return jnp.einsum("blt,btd->bld", jax.nn.softmax(scores, axis=-1), v) @ wo


def _forward(w, tokens, positions):
    x = w["embed"][tokens] + _features(positions)
    q, k, v = x @ w["wq"], x @ w["wk"], x @ w["wv"]
    h = x + _attend(q, k, v, positions, positions, w["wo"])
    return h @ w["unembed"]


class Toy(nnx.Module):
    """The toy decoder."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.embed = nnx.Embed(VOCAB, DIM, rngs=rngs)
        for name in ("wq", "wk", "wv", "wo"):
            setattr(self, name, nnx.Linear(DIM, DIM, use_bias=False, rngs=rngs))
        self.unembed = nnx.Linear(DIM, VOCAB, use_bias=False, rngs=rngs)

    def weights(self):
        w = {n: getattr(self, n).kernel.get_value() for n in ("wq", "wk", "wv", "wo", "unembed")}
        return {**w, "embed": self.embed.embedding.get_value()}

    def __call__(self, tokens, positions):
        return _forward(self.weights(), tokens, positions)

    def decode(self, tokens, positions, cache):
        w = self.weights()
        x = w["embed"][tokens] + _features(positions)
        q, k, v = x @ w["wq"], x @ w["wk"], x @ w["wv"]
        batch = jnp.arange(tokens.shape[0])[None, :]
        # The cache is [T, B, D]: row b writes its keys at its own positions.
        ck = cache["k"].at[positions.T, batch].set(k.transpose(1, 0, 2))
        cv = cache["v"].at[positions.T, batch].set(v.transpose(1, 0, 2))
        t = ck.shape[0]
        k_pos = jnp.broadcast_to(jnp.arange(t, dtype=positions.dtype), (tokens.shape[0], t))
        out = _attend(q, ck.transpose(1, 0, 2), cv.transpose(1, 0, 2), positions, k_pos, w["wo"])
        return (x + out) @ w["unembed"], {"k": ck, "v": cv}


def linen_params(model: Toy):
    """The model's weights as a Linen params tree (``nn.Embed`` / ``nn.Dense`` names)."""
    w = model.weights()
    out = {n: {"kernel": w[n]} for n in ("wq", "wk", "wv", "wo", "unembed")}
    return {**out, "embed": {"embedding": w["embed"]}}


class ToyAdapter:
    """The toy model through the explicit-cache protocol."""

    vocab_size = VOCAB
    max_prefill_length = 8
    max_target_length = 24

    def __init__(self, seed: int = 0):
        self.seed = seed

    def nnx_model(self):
        return Toy(rngs=nnx.Rngs(self.seed))

    def nnx_forward(self, model, tokens, positions):
        return model(tokens, positions)

    def linen_forward(self, params, tokens, positions):
        w = {n: params[n]["kernel"] for n in ("wq", "wk", "wv", "wo", "unembed")}
        return _forward({**w, "embed": params["embed"]["embedding"]}, tokens, positions)

    def init_cache(self, model, *, batch, max_length):
        del model
        zeros = jnp.zeros((max_length, batch, DIM), jnp.float32)
        return {"k": zeros, "v": zeros}

    def cache_batch_axes(self, cache):
        return {"k": 1, "v": 1}

    def nnx_decode(self, model, tokens, positions, cache):
        return model.decode(tokens, positions, cache)


class NoLinen(ToyAdapter):
    """The toy without ``linen_forward`` (verify must refuse it)."""

    linen_forward = None


class BadAxes(ToyAdapter):
    """A cache whose slot axis the adapter gets wrong."""

    def cache_batch_axes(self, cache):
        return {"k": 2, "v": 2}


class Wider(ToyAdapter):
    """A model the toy's checkpoint does not fit (another unembedding)."""

    def nnx_model(self):
        model = super().nnx_model()
        model.unembed = nnx.Linear(DIM, 40, use_bias=False, rngs=nnx.Rngs(0))
        return model


def wider():
    return Wider()


def adapter():
    return ToyAdapter()


def no_linen():
    return NoLinen()


def bad_axes():
    return BadAxes()


def not_an_adapter():
    return object()


def raises():
    raise RuntimeError("no weights here")


def save_checkpoints(root, *, seed: int = 0):
    """Saves the toy's weights as a MaxText-layout Linen checkpoint and converts it to NNX.

    Returns:
        ``(linen_path, nnx_path)``.
    """
    import numpy as np
    import orbax.checkpoint as ocp

    from ckptconv.convert import convert

    params = jax.tree.map(np.asarray, linen_params(ToyAdapter(seed).nnx_model()))
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(root / "linen", {"params": {"params": params}, "step": np.int32(0)})
    ckptr.wait_until_finished()
    convert(root / "linen", root / "nnx")
    return root / "linen", root / "nnx"


def perturbed_copy(src, dst, path, factor=1.01):
    """A copy of checkpoint ``src`` at ``dst`` with row 0 of leaf ``path`` times ``factor``."""
    import numpy as np

    from ckptconv.testing import edited_copy

    def edit(p, value):
        if p != path:
            return value
        value = value.copy()
        value[0] *= np.asarray(factor, value.dtype)
        return value

    return edited_copy(src, dst, edit)
