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


def test_demo_summary_table():
    from ckptconv.demo import DemoResult

    out = DemoResult(
        linen_bytes=1000,
        nnx_bytes=900,
        seconds={"train": 1.23456, "orbax_save": 0.5, "linen_to_nnx": 0.012},
        bytes={"orbax_save": 1000, "linen_to_nnx": 123456},
        max_logit_diff=0.0,
        round_trip_bit_exact=True,
        peak_rss_mb=321.5,
    )
    lines = out.table().splitlines()
    assert lines[0].split() == ["step", "seconds", "bytes"]
    assert lines[1].split() == ["train", "1.235", "-"]
    assert lines[3].split() == ["linen_to_nnx", "0.012", "123456"]
    assert lines[-1] == "peak RSS: 321.5 MB"
    # aligned: the seconds and bytes columns end at the same offsets on every row
    ends = {(len(line.rstrip())) for line in lines[:-1]}
    assert len(ends) == 1, lines
    assert "{" not in out.table()


def test_demo_text_output_is_a_table(tmp_path):
    result = CliRunner().invoke(main, ["demo", "--workdir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "{" not in result.stdout
    lines = result.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split() == ["step", "seconds", "bytes"])
    rows = lines[header + 1 : -1]
    assert [r.split()[0] for r in rows] == [
        "train",
        "orbax_save",
        "linen_to_nnx",
        "nnx_restore",
        "nnx_to_linen",
    ]
    assert lines[-1].startswith("peak RSS: ") and lines[-1].endswith(" MB")
