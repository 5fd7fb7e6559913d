"""`ckptconv demo`, the README's main-job command, runs end to end and checks what it claims."""

from __future__ import annotations

import json

from click.testing import CliRunner

from ckptconv.cli import main


def test_demo_json(tmp_path):
    result = CliRunner().invoke(main, ["demo", "--workdir", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["max_logit_diff"] == 0.0
    assert doc["round_trip_bit_exact"] is True
    assert doc["nnx_bytes"] > 0 and doc["linen_bytes"] > 0
    assert {"train", "linen_to_nnx", "nnx_restore", "nnx_to_linen"} <= set(doc["seconds"])
    assert (tmp_path / "nnx" / "commit_success.txt").exists()
