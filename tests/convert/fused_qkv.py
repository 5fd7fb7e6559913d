"""Twin test models for `propose`: a Linen decoder with one fused qkv kernel per layer and an
NNX port of it with separate q/k/v projections, a different tree and different names.

Sizes are chosen so that a shape-based matcher meets exactly one ambiguity, the order of the
q/k/v parts of the fused kernel: V=64, E=32, H*D=24, F=48 are all different.

    Linen (params)                         NNX (nnx.state)
    Embed_0/embedding        [V, E]        embedder/embedding         [V, E]
    layer_{i}/LayerNorm_0/{scale,bias} [E] layers/{i}/norm/{scale,bias} [E]
    layer_{i}/attn/qkv       [3, H, D, E]  layers/{i}/attn/{q,k,v}_proj/kernel [E, H, D]
    layer_{i}/attn/Dense_0/kernel [H*D, E] layers/{i}/attn/o_proj/kernel [H, D, E]
    layer_{i}/mlp/Dense_0/kernel [E, F]    layers/{i}/mlp/up_proj/kernel [E, F]
    layer_{i}/mlp/Dense_1/kernel [F, E]    layers/{i}/mlp/down_proj/kernel [F, E]
    LayerNorm_0/{scale,bias} [E]           final_norm/{scale,bias} [E]
    Dense_0/kernel           [E, V]        lm_head/kernel             [E, V]

Blocks are parallel (GPT-J style): ``x + attn(norm(x)) + mlp(norm(x))``, causal, float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import linen as nn
from flax import nnx

V, E, H, D, F, NUM_LAYERS = 64, 32, 4, 6, 48, 3

HAND_MAPPING = r"""
version: 1
layout: params
rules:
  - rename: {match: '^Dense_0/kernel$', to: 'lm_head/kernel'}
  - rename: {match: '^Embed_0/embedding$', to: 'embedder/embedding'}
  - rename: {match: '^LayerNorm_0/bias$', to: 'final_norm/bias'}
  - rename: {match: '^LayerNorm_0/scale$', to: 'final_norm/scale'}
  - rename: {match: '^layer_(\d+)/LayerNorm_0/bias$', to: 'layers/\1/norm/bias'}
  - rename: {match: '^layer_(\d+)/LayerNorm_0/scale$', to: 'layers/\1/norm/scale'}
  - rename: {match: '^layer_(\d+)/attn/Dense_0/kernel$', to: 'layers/\1/attn/o_proj/kernel'}
  - reshape: {match: '^layers/(\d+)/attn/o_proj/kernel$', shape: [4, 6, 32]}
  - split:
      match: '^layer_(\d+)/attn/qkv$'
      axis: 0
      to: ['layers/\1/attn/q_proj/kernel', 'layers/\1/attn/k_proj/kernel',
           'layers/\1/attn/v_proj/kernel']
  - reshape: {match: '^layers/(\d+)/attn/(?:q_proj|k_proj|v_proj)/kernel$', shape: [4, 6, 32]}
  - transpose: {match: '^layers/(\d+)/attn/(?:q_proj|k_proj|v_proj)/kernel$', perm: [2, 0, 1]}
  - rename: {match: '^layer_(\d+)/mlp/Dense_0/kernel$', to: 'layers/\1/mlp/up_proj/kernel'}
  - rename: {match: '^layer_(\d+)/mlp/Dense_1/kernel$', to: 'layers/\1/mlp/down_proj/kernel'}
ignore: []
"""


def attend(q, k, v):
    """Causal softmax attention: ``[B, T, H, D]`` each -> ``[B, T, H, D]``."""
    t = q.shape[1]
    s = jnp.einsum("bthd,bshd->bhts", q, k) / np.float32(np.sqrt(D))
    mask = jnp.tril(jnp.ones((t, t), bool))[None, None]
    s = jnp.where(mask, s, jnp.float32(-1e30))
    return jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(s, axis=-1), v)


# ---------------------------------------------------------------- Linen


class Attention(nn.Module):
    @nn.compact
    def __call__(self, x):
        qkv = self.param("qkv", nn.initializers.normal(0.2), (3, H, D, E))
        q = jnp.einsum("bte,hde->bthd", x, qkv[0])
        k = jnp.einsum("bte,hde->bthd", x, qkv[1])
        v = jnp.einsum("bte,hde->bthd", x, qkv[2])
        o = attend(q, k, v)
        return nn.Dense(E, use_bias=False)(o.reshape(*o.shape[:2], H * D))


class Mlp(nn.Module):
    @nn.compact
    def __call__(self, x):
        up = nn.Dense(F, use_bias=False)  # Dense_0: modules are named in construction order
        down = nn.Dense(E, use_bias=False)  # Dense_1
        return down(nn.gelu(up(x)))


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm()(x)
        return x + Attention(name="attn")(h) + Mlp(name="mlp")(h)


class LinenDecoder(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(V, E)(tokens)
        for i in range(NUM_LAYERS):
            x = Block(name=f"layer_{i}")(x)
        x = nn.LayerNorm()(x)
        return nn.Dense(V, use_bias=False)(x)


# ---------------------------------------------------------------- NNX


class NNXAttention(nnx.Module):
    def __init__(self, rngs):
        self.q_proj = nnx.LinearGeneral(E, (H, D), use_bias=False, rngs=rngs)
        self.k_proj = nnx.LinearGeneral(E, (H, D), use_bias=False, rngs=rngs)
        self.v_proj = nnx.LinearGeneral(E, (H, D), use_bias=False, rngs=rngs)
        self.o_proj = nnx.LinearGeneral((H, D), E, axis=(-2, -1), use_bias=False, rngs=rngs)

    def __call__(self, x):
        q = jnp.einsum("bte,ehd->bthd", x, self.q_proj.kernel[...])
        k = jnp.einsum("bte,ehd->bthd", x, self.k_proj.kernel[...])
        v = jnp.einsum("bte,ehd->bthd", x, self.v_proj.kernel[...])
        o = attend(q, k, v)
        return o.reshape(*o.shape[:2], H * D) @ self.o_proj.kernel[...].reshape(H * D, E)


class NNXMlp(nnx.Module):
    def __init__(self, rngs):
        self.up_proj = nnx.Linear(E, F, use_bias=False, rngs=rngs)
        self.down_proj = nnx.Linear(F, E, use_bias=False, rngs=rngs)

    def __call__(self, x):
        return self.down_proj(nnx.gelu(self.up_proj(x)))


class NNXBlock(nnx.Module):
    def __init__(self, rngs):
        self.norm = nnx.LayerNorm(E, rngs=rngs)
        self.attn = NNXAttention(rngs)
        self.mlp = NNXMlp(rngs)

    def __call__(self, x):
        h = self.norm(x)
        return x + self.attn(h) + self.mlp(h)


class NNXDecoder(nnx.Module):
    def __init__(self, rngs):
        self.embedder = nnx.Embed(V, E, rngs=rngs)
        self.layers = nnx.List([NNXBlock(rngs) for _ in range(NUM_LAYERS)])
        self.final_norm = nnx.LayerNorm(E, rngs=rngs)
        self.lm_head = nnx.Linear(E, V, use_bias=False, rngs=rngs)

    def __call__(self, tokens):
        x = self.embedder(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.final_norm(x))


# ---------------------------------------------------------------- helpers


def linen_params(seed: int = 0) -> dict:
    """The Linen model's bare params tree (no ``params`` wrapper)."""
    tokens = jnp.zeros((1, 4), jnp.int32)
    return LinenDecoder().init(jax.random.key(seed), tokens)["params"]


def nnx_abstract() -> NNXDecoder:
    """The NNX port, abstract (``nnx.eval_shape``)."""
    return nnx.eval_shape(lambda: NNXDecoder(nnx.Rngs(0)))


def target() -> NNXDecoder:
    """``--target tests.convert.fused_qkv:target``: the abstract NNX port."""
    return nnx_abstract()


def linen_logits(params: dict, tokens) -> jax.Array:
    """Float32 logits ``[B, T, V]`` of the Linen model."""
    return LinenDecoder().apply({"params": params}, tokens)


def nnx_logits(model: NNXDecoder, tokens) -> jax.Array:
    """Float32 logits ``[B, T, V]`` of the NNX port."""
    return model(tokens)


def flatten(tree, prefix: str = "") -> dict:
    """``{'a/b/c': leaf}`` of a nested mapping."""
    out = {}
    for k, v in tree.items():
        path = f"{prefix}{k}"
        if hasattr(v, "items"):
            out.update(flatten(v, path + "/"))
        else:
            out[path] = v
    return out


def leaves(flat: dict) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{path: (shape, dtype name)}`` of a flat dict of arrays or shape structs."""
    return {k: (tuple(v.shape), np.dtype(v.dtype).name) for k, v in flat.items()}


def linen_leaves(params: dict) -> dict[str, tuple[tuple[int, ...], str]]:
    """The source side for `propose`: the Linen params' leaves."""
    return leaves(flatten(params))


def nnx_leaves(model) -> dict[str, tuple[tuple[int, ...], str]]:
    """The target side for `propose`: the NNX state's leaves, ``model/`` and ``value`` off."""
    return leaves(flatten(nnx.to_pure_dict(nnx.state(model))))


def nnx_with(flat_arrays: dict) -> NNXDecoder:
    """A concrete NNX port holding ``flat_arrays`` (``{'layers/0/norm/scale': array}``)."""
    graphdef, state = nnx.split(nnx_abstract())
    pure = nnx.to_pure_dict(state)

    def fill(node, prefix):
        for k in node:
            path = f"{prefix}{k}"
            if hasattr(node[k], "items"):
                fill(node[k], path + "/")
            else:
                node[k] = jnp.asarray(flat_arrays[path])

    fill(pure, "")
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


def save_bare_params(path, params: dict) -> None:
    """Saves the bare params tree with Orbax's StandardCheckpointer (``layout: params``)."""
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(path, params)
    ckptr.wait_until_finished()


class Adapter:
    """A model adapter (``ckptconv.models.ModelAdapter``) for the port: verify's two sides."""

    def nnx_model(self) -> NNXDecoder:  # noqa: D102
        return nnx_abstract()

    def nnx_forward(self, model, tokens, positions):  # noqa: D102
        return model(tokens)

    def linen_forward(self, params, tokens, positions):  # noqa: D102
        return linen_logits(params, tokens)


def adapter() -> Adapter:
    """``--model fused_qkv:adapter``."""
    return Adapter()
