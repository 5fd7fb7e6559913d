"""The CLI: exit codes, one-line errors without tracebacks, --json documents."""

from __future__ import annotations

import json
import os
import shutil
import sys

import pytest

from ckptconv.testing import assert_one_line_error, run_cli


@pytest.fixture
def src_a(maxtext_fixtures, tmp_path):
    src = tmp_path / "A"
    shutil.copytree(maxtext_fixtures / "A" / "ckpt", src)
    for root, dirs, files in os.walk(src):
        for name in dirs + files:
            os.chmod(os.path.join(root, name), 0o755)
    return src


def test_convert_compare_inspect_json(src_a, tmp_path):
    code, out, _ = run_cli("linen-to-nnx", src_a, tmp_path / "nnx", "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["source_layout"] == "maxtext" and doc["target_layout"] == "nnx"
    assert doc["leaves"] == 51
    code, out, _ = run_cli("compare", src_a, tmp_path / "nnx", "--json")
    assert code == 0 and json.loads(out)["bit_exact"] is True
    code, out, _ = run_cli("inspect", tmp_path / "nnx", "--json")
    doc = json.loads(out)
    assert doc["layout"] == "nnx" and len(doc["leaves"]) == 51
    code, out, _ = run_cli("nnx-to-linen", tmp_path / "nnx", tmp_path / "back")
    assert code == 0 and "nnx -> maxtext" in out
    code, out, _ = run_cli("compare", src_a, tmp_path / "back")
    assert code == 0 and "bit-exact" in out


def test_dry_run_writes_nothing(src_a, tmp_path):
    code, out, _ = run_cli("linen-to-nnx", src_a, tmp_path / "nnx", "--dry-run", "--json")
    assert code == 0
    doc = json.loads(out)
    assert any(leaf["from"].startswith("moveaxis(") for leaf in doc["leaves"])
    assert not (tmp_path / "nnx").exists()


def test_compare_exits_1_when_different(src_a, tmp_path):
    run_cli("linen-to-nnx", src_a, tmp_path / "nnx")
    run_cli("linen-to-nnx", src_a, tmp_path / "bf16", "--dtype", "bfloat16")
    code, out, _ = run_cli("compare", tmp_path / "nnx", tmp_path / "bf16")
    assert code == 1 and "DIFFERENT" in out


def test_missing_source(tmp_path):
    code, _, err = run_cli("linen-to-nnx", tmp_path / "missing", tmp_path / "out")
    assert_one_line_error(code, err, "missing")


def test_garbage_metadata(src_a, tmp_path):
    (src_a / "_METADATA").write_text("{not json")
    code, _, err = run_cli("linen-to-nnx", src_a, tmp_path / "out")
    assert_one_line_error(code, err, "_METADATA")


def test_truncated_chunk(src_a, tmp_path):
    for f in (src_a / "ocdbt.process_0" / "d").iterdir():
        f.write_bytes(f.read_bytes()[:10])
    code, _, err = run_cli("linen-to-nnx", src_a, tmp_path / "out")
    assert_one_line_error(code, err)
    assert not (tmp_path / "out").exists()


def test_unknown_layout(tmp_path):
    import numpy as np
    import orbax.checkpoint as ocp

    ckptr = ocp.StandardCheckpointer()
    ckptr.save(tmp_path / "odd", {"weird": {"x": np.zeros(3, np.float32), "y": None}})
    ckptr.wait_until_finished()
    code, _, err = run_cli("linen-to-nnx", tmp_path / "odd", tmp_path / "out")
    assert_one_line_error(code, err, "unknown layout", "weird")


def test_existing_destination_and_inside_source(src_a, tmp_path):
    (tmp_path / "out").mkdir()
    code, _, err = run_cli("linen-to-nnx", src_a, tmp_path / "out")
    assert_one_line_error(code, err, "out", "--force")
    code, _, err = run_cli("linen-to-nnx", src_a, src_a / "nested", "--force")
    assert_one_line_error(code, err, "inside")


def test_target_mismatch(src_a, tmp_path, monkeypatch):
    (tmp_path / "tgt.py").write_text(
        "import jax\n"
        "def model():\n"
        "    return {'token_embedder': {'embedding': jax.ShapeDtypeStruct((256, 32), 'float32')}}\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    code, _, err = run_cli(
        "linen-to-nnx", src_a, tmp_path / "out", "--params-only", "--target", "tgt:model"
    )
    assert_one_line_error(
        code, err, "token_embedder/embedding/value: mismatch", "expected float32[256, 32]"
    )
    assert not (tmp_path / "out").exists()
    sys.modules.pop("tgt", None)


def test_bad_rename(src_a, tmp_path):
    code, _, err = run_cli("linen-to-nnx", src_a, tmp_path / "out", "--rename", "nope")
    assert_one_line_error(code, err, "REGEX=REPLACEMENT")


def test_annotate_json_and_errors(maxtext_fixtures, tmp_path):
    cfg = maxtext_fixtures / "A" / "config.json"
    code, out, _ = run_cli("annotate", "--model-config", cfg, "--mesh", "fsdp=4,tensor=2", "--json")
    assert code == 0
    rows = {r["path"]: r for r in json.loads(out)["rows"]}
    q = rows["decoder/layers/self_attention/query/kernel"]
    assert q["logical_names"] == ["layers", "embed", "q_heads", "kv"]
    assert q["spec"] == [None, "fsdp", "tensor", None]
    assert q["shard_shape"] == [2, 16, 2, 16]
    code, out, _ = run_cli(
        "annotate", "--model-config", cfg, "--mesh", "data=2,tensor=4", "--mode", "ar", "--json"
    )
    assert code == 2
    code, _, err = run_cli("annotate", "--model-config", cfg, "--mesh", "data=2,tensor=4")
    assert_one_line_error(code, err, "self_attention/key/kernel", "size 2", "tensor")
    code, out, _ = run_cli(
        "annotate",
        "--model-config",
        cfg,
        "--mesh",
        "data=2,tensor=4",
        "--replicate-indivisible",
        "--json",
    )
    assert code == 0 and json.loads(out)["fallbacks"]
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps([["embed", "fsdpp"], ["mlp", "tensor"]]))
    code, _, err = run_cli(
        "annotate", "--model-config", cfg, "--mesh", "fsdp=4,tensor=2", "--rules", rules
    )
    assert_one_line_error(code, err, "fsdpp")
