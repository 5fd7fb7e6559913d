"""Plans from metadata alone: round trips, the anchors' defects, and values through a fake store."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ckptconv.convert.expr import evaluate, is_data_movement
from ckptconv.convert.plan import (
    ConvertOptions,
    check_against,
    plan_linen_to_nnx,
    plan_nnx_to_linen,
)
from ckptconv.errors import LayoutError, PlanError
from ckptconv.io.leaf import Leaf


def layout_leaves(path) -> dict:
    out = {}
    for line in open(path):
        parts = line.rstrip("\n").split("\t")
        key = tuple(parts[0].split("/"))
        if parts[1] == "<empty>":
            out[key] = Leaf(key, None, None)
            continue
        dims = parts[1][len("shape=(") : -1]
        shape = tuple(int(x) for x in dims.split(",") if x.strip())
        out[key] = Leaf(key, shape, parts[2][len("dtype=") :])
    return out


class FakeStore:
    """Random arrays for a dict of leaves; reads like CheckpointReader.read."""

    def __init__(self, leaves, seed=0):
        rng = np.random.default_rng(seed)
        self.leaves = leaves
        self.data = {}
        for p, leaf in leaves.items():
            if leaf.empty:
                continue
            dt = ml_dtypes.bfloat16 if leaf.dtype == "bfloat16" else np.dtype(leaf.dtype)
            self.data[p] = (rng.standard_normal(leaf.shape) * 100).astype(dt)

    def read(self, path, index=None):
        a = self.data[path]
        return a if index is None else a[index]


def run_plan(plan, store) -> FakeStore:
    out = FakeStore({})
    out.leaves = plan.output_leaves()
    for o in plan.leaves:
        if o.expr is not None:
            out.data[o.path] = evaluate(o.expr, store.read)
    return out


def assert_same(a: FakeStore, b: FakeStore):
    assert set(a.leaves) == set(b.leaves)
    for p, leaf in a.leaves.items():
        assert b.leaves[p] == leaf, p
        if not leaf.empty:
            assert a.data[p].dtype == b.data[p].dtype
            assert a.data[p].tobytes() == b.data[p].tobytes(), p


@pytest.fixture(params=["A", "B"])
def fixture_leaves(request, maxtext_fixtures):
    return request.param, layout_leaves(maxtext_fixtures / request.param / "layout.txt")


@pytest.mark.parametrize("scan", [None, True, False])
def test_round_trip_bit_exact(fixture_leaves, scan):
    name, leaves = fixture_leaves
    store = FakeStore(leaves)
    meta = {"scan_layers": name == "A"}
    if name == "B" and scan:
        # B (MaxText 0.2.5, unscanned) stores the one Rngs its layers share once, under
        # layers_0: it has no per-layer form, so it is refused, never left behind per layer.
        with pytest.raises(
            PlanError, match=r"^decoder/layers_1/self_attention/rngs/.*shared.*--params-only"
        ):
            plan_linen_to_nnx(leaves, meta, ConvertOptions(scan_layers=scan))
        fwd = plan_linen_to_nnx(leaves, meta, ConvertOptions(scan_layers=True, params_only=True))
        assert not any(seg.startswith("layers_") for p in fwd.output_leaves() for seg in p)
        return
    fwd = plan_linen_to_nnx(leaves, meta, ConvertOptions(scan_layers=scan))
    # everything but the step counter (int32 -> uint32, a layout rule) is a pure byte move
    moved = [o for o in fwd.leaves if o.expr is not None and o.path[:2] != ("optimizer", "step")]
    assert all(is_data_movement(o.expr) for o in moved)
    nnx_store = run_plan(fwd, store)
    back = plan_nnx_to_linen(nnx_store.leaves, fwd.custom_metadata)
    assert_same(store, run_plan(back, nnx_store))


def test_nnx_layout_of_fixture_a(maxtext_fixtures):
    leaves = layout_leaves(maxtext_fixtures / "A" / "layout.txt")
    plan = plan_linen_to_nnx(leaves, {"scan_layers": True})
    out = plan.output_leaves()
    q = out[("model", "decoder", "layers", "self_attention", "query", "kernel", "value")]
    assert q.shape == (2, 64, 4, 16)  # scan axis moved 1 -> 0
    assert out[("optimizer", "step", "value")].dtype == "uint32"
    assert (
        "optimizer",
        "opt_state",
        "0",
        "mu",
        "decoder",
        "layers",
        "mlp",
        "wo",
        "kernel",
        "value",
    ) in out
    # the empty chain entry is omitted, entry 2 keeps its position
    assert not any(p[:3] == ("optimizer", "opt_state", "1") for p in out)
    assert ("optimizer", "opt_state", "2", "count", "value") in out
    # rng state lands at the model's rng paths, still stacked on axis 0
    rng = out[("model", "decoder", "layers", "self_attention", "rngs", "params", "key", "value")]
    assert rng.shape == (2, 4)


# --- The defects of MaxText's converter, one test each ("Where the anchors go wrong") ---


def test_mirrors_follow_params_when_axes_move_and_layers_unstack(maxtext_fixtures):
    leaves = layout_leaves(maxtext_fixtures / "A" / "layout.txt")
    for scan in (None, False):
        out = plan_linen_to_nnx(leaves, {}, ConvertOptions(scan_layers=scan)).output_leaves()
        params = {p[1:-1]: x for p, x in out.items() if p[0] == "model" and "rngs" not in p}
        for moment in ("mu", "nu"):
            mirror = {
                p[4:-1]: x
                for p, x in out.items()
                if p[:4] == ("optimizer", "opt_state", "0", moment)
            }
            assert {k: v.shape for k, v in mirror.items()} == {
                k: v.shape for k, v in params.items()
            }


def test_scanned_round_trip_stays_scanned(maxtext_fixtures):
    leaves = layout_leaves(maxtext_fixtures / "A" / "layout.txt")
    fwd = plan_linen_to_nnx(leaves, {"scan_layers": True})
    back = plan_nnx_to_linen(fwd.output_leaves(), fwd.custom_metadata)
    assert back.output_leaves() == leaves
    assert back.custom_metadata["scan_layers"] is True


def test_low_rank_stacked_arrays_are_sliced_not_copied(maxtext_fixtures):
    leaves = layout_leaves(maxtext_fixtures / "A" / "layout.txt")
    store = FakeStore(leaves)
    plan = plan_linen_to_nnx(leaves, {}, ConvertOptions(scan_layers=False))
    out = run_plan(plan, store)
    count = ("nnx_aux", "model", "decoder", "layers", "self_attention", "rngs", "params", "count")
    scale = ("params", "params", "decoder", "layers", "pre_self_attention_layer_norm", "scale")
    for i in range(2):
        c = out.data[
            (
                "model",
                "decoder",
                f"layers_{i}",
                "self_attention",
                "rngs",
                "params",
                "count",
                "value",
            )
        ]
        assert c.shape == () and c == store.data[count][i]
        s = out.data[
            ("model", "decoder", f"layers_{i}", "pre_self_attention_layer_norm", "scale", "value")
        ]
        np.testing.assert_array_equal(s, store.data[scale][:, i])  # param axis 1


def test_step_dtype_and_opt_state_structure_round_trip(maxtext_fixtures):
    leaves = layout_leaves(maxtext_fixtures / "A" / "layout.txt")
    fwd = plan_linen_to_nnx(leaves, {})
    out = fwd.output_leaves()
    assert out[("optimizer", "step", "value")].dtype == "uint32"
    back = plan_nnx_to_linen(out, fwd.custom_metadata).output_leaves()
    assert back[("step",)].dtype == "int32"
    assert back[("opt_state", "1")].empty
    types = {o.path: o.key_types for o in plan_nnx_to_linen(out, fwd.custom_metadata).leaves}
    assert types[("opt_state", "1")] == (2, 1)
    assert types[("opt_state", "0", "count")] == (2, 1, 2)


def test_params_keys_inside_opt_state_are_kept():
    # A model with a module literally named "params": only the mirror root's wrapper is stripped.
    leaves = {}
    for root in (("params",), ("opt_state", "0", "mu"), ("opt_state", "0", "nu")):
        for rel in (("enc", "params", "kernel"), ("dec", "kernel")):
            p = root + rel
            leaves[p] = Leaf(p, (3, 4), "float32")
    leaves[("opt_state", "0", "count")] = Leaf(("opt_state", "0", "count"), (), "int32")
    leaves[("opt_state", "0", "extra", "params", "x")] = Leaf(
        ("opt_state", "0", "extra", "params", "x"), (2,), "float32"
    )
    leaves[("opt_state", "1")] = Leaf(("opt_state", "1"), None, None)
    leaves[("step",)] = Leaf(("step",), (), "int32")
    fwd = plan_linen_to_nnx(leaves, {})
    out = fwd.output_leaves()
    assert ("optimizer", "opt_state", "0", "mu", "enc", "params", "kernel", "value") in out
    assert ("optimizer", "opt_state", "0", "extra", "params", "x", "value") in out
    store = FakeStore(leaves)
    nnx = run_plan(fwd, store)
    assert_same(store, run_plan(plan_nnx_to_linen(nnx.leaves, fwd.custom_metadata), nnx))


def test_rng_state_round_trips_with_params_only_dropping_it(maxtext_fixtures):
    leaves = layout_leaves(maxtext_fixtures / "A" / "layout.txt")
    fwd = plan_linen_to_nnx(leaves, {})
    assert fwd.custom_metadata["ckptconv"]["kinds"]["decoder/rngs/params/key"] == "nnx_aux"
    back = plan_nnx_to_linen(fwd.output_leaves(), fwd.custom_metadata).output_leaves()
    assert {p for p in back if p[0] == "nnx_aux"} == {p for p in leaves if p[0] == "nnx_aux"}
    only = plan_linen_to_nnx(leaves, {}, ConvertOptions(params_only=True)).output_leaves()
    assert all(p[0] == "model" and "rngs" not in p for p in only)


@pytest.mark.parametrize("family", ["layers", "dense_layers", "moe_layers"])
def test_every_layer_family_stacks_and_unstacks(family):
    leaves = {}
    for i in range(3):
        for rel in (("mlp", "kernel"), ("norm", "scale")):
            p = ("params", "decoder", f"{family}_{i}", *rel)
            leaves[p] = Leaf(p, (4, 5) if rel[0] == "mlp" else (4,), "float32")
    p = ("params", "decoder", "wi_0", "kernel")  # a name_{i} that is not a layer family
    leaves[p] = Leaf(p, (2, 2), "float32")
    store = FakeStore(leaves)
    fwd = plan_linen_to_nnx(leaves, {}, ConvertOptions(scan_layers=True))
    out = fwd.output_leaves()
    assert out[("model", "decoder", family, "mlp", "kernel", "value")].shape == (3, 4, 5)
    assert ("model", "decoder", "wi_0", "kernel", "value") in out
    nnx = run_plan(fwd, store)
    assert_same(store, run_plan(plan_nnx_to_linen(nnx.leaves, fwd.custom_metadata), nnx))


def test_scan_reports_missing_layer():
    leaves = {}
    for i in (0, 2):
        p = ("params", "layers_" + str(i), "kernel")
        leaves[p] = Leaf(p, (2,), "float32")
    with pytest.raises(PlanError, match="layers_1/kernel: missing"):
        plan_linen_to_nnx(leaves, {}, ConvertOptions(scan_layers=True))


def test_unknown_layout_is_a_layout_error():
    leaves = {
        ("foo", "bar"): Leaf(("foo", "bar"), (2,), "float32"),
        ("foo", "e"): Leaf(("foo", "e"), None, None),
    }
    with pytest.raises(LayoutError, match="unknown layout"):
        plan_linen_to_nnx(leaves, {})


def test_target_check_reports_missing_extra_and_mismatch():
    plan_out = {
        ("model", "a", "value"): Leaf(("model", "a", "value"), (2, 3), "float32"),
        ("model", "b", "value"): Leaf(("model", "b", "value"), (2,), "float32"),
    }
    target = {
        ("model", "a", "value"): ((3, 2), "float32"),
        ("model", "c", "value"): ((1,), "int32"),
    }
    problems = [str(p) for p in check_against(plan_out, target)]
    assert problems == [
        "model/a/value: mismatch: expected float32[3, 2], found float32[2, 3]",
        "model/c/value: missing: expected int32[1], found nothing",
        "model/b/value: extra: expected nothing, found float32[2]",
    ]


def test_dtype_cast_only_touches_float_params_and_mirrors(maxtext_fixtures):
    leaves = layout_leaves(maxtext_fixtures / "A" / "layout.txt")
    out = plan_linen_to_nnx(leaves, {}, ConvertOptions(dtype="bfloat16")).output_leaves()
    assert out[("model", "token_embedder", "embedding", "value")].dtype == "bfloat16"
    assert (
        out[("optimizer", "opt_state", "0", "mu", "token_embedder", "embedding", "value")].dtype
        == "bfloat16"
    )
    assert out[("optimizer", "opt_state", "0", "count", "value")].dtype == "int32"
    assert out[("model", "decoder", "rngs", "params", "key", "value")].dtype == "uint32"


@settings(max_examples=60, deadline=None)
@given(
    n_layers=st.integers(1, 4),
    dims=st.lists(st.integers(1, 3), min_size=0, max_size=3),
    axes=st.data(),
    dtype=st.sampled_from(["float32", "bfloat16", "int8"]),
    scan=st.sampled_from([None, False]),
)
def test_property_scanned_round_trip(n_layers, dims, axes, dtype, scan):
    """Any stacked rank, axis (negative too) and dtype: linen -> nnx -> linen, same bytes."""
    rank = len(dims) + 1  # the stacked rank of w
    linen_axis = axes.draw(st.integers(-rank, rank - 1))
    nnx_axis = axes.draw(st.integers(-rank, rank - 1))
    leaves = {}
    shape = list(dims)
    shape.insert(linen_axis % rank, n_layers)
    for root in (("params",), ("opt_state", "0", "mu")):
        p = (*root, "layers", "w")
        leaves[p] = Leaf(p, tuple(shape), dtype)
    p = ("nnx_aux", "layers", "rngs", "key")  # another collection: always at axis 0
    leaves[p] = Leaf(p, (n_layers, 2), "uint32")
    leaves[("step",)] = Leaf(("step",), (), "int32")
    store = FakeStore(leaves, seed=n_layers)
    opts = ConvertOptions(scan_layers=scan, linen_scan_axis=linen_axis, nnx_scan_axis=nnx_axis)
    fwd = plan_linen_to_nnx(leaves, {}, opts)
    nnx = run_plan(fwd, store)
    w = store.data[("params", "layers", "w")]
    if scan is None:  # the stacked axis moves exactly as numpy.moveaxis moves it
        got = nnx.data[("model", "layers", "w", "value")]
        np.testing.assert_array_equal(got, np.moveaxis(w, linen_axis, nnx_axis))
    else:
        for i in range(n_layers):
            got = nnx.data[("model", f"layers_{i}", "w", "value")]
            np.testing.assert_array_equal(got, np.take(w, i, axis=linen_axis))
    back = plan_nnx_to_linen(nnx.leaves, fwd.custom_metadata)
    assert_same(store, run_plan(back, nnx))


# --- plan and target errors ------------------------------------------------------------------

SMALL = {
    ("params", "dense", "kernel"): Leaf(("params", "dense", "kernel"), (2, 3), "float32"),
    ("step",): Leaf(("step",), (), "int32"),
}


def test_linen_to_nnx_of_an_nnx_checkpoint_points_at_nnx_to_linen():
    nnx = plan_linen_to_nnx(SMALL, {}).output_leaves()
    for forced in (None, "nnx", "maxtext", "flax"):
        with pytest.raises(
            LayoutError, match=r"^src: is an nnx checkpoint \(detected\).*use nnx-to-linen"
        ) as e:
            plan_linen_to_nnx(nnx, {}, ConvertOptions(layout=forced), where="src")
        if forced:
            assert f"--layout {forced} names the source's layout" in str(e.value)


def test_nnx_to_linen_refuses_unknown_recorded_and_nnx_target():
    fwd = plan_linen_to_nnx(SMALL, {})
    meta = {"ckptconv": {**fwd.custom_metadata["ckptconv"], "source_layout": "mlx"}}
    with pytest.raises(PlanError, match=r"unknown recorded layout 'mlx'"):
        plan_nnx_to_linen(fwd.output_leaves(), meta)
    with pytest.raises(PlanError, match=r"target layout must be one of maxtext, flax, params"):
        plan_nnx_to_linen(
            fwd.output_leaves(), fwd.custom_metadata, ConvertOptions(target_layout="nnx")
        )


def test_require_target_names_every_problem_in_one_line():
    from ckptconv.convert.plan import mismatch_error, require_target

    plan = plan_linen_to_nnx(SMALL, {})
    require_target(plan, None)
    require_target(plan, {p: (x.shape, x.dtype) for p, x in plan.output_leaves().items()})
    kernel = ("model", "dense", "kernel", "value")
    with pytest.raises(PlanError) as e:
        require_target(plan, {kernel: ((3, 2), "float32")})
    msg = str(e.value)
    assert msg.startswith("output does not match the target: model/dense/kernel/value: mismatch")
    assert "\n" not in msg and "optimizer/" not in msg
    # a model leaf the target lacks is extra; the optimizer state and step are not the model's
    with pytest.raises(PlanError) as e:
        require_target(plan, {("model", "other", "value"): ((2, 3), "float32")})
    msg = str(e.value)
    assert "model/other/value: missing" in msg and "model/dense/kernel/value: extra" in msg
    assert "optimizer/" not in msg
    many = check_against({}, {("model", str(i)): ((1,), "int8") for i in range(7)})
    assert str(mismatch_error(many, "x")).endswith("(and 2 more)")
