"""The model adapter protocol: registry, ``load_adapter``, ``--model`` bad inputs, restore."""

import json
import pathlib
import sys

import numpy as np
import pytest
from click.testing import CliRunner

import ckptconv
from ckptconv.cli import main
from ckptconv.errors import ConfigError, EngineError, PlanError
from ckptconv.models import (
    ModelAdapter,
    ModelConfig,
    ReferenceAdapter,
    get_adapter,
    load_adapter,
    register_adapter,
)
from ckptconv.models.adapter import as_adapter, resolve_model

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import toy_model  # noqa: E402


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def test_reference_adapter_is_the_registered_default(make_config):
    config = make_config()
    adapter = get_adapter("reference", config)
    assert isinstance(adapter, ReferenceAdapter) and adapter.config == config
    assert isinstance(as_adapter(config), ReferenceAdapter)
    assert isinstance(adapter, ModelAdapter)
    assert adapter.vocab_size == config.vocab_size


def test_registry_holds_other_adapters():
    register_adapter("toy-test", toy_model.ToyAdapter)
    assert isinstance(get_adapter("toy-test", 3), toy_model.ToyAdapter)
    assert get_adapter("toy-test", 3).seed == 3
    with pytest.raises(ConfigError, match="no model adapter is registered as 'nope'"):
        get_adapter("nope")


def test_load_adapter_imports_calls_and_checks():
    adapter = load_adapter("toy_model:adapter")
    assert isinstance(adapter, toy_model.ToyAdapter)
    with pytest.raises(ConfigError, match="expected module:function"):
        load_adapter("toy_model")
    with pytest.raises(ConfigError, match="cannot import module no_such_mod"):
        load_adapter("no_such_mod:adapter")
    with pytest.raises(ConfigError, match="has no attribute missing"):
        load_adapter("toy_model:missing")
    with pytest.raises(ConfigError, match=r"raises\(\) raised RuntimeError: no weights here"):
        load_adapter("toy_model:raises")
    with pytest.raises(ConfigError, match="lacks nnx_model, nnx_forward"):
        load_adapter("toy_model:not_an_adapter")


def test_resolve_model_wants_exactly_one(tmp_path, make_config):
    with pytest.raises(ConfigError, match="exactly one.*neither"):
        resolve_model(None, None)
    with pytest.raises(ConfigError, match="exactly one.*both"):
        resolve_model("toy_model:adapter", "cfg.json")
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(make_config().to_dict()))
    assert isinstance(resolve_model(None, str(cfg)), ReferenceAdapter)


def test_engine_refuses_adapters_it_cannot_run():
    from ckptconv.engine import Engine

    with pytest.raises(EngineError, match="lacks init_cache, cache_batch_axes, nnx_decode"):
        Engine(ForwardOnly())
    with pytest.raises(EngineError, match=r"cache leaf \['k'\] .* has no slot axis"):
        Engine(toy_model.BadAxes())


class ForwardOnly:
    vocab_size = toy_model.VOCAB

    def nnx_model(self):
        return toy_model.ToyAdapter().nnx_model()

    def nnx_forward(self, model, tokens, positions):
        return model(tokens, positions)


@pytest.fixture(scope="module")
def toy_ckpts(tmp_path_factory):
    return toy_model.save_checkpoints(tmp_path_factory.mktemp("toy"))


def test_restore_takes_an_adapter_or_its_spec(toy_ckpts):
    _, nnx_ckpt = toy_ckpts
    expected = toy_model.ToyAdapter(seed=0).nnx_model()
    for model in (toy_model.ToyAdapter(seed=5), "toy_model:adapter"):
        restored = ckptconv.restore(nnx_ckpt, model)
        np.testing.assert_array_equal(
            restored.wq.kernel.get_value(), expected.wq.kernel.get_value()
        )
    # The seed-5 model's own weights differ, so the restore above did replace them.
    assert not np.array_equal(
        toy_model.ToyAdapter(seed=5).nnx_model().wq.kernel.get_value(),
        expected.wq.kernel.get_value(),
    )


def test_restore_names_the_paths_that_do_not_fit(toy_ckpts):
    with pytest.raises(PlanError, match="does not match the model.*unembed"):
        ckptconv.restore(toy_ckpts[1], toy_model.Wider())


@pytest.mark.parametrize(
    ("command", "spec", "message"),
    [
        ("decode", "no_such_mod:adapter", "cannot import module no_such_mod"),
        ("decode", "toy_model:not_an_adapter", "lacks nnx_model, nnx_forward"),
        ("decode", "toy_model:bad_axes", "has no slot axis"),
        ("decode", "toy_model:wider", "does not match the model"),
        ("verify", "toy_model:no_linen", "lacks linen_forward, which verify needs"),
        ("verify", "no_such_mod:adapter", "cannot import module no_such_mod"),
        ("annotate", "toy_model:not_an_adapter", "lacks nnx_model, nnx_forward"),
        ("reshard", "toy_model:not_an_adapter", "lacks nnx_model, nnx_forward"),
        ("reshard", "no_such_mod:adapter", "cannot import module no_such_mod"),
    ],
)
def test_bad_model_inputs_are_one_line_and_exit_2(command, spec, message, toy_ckpts):
    linen, nnx_ckpt = toy_ckpts
    args = {
        "decode": ["decode", nnx_ckpt, "--prompt-ids", "1,2,3"],
        "verify": ["verify", linen, nnx_ckpt],
        "annotate": ["annotate", "--mesh", "data=2"],
        "reshard": ["reshard", nnx_ckpt, nnx_ckpt.parent / "resharded", "--mesh", "data=2"],
    }[command]
    code, _, err = run(*args, "--model", spec)
    assert code == 2, err
    assert err.startswith("ckptconv: error:") and message in err
    assert len(err.strip().splitlines()) == 1


def test_exactly_one_of_model_and_model_config(toy_ckpts, tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(ModelConfig(vocab_size=32).to_dict()))
    for extra in ([], ["--model", "toy_model:adapter", "--model-config", cfg]):
        code, _, err = run("decode", toy_ckpts[1], "--prompt-ids", "1", *extra)
        assert code == 2 and "exactly one of --model" in err
        assert len(err.strip().splitlines()) == 1


def test_annotate_params_of_an_adapter():
    code, out, err = run("annotate", "--model", "toy_model:adapter", "--mesh", "data=2", "--json")
    assert code == 0, err
    rows = json.loads(out)["rows"]
    assert {r["path"] for r in rows} >= {"wq/kernel", "embed/embedding"}
    code, _, err = run(
        "annotate", "--model", "toy_model:adapter", "--mesh", "data=2", "--mode", "ar"
    )
    assert code == 2 and "keeps no nnx.Cache variables" in err


def test_reshard_takes_an_adapter(toy_ckpts, tmp_path):
    _, nnx_ckpt = toy_ckpts
    out = tmp_path / "resharded"
    code, stdout, err = run(
        "reshard", nnx_ckpt, out, "--model", "toy_model:adapter", "--mesh", "data=2", "--json"
    )
    assert code == 0, err
    report = json.loads(stdout)
    assert {leaf["path"] for leaf in report["leaves"]} >= {"model/wq/kernel/value"}
    code, text, err = run("compare", nnx_ckpt, out)
    assert code == 0 and "bit-exact" in text, text + err
