"""The engine, decode and verify through a model adapter the reference does not provide.

The toy model (``tests/models/toy_model.py``) keeps an explicit cache ``[T, B, D]``, batch
axis second, through the adapter's ``init_cache`` / ``cache_batch_axes`` / ``nnx_decode``.
"""

import json
import pathlib
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from ckptconv.cli import main
from ckptconv.engine import Engine, decode, verify
from ckptconv.sharding import make_mesh

sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "models"))
import toy_model  # noqa: E402

MESHES = {"1": "data=1", "2x4": "data=2,tensor=4"}


def full_forward_greedy(adapter, prompt, steps):
    """The toy's own greedy decoding: one full forward pass per token, no cache."""
    model, seq = adapter.nnx_model(), list(prompt)
    for _ in range(steps):
        tokens = np.asarray([seq], np.int32)
        logits = adapter.nnx_forward(model, tokens, np.arange(len(seq), dtype=np.int32)[None])
        seq.append(int(np.argmax(logits[0, -1])))
    return seq[len(prompt) :]


@pytest.fixture(scope="module")
def toy_ckpts(tmp_path_factory):
    return toy_model.save_checkpoints(tmp_path_factory.mktemp("toy"))


def _mesh(name):
    import jax

    n = 1 if name == "1" else 8
    return make_mesh(MESHES[name], jax.devices()[:n])


@pytest.mark.parametrize("mesh", list(MESHES))
def test_engine_greedy_equals_full_forward_greedy(mesh, toy_ckpts):
    adapter = toy_model.adapter()
    engine = Engine(adapter, mesh=_mesh(mesh), max_concurrent_decodes=3)
    params = engine.load_params(toy_ckpts[1])  # the NNX checkpoint, restored sharded
    for slot, prompt in ((0, [3, 7, 1, 9, 4]), (2, [5])):
        result = decode(engine, params, prompt, max_new_tokens=10, slot=slot)
        assert result.generated_ids == full_forward_greedy(adapter, prompt, 10)


def test_continuous_batching_with_the_batch_axis_second():
    """Two prompts of different lengths decoded side by side, each as if alone."""
    adapter = toy_model.adapter()
    engine = Engine(adapter, max_concurrent_decodes=2)
    params = engine.load_params(adapter.nnx_model())
    prompts = ([2, 4, 6], [9, 8, 7, 6, 5, 4, 3])
    state = engine.init_decode_state()
    tokens = {0: [], 1: []}
    for slot, prompt in enumerate(prompts):
        padded, n = engine.pad_tokens(prompt)
        prefix, first = engine.prefill(params=params, padded_tokens=padded, true_length=n)
        state = engine.insert(prefix, state, slot)
        tokens[slot].append(int(np.asarray(first.data)[0, 0]))
    for _ in range(6):
        state, result = engine.generate(params, state)
        for slot in (0, 1):
            tokens[slot].append(int(np.asarray(result.data)[slot, 0]))
    for slot, prompt in enumerate(prompts):
        assert tokens[slot] == full_forward_greedy(adapter, prompt, 7)


def _perturbed(src, dst):
    """A copy of the NNX checkpoint with the query kernel's first row times 1.01."""
    return toy_model.perturbed_copy(src, dst, ("model", "wq", "kernel", "value"))


@pytest.mark.parametrize("mesh", list(MESHES))
def test_verify_passes_faithful_and_fails_perturbed(mesh, toy_ckpts, tmp_path):
    linen, nnx_ckpt = toy_ckpts
    adapter = toy_model.adapter()
    good = verify(linen, nnx_ckpt, adapter, mesh=_mesh(mesh))
    assert good.ok and good.weights.ok and good.decode.ok
    assert good.weights.max_abs_diff == [0.0] * 8  # same math on the same weights
    assert good.decode.tokens_agree and good.dtype == "float32"
    bad = verify(linen, _perturbed(nnx_ckpt, tmp_path / "bad"), adapter, mesh=_mesh(mesh))
    assert not bad.ok and not bad.weights.ok
    assert max(bad.weights.max_abs_diff) > bad.weights.atol


def test_verify_weights_only_for_an_adapter_without_engine_support(toy_ckpts, tmp_path):
    class ForwardOnly:
        vocab_size = toy_model.VOCAB
        _toy = toy_model.ToyAdapter()
        nnx_model = _toy.nnx_model
        nnx_forward = _toy.nnx_forward
        linen_forward = _toy.linen_forward

    linen, nnx_ckpt = toy_ckpts
    result = verify(linen, nnx_ckpt, ForwardOnly())
    assert result.ok and result.decode is None and result.engine_ids == []
    assert "decode: skipped" in "\n".join(result.lines())
    bad = verify(linen, _perturbed(nnx_ckpt, tmp_path / "bad"), ForwardOnly())
    assert not bad.ok


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def test_cli_decode_and_verify_with_model(toy_ckpts, tmp_path):
    linen, nnx_ckpt = toy_ckpts
    prompt = [3, 7, 1, 9, 4]
    code, out, err = run(
        "decode", nnx_ckpt, "--model", "toy_model:adapter", "--prompt-ids", "3,7,1,9,4",
        "--max-new-tokens", 6, "--json",
    )  # fmt: skip
    assert code == 0, err
    doc = json.loads(out)
    assert doc["generated_ids"] == full_forward_greedy(toy_model.adapter(), prompt, 6)

    code, out, err = run("verify", linen, nnx_ckpt, "--model", "toy_model:adapter", "--json")
    assert code == 0, err
    assert json.loads(out)["ok"]
    bad = _perturbed(nnx_ckpt, tmp_path / "bad")
    code, out, _ = run("verify", linen, bad, "--model", "toy_model:adapter")
    assert code == 1 and "DIFFERENT" in out
