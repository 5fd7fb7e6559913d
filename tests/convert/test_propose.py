"""`propose`: a mapping file from the target's leaves (ckptconv.convert.propose)."""

import pathlib
import re
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from ckptconv.convert.propose import propose

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import fused_qkv as fq  # noqa: E402

F32 = "float32"


def leaves(**shapes):
    """``leaves(a__b=(2, 3))`` -> ``{'a/b': ((2, 3), 'float32')}``."""
    return {k.replace("__", "/"): (tuple(v), F32) for k, v in shapes.items()}


# ------------------------------------------------ a tiny numpy engine for the rule format


def _sub(rule, path, to):
    return re.sub(rule["match"], to, path, count=1)


def apply_rules(rules, arrays):
    """Applies mapping rules (rename, reshape, transpose, split, cast) with numpy."""
    arrays = dict(arrays)
    for rule in rules:
        ((kind, r),) = rule.items()
        hits = [p for p in arrays if re.search(r["match"], p)]
        assert hits, f"rule matches nothing: {rule}"
        for p in hits:
            x = arrays.pop(p)
            if kind == "rename":
                arrays[re.sub(r["match"], r["to"], p)] = x
            elif kind == "reshape":
                arrays[p] = np.reshape(x, r["shape"])
            elif kind == "transpose":
                arrays[p] = np.transpose(x, r["perm"])
            elif kind == "cast":
                arrays[p] = x.astype(r["dtype"])
            elif kind == "split":
                for to, part in zip(r["to"], np.split(x, len(r["to"]), r["axis"]), strict=True):
                    arrays[_sub(r, p, to)] = part
            else:
                raise NotImplementedError(kind)
    return arrays


def apply_shapes(rules, shapes):
    zeros = {p: np.zeros(s, np.float32) for p, (s, _) in shapes.items()}
    return {p: tuple(x.shape) for p, x in apply_rules(rules, zeros).items()}


def uncomment(text, k):
    """The YAML text with alternative ``k`` (1-based) of every ambiguity uncommented."""
    out, active = [], False
    for line in text.splitlines():
        if line.startswith("  # -- alternative "):
            active = line.startswith(f"  # -- alternative {k}:")
            continue
        if line.startswith("  # - ") and active:
            line = "  - " + line[len("  # - ") :]
        elif not line.startswith("  # - "):
            active = False
        out.append(line)
    return "\n".join(out)


# ------------------------------------------------ the fused-qkv twins


@pytest.fixture(scope="module")
def pair():
    params = fq.linen_params(0)
    return params, propose(
        fq.linen_leaves(params), fq.nnx_leaves(fq.nnx_abstract()), layout="params"
    )


def test_hand_mapping_makes_the_twins_agree():
    params = fq.linen_params(0)
    rules = yaml.safe_load(fq.HAND_MAPPING)["rules"]
    mapped = apply_rules(rules, {k: np.asarray(v) for k, v in fq.flatten(params).items()})
    assert set(mapped) == set(fq.nnx_leaves(fq.nnx_abstract()))
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, fq.V, (2, 9)), jnp.int32)
    want = np.asarray(fq.linen_logits(params, tokens))
    got = np.asarray(fq.nnx_logits(fq.nnx_with(mapped), tokens))
    assert np.abs(want).max() > 0.1
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_fused_qkv_has_exactly_one_ambiguity_the_split_order(pair):
    _, p = pair
    assert not p.complete
    assert p.unmatched_source == [] and p.unmatched_target == []
    assert len(p.alternatives) == 1
    amb = p.alternatives[0]
    assert len(amb.options) == 6  # 3! orders of q, k, v
    assert {o.match.source for o in amb.options} == {("layer_{i}/attn/qkv",)}
    assert [m.kind for m in p.matches].count("ambiguous") == 1
    # no false match: every confident match is what the hand mapping says
    hand = {
        "Dense_0/kernel": "lm_head/kernel",
        "Embed_0/embedding": "embedder/embedding",
        "LayerNorm_0/scale": "final_norm/scale",
        "LayerNorm_0/bias": "final_norm/bias",
        "layer_{i}/LayerNorm_0/scale": "layers/{i}/norm/scale",
        "layer_{i}/LayerNorm_0/bias": "layers/{i}/norm/bias",
        "layer_{i}/attn/Dense_0/kernel": "layers/{i}/attn/o_proj/kernel",
        "layer_{i}/mlp/Dense_0/kernel": "layers/{i}/mlp/up_proj/kernel",
        "layer_{i}/mlp/Dense_1/kernel": "layers/{i}/mlp/down_proj/kernel",
    }
    confident = {m.source[0]: m.target[0] for m in p.matches if m.kind != "ambiguous"}
    assert confident == hand
    assert all(m.layers == (0, 1, 2) for m in p.matches if "{i}" in m.source[0])


def test_unresolved_yaml_activates_no_alternative(pair):
    _, p = pair
    text = p.to_yaml()
    parsed = yaml.safe_load(text)
    assert parsed["version"] == 1 and parsed["layout"] == "params" and parsed["ignore"] == []
    assert parsed["rules"] == p.rules
    assert not any("split" in r for r in parsed["rules"])
    assert "Uncomment exactly ONE" in text
    assert text.count("# -- alternative") == 6


def test_resolved_rules_equal_the_hand_mapping(pair):
    params, p = pair
    hand = yaml.safe_load(fq.HAND_MAPPING)
    assert p.resolve([0]).rules == hand["rules"]  # the name 'qkv' puts q, k, v first
    assert yaml.safe_load(uncomment(p.to_yaml(), 1)) == hand
    wrong = p.resolve([1])
    assert wrong.rules != hand["rules"] and wrong.complete
    assert p.resolve([0]).complete
    with pytest.raises(ValueError):
        p.resolve([])
    with pytest.raises(ValueError):
        p.resolve([6])


def test_resolved_rules_reproduce_the_target_shapes(pair):
    params, p = pair
    target = fq.nnx_leaves(fq.nnx_abstract())
    got = apply_shapes(p.resolve([0]).rules, fq.linen_leaves(params))
    assert got == {k: s for k, (s, _) in target.items()}


def test_through_the_mapping_engine(pair):
    mapping = pytest.importorskip("ckptconv.convert.mapping")
    if not hasattr(mapping, "parse_mapping"):
        pytest.skip("ckptconv.convert.mapping.parse_mapping not there yet")
    params, p = pair
    m = mapping.parse_mapping(p.resolve([0]).to_yaml(), "proposed")
    out = m.apply_shapes(fq.linen_leaves(params))
    assert {k: (tuple(s), str(d)) for k, (s, d) in out.items()} == fq.nnx_leaves(fq.nnx_abstract())


def test_table_and_dict(pair):
    _, p = pair
    table = p.table()
    assert "ambiguous (1):" in table and "inferred (9):" in table and "complete: False" in table
    d = p.to_dict()
    assert d["complete"] is False and len(d["alternatives"]) == 1
    assert propose(fq.linen_leaves(pair[0]), fq.nnx_leaves(fq.nnx_abstract()), layout="params") == p


# ------------------------------------------------ small cases


def test_pure_renames():
    src = leaves(Dense_0__kernel=(3, 5), Dense_0__bias=(5,))
    tgt = leaves(linear__kernel=(3, 5), linear__bias=(5,))
    p = propose(src, tgt)
    assert p.complete
    assert p.rules == [
        {"rename": {"match": "^Dense_0/bias$", "to": "linear/bias"}},
        {"rename": {"match": "^Dense_0/kernel$", "to": "linear/kernel"}},
    ]
    assert "layout" not in yaml.safe_load(p.to_yaml())


def test_same_paths_need_no_rules_and_are_exact():
    p = propose(leaves(a__kernel=(3, 5)), leaves(a__kernel=(3, 5)))
    assert p.complete and p.rules == [] and [m.kind for m in p.matches] == ["exact"]


def test_transposed_leaf():
    p = propose(leaves(proj__kernel=(3, 5, 7)), leaves(proj__kernel=(7, 3, 5)))
    assert p.complete
    assert p.rules == [{"transpose": {"match": "^proj/kernel$", "perm": [2, 0, 1]}}]


def test_reshaped_leaf():
    p = propose(leaves(out__kernel=(4, 6, 8)), leaves(out__kernel=(24, 8)))
    assert p.rules == [{"reshape": {"match": "^out/kernel$", "shape": [24, 8]}}]
    assert p.complete


def test_unmatched_on_both_sides():
    p = propose(leaves(a=(3,), extra=(7,)), leaves(a=(3,), other=(9, 2)))
    assert p.unmatched_source == ["extra"] and p.unmatched_target == ["other"]
    assert not p.complete and not p.alternatives
    assert "extra" in p.table() and "other" in p.table()


def test_dtype_mismatch_is_unmatched_with_a_reason():
    p = propose({"w/kernel": ((3, 5), "float32")}, {"w/kernel": ((3, 5), "bfloat16")})
    assert p.unmatched_source == ["w/kernel"] and p.unmatched_target == ["w/kernel"]
    assert "dtype float32 != bfloat16" in p.reasons["source:w/kernel"]
    assert "dtype bfloat16 != float32" in p.reasons["target:w/kernel"]
    assert "dtype float32 != bfloat16" in p.table()
    assert p.rules == []


def test_a_name_token_tells_two_same_shape_leaves_apart():
    src, tgt = {}, {}
    for i in range(3):
        src |= leaves(
            **{f"layer_{i}__attn__query__kernel": (8, 8), f"layer_{i}__attn__key__kernel": (8, 8)}
        )
        tgt |= leaves(
            **{
                f"layers__{i}__attn__query_proj__kernel": (8, 8),
                f"layers__{i}__attn__key_proj__kernel": (8, 8),
            }
        )
    p = propose(src, tgt)
    assert p.complete
    assert p.rules == [
        {
            "rename": {
                "match": r"^layer_(\d+)/attn/key/kernel$",
                "to": r"layers/\1/attn/key_proj/kernel",
            }
        },
        {
            "rename": {
                "match": r"^layer_(\d+)/attn/query/kernel$",
                "to": r"layers/\1/attn/query_proj/kernel",
            }
        },
    ]


def test_same_shape_leaves_without_names_are_an_ambiguity():
    p = propose(leaves(m__a=(8,), m__b=(8,)), leaves(m__x=(8,), m__y=(8,)))
    assert len(p.alternatives) == 1 and len(p.alternatives[0].options) == 2
    assert p.rules == [] and not p.complete
    assert yaml.safe_load(p.to_yaml())["rules"] is None  # nothing active
    assert p.resolve([0]).complete


def test_a_layer_that_differs_gets_rules_of_its_own():
    src = leaves(layer_0__w=(3, 5), layer_1__w=(3, 5), layer_2__w=(5, 3))
    tgt = leaves(layers__0__w=(3, 5), layers__1__w=(3, 5), layers__2__w=(3, 5))
    p = propose(src, tgt)
    assert p.complete
    assert not any(r"(\d+)" in str(r) for r in p.rules)
    assert {"transpose": {"match": "^layers/2/w$", "perm": [1, 0]}} in p.rules
    assert apply_shapes(p.rules, src) == {k: s for k, (s, _) in tgt.items()}


def test_rules_are_anchored():
    src = leaves(a__kernel=(3, 5), aa__kernel=(5, 3))
    tgt = leaves(b__kernel=(3, 5), bb__kernel=(5, 3))
    p = propose(src, tgt)
    assert all(
        r[k]["match"].startswith("^") and r[k]["match"].endswith("$") for r in p.rules for k in r
    )
    assert apply_shapes(p.rules, src) == {k: s for k, (s, _) in tgt.items()}
