"""Layouts: detection, a forced ``--layout`` checked against it, and every parse error."""

from __future__ import annotations

import pytest

from ckptconv.convert import layouts
from ckptconv.convert.layouts import detect_layout, get_layout, resolve_layout
from ckptconv.convert.plan import ConvertOptions, plan_linen_to_nnx, plan_nnx_to_linen
from ckptconv.errors import LayoutError
from ckptconv.io.leaf import Leaf
from ckptconv.testing import assert_one_line_error, run_cli


def tree(*paths, shape=(2,)):
    return {p: Leaf(p, shape, "float32") for p in paths}


MAXTEXT = tree(
    ("params", "params", "decoder", "decoder_norm", "scale"),
    ("params", "params", "token_embedder", "embedding"),
    ("nnx_aux", "model", "decoder", "rngs", "key"),
)
FLAX = tree(("params", "dense", "kernel"), ("batch_stats", "bn", "mean"))


def nnx_of(leaves):
    plan = plan_linen_to_nnx(leaves, {})
    return plan.output_leaves(), plan.custom_metadata


# --- B: a forced --layout that contradicts detection is refused, naming the detected one -----


def test_forced_flax_on_a_maxtext_checkpoint_is_refused_naming_maxtext():
    with pytest.raises(LayoutError, match=r"--layout flax .* detected as maxtext"):
        plan_linen_to_nnx(MAXTEXT, {}, ConvertOptions(layout="flax"))


@pytest.mark.parametrize(
    "leaves,forced,detected",
    [(MAXTEXT, "nnx", "maxtext"), (FLAX, "maxtext", "flax"), (FLAX, "nnx", "flax")],
)
def test_any_contradicting_forced_layout_is_refused(leaves, forced, detected):
    with pytest.raises(LayoutError, match=rf"--layout {forced} .*detected as {detected}"):
        plan_linen_to_nnx(leaves, {}, ConvertOptions(layout=forced))


def test_forced_layout_that_agrees_is_used():
    plan = plan_linen_to_nnx(MAXTEXT, {}, ConvertOptions(layout="maxtext"))
    assert ("model", "decoder", "decoder_norm", "scale", "value") in plan.output_leaves()


def test_cli_forced_flax_on_fixture_a_is_refused(maxtext_fixtures, tmp_path):
    src = maxtext_fixtures / "A" / "ckpt"
    code, _, err = run_cli("linen-to-nnx", src, tmp_path / "out", "--layout", "flax")
    assert_one_line_error(code, err, "--layout flax", "maxtext")
    assert not (tmp_path / "out").exists()


def test_forced_layout_when_nothing_is_detected_says_so():
    leaves = tree(("model", "a", "value"), ("extra", "b"))
    assert layouts.matching_layouts(leaves) == []
    with pytest.raises(LayoutError, match=r"^extra/b: .*\(read as --layout nnx; no layout"):
        plan_nnx_to_linen(leaves, {}, ConvertOptions(layout="nnx"))
    with pytest.raises(LayoutError, match=r"^src: is read as nnx .*use nnx-to-linen"):
        plan_linen_to_nnx(leaves, {}, ConvertOptions(layout="nnx"), where="src")


def test_cli_linen_to_nnx_of_an_nnx_checkpoint_names_nnx(maxtext_fixtures, tmp_path):
    code, _, err = run_cli("linen-to-nnx", maxtext_fixtures / "A" / "ckpt", tmp_path / "nnx")
    assert code == 0, err
    code, _, err = run_cli("linen-to-nnx", tmp_path / "nnx", tmp_path / "o", "--layout", "maxtext")
    assert_one_line_error(
        code, err, "is an nnx checkpoint (detected)", "--layout maxtext", "use nnx-to-linen"
    )
    assert not (tmp_path / "o").exists()


# --- 4: nnx-to-linen --layout names the SOURCE layout; --to picks the output ------------------


def test_nnx_to_linen_layout_maxtext_points_at_to():
    leaves, meta = nnx_of(MAXTEXT)
    with pytest.raises(LayoutError) as e:
        plan_nnx_to_linen(leaves, meta, ConvertOptions(layout="maxtext"))
    msg = str(e.value)
    assert "--layout maxtext names the source's layout" in msg
    assert "nnx checkpoint (detected)" in msg and "--to maxtext" in msg
    assert "expected params/params" not in msg


def test_nnx_to_linen_of_a_linen_source_names_its_layout():
    for leaves, name in ((MAXTEXT, "maxtext"), (FLAX, "flax")):
        for forced in (None, "nnx", name):
            with pytest.raises(LayoutError, match=rf"is a {name} checkpoint .*use linen-to-nnx"):
                plan_nnx_to_linen(leaves, {}, ConvertOptions(layout=forced))


def test_cli_nnx_to_linen_layout_maxtext(maxtext_fixtures, tmp_path):
    code, _, err = run_cli("linen-to-nnx", maxtext_fixtures / "A" / "ckpt", tmp_path / "nnx")
    assert code == 0, err
    code, _, err = run_cli(
        "nnx-to-linen", tmp_path / "nnx", tmp_path / "back", "--layout", "maxtext"
    )
    assert_one_line_error(code, err, "--layout maxtext", "nnx", "--to maxtext")
    assert not (tmp_path / "back").exists()
    code, _, err = run_cli("nnx-to-linen", tmp_path / "nnx", tmp_path / "back", "--to", "maxtext")
    assert code == 0, err


# --- detection and the registry ------------------------------------------------------------


class _Everything:
    name = "everything"

    def matches(self, leaves):
        return True


def test_ambiguous_detection_asks_for_layout_and_forced_must_be_a_match(monkeypatch):
    monkeypatch.setitem(layouts._REGISTRY, "everything", _Everything())
    with pytest.raises(LayoutError, match=r"^src: ambiguous layout \(maxtext, everything\)"):
        detect_layout(MAXTEXT, "src")
    assert resolve_layout(MAXTEXT, "maxtext", "src")[0].name == "maxtext"
    with pytest.raises(LayoutError, match=r"--layout nnx .*detected as maxtext or everything"):
        resolve_layout(MAXTEXT, "nnx", "src")


def test_unknown_layout_name_lists_the_known_ones():
    with pytest.raises(LayoutError, match=r"unknown layout 'mlx': expected one of flax, maxtext"):
        get_layout("mlx")


def test_a_bare_tree_of_arrays_is_the_params_layout():
    assert detect_layout(tree(("foo", "bar"), ("foo", "baz")), "src").name == "params"
    # a root module called 'model' without nnx.State's 'value' leaves is params, not nnx
    assert detect_layout(tree(("model", "Dense_0", "kernel"))).name == "params"
    assert detect_layout(tree(("model", "Dense_0", "kernel", "value"))).name == "nnx"


def test_unknown_top_level_keys():
    leaves = {**tree(("foo", "bar")), ("foo", "e"): Leaf(("foo", "e"), None, None)}
    with pytest.raises(LayoutError, match=r"^src: unknown layout: .* found \['foo'\]"):
        detect_layout(leaves, "src")


# --- parse errors ----------------------------------------------------------------------------


def test_unknown_maxtext_key_is_named():
    leaves = {**MAXTEXT, **tree(("nnx_aux", "cache", "x"))}
    assert detect_layout(leaves).name == "maxtext"
    with pytest.raises(LayoutError, match=r"^nnx_aux/cache/x: expected params/params/.*MaxText"):
        plan_linen_to_nnx(leaves, {})


def test_empty_leaf_outside_opt_state_is_refused():
    leaves = {**FLAX, ("step",): Leaf(("step",), None, None)}
    with pytest.raises(LayoutError, match=r"^step: expected an array outside opt_state"):
        plan_linen_to_nnx(leaves, {})


def test_opt_state_without_chain_position_is_refused():
    leaves = {**FLAX, **tree(("opt_state", "mu", "dense", "kernel"))}
    with pytest.raises(LayoutError, match=r"^opt_state/mu/dense/kernel: expected an optax chain"):
        plan_linen_to_nnx(leaves, {})


def test_nnx_parse_errors_name_the_leaf():
    leaves, meta = nnx_of(FLAX)
    bad = {**leaves, **tree(("model", "x", "kernel"))}
    with pytest.raises(LayoutError, match=r"^model/x/kernel: expected an array leaf ending in"):
        plan_nnx_to_linen(bad, meta)
    bad = {**leaves, **tree(("optimizer", "other", "value"))}
    with pytest.raises(LayoutError, match=r"^optimizer/other/value: expected model/\.\.\."):
        plan_nnx_to_linen(bad, meta)
    empty = {**leaves, ("model", "y", "value"): Leaf(("model", "y", "value"), None, None)}
    with pytest.raises(LayoutError, match=r"^model/y/value: .*found an empty leaf"):
        plan_nnx_to_linen(empty, meta)
