"""The layout-neutral TrainTree: merging Linen collections and finding optimizer mirrors."""

from __future__ import annotations

import pytest

from ckptconv.convert.expr import Src
from ckptconv.convert.plan import plan_linen_to_nnx, plan_nnx_to_linen
from ckptconv.convert.tree import PARAMS, find_mirrors, merge_collection, prefix_conflict
from ckptconv.errors import LayoutError
from ckptconv.io.leaf import Leaf


def src(*path):
    return Src(path, (2,), "float32")


def leaves_of(*paths):
    return {p: Leaf(p, (2,), "float32") for p in paths}


def test_collection_colliding_with_params_is_refused():
    leaves = leaves_of(("params", "bn", "mean"), ("batch_stats", "bn", "mean"))
    with pytest.raises(LayoutError, match=r"^batch_stats/bn/mean: collides with params/bn/mean"):
        plan_linen_to_nnx(leaves, {})


def test_collection_leaf_where_params_have_a_module_is_refused():
    leaves = leaves_of(("params", "bn", "scale"), ("batch_stats", "bn"))
    with pytest.raises(LayoutError, match=r"^batch_stats/bn: is a leaf where params/bn/scale"):
        plan_linen_to_nnx(leaves, {})


def test_merge_collection_places_leaves_at_module_paths():
    model = {("bn", "scale"): (PARAMS, src("params", "bn", "scale"))}
    merge_collection(model, "batch_stats", {("bn", "mean"): src("batch_stats", "bn", "mean")})
    assert model[("bn", "mean")][0] == "batch_stats"
    leaves = leaves_of(("params", "bn", "scale"), ("batch_stats", "bn", "mean"))
    fwd = plan_linen_to_nnx(leaves, {})
    assert ("model", "bn", "mean", "value") in fwd.output_leaves()
    assert plan_nnx_to_linen(fwd.output_leaves(), fwd.custom_metadata).output_leaves() == leaves


def test_prefix_conflict():
    assert prefix_conflict([("a", "b"), ("a", "b", "c"), ("d",)]) == (("a", "b"), ("a", "b", "c"))
    assert prefix_conflict([("a", "b"), ("a", "c")]) is None


def test_find_mirrors_strips_only_the_root_wrapper():
    params = {("dec", "kernel"), ("enc", "params", "kernel")}
    entry = {
        ("mu", "params", "dec", "kernel"): src("mu", "dec"),
        ("mu", "params", "enc", "params", "kernel"): src("mu", "enc"),
        ("count",): src("count"),
    }
    out = find_mirrors(entry, params, ("params",))
    assert set(out.mirrors) == {("mu",)}
    assert set(out.mirrors[("mu",)]) == params
    assert set(out.leaves) == {("count",)}
    # a subtree that does not cover every param is not a mirror
    partial = find_mirrors({("nu", "params", "dec", "kernel"): src("nu")}, params, ("params",))
    assert partial.mirrors == {} and set(partial.leaves) == {("nu", "params", "dec", "kernel")}
