"""Converted MaxText fixtures restore into the NNX twin with plain Orbax: MaxText's logits."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ckptconv
from ckptconv.convert import ConvertOptions, convert
from ckptconv.errors import PlanError
from ckptconv.models import ModelConfig
from ckptconv.models import nnx as nnx_models


def fixture_config(folder, **changes) -> ModelConfig:
    config = ModelConfig.from_maxtext(json.loads((folder / "config.json").read_text()))
    return config.replace(**changes) if changes else config


def abstract_twin(config):
    return nnx.eval_shape(lambda: nnx_models.Transformer(config, rngs=nnx.Rngs(0)))


def twin(config):
    graphdef, state = nnx.split(abstract_twin(config))
    zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), state)
    return nnx.merge(graphdef, zeros)


@jax.jit
def _logits(graphdef, state, tokens):
    model = nnx.merge(graphdef, state)
    positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
    return model(tokens, positions)


def logits_of(model, tokens):
    graphdef, state = nnx.split(model)
    return np.asarray(_logits(graphdef, state, jnp.asarray(tokens)))


@pytest.mark.parametrize(
    "name,options,changes",
    [
        ("A", ConvertOptions(), {}),
        ("A", ConvertOptions(params_only=True), {}),
        ("B", ConvertOptions(scan_layers=True, params_only=True), {"scan_layers": True}),
        ("B", ConvertOptions(), {}),
    ],
)
def test_converted_fixture_reproduces_maxtext_logits(
    maxtext_fixtures, tmp_path, name, options, changes
):
    folder = maxtext_fixtures / name
    convert(folder / "ckpt", tmp_path / "nnx", options=options)
    model = twin(fixture_config(folder, **changes))
    ckptconv.restore(tmp_path / "nnx", model, strict=options.params_only)
    ref = np.load(folder / "reference.npz")
    logits = logits_of(model, ref["tokens"])
    np.testing.assert_allclose(logits, ref["logits"], atol=1e-5, rtol=0)


def test_strict_restore_names_the_extra_rng_state(maxtext_fixtures, tmp_path):
    folder = maxtext_fixtures / "A"
    convert(folder / "ckpt", tmp_path / "nnx")
    with pytest.raises(PlanError, match=r"rngs/.*extra.*strict=False"):
        ckptconv.restore(tmp_path / "nnx", twin(fixture_config(folder)))


def test_restore_mismatch_names_the_path(maxtext_fixtures, tmp_path):
    folder = maxtext_fixtures / "A"
    convert(folder / "ckpt", tmp_path / "nnx", options=ConvertOptions(params_only=True))
    wrong = twin(fixture_config(folder, nnx_scan_axis=1))
    with pytest.raises(PlanError, match=r"model/decoder/layers/.*mismatch: expected float32\["):
        ckptconv.restore(tmp_path / "nnx", wrong)


def test_sharded_restore_reads_straight_into_named_shardings(maxtext_fixtures, tmp_path):
    from ckptconv.nnx_restore import param_shardings
    from ckptconv.sharding import make_mesh

    folder = maxtext_fixtures / "A"
    convert(folder / "ckpt", tmp_path / "nnx", options=ConvertOptions(params_only=True))
    config = fixture_config(folder)
    plain = twin(config)
    ckptconv.restore(tmp_path / "nnx", plain)
    mesh = make_mesh("fsdp=4,tensor=2")
    sharded = twin(config)
    ckptconv.restore(tmp_path / "nnx", sharded, mesh=mesh, rules="maxtext")
    expected = param_shardings(sharded, mesh=mesh, rules="maxtext")
    got = nnx.to_pure_dict(nnx.state(sharded))
    want = nnx.to_pure_dict(nnx.state(plain))
    flat_got = dict(jax.tree_util.tree_leaves_with_path(got))
    flat_exp = dict(jax.tree_util.tree_leaves_with_path(expected))
    assert flat_got.keys() == flat_exp.keys()
    sharded_dims = 0
    for path, arr in flat_got.items():
        assert arr.sharding == flat_exp[path], jax.tree_util.keystr(path)
        sharded_dims += sum(s is not None for s in arr.sharding.spec)
    assert sharded_dims >= 10  # the test would be vacuous if everything were replicated
    for path, arr in jax.tree_util.tree_leaves_with_path(want):
        np.testing.assert_array_equal(np.asarray(flat_got[path]), np.asarray(arr))
    q = sharded.decoder.layers.self_attention.query.kernel.value
    assert {s.data.shape for s in q.addressable_shards} == {(2, 16, 2, 16)}


def test_readme_plain_orbax_snippet(tmp_path):
    """The README's plain-Orbax restore works on ckptconv's output (no ckptconv involved)."""
    import optax
    import orbax.checkpoint as ocp

    from ckptconv.demo import DEMO_CONFIG, _train_linen

    config = ModelConfig(**{**DEMO_CONFIG, "num_decoder_layers": 1})
    _, state, tokens, positions = _train_linen(config, steps=1)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(tmp_path / "linen", state)
    ckptr.wait_until_finished()
    convert(tmp_path / "linen", tmp_path / "nnx")

    model = nnx_models.Transformer(config, rngs=nnx.Rngs(5))
    optimizer = nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.Param)
    abstract = {"model": nnx.state(model), "optimizer": nnx.state(optimizer)}
    restored = ocp.StandardCheckpointer().restore(str(tmp_path / "nnx"), abstract)
    nnx.update(model, restored["model"])
    nnx.update(optimizer, restored["optimizer"])
    assert int(optimizer.step.value) == 1
    np.testing.assert_array_equal(
        np.asarray(model.token_embedder.embedding.value),
        np.asarray(state.params["token_embedder"]["embedding"]),
    )
