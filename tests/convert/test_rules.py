"""The rules of the planning layer: scan axes (numpy rules, no clamping), layer stacking of
every collection, renames, and dtype casts; through the library and a few through the CLI."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from ckptconv.convert import compare, convert
from ckptconv.convert.expr import evaluate
from ckptconv.convert.plan import ConvertOptions, plan_linen_to_nnx, plan_nnx_to_linen
from ckptconv.errors import PlanError
from ckptconv.io import CheckpointWriter
from ckptconv.io.leaf import Leaf
from ckptconv.io.sources import open_source
from ckptconv.testing import assert_one_line_error, run_cli


def leaf(*path, shape=(2,), dtype="float32"):
    return path, Leaf(path, shape, dtype)


def tree(*items):
    return dict(items)


def values(leaves, seed=0):
    rng = np.random.default_rng(seed)
    return {
        p: (rng.standard_normal(x.shape) * 10).astype(x.dtype)
        if x.dtype.startswith("float")
        else rng.integers(0, 1000, x.shape).astype(x.dtype)
        for p, x in leaves.items()
    }


def run(plan, data):
    def read(path, index=None):
        return data[path] if index is None else data[path][index]

    return {o.path: evaluate(o.expr, read) for o in plan.leaves}


# A scanned Flax tree like the issue's: a rank-3 kernel (64, 4, 160) with 4 layers on axis 1.
SCANNED = tree(
    leaf("params", "decoder", "layers", "mlp", "kernel", shape=(64, 4, 160)),
    leaf("params", "decoder", "layers", "norm", "scale", shape=(64, 4)),
    leaf("params", "decoder", "final", "scale", shape=(64,)),
)
KERNEL = ("model", "decoder", "layers", "mlp", "kernel", "value")


# --- 2: out-of-range axes are refused, naming leaf, rank and axis --------------------------


def test_out_of_range_nnx_scan_axis_is_refused_naming_leaf_rank_and_axis():
    with pytest.raises(PlanError) as e:
        plan_linen_to_nnx(SCANNED, {}, ConvertOptions(nnx_scan_axis=7))
    msg = str(e.value)
    assert msg.startswith("decoder/layers/mlp/kernel: --nnx-scan-axis 7 ")
    assert "rank-3" in msg and "-3..2" in msg


@pytest.mark.parametrize(
    "options,needle",
    [
        (ConvertOptions(linen_scan_axis=3), "--linen-scan-axis 3"),
        (ConvertOptions(linen_scan_axis=-4), "--linen-scan-axis -4"),
        (ConvertOptions(nnx_scan_axis=-4), "--nnx-scan-axis -4"),
        (ConvertOptions(linen_scan_axis=5, scan_layers=False), "--linen-scan-axis 5"),
        # src == dst out of range is no excuse to skip the check
        (ConvertOptions(linen_scan_axis=9, nnx_scan_axis=9), "--linen-scan-axis 9"),
    ],
)
def test_every_out_of_range_axis_is_refused(options, needle):
    with pytest.raises(PlanError, match=f"decoder/layers/mlp/kernel: {needle} is out of range"):
        plan_linen_to_nnx(SCANNED, {}, options)


def test_out_of_range_axis_when_stacking_is_refused():
    leaves = tree(*(leaf("params", f"layers_{i}", "w", shape=(3, 5)) for i in range(2)))
    with pytest.raises(PlanError, match=r"layers/w: --nnx-scan-axis 3 .*rank-3.*-3\.\.2"):
        plan_linen_to_nnx(leaves, {}, ConvertOptions(scan_layers=True, nnx_scan_axis=3))
    # the clamp that used to hide it: a rank-1 stacked leaf at axis 1
    low = tree(*(leaf("params", f"layers_{i}", "b", shape=()) for i in range(2)))
    with pytest.raises(PlanError, match=r"layers/b: --nnx-scan-axis 1 .*rank-1"):
        plan_linen_to_nnx(low, {}, ConvertOptions(scan_layers=True, nnx_scan_axis=1))


def test_out_of_range_axis_is_refused_in_nnx_to_linen():
    fwd = plan_linen_to_nnx(SCANNED, {})
    with pytest.raises(PlanError, match=r"mlp/kernel: --linen-scan-axis 3 .*rank-3"):
        plan_nnx_to_linen(
            fwd.output_leaves(), fwd.custom_metadata, ConvertOptions(linen_scan_axis=3)
        )
    with pytest.raises(PlanError, match=r"mlp/kernel: --nnx-scan-axis -5 .*rank-3"):
        plan_nnx_to_linen(
            fwd.output_leaves(), fwd.custom_metadata, ConvertOptions(nnx_scan_axis=-5)
        )


def test_cli_refuses_out_of_range_scan_axis(maxtext_fixtures, tmp_path):
    code, _, err = run_cli(
        "linen-to-nnx", maxtext_fixtures / "A" / "ckpt", tmp_path / "out", "--nnx-scan-axis", "7"
    )
    assert_one_line_error(code, err, "decoder/layers/", "--nnx-scan-axis 7", "rank-")
    assert not (tmp_path / "out").exists()


# --- 3: negative axes follow numpy.moveaxis / numpy.stack, both ways -------------------------


def test_negative_nnx_axis_follows_numpy_and_inverts():
    data = values(SCANNED)
    fwd = plan_linen_to_nnx(SCANNED, {}, ConvertOptions(nnx_scan_axis=-1))
    assert fwd.output_leaves()[KERNEL].shape == (64, 160, 4)
    assert fwd.custom_metadata["ckptconv"]["nnx_scan_axis"] == -1  # recorded as given
    out = run(fwd, data)
    k = ("params", "decoder", "layers", "mlp", "kernel")
    np.testing.assert_array_equal(out[KERNEL], np.moveaxis(data[k], 1, -1))
    s = ("params", "decoder", "layers", "norm", "scale")
    scale = out[("model", "decoder", "layers", "norm", "scale", "value")]
    np.testing.assert_array_equal(scale, np.moveaxis(data[s], 1, -1))
    back = plan_nnx_to_linen(fwd.output_leaves(), fwd.custom_metadata)
    assert back.output_leaves() == SCANNED
    again = run(back, out)
    assert all(again[p].tobytes() == data[p].tobytes() for p in SCANNED)


def test_negative_linen_axis_follows_numpy():
    data = values(SCANNED)
    fwd = plan_linen_to_nnx(SCANNED, {}, ConvertOptions(linen_scan_axis=-2, nnx_scan_axis=0))
    out = run(fwd, data)
    # -2 is axis 1 of the rank-3 kernel but axis 0 of the rank-2 scale: each leaf its own rank
    k = ("params", "decoder", "layers", "mlp", "kernel")
    np.testing.assert_array_equal(out[KERNEL], np.moveaxis(data[k], -2, 0))
    s = ("params", "decoder", "layers", "norm", "scale")
    scale = out[("model", "decoder", "layers", "norm", "scale", "value")]
    np.testing.assert_array_equal(scale, np.moveaxis(data[s], -2, 0))
    back = run(plan_nnx_to_linen(fwd.output_leaves(), fwd.custom_metadata), out)
    assert all(back[p].tobytes() == data[p].tobytes() for p in SCANNED)


def test_negative_axis_when_stacking_follows_numpy_stack_and_inverts():
    leaves = tree(
        *(leaf("params", f"layers_{i}", "w", shape=(3, 5)) for i in range(4)),
        *(leaf("opt_state", "0", "mu", f"layers_{i}", "w", shape=(3, 5)) for i in range(4)),
    )
    data = values(leaves)
    fwd = plan_linen_to_nnx(leaves, {}, ConvertOptions(scan_layers=True, nnx_scan_axis=-1))
    out = run(fwd, data)
    want = np.stack([data[("params", f"layers_{i}", "w")] for i in range(4)], axis=-1)
    np.testing.assert_array_equal(out[("model", "layers", "w", "value")], want)
    mu = out[("optimizer", "opt_state", "0", "mu", "layers", "w", "value")]
    assert mu.shape == (3, 5, 4)
    back = plan_nnx_to_linen(fwd.output_leaves(), fwd.custom_metadata)
    again = run(back, out)
    assert set(again) == set(leaves)
    assert all(again[p].tobytes() == data[p].tobytes() for p in leaves)


def test_cli_negative_axis_on_fixture_a_follows_numpy_and_round_trips(maxtext_fixtures, tmp_path):
    src = maxtext_fixtures / "A" / "ckpt"
    code, _, err = run_cli("linen-to-nnx", src, tmp_path / "nnx", "--nnx-scan-axis", "-1")
    assert code == 0, err
    out = open_source(tmp_path / "nnx")
    leaves = out.leaves()
    # query kernel (embed, layers, heads, head_dim) = (64, 2, 4, 16): layers last
    q = ("model", "decoder", "layers", "self_attention", "query", "kernel", "value")
    assert leaves[q].shape == (64, 4, 16, 2)
    norm = ("model", "decoder", "layers", "pre_self_attention_layer_norm", "scale", "value")
    assert leaves[norm].shape == (64, 2)  # (embed, layers): its own last axis
    rng = ("model", "decoder", "layers", "self_attention", "rngs", "params", "key", "value")
    assert leaves[rng].shape == (2, 4)  # rng state stays at axis 0
    code, _, err = run_cli("nnx-to-linen", tmp_path / "nnx", tmp_path / "back")
    assert code == 0, err
    assert compare(src, tmp_path / "back").bit_exact


@pytest.mark.parametrize("axis", ["1", 1.5, True])
def test_scan_axis_must_be_an_integer(axis):
    with pytest.raises(PlanError, match=r"^--nnx-scan-axis: expected an integer axis, found"):
        plan_linen_to_nnx(SCANNED, {}, ConvertOptions(nnx_scan_axis=axis))


def test_recorded_scan_axis_must_be_an_integer():
    fwd = plan_linen_to_nnx(SCANNED, {})
    meta = {"ckptconv": {**fwd.custom_metadata["ckptconv"], "nnx_scan_axis": "0"}}
    with pytest.raises(
        PlanError,
        match=r"^src: the nnx_scan_axis recorded in the custom metadata: expected an integer "
        r"axis, found '0'",
    ):
        plan_nnx_to_linen(fwd.output_leaves(), meta, where="src")


# --- 9: every collection of a family is stacked together; rng state at axis 0 ---------------

STREAMS = ("aqt", "dropout", "params")


def unscanned_maxtext(n_layers=3, rng_layers=None):
    """An unscanned MaxText-layout tree with per-layer rng state at several depths."""
    rng_layers = range(n_layers) if rng_layers is None else rng_layers
    items = []
    for i in range(n_layers):
        items.append(leaf("params", "params", "decoder", f"layers_{i}", "mlp", "wi", shape=(4, 6)))
        items.append(leaf("params", "params", "decoder", f"layers_{i}", "norm", "scale"))
        items.append(
            leaf(
                "opt_state",
                "0",
                "mu",
                "params",
                "decoder",
                f"layers_{i}",
                "mlp",
                "wi",
                shape=(4, 6),
            )
        )
        items.append(
            leaf("opt_state", "0", "mu", "params", "decoder", f"layers_{i}", "norm", "scale")
        )
    for i in rng_layers:
        for s in STREAMS:
            base = ("nnx_aux", "model", "decoder", f"layers_{i}", "self_attention", "rngs", s)
            items.append(leaf(*base, "count", shape=(), dtype="uint32"))
            items.append(leaf(*base, "key", shape=(4,), dtype="uint32"))
        deep = ("nnx_aux", "model", "decoder", f"layers_{i}", "mlp", "moe", "gate", "rngs")
        items.append(leaf(*deep, "dropout", "key", shape=(4,), dtype="uint32"))
    items.append(leaf("params", "params", "decoder", "decoder_norm", "scale"))
    items.append(leaf("opt_state", "0", "mu", "params", "decoder", "decoder_norm", "scale"))
    items.append(
        leaf("nnx_aux", "model", "decoder", "rngs", "params", "key", shape=(4,), dtype="uint32")
    )
    items.append(leaf("opt_state", "0", "count", shape=(), dtype="int32"))
    items.append(leaf("step", shape=(), dtype="int32"))
    return tree(*items)


@pytest.mark.parametrize("param_axis", [0, 1, -1])
def test_scan_layers_stacks_rng_state_of_every_depth_at_axis_0(param_axis):
    leaves = unscanned_maxtext()
    data = values(leaves)
    opts = ConvertOptions(scan_layers=True, nnx_scan_axis=param_axis)
    fwd = plan_linen_to_nnx(leaves, {}, opts)
    out_leaves = fwd.output_leaves()
    assert not any(seg.startswith("layers_") for p in out_leaves for seg in p)
    out = run(fwd, data)
    for s in STREAMS:
        base = ("model", "decoder", "layers", "self_attention", "rngs", s)
        key = out[(*base, "key", "value")]
        want = [
            data[("nnx_aux", "model", "decoder", f"layers_{i}", "self_attention", "rngs", s, "key")]
            for i in range(3)
        ]
        np.testing.assert_array_equal(key, np.stack(want, axis=0))
        assert out[(*base, "count", "value")].shape == (3,)
    deep = ("model", "decoder", "layers", "mlp", "moe", "gate", "rngs", "dropout", "key", "value")
    assert out[deep].shape == (3, 4)
    wi = [data[("params", "params", "decoder", f"layers_{i}", "mlp", "wi")] for i in range(3)]
    wi_out = out[("model", "decoder", "layers", "mlp", "wi", "value")]
    np.testing.assert_array_equal(wi_out, np.stack(wi, axis=param_axis))
    back = plan_nnx_to_linen(out_leaves, fwd.custom_metadata)
    again = run(back, out)
    assert set(again) == set(leaves)
    assert all(again[p].tobytes() == data[p].tobytes() for p in leaves)


@pytest.mark.parametrize("rng_layers", [(0,), (0, 1)])
def test_rng_state_stored_for_some_layers_only_is_refused_not_left_behind(rng_layers):
    # NNX stores an Rngs that several layers share once, at its first path (fixture B keeps
    # its decoder's one Rngs under layers_0): it has no per-layer form to stack.
    leaves = unscanned_maxtext(n_layers=3, rng_layers=rng_layers)
    with pytest.raises(
        PlanError,
        match=rf"^decoder/layers_{len(rng_layers)}/.*rngs/.*: missing while stacking "
        r"decoder/layers_0\.\.2 .*shared by the layers.*--params-only",
    ):
        plan_linen_to_nnx(leaves, {}, ConvertOptions(scan_layers=True))
    only = plan_linen_to_nnx(leaves, {}, ConvertOptions(scan_layers=True, params_only=True))
    assert not any(seg.startswith("layers_") for p in only.output_leaves() for seg in p)


def test_cli_scan_layers_on_fixture_b_refuses_its_shared_rng_state(maxtext_fixtures, tmp_path):
    src = maxtext_fixtures / "B" / "ckpt"
    code, _, err = run_cli("linen-to-nnx", src, tmp_path / "nnx", "--scan-layers")
    assert_one_line_error(code, err, "decoder/layers_1/self_attention/rngs/", "--params-only")
    assert not (tmp_path / "nnx").exists()


def test_param_missing_from_a_layer_is_refused():
    leaves = unscanned_maxtext(n_layers=3)
    del leaves[("params", "params", "decoder", "layers_1", "mlp", "wi")]
    del leaves[("opt_state", "0", "mu", "params", "decoder", "layers_1", "mlp", "wi")]
    with pytest.raises(
        PlanError,
        match=r"^decoder/layers_1/mlp/wi: missing while stacking decoder/layers_0\.\.2 "
        r"\(found layers \[0, 2\]\): a param must be stored for every layer",
    ):
        plan_linen_to_nnx(leaves, {}, ConvertOptions(scan_layers=True))


def test_stacking_layers_of_different_shape_or_dtype_is_refused():
    leaves = tree(leaf("params", "layers_0", "w", shape=(3,)), leaf("params", "layers_1", "w"))
    with pytest.raises(
        PlanError, match=r"^layers_1/w: expected float32\[3\] like layer 0, found float32\[2\]"
    ):
        plan_linen_to_nnx(leaves, {}, ConvertOptions(scan_layers=True))
    leaves = tree(leaf("params", "layers_0", "w"), leaf("params", "layers_1", "w", dtype="int8"))
    with pytest.raises(
        PlanError, match=r"^layers_1/w: expected float32\[2\] like layer 0, found int8"
    ):
        plan_linen_to_nnx(leaves, {}, ConvertOptions(scan_layers=True))


def test_one_path_holding_two_collections_across_layers_is_refused():
    leaves = tree(
        leaf("params", "layers_0", "w"),
        leaf("params", "layers_1", "w"),
        leaf("params", "layers_0", "x"),
        leaf("batch_stats", "layers_1", "x"),
    )
    with pytest.raises(
        PlanError, match=r"^layers_1/x: expected a params leaf like layers_0/x, found a batch_stats"
    ):
        plan_linen_to_nnx(leaves, {}, ConvertOptions(scan_layers=True))


def test_unstacking_refuses_a_scalar_and_disagreeing_layer_counts():
    scalar = tree(
        leaf("params", "layers", "w", shape=(2, 3)), leaf("params", "layers", "b", shape=())
    )
    for scan in (False, None):  # unstacking, or moving the stacked axis
        with pytest.raises(
            PlanError, match=r"^layers/b: a scanned leaf must have a layer axis, found \(\)"
        ):
            plan_linen_to_nnx(scalar, {}, ConvertOptions(scan_layers=scan))
    counts = tree(
        leaf("params", "layers", "w", shape=(2, 3)), leaf("params", "layers", "b", shape=(3, 3))
    )
    with pytest.raises(
        PlanError,
        match=r"^layers/[bw]: expected [23] layers on axis 0 \(as layers/[bw]\), found [23]",
    ):
        plan_linen_to_nnx(counts, {}, ConvertOptions(scan_layers=False, linen_scan_axis=0))


def test_scan_layers_round_trip_through_the_files_is_bit_exact(tmp_path):
    leaves = unscanned_maxtext(n_layers=2)
    data = values(leaves, seed=3)
    with CheckpointWriter(tmp_path / "src", custom_metadata={"scan_layers": False}) as w:
        for p, a in data.items():
            w.write(p, a)
    convert(tmp_path / "src", tmp_path / "nnx", options=ConvertOptions(scan_layers=True))
    written = open_source(tmp_path / "nnx").leaves()
    assert not any(seg.startswith("layers_") for p in written for seg in p)
    rng = ("model", "decoder", "layers", "self_attention", "rngs", "dropout", "key", "value")
    assert written[rng].shape == (2, 4)
    code, _, err = run_cli("nnx-to-linen", tmp_path / "nnx", tmp_path / "back")
    assert code == 0, err
    assert set(open_source(tmp_path / "back").leaves()) == set(leaves)
    assert compare(tmp_path / "src", tmp_path / "back").bit_exact


# --- renames ---------------------------------------------------------------------------------

RENAMED = tree(
    leaf("params", "enc", "kernel"),
    leaf("params", "dec", "kernel"),
    leaf("params", "dec", "norm", "scale"),
)


def test_rename_collision_names_both_sources():
    with pytest.raises(
        PlanError,
        match=r"^x/kernel: two model leaves map to this path after --rename "
        r"\(enc/kernel and dec/kernel\)",
    ):
        plan_linen_to_nnx(RENAMED, {}, ConvertOptions(renames=(("^(enc|dec)/", "x/"),)))


def test_rename_onto_a_module_path_is_refused():
    with pytest.raises(
        PlanError,
        match=r"^dec/norm: is a leaf and also the module of dec/norm/scale after --rename",
    ):
        plan_linen_to_nnx(RENAMED, {}, ConvertOptions(renames=(("^enc/kernel$", "dec/norm"),)))


def test_rename_invalid_regex_and_empty_component():
    with pytest.raises(PlanError, match=r"--rename \(bad=x: invalid regex"):
        plan_linen_to_nnx(RENAMED, {}, ConvertOptions(renames=(("(bad", "x"),)))
    with pytest.raises(PlanError, match=r"enc/kernel: --rename gives an empty path component"):
        plan_linen_to_nnx(RENAMED, {}, ConvertOptions(renames=(("^enc", ""),)))


def test_rename_is_undone_by_nnx_to_linen():
    fwd = plan_linen_to_nnx(RENAMED, {}, ConvertOptions(renames=(("^enc/", "encoder/"),)))
    assert ("model", "encoder", "kernel", "value") in fwd.output_leaves()
    assert plan_nnx_to_linen(fwd.output_leaves(), fwd.custom_metadata).output_leaves() == RENAMED


def test_cli_rename_collision(maxtext_fixtures, tmp_path):
    src = tmp_path / "A"
    shutil.copytree(maxtext_fixtures / "A" / "ckpt", src)
    code, _, err = run_cli("linen-to-nnx", src, tmp_path / "out", "--rename", "wi_[01]=wi")
    assert_one_line_error(code, err, "decoder/layers/mlp/wi/kernel", "two model leaves")


# --- A: --dtype is floating only ------------------------------------------------------------


@pytest.mark.parametrize("name", ["int8", "uint32", "bool", "complex64"])
def test_non_floating_dtype_is_refused_both_ways(name):
    with pytest.raises(
        PlanError,
        match=rf"^--dtype {name}: expected a floating dtype "
        r"\(bfloat16, float16, float32, float64\)",
    ):
        plan_linen_to_nnx(SCANNED, {}, ConvertOptions(dtype=name))
    fwd = plan_linen_to_nnx(SCANNED, {})
    with pytest.raises(PlanError, match=rf"^--dtype {name}: expected a floating dtype"):
        plan_nnx_to_linen(fwd.output_leaves(), fwd.custom_metadata, ConvertOptions(dtype=name))


def test_unknown_dtype_is_still_refused_and_floats_are_cast():
    with pytest.raises(PlanError, match=r"--dtype float7: not a dtype numpy knows"):
        plan_linen_to_nnx(SCANNED, {}, ConvertOptions(dtype="float7"))
    out = plan_linen_to_nnx(SCANNED, {}, ConvertOptions(dtype="float16")).output_leaves()
    assert out[KERNEL].dtype == "float16"


def test_cli_refuses_integer_dtype(maxtext_fixtures, tmp_path):
    code, _, err = run_cli(
        "linen-to-nnx", maxtext_fixtures / "A" / "ckpt", tmp_path / "o", "--dtype", "int8"
    )
    assert_one_line_error(code, err, "--dtype int8", "float32")
    assert not (tmp_path / "o").exists()
