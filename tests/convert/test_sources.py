"""Converting what Linen users have: Flax msgpack files and Orbax without OCDBT, both ways.

Fixtures are written by the libraries' own writers (flax.training.checkpoints with Orbax
checkpointing off, flax.serialization, Orbax's PyTreeCheckpointHandler with use_ocdbt=False).
"""

from __future__ import annotations

import flax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from flax.training import checkpoints

import ckptconv
from ckptconv.errors import CheckpointFormatError
from ckptconv.io.sources import open_source


@pytest.fixture
def msgpack_ckpt(tmp_path, bn_net):
    """A Flax TrainState (adamw, batch_stats) saved as msgpack files, steps 1 and 2."""
    state = bn_net.trained_state(1)
    with flax.config.temp_flip_flag("use_orbax_checkpointing", False):
        checkpoints.save_checkpoint(tmp_path / "flax", bn_net.trained_state(0), step=1, keep=5)
        checkpoints.save_checkpoint(tmp_path / "flax", state, step=2, keep=5)
    return tmp_path / "flax", state


def test_msgpack_train_state_continues_training_in_nnx(msgpack_ckpt, tmp_path, bn_net):
    folder, state = msgpack_ckpt
    assert open_source(folder).format_name == "msgpack"
    result = ckptconv.convert(folder, tmp_path / "nnx")
    assert result.plan.source_layout == "flax"
    assert ckptconv.compare(folder, tmp_path / "nnx").bit_exact

    model = bn_net.NNXNet(nnx.Rngs(1))
    optimizer = nnx.Optimizer(model, bn_net.TX, wrt=nnx.Param)
    ckptconv.restore(tmp_path / "nnx", model, optimizer)
    assert int(optimizer.step.value) == int(state.step) == 1

    @nnx.jit
    def nnx_step(m, opt):
        def loss(m):
            return (m(bn_net.X) ** 2).mean()

        opt.update(m, nnx.grad(loss)(m))

    for _ in range(2):
        state = bn_net.linen_step(state)
        nnx_step(model, optimizer)
    for layer in ("Dense_0", "Dense_1"):
        for name in ("kernel", "bias"):
            np.testing.assert_allclose(
                np.asarray(getattr(getattr(model, layer), name).value),
                np.asarray(state.params[layer][name]),
                atol=1e-6,
                rtol=0,
                err_msg=f"{layer}/{name}",
            )
    np.testing.assert_allclose(
        np.asarray(model.BatchNorm_0.mean.value),
        np.asarray(state.batch_stats["BatchNorm_0"]["mean"]),
        atol=1e-6,
        rtol=0,
    )


def test_msgpack_converts_back_to_linen_ocdbt_bit_exactly(msgpack_ckpt, tmp_path):
    folder, _ = msgpack_ckpt
    ckptconv.convert(folder, tmp_path / "nnx")
    ckptconv.convert(tmp_path / "nnx", tmp_path / "back", direction="nnx-to-linen")
    back = open_source(tmp_path / "back")
    assert back.format_name == "ocdbt"
    report = ckptconv.compare(folder, tmp_path / "back")
    assert report.bit_exact and not report.only_in_a and not report.only_in_b
    # and the Linen checkpoint restores with plain Orbax
    restored = ocp.PyTreeCheckpointer().restore(str(tmp_path / "back"))
    np.testing.assert_array_equal(
        np.asarray(restored["params"]["Dense_0"]["kernel"]),
        np.asarray(checkpoints.restore_checkpoint(folder, None)["params"]["Dense_0"]["kernel"]),
    )


@pytest.mark.parametrize("use_zarr3", [False, True], ids=["zarr2", "zarr3"])
def test_orbax_without_ocdbt_converts_both_ways_bit_exactly(tmp_path, use_zarr3, bn_net):
    state = bn_net.trained_state(2)
    ckptr = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=False, use_zarr3=use_zarr3))
    ckptr.save(tmp_path / "plain", state)
    assert open_source(tmp_path / "plain").format_name == "zarr"
    ckptconv.convert(tmp_path / "plain", tmp_path / "nnx")
    assert ckptconv.compare(tmp_path / "plain", tmp_path / "nnx").bit_exact
    ckptconv.convert(tmp_path / "nnx", tmp_path / "back", direction="nnx-to-linen")
    assert ckptconv.compare(tmp_path / "plain", tmp_path / "back").bit_exact
    model = bn_net.NNXNet(nnx.Rngs(0))
    ckptconv.restore(tmp_path / "nnx", model)
    np.testing.assert_array_equal(
        np.asarray(model.Dense_1.kernel.value), np.asarray(state.params["Dense_1"]["kernel"])
    )


def test_a_folder_holding_two_formats_is_refused(msgpack_ckpt, tmp_path):
    folder, state = msgpack_ckpt
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(folder / "7", {"a": np.ones(2, np.float32)})
    ckptr.wait_until_finished()
    with pytest.raises(CheckpointFormatError, match="expected one checkpoint format") as info:
        open_source(folder)
    assert "msgpack" in str(info.value) and "orbax" in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("use_zarr3", [False, True], ids=["zarr2", "zarr3"])
def test_zarr_folder_output_restores_with_plain_orbax(tmp_path, use_zarr3, bn_net):
    state = bn_net.trained_state(2)
    ckptr = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=False, use_zarr3=use_zarr3))
    ckptr.save(tmp_path / "plain", state)
    result = ckptconv.convert(tmp_path / "plain", tmp_path / "nnx", output_format="zarr")
    out = tmp_path / "nnx"
    assert not (out / "manifest.ocdbt").exists()
    assert (out / "model.Dense_0.kernel.value").is_dir()
    assert open_source(out).format_name == "zarr"
    # renames only: every array's chunk files were copied as stored; only the step is decoded
    # (int32 -> uint32, as nnx.Optimizer holds it)
    arrays = [o for o in result.plan.leaves if o.expr is not None]
    assert result.copied_leaves == len(arrays) - 1
    src_chunk = tmp_path / "plain" / "params.Dense_0.kernel"
    out_chunk = out / "model.Dense_0.kernel.value"
    name = "c/0/0" if use_zarr3 else "0.0"
    assert (src_chunk / name).read_bytes() == (out_chunk / name).read_bytes()
    assert ckptconv.compare(tmp_path / "plain", out).bit_exact
    restored = ocp.PyTreeCheckpointer().restore(str(out))
    np.testing.assert_array_equal(
        np.asarray(restored["model"]["Dense_1"]["kernel"]["value"]),
        np.asarray(state.params["Dense_1"]["kernel"]),
    )
    ckptconv.convert(out, tmp_path / "back", direction="nnx-to-linen", output_format="zarr")
    assert ckptconv.compare(tmp_path / "plain", tmp_path / "back").bit_exact


def test_zarr_folder_output_from_ocdbt_moves_the_scan_axis(maxtext_fixtures, tmp_path):
    src = maxtext_fixtures / "A" / "ckpt"
    ckptconv.convert(src, tmp_path / "nnx", output_format="zarr")
    assert not (tmp_path / "nnx" / "manifest.ocdbt").exists()
    assert ckptconv.compare(src, tmp_path / "nnx").bit_exact
    restored = ocp.PyTreeCheckpointer().restore(str(tmp_path / "nnx"))
    kernel = restored["model"]["decoder"]["layers"]["mlp"]["wi_0"]["kernel"]["value"]
    assert kernel.shape == (2, 64, 128)  # layer axis moved to 0 (stored (64, 2, 128))


def test_unknown_output_format_is_refused(msgpack_ckpt, tmp_path):
    from ckptconv.errors import PlanError

    folder, _ = msgpack_ckpt
    with pytest.raises(PlanError, match="--format tiledb"):
        ckptconv.convert(folder, tmp_path / "out", output_format="tiledb")
    assert not (tmp_path / "out").exists()


def test_cli_format_zarr(maxtext_fixtures, tmp_path):
    from click.testing import CliRunner

    from ckptconv.cli import main

    src = maxtext_fixtures / "A" / "ckpt"
    run = CliRunner().invoke(
        main, ["linen-to-nnx", str(src), str(tmp_path / "o"), "--format", "zarr"]
    )
    assert run.exit_code == 0, run.output
    assert not (tmp_path / "o" / "manifest.ocdbt").exists()
    bad = CliRunner().invoke(main, ["linen-to-nnx", str(src), str(tmp_path / "p"), "--format", "x"])
    assert bad.exit_code == 2 and not (tmp_path / "p").exists()


def hf_params():
    """A Hugging Face-style Flax params tree (a root module, numbered blocks)."""
    rng = np.random.default_rng(3)
    return {
        "transformer": {
            "wte": {"embedding": rng.standard_normal((16, 8), dtype=np.float32)},
            **{
                f"h_{i}": {
                    "attn": {"kernel": rng.standard_normal((8, 24), dtype=np.float32)},
                    "ln": {"scale": np.ones(8, np.float32), "bias": np.zeros(8, np.float32)},
                }
                for i in range(2)
            },
        }
    }


def _flat(tree, prefix=()):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _flat(v, (*prefix, k))
        else:
            yield (*prefix, k), v


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_flax_serialization_params_convert_bit_exactly(tmp_path, sharded):
    import json

    from flax import serialization

    params = hf_params()
    folder = tmp_path / "hf"
    folder.mkdir()
    if sharded:
        weight_map = {}
        for n, block in enumerate(["h_0", "h_1"]):
            name = f"flax_model-0000{n + 1}-of-00002.msgpack"
            sub = {"transformer": {block: params["transformer"][block]}}
            if n == 0:
                sub["transformer"]["wte"] = params["transformer"]["wte"]
            (folder / name).write_bytes(serialization.to_bytes(sub))
            weight_map.update({"/".join(p): name for p, _ in _flat(sub)})
        index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
        (folder / "flax_model.msgpack.index.json").write_text(json.dumps(index))
    else:
        (folder / "flax_model.msgpack").write_bytes(serialization.to_bytes(params))
    result = ckptconv.convert(folder, tmp_path / "nnx")
    assert result.plan.source_layout == "params"
    out = open_source(tmp_path / "nnx")
    for path, value in _flat(params):
        got = out.read(("model", *path, "value"))
        assert got.dtype == value.dtype and got.tobytes() == value.tobytes(), path
    assert ckptconv.compare(folder, tmp_path / "nnx").bit_exact
    # and back: a bare params tree again, as Orbax writes one
    ckptconv.convert(tmp_path / "nnx", tmp_path / "back", direction="nnx-to-linen")
    restored = ocp.StandardCheckpointer().restore(str(tmp_path / "back"))
    assert set(restored) == {"transformer"}
    np.testing.assert_array_equal(
        restored["transformer"]["h_1"]["attn"]["kernel"],
        params["transformer"]["h_1"]["attn"]["kernel"],
    )
    assert ckptconv.compare(folder, tmp_path / "back").bit_exact


def test_bare_params_saved_by_orbax_round_trip(tmp_path):
    params = hf_params()
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(tmp_path / "bare", params)
    ckptr.wait_until_finished()
    plan = ckptconv.convert(tmp_path / "bare", None).plan
    assert plan.source_layout == "params"
    assert all(o.path[0] == "model" and o.path[-1] == "value" for o in plan.leaves)
    ckptconv.convert(tmp_path / "bare", tmp_path / "nnx")
    ckptconv.convert(tmp_path / "nnx", tmp_path / "back", direction="nnx-to-linen")
    assert ckptconv.compare(tmp_path / "bare", tmp_path / "back").bit_exact
    assert ckptconv.CheckpointReader(tmp_path / "back").leaves().keys() == (
        ckptconv.CheckpointReader(tmp_path / "bare").leaves().keys()
    )
