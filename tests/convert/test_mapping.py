"""Mapping files: parsing, every rule, exact inversion (hypothesis), mirrors, CLI errors."""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckptconv.convert.expr import Src, evaluate
from ckptconv.convert.mapping import MappingError, map_tree, parse_mapping, undo_tree
from ckptconv.convert.tree import PARAMS, OptEntry, TrainTree
from ckptconv.testing import assert_one_line_error, run_cli

GEMMA = r"""
version: 1
layout: params
rules:
  - rename:    {match: '^layer_(\d+)/', to: 'layers/\1/'}
  - split:     {match: '^(.*)/mlp/gating_einsum$', axis: 0,
                to: ['\1/mlp/gate_proj/kernel', '\1/mlp/up_proj/kernel']}
  - reshape:   {match: '/mlp/(gate|up)_proj/kernel$', shape: [8, 4]}
  - transpose: {match: '/mlp/(gate|up)_proj/kernel$', perm: [1, 0]}
  - rename:    {match: '^(.*)/mlp/linear$', to: '\1/mlp/down_proj/kernel'}
ignore: ['^unused$']
"""


def _arrays(shapes: dict[str, tuple]) -> dict[tuple, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        tuple(p.split("/")): rng.standard_normal(s).astype(np.float32) for p, s in shapes.items()
    }


def _tree(arrays: dict[tuple, np.ndarray], mirrors: int = 2) -> TrainTree:
    """A TrainTree over ``arrays`` with ``mirrors`` optimizer trees (mu, nu) of the params."""

    def src(root, p, a):
        return Src((root, *p), a.shape, a.dtype.name)

    model = {p: (PARAMS, src("m", p, a)) for p, a in arrays.items()}
    entry = OptEntry(
        leaves={("count",): Src(("count",), (), "int32")},
        mirrors={
            (r,): {p: src(r, p, a) for p, a in arrays.items()} for r in ["mu", "nu"][:mirrors]
        },
    )
    return TrainTree(model, [entry])


def _store(arrays, mirrors=("mu", "nu")):
    """Reads the sources of :func:`_tree`: the model and each mirror (mirror = model + k)."""
    out = {("m", *p): a for p, a in arrays.items()}
    for k, r in enumerate(mirrors, 1):
        out.update({(r, *p): a + k for p, a in arrays.items()})
    out[("count",)] = np.array(7, np.int32)
    return lambda path, index=None: out[path] if index is None else out[path][index]


def _evaluated(tree: TrainTree, read) -> dict:
    """``{where: {path: array}}`` of the model and every mirror."""
    out = {"model": {p: evaluate(e, read) for p, (_, e) in tree.model.items()}}
    for root, mirror in tree.opt_state[0].mirrors.items():
        out["/".join(root)] = {p: evaluate(e, read) for p, e in mirror.items()}
    return out


def test_the_issue_example_maps_and_inverts_exactly():
    shapes = {
        "layer_0/mlp/gating_einsum": (2, 8, 4),
        "layer_0/mlp/linear": (8, 4),
        "layer_1/mlp/gating_einsum": (2, 8, 4),
        "layer_1/mlp/linear": (8, 4),
        "unused": (3,),
    }
    mapping = parse_mapping(GEMMA, "gemma.yaml")
    assert mapping.layout == "params"
    arrays = _arrays(shapes)
    tree = _tree(arrays)
    steps = map_tree(tree, mapping)
    read = _store(arrays)
    got = _evaluated(tree, read)["model"]
    g = arrays[("layer_1", "mlp", "gating_einsum")]
    np.testing.assert_array_equal(got[("layers", "1", "mlp", "gate_proj", "kernel")], g[0].T)
    np.testing.assert_array_equal(got[("layers", "1", "mlp", "up_proj", "kernel")], g[1].T)
    assert ("unused",) not in got and len(got) == 6
    mu = _evaluated(tree, read)["mu"]
    np.testing.assert_array_equal(
        mu[("layers", "0", "mlp", "up_proj", "kernel")],
        read(("mu", "layer_0", "mlp", "gating_einsum"))[1].T,
    )
    # undo: the inverse steps bring back every kept leaf, bytes and keys
    undo_tree(tree, steps)
    back = _evaluated(tree, read)
    for where, root in (("model", "m"), ("mu", "mu"), ("nu", "nu")):
        assert set(back[where]) == {p for p in arrays if p != ("unused",)}
        for p, a in back[where].items():
            assert a.tobytes() == read((root, *p)).tobytes()


def test_dry_run_describes_each_expression():
    mapping = parse_mapping(GEMMA)
    tree = _tree(_arrays({"layer_0/mlp/gating_einsum": (2, 8, 4), "layer_0/mlp/linear": (8, 4)}))
    map_tree(tree, mapping)
    desc = tree.model[("layers", "0", "mlp", "gate_proj", "kernel")][1].describe()
    assert (
        desc
        == "transpose(reshape(slice(m/layer_0/mlp/gating_einsum, axis=0, 0:1), [8, 4]), [1, 0])"
    )


def test_stack_unstack_concat_cast_and_sizes():
    text = r"""
version: 1
rules:
  - stack:   {match: '^blk(\d+)/(.*)$', to: 'blocks/\2', axis: 1}
  - concat:  {match: ['^(.*)/q$', '^(.*)/kv$'], axis: 0, to: '\1/qkv'}
  - split:   {match: '^(.*)/qkv$', axis: 0, sizes: [1, 3], to: ['\1/a', '\1/b']}
  - unstack: {match: '^blocks/(.*)$', to: 'layer_{i}/\1', axis: 1}
  - cast:    {match: '/b$', dtype: float64}
"""
    arrays = _arrays(
        {f"blk{i}/{n}": s for i in range(3) for n, s in (("q", (1, 5)), ("kv", (3, 5)))}
    )
    tree = _tree(arrays, mirrors=1)
    steps = map_tree(tree, parse_mapping(text))
    read = _store(arrays, ("mu",))
    got = _evaluated(tree, read)
    for i in range(3):
        q, kv = arrays[(f"blk{i}", "q")], arrays[(f"blk{i}", "kv")]
        np.testing.assert_array_equal(got["model"][(f"layer_{i}", "a")], q)
        b = got["model"][(f"layer_{i}", "b")]
        assert b.dtype == np.float64 and b.tobytes() == kv.astype(np.float64).tobytes()
        np.testing.assert_array_equal(got["mu"][(f"layer_{i}", "a")], q + 1)
    undo_tree(tree, steps)
    back = _evaluated(tree, read)
    assert {p: a.tobytes() for p, a in back["model"].items()} == {
        p: a.tobytes() for p, a in arrays.items()
    }


# -- hypothesis: random rule sequences on random trees, with mirrors, invert exactly ----------


@st.composite
def rule_sequences(draw):
    """A random tree and a random, valid sequence of rules over it."""
    n = draw(st.integers(1, 4))
    shapes = {
        f"mod{i}/w": tuple(draw(st.lists(st.sampled_from([1, 2, 3, 4, 6]), min_size=1, max_size=3)))
        for i in range(n)
    }
    if draw(st.booleans()):  # a numbered family to stack
        for i in range(draw(st.integers(2, 3))):
            shapes[f"layer_{i}/k"] = (2, 3)
    mapping_rules = []
    current = {p: (s, "float32") for p, s in shapes.items()}
    for _ in range(draw(st.integers(1, 5))):
        rule = _random_rule(draw, current)
        if rule is None:
            continue
        text = "version: 1\nrules:\n" + "".join(f"  - {r}\n" for r in [*mapping_rules, rule])
        try:
            current = parse_mapping(text).apply_shapes(
                {p: (s, "float32") for p, s in shapes.items()}
            )
        except MappingError:
            continue
        mapping_rules.append(rule)
    return shapes, "version: 1\nrules:\n" + "".join(f"  - {r}\n" for r in mapping_rules)


def _random_rule(draw, current: dict) -> str | None:
    path = draw(st.sampled_from(sorted(current)))
    shape, dtype = current[path]
    rx = "'^" + re.escape(path).replace("'", "''") + "$'"
    op = draw(
        st.sampled_from(["rename", "transpose", "reshape", "split", "stack", "unstack", "cast"])
    )
    if op == "rename":
        return f"rename: {{match: {rx}, to: 'r{draw(st.integers(0, 9))}/{path.replace('/', '_')}'}}"
    if op == "transpose":
        return f"transpose: {{match: {rx}, perm: {list(draw(st.permutations(range(len(shape)))))}}}"
    if op == "reshape":
        return f"reshape: {{match: {rx}, shape: [-1]}}"
    if op == "split" and shape:
        axis = draw(st.integers(0, len(shape) - 1))
        if shape[axis] < 2:
            return None
        sizes = f"[1, {shape[axis] - 1}]"
        return f"split: {{match: {rx}, axis: {axis}, sizes: {sizes}, to: ['{path}_a', '{path}_b']}}"
    if op == "stack":
        return (
            r"stack: {match: '^layer_(\d+)/(.*)$', to: 'stacked/\2', axis: "
            + str(draw(st.integers(0, 2)))
            + "}"
        )
    if op == "unstack" and shape:
        axis = draw(st.integers(0, len(shape) - 1))
        return f"unstack: {{match: {rx}, to: 'u{{i}}/{path.replace('/', '_')}', axis: {axis}}}"
    if op == "cast" and dtype == "float32":
        return f"cast: {{match: {rx}, dtype: float64}}"
    return None


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rule_sequences())
def test_random_rule_sequences_with_mirrors_invert_exactly(case):
    shapes, text = case
    arrays = _arrays(shapes)
    tree = _tree(arrays)
    steps = map_tree(tree, parse_mapping(text))
    read = _store(arrays)
    mapped = _evaluated(tree, read)
    assert {p: a.shape for p, a in mapped["model"].items()} == {
        p: a.shape for p, a in mapped["mu"].items()
    }
    # the output is written, then read back: undo on sources named by the output paths
    written = {(w, *p): a for w, leaves in mapped.items() for p, a in leaves.items()}
    back_tree = TrainTree(
        {
            p: (PARAMS, Src(("model", *p), a.shape, a.dtype.name))
            for p, a in mapped["model"].items()
        },
        [
            OptEntry(
                mirrors={
                    (r,): {p: Src((r, *p), a.shape, a.dtype.name) for p, a in mapped[r].items()}
                    for r in ("mu", "nu")
                }
            )
        ],
    )
    undo_tree(back_tree, steps)
    back = _evaluated(back_tree, lambda p, i=None: written[p] if i is None else written[p][i])
    for where, src_root in (("model", "m"), ("mu", "mu"), ("nu", "nu")):
        assert set(back[where]) == set(arrays)
        for p, a in back[where].items():
            want = read((src_root, *p))
            assert a.dtype == want.dtype and a.shape == want.shape
            assert a.tobytes() == want.tobytes(), (where, p)


# -- errors -----------------------------------------------------------------------------------

LEAVES = {"layer_0/w": ((4, 6), "float32"), "layer_1/w": ((4, 6), "float32")}


@pytest.mark.parametrize(
    ("rule", "needles"),
    [
        ("rename: {match: '([', to: x}", ["rule 1", "invalid regex"]),
        ("rename: {match: '^nothing$', to: x}", ["rule 1", "matches no leaf", "optional: true"]),
        ("rename: {match: '^layer_\\d+/', to: 'same/'}", ["rule 1", "same/w", "two leaves map"]),
        (
            "split: {match: '/w$', axis: 0, to: [a, b, c]}",
            ["rule 1", "layer_0/w", "does not divide"],
        ),
        (
            "reshape: {match: '/w$', shape: [5, -1]}",
            ["rule 1", "layer_0/w", "cannot reshape [4, 6]"],
        ),
        ("transpose: {match: '/w$', perm: [0, 1, 2]}", ["rule 1", "layer_0/w", "perm [0, 1, 2]"]),
        ("explode: {match: '/w$'}", ["rule 1", "unknown operation 'explode'"]),
        ("rename: {match: '/w$', to: x, color: red}", ["rule 1", "unknown key 'color'"]),
    ],
)
def test_rule_errors_name_the_rule_and_the_path(rule, needles):
    text = f"version: 1\nrules:\n  - {rule}\n"
    with pytest.raises(MappingError) as e:
        parse_mapping(text, "m.yaml").apply_shapes(LEAVES)
    msg = str(e.value)
    assert msg.startswith("m.yaml: ") and "\n" not in msg
    assert rule.split(":")[0] in msg  # the rule's text
    for n in needles:
        assert n in msg, (n, msg)


def test_optional_rule_may_match_nothing_and_yaml_errors_name_the_line():
    ok = "version: 1\nrules:\n  - rename: {match: '^nothing$', to: x, optional: true}\n"
    assert parse_mapping(ok).apply_shapes(LEAVES) == LEAVES
    with pytest.raises(MappingError, match=r"^m.yaml:3: YAML syntax error"):
        parse_mapping("version: 1\nrules:\n  - rename: {match: 'a', to: b]\n  - x: 1\n", "m.yaml")
    with pytest.raises(MappingError, match="version: expected 1"):
        parse_mapping("version: 2\nrules: []\n")


@pytest.fixture(scope="module")
def bare_ckpt(tmp_path_factory):
    import orbax.checkpoint as ocp

    path = tmp_path_factory.mktemp("bare") / "ckpt"
    rng = np.random.default_rng(1)
    params = {f"layer_{i}": {"w": rng.standard_normal((4, 6)).astype(np.float32)} for i in range(2)}
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, params)
    return path


@pytest.mark.parametrize(
    ("body", "needles"),
    [
        (
            "  - rename: {match: '([', to: x}\n",
            ["rule 1 (rename: {match: '([', to: x})", "invalid regex"],
        ),
        ("  - rename: {match: '^zzz$', to: x}\n", ["rule 1", "matches no leaf"]),
        ("  - rename: {match: '^layer_\\d+/', to: 'a/'}\n", ["rule 1", "a/w", "two leaves map"]),
        (
            "  - split: {match: '/w$', axis: 1, to: [a, b, c, d]}\n",
            ["layer_0/w", "does not divide"],
        ),
        ("  - reshape: {match: '/w$', shape: [7]}\n", ["layer_0/w", "cannot reshape"]),
        ("  - transpose: {match: '/w$', perm: [1]}\n", ["layer_0/w", "perm [1]"]),
        ("  - rename: {match: 'a', to: b]\n", ["m.yaml:4: YAML syntax error", "']'"]),
        ("  - fold: {match: 'a'}\n", ["unknown operation 'fold'"]),
        ("  - rename: {match: 'a', too: b}\n", ["unknown key 'too'"]),
    ],
)
def test_rule_errors_through_the_cli(tmp_path, bare_ckpt, body, needles):
    m = tmp_path / "m.yaml"
    m.write_text("version: 1\nlayout: params\nrules:\n" + body)
    code, _, err = run_cli("linen-to-nnx", bare_ckpt, tmp_path / "out", "--mapping", m)
    line = assert_one_line_error(code, err, *needles)
    assert "m.yaml" in line
    assert not (tmp_path / "out").exists()


def test_renames_and_transposes_copy_chunks_without_decoding(tmp_path, bare_ckpt):
    import json

    from ckptconv.io import CheckpointReader

    m = tmp_path / "m.yaml"
    m.write_text(
        "version: 1\nrules:\n"
        "  - rename: {match: '^layer_(\\d+)/', to: 'blocks/\\1/'}\n"
        "  - transpose: {match: '^blocks/1/w$', perm: [1, 0]}\n"
    )
    code, out, err = run_cli(
        "linen-to-nnx", bare_ckpt, tmp_path / "out", "--mapping", m, "--layout", "params", "--json"
    )
    assert code == 0, err
    assert json.loads(out)["copied_leaves"] == 2
    src, dst = CheckpointReader(bare_ckpt), CheckpointReader(tmp_path / "out")
    w1 = dst.read(("model", "blocks", "1", "w", "value"))
    np.testing.assert_array_equal(w1, src.read(("layer_1", "w")).T)
    np.testing.assert_array_equal(
        dst.read(("model", "blocks", "0", "w", "value")), src.read(("layer_0", "w"))
    )


def test_nnx_to_linen_applies_a_mapping_file_to_the_nnx_paths(tmp_path, bare_ckpt):
    from ckptconv.io import CheckpointReader

    code, _, err = run_cli("linen-to-nnx", bare_ckpt, tmp_path / "nnx")
    assert code == 0, err
    m = tmp_path / "back.yaml"
    m.write_text(
        "version: 1\nrules:\n  - rename: {match: '^layer_(\\d+)/w$', to: 'blk\\1/kernel'}\n"
    )
    code, _, err = run_cli("nnx-to-linen", tmp_path / "nnx", tmp_path / "linen", "--mapping", m)
    assert code == 0, err
    src, out = CheckpointReader(bare_ckpt), CheckpointReader(tmp_path / "linen")
    assert sorted(out.leaves()) == [("blk0", "kernel"), ("blk1", "kernel")]
    assert out.read(("blk1", "kernel")).tobytes() == src.read(("layer_1", "w")).tobytes()
