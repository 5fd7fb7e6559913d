"""`ckptconv annotate`'s library call: structured JSON rows, one spec entry per dimension."""

from __future__ import annotations

import json

from click.testing import CliRunner
from jax.sharding import PartitionSpec as P

from ckptconv.cli import main
from ckptconv.sharding.cli_support import annotate_model, spec_to_json


def test_spec_to_json_one_entry_per_dimension():
    assert spec_to_json(P(), 2) == [None, None]
    assert spec_to_json(P("tensor"), 1) == ["tensor"]
    assert spec_to_json(P(None, ("fsdp", "tensor")), 3) == [None, ["fsdp", "tensor"], None]


def _strings(doc):
    if isinstance(doc, dict):
        for v in doc.values():
            yield from _strings(v)
    elif isinstance(doc, list):
        for v in doc:
            yield from _strings(v)
    elif isinstance(doc, str):
        yield doc


def _looks_like_a_repr(s: str) -> bool:
    """A Python repr of a PartitionSpec, tuple or list inside a JSON string."""
    return "P(" in s or "(" in s or "[" in s


def test_annotate_json_is_structured(maxtext_fixtures):
    cfg = maxtext_fixtures / "A" / "config.json"
    result = CliRunner().invoke(
        main, ["annotate", "--model-config", str(cfg), "--mesh", "fsdp=4,tensor=2", "--json"]
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert not [s for s in _strings(doc) if _looks_like_a_repr(s)]
    for row in doc["rows"]:
        assert isinstance(row["shape"], list) and all(isinstance(d, int) for d in row["shape"])
        assert len(row["spec"]) == len(row["shape"]), row
        for entry in row["spec"]:
            assert entry is None or isinstance(entry, str) or isinstance(entry, list)
    rows = {r["path"]: r for r in doc["rows"]}
    assert rows["decoder/layers/mlp/wi_0/kernel"]["spec"] == [None, "fsdp", "tensor"]
    assert rows["token_embedder/embedding"]["spec"] == ["tensor", "fsdp"]


def test_text_output_keeps_partition_spec_reprs(maxtext_fixtures):
    cfg = maxtext_fixtures / "A" / "config.json"
    result = CliRunner().invoke(
        main, ["annotate", "--model-config", str(cfg), "--mesh", "fsdp=4,tensor=2"]
    )
    assert result.exit_code == 0, result.output
    line = next(x for x in result.stdout.splitlines() if "self_attention/query/kernel" in x)
    assert "P(None, 'fsdp', 'tensor', None)" in line


def test_annotate_model_rows(maxtext_fixtures):
    rows, fallbacks = annotate_model(
        str(maxtext_fixtures / "A" / "config.json"), "fsdp=4,tensor=2", "maxtext", "params"
    )
    assert fallbacks == []
    q = next(r for r in rows if r["path"] == "decoder/layers/self_attention/query/kernel")
    assert q["spec"] == [None, "fsdp", "tensor", None]
    assert q["shard_shape"] == [2, 16, 2, 16]


def test_annotate_json_fallbacks_are_structured(maxtext_fixtures):
    # Fixture A has 2 KV heads: a 4-way tensor axis cannot split them, so they are replicated.
    cfg = maxtext_fixtures / "A" / "config.json"
    args = ["annotate", "--model-config", str(cfg), "--mesh", "data=2,tensor=4"]
    result = CliRunner().invoke(main, [*args, "--replicate-indivisible", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert not [s for s in _strings(doc) if _looks_like_a_repr(s)]
    assert doc["fallbacks"], doc
    paths = {r["path"] for r in doc["rows"]}
    for f in doc["fallbacks"]:
        assert set(f) == {"path", "dim", "size", "axes"}, f
        assert f["path"] in paths and f["size"] == 2 and f["axes"] == ["tensor"], f
    assert {
        "decoder/layers/self_attention/key/kernel",
        "decoder/layers/self_attention/value/kernel",
    } <= {f["path"] for f in doc["fallbacks"]}
    text = CliRunner().invoke(main, [*args, "--replicate-indivisible"])
    assert text.exit_code == 0, text.output
    assert (
        "replicated (indivisible): decoder/layers/self_attention/key/kernel dim 2 (size 2) "
        "over tensor" in text.stdout.splitlines()
    )
