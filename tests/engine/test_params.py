import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from ckptconv.engine import Engine
from ckptconv.errors import CkptconvError, LayoutError, PlanError
from ckptconv.sharding import make_mesh


def _arrays(params):
    return {
        jax.tree_util.keystr(p): np.asarray(a)
        for p, a in jax.tree_util.tree_leaves_with_path(params)
    }


@pytest.fixture(scope="module")
def engine_a(fixture_config):
    return Engine(fixture_config("A"), mesh=make_mesh("fsdp=2,tensor=4"))


def test_every_source_gives_the_same_sharded_params(engine_a, nnx_ckpts, maxtext_fixtures):
    from_nnx = engine_a.load_params(nnx_ckpts["A"])  # Orbax restore into the shardings
    from_linen_ckpt = engine_a.load_params(maxtext_fixtures / "A" / "ckpt")  # in memory
    restored = ocp.PyTreeCheckpointer().restore(str((maxtext_fixtures / "A" / "ckpt").resolve()))
    from_linen_tree = engine_a.load_params(restored["params"])  # {"params": ...} wrapper
    from_state = engine_a.load_params(from_nnx)
    want = _arrays(from_nnx)
    assert len(want) == 12
    shardings = jax.tree.leaves(engine_a.param_shardings)
    assert any(not s.is_fully_replicated for s in shardings)
    for params in (from_nnx, from_linen_ckpt, from_linen_tree, from_state):
        assert isinstance(params, nnx.State)
        assert [a.sharding for a in jax.tree.leaves(params)] == shardings
        got = _arrays(params)
        assert got.keys() == want.keys()
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_unscanned_checkpoint_into_scanned_config(fixture_config, maxtext_fixtures, nnx_ckpts):
    config = fixture_config("B")
    engine = Engine(config.replace(scan_layers=True), max_concurrent_decodes=1)
    params = engine.load_params(maxtext_fixtures / "B" / "ckpt")  # stacked in memory
    assert params["decoder"]["layers"]["mlp"]["wo"]["kernel"].shape == (3, 96, 32)
    with pytest.raises(PlanError, match=r"decoder/layers/mlp/wo/kernel.*missing"):
        engine.load_params(nnx_ckpts["B"])  # the NNX checkpoint stays unscanned


@pytest.mark.parametrize("source", ["nnx", "linen"])
def test_checkpoint_config_mismatch_names_the_path(
    source, fixture_config, nnx_ckpts, maxtext_fixtures
):
    engine = Engine(fixture_config("B"), max_concurrent_decodes=1)
    path = nnx_ckpts["A"] if source == "nnx" else maxtext_fixtures / "A" / "ckpt"
    with pytest.raises(PlanError) as info:
        engine.load_params(path)
    message = str(info.value)
    assert str(path.name) in message and "decoder/" in message


def test_bad_sources(engine_a, tmp_path, fixture_config, make_linen_params):
    with pytest.raises(CkptconvError):
        engine_a.load_params(tmp_path / "missing")
    with pytest.raises(LayoutError, match="cannot load params from a list"):
        engine_a.load_params([1, 2])
    other = make_linen_params(fixture_config("B"))
    with pytest.raises(LayoutError, match="decoder"):
        engine_a.load_params(other)
