import json
import random

import flax.linen as nn
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from ckptconv.errors import ShardingError
from ckptconv.sharding import LogicalAxisRules, get_preset, load_rules

NAMES = ["a", "b", "c", "d"]
AXES = ["x", "y", "z"]


def outcome(fn):
    try:
        return ("ok", fn())
    except ValueError:
        return ("raises", None)


# -- semantics ---------------------------------------------------------------------------------


def test_flax_docstring_example():
    rules = LogicalAxisRules.from_pairs(
        [("batch", "X"), ("features", "X"), ("heads", "Y"), ("batch", "Z")]
    )
    assert rules.to_partition_spec(("batch", "length", "heads", "features")) == P(
        "X", None, "Y", None
    )


def test_rule_order_not_dimension_order_decides():
    # 'mlp' comes first in the rules, so it takes 'b' before 'embed' is looked at.
    rules = LogicalAxisRules.from_pairs(
        [("mlp", ("b", "c")), ("embed", ("a", "b")), ("embed", "a")]
    )
    assert rules.to_partition_spec(("embed", "mlp")) == P("a", ("b", "c"))


def test_empty_rule_value_assigns_replicated_and_stops_later_rules():
    rules = LogicalAxisRules.from_pairs([("a", []), ("a", "x")])
    assert rules.to_partition_spec(("a",)) == P(None)
    rules = LogicalAxisRules.from_pairs([("a", None), ("a", "x")])
    assert rules.to_partition_spec(("a",)) == P(None)


def test_unknown_and_none_names_are_replicated():
    rules = LogicalAxisRules.from_pairs([("a", "x")])
    assert rules.to_partition_spec((None, "zzz", "a")) == P(None, None, "x")
    assert rules.to_partition_spec(None) == P()
    assert rules.to_partition_spec(()) == P()


def test_mesh_axis_used_once_per_array():
    rules = LogicalAxisRules.from_pairs([("a", "x"), ("b", "x"), ("b", "y")])
    assert rules.to_partition_spec(("a", "b")) == P("x", "y")
    assert rules.to_partition_spec(("b",)) == P("x")


def test_repeated_dimension_name_raises():
    rules = LogicalAxisRules.from_pairs([("a", "x")])
    with pytest.raises(ShardingError, match="more than once"):
        rules.to_partition_spec(("a", None, "a"))
    # None may repeat.
    assert rules.to_partition_spec((None, None)) == P(None, None)


def test_non_string_dimension_name_raises():
    with pytest.raises(ShardingError, match="strings or None"):
        LogicalAxisRules.from_pairs([("a", "x")]).to_partition_spec(("a", 3))


# -- parity with flax --------------------------------------------------------------------------


def _maxtext_pairs(maxtext_fixtures):
    return json.loads((maxtext_fixtures / "logical_axis_rules.json").read_text())[
        "logical_axis_rules"
    ]


# Names beyond the reference decoder's: MaxText's MoE and vocab names, an unknown one, None.
EXTRA_NAMES = ["embed_vocab", "exp", "mlp_moe", "embed_moe", "unknown_name", None]


def _name_tuples(all_names, reference_names, *, n_random=600, seed=0):
    pair_names = [*reference_names, *EXTRA_NAMES]
    tuples = [(n,) for n in all_names]
    tuples += [(a, b) for a in pair_names for b in pair_names]
    rng = random.Random(seed)
    pool = list(all_names) + ["unknown_name", None]
    for _ in range(n_random):
        tuples.append(tuple(rng.choice(pool) for _ in range(rng.randint(1, 5))))
    return tuples


@pytest.mark.parametrize("preset", ["maxtext", "fsdp-tp"])
def test_preset_parity_with_flax(preset, maxtext_fixtures, reference_logical_names):
    rules = get_preset(preset)
    raw = _maxtext_pairs(maxtext_fixtures) if preset == "maxtext" else rules.to_pairs()
    all_names = sorted({name for name, _ in rules})
    checked = 0
    for names in _name_tuples(all_names, reference_logical_names):
        ours = outcome(lambda names=names: rules.to_partition_spec(names))
        ref = outcome(lambda names=names: nn.logical_to_mesh_axes(names, raw))
        assert ours == ref, names
        checked += ours[0] == "ok"
    assert checked > 500


@pytest.mark.parametrize(
    "preset, mesh",
    [
        ("maxtext", AbstractMesh((8,), ("fsdp",))),
        ("maxtext", AbstractMesh((2, 4), ("fsdp", "tensor"))),
        ("maxtext", AbstractMesh((2, 1, 4), ("stage", "fsdp", "tensor"))),
        ("fsdp-tp", AbstractMesh((4, 2), ("data", "tensor"))),
        ("fsdp-tp", AbstractMesh((1, 8), ("fsdp", "tensor"))),
    ],
)
def test_preset_parity_with_flax_on_a_mesh(
    preset, mesh, maxtext_fixtures, reference_logical_names, drop
):
    rules = get_preset(preset)
    raw = _maxtext_pairs(maxtext_fixtures) if preset == "maxtext" else rules.to_pairs()
    names_list = sorted({n for n, _ in rules})
    for names in _name_tuples(names_list, reference_logical_names, n_random=200, seed=1):
        if any(n is not None and names.count(n) > 1 for n in names):
            continue
        assert rules.to_partition_spec(names, mesh=mesh) == drop(
            nn.logical_to_mesh_axes(names, raw), mesh
        ), names


axis_values = st.one_of(
    st.none(),
    st.sampled_from(AXES),
    st.lists(st.sampled_from(AXES), max_size=3, unique=True).map(tuple),
)
rule_lists = st.lists(st.tuples(st.sampled_from(NAMES), axis_values), min_size=1, max_size=8)
name_tuples = st.lists(st.one_of(st.none(), st.sampled_from(NAMES + ["q"])), max_size=5).map(tuple)
meshes = st.lists(st.sampled_from([1, 2, 3]), min_size=len(AXES), max_size=len(AXES)).flatmap(
    lambda sizes: st.sets(st.sampled_from(AXES)).map(
        lambda present: AbstractMesh(
            tuple(s for s, a in zip(sizes, AXES, strict=True) if a in present),
            tuple(a for a in AXES if a in present),
        )
    )
)


@settings(max_examples=400, deadline=None)
@given(pairs=rule_lists, names=name_tuples)
@example(pairs=[("a", "x"), ("b", "x")], names=("a", "b"))
@example(pairs=[("b", ("x", "y")), ("a", ("y", "z")), ("a", "z")], names=("a", "b"))
@example(pairs=[("a", ()), ("a", "x")], names=("a",))
@example(pairs=[("a", "x")], names=("a", None, "a"))
def test_property_parity_with_flax(pairs, names):
    rules = LogicalAxisRules.from_pairs(pairs)
    ours = outcome(lambda: rules.to_partition_spec(names))
    ref = outcome(lambda: nn.logical_to_mesh_axes(names, pairs))
    assert ours == ref


@settings(max_examples=200, deadline=None)
@given(pairs=rule_lists, names=name_tuples, mesh=meshes)
def test_property_mesh_drop_out(drop, pairs, names, mesh):
    rules = LogicalAxisRules.from_pairs(pairs)
    ours = outcome(lambda: rules.to_partition_spec(names, mesh=mesh))
    ref = outcome(lambda: drop(nn.logical_to_mesh_axes(names, pairs), mesh))
    assert ours == ref


# -- mesh drop-out -----------------------------------------------------------------------------


def test_mesh_drops_absent_and_size_one_axes():
    rules = LogicalAxisRules.from_pairs(
        [("embed", ("fsdp", "fsdp_transpose", "expert")), ("mlp", ("tensor", "stage")), ("n", "x")]
    )
    mesh = AbstractMesh((2, 1, 4), ("fsdp", "expert", "tensor"))
    # fsdp_transpose absent, expert size 1: the tuple shrinks to one axis, which is unwrapped.
    assert rules.to_partition_spec(("embed", "mlp", "n"), mesh=mesh) == P("fsdp", "tensor", None)
    mesh = AbstractMesh((2, 3, 4), ("fsdp", "expert", "tensor"))
    assert rules.to_partition_spec(("embed",), mesh=mesh) == P(("fsdp", "expert"))


def test_dropped_axes_are_not_freed_for_later_rules():
    # As in MaxText with size-1 axes: 'stage' is taken by 'layers' even when it drops out.
    rules = LogicalAxisRules.from_pairs([("layers", "stage"), ("mlp", "stage"), ("mlp", "tensor")])
    mesh = AbstractMesh((1, 8), ("stage", "tensor"))
    assert rules.to_partition_spec(("layers", "mlp"), mesh=mesh) == P(None, "tensor")


def test_validate_names_rule_and_mesh_axes():
    rules = LogicalAxisRules.from_pairs([("embed", "fsdp"), ("mlp", ("tensor", "typo"))])
    with pytest.raises(ShardingError, match=r"'mlp'.*typo.*\('fsdp', 'tensor'\)"):
        rules.validate(AbstractMesh((2, 4), ("fsdp", "tensor")))
    rules[:1].validate(AbstractMesh((2, 4), ("fsdp", "tensor")))


# -- construction and loading ------------------------------------------------------------------


def test_sequence_protocol_and_immutability():
    rules = LogicalAxisRules.from_pairs([("a", "x"), ("b", ["y", "z"]), ("c", None)])
    assert len(rules) == 3
    assert list(rules) == [("a", ("x",)), ("b", ("y", "z")), ("c", ())]
    assert rules[1] == ("b", ("y", "z"))
    assert isinstance(rules[1:], LogicalAxisRules) and len(rules[1:]) == 2
    assert rules.to_pairs() == (("a", "x"), ("b", ("y", "z")), ("c", None))
    assert rules == LogicalAxisRules.from_pairs(rules.to_pairs())
    assert hash(rules) == hash(LogicalAxisRules(list(rules)))
    assert rules.used_mesh_axes() == ("x", "y", "z")
    with pytest.raises(TypeError):
        rules[0] = ("d", "x")  # type: ignore[index]
    combined = rules + [("d", "w")]
    assert combined[-1] == ("d", ("w",)) and len(rules) == 3


@pytest.mark.parametrize(
    "pairs, match",
    [
        ([("a",)], "pair"),
        (["ab"], "pair"),
        ([("", "x")], "non-empty"),
        ([(3, "x")], "non-empty"),
        ([("a", ("x", "x"))], "twice"),
        ([("a", 3)], "mesh axes must be"),
        ([("a", ("x", ""))], "non-empty strings"),
    ],
)
def test_bad_rules_raise(pairs, match):
    with pytest.raises(ShardingError, match=match):
        LogicalAxisRules.from_pairs(pairs)


def test_declared_mesh_axes_are_checked():
    with pytest.raises(ShardingError, match=r"rule 'mlp'.*\['tnesor'\].*\('data', 'tensor'\)"):
        LogicalAxisRules.from_pairs([("mlp", "tnesor")], mesh_axes=("data", "tensor"))


def test_from_file_json_fixture(maxtext_fixtures):
    rules = LogicalAxisRules.from_file(maxtext_fixtures / "logical_axis_rules.json")
    assert rules == get_preset("maxtext")
    assert rules.mesh_axes[:3] == ("diloco", "data", "stage")


def test_from_file_yaml_and_list_forms(tmp_path):
    yml = tmp_path / "rules.yml"
    yml.write_text("logical_axis_rules:\n  - ['embed', 'fsdp']\n  - ['mlp', ['tensor']]\n")
    assert LogicalAxisRules.from_file(yml).to_pairs() == (("embed", "fsdp"), ("mlp", "tensor"))
    js = tmp_path / "rules.json"
    js.write_text(json.dumps([["embed", None], ["mlp", ["a", "b"]]]))
    assert LogicalAxisRules.from_file(js).to_pairs() == (("embed", None), ("mlp", ("a", "b")))
    # A file without a known suffix is read as JSON, then as YAML.
    txt = tmp_path / "rules.txt"
    txt.write_text("- [embed, fsdp]\n")
    assert LogicalAxisRules.from_file(txt).to_pairs() == (("embed", "fsdp"),)


@pytest.mark.parametrize(
    "text, match",
    [
        ('{"rules": []}', "without a 'logical_axis_rules' key"),
        ('"embed"', "must hold a list"),
        ("[[1, 2, 3]]", "pair"),
        ("[[", "cannot parse"),
    ],
)
def test_from_file_errors(tmp_path, text, match):
    path = tmp_path / "rules.json"
    path.write_text(text)
    with pytest.raises(ShardingError, match=match):
        LogicalAxisRules.from_file(path)


def test_from_file_missing(tmp_path):
    with pytest.raises(ShardingError, match="cannot read"):
        LogicalAxisRules.from_file(tmp_path / "nope.json")


def test_load_preset_or_path(tmp_path):
    assert load_rules("fsdp-tp") == get_preset("fsdp-tp")
    path = tmp_path / "r.json"
    path.write_text('[["embed", "fsdp"]]')
    assert load_rules(path).to_pairs() == (("embed", "fsdp"),)
    assert load_rules(str(path)).to_pairs() == (("embed", "fsdp"),)
    with pytest.raises(ShardingError, match="maxtext, fsdp-tp"):
        load_rules("no-such-preset")


def test_sharding_error_is_value_error():
    with pytest.raises(ValueError):
        LogicalAxisRules.from_pairs([("a", "x")]).to_partition_spec(("a", "a"))
