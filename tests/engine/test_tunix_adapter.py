"""Proof on code ckptconv did not write: tunix's NNX Llama 3 through ``examples/tunix_llama3.py``.

Needs ``pip install --no-deps google-tunix==0.1.7`` (the README's test command and .ci/run do
it; einops and jaxtyping come with the ``[test]`` extra). A missing tunix fails these tests.
"""

import json
import pathlib
import sys

import numpy as np
import orbax.checkpoint as ocp
import pytest
from click.testing import CliRunner
from flax import nnx

from ckptconv.cli import main
from ckptconv.convert import ConvertOptions, convert
from ckptconv.engine import Engine, decode, verify
from ckptconv.sharding import make_mesh

ROOT = pathlib.Path(__file__).parents[2]
sys.path.insert(0, str(ROOT / "tests" / "models"))
sys.path.insert(0, str(ROOT))
import toy_model  # noqa: E402

import examples.tunix_llama3 as tx  # noqa: E402

try:
    tx.import_llama3()
except ImportError as e:  # a missing test dependency fails the suite, never skips it
    pytest.fail(
        f"tunix's llama3 cannot be imported ({e}): pip install --no-deps google-tunix==0.1.7",
        pytrace=False,
    )

MESHES = {"1": ("data=1", 1), "2x4": ("data=2,tensor=4", 8)}


@pytest.fixture(autouse=True)
def _allow_rank_promotion():
    """tunix's own code broadcasts across ranks, which the suite's JAX config refuses."""
    import jax

    with jax.numpy_rank_promotion("allow"):
        yield


def own_greedy(adapter, prompt, steps):
    """tunix's model decoding itself: one full forward pass per token."""
    model, seq = adapter.nnx_model(), list(prompt)
    for _ in range(steps):
        tokens = np.asarray([seq], np.int32)
        positions = np.arange(len(seq), dtype=np.int32)[None]
        seq.append(int(np.argmax(adapter.nnx_forward(model, tokens, positions)[0, -1])))
    return seq[len(prompt) :]


def _str_keys(tree):
    if isinstance(tree, dict):
        return {str(k): _str_keys(v) for k, v in tree.items()}
    return np.asarray(tree)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """tunix's weights as a MaxText-layout checkpoint, and its NNX conversion."""
    root = tmp_path_factory.mktemp("tunix")
    params = _str_keys(nnx.to_pure_dict(nnx.state(tx.adapter().nnx_model())))
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(root / "linen", {"params": {"params": params}, "step": np.int32(0)})
    ckptr.wait_until_finished()
    # tunix numbers its layers in a list: no layer family to stack.
    convert(root / "linen", root / "nnx", options=ConvertOptions(families=()))
    return root / "linen", root / "nnx"


@pytest.mark.parametrize("mesh", list(MESHES))
def test_engine_decode_equals_tunix_full_forward(mesh, ckpts):
    import jax

    spec, n = MESHES[mesh]
    adapter = tx.adapter()
    engine = Engine(adapter, mesh=make_mesh(spec, jax.devices()[:n]), max_concurrent_decodes=2)
    params = engine.load_params(ckpts[1])
    for slot, prompt in ((1, [3, 7, 1, 9, 4]), (0, [11, 2])):
        result = decode(engine, params, prompt, max_new_tokens=8, slot=slot)
        assert result.generated_ids == own_greedy(adapter, prompt, 8)


def test_verify_passes_faithful_and_fails_perturbed(ckpts, tmp_path):
    linen, nnx_ckpt = ckpts
    good = verify(linen, nnx_ckpt, tx.adapter())
    assert good.ok and good.decode.ok and good.weights.max_abs_diff == [0.0] * 8
    path = ("model", "lm_head", "w", "value")
    bad_ckpt = toy_model.perturbed_copy(nnx_ckpt, tmp_path / "bad", path, factor=1.5)
    bad = verify(linen, bad_ckpt, tx.adapter())
    assert not bad.ok and not bad.weights.ok


def test_cli_decode_with_the_example_adapter(ckpts, monkeypatch):
    monkeypatch.chdir(ROOT)
    args = ["decode", str(ckpts[1]), "--model", "examples.tunix_llama3:adapter"]
    result = CliRunner().invoke(main, [*args, "--prompt-ids", "3,7,1", "--json"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["generated_ids"] == own_greedy(tx.adapter(), [3, 7, 1], 8)
