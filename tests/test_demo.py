"""`ckptconv demo`, the README's main-job command, runs end to end and checks what it claims.

The demo trains and converts, so it runs once per module (the ``demo`` fixture); the CLI's
wiring of its two outputs is checked against a stand-in result.
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

import ckptconv.demo
from ckptconv.cli import main
from ckptconv.demo import DemoResult, run_demo

STEPS = ["train", "orbax_save", "linen_to_nnx", "nnx_restore", "nnx_to_linen"]
JSON_KEYS = {
    "linen_bytes",
    "nnx_bytes",
    "seconds",
    "max_logit_diff",
    "round_trip_bit_exact",
    "peak_rss_mb",
}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """One real run: ``(workdir, result, the lines it said)``."""
    workdir = tmp_path_factory.mktemp("demo")
    lines: list[str] = []
    result = run_demo(workdir, say=lines.append)
    return workdir, result, "\n".join(lines).splitlines()


def test_demo_checks_what_it_claims(demo):
    workdir, result, _ = demo
    doc = json.loads(json.dumps(result.to_dict()))
    assert set(doc) == JSON_KEYS
    assert doc["max_logit_diff"] == 0.0
    assert doc["round_trip_bit_exact"] is True
    assert doc["nnx_bytes"] > 0 and doc["linen_bytes"] > 0
    assert list(doc["seconds"]) == STEPS
    assert (workdir / "nnx" / "commit_success.txt").exists()


def test_demo_text_output_is_a_table(demo):
    _, result, lines = demo
    assert not any("{" in line for line in lines), lines
    header = next(i for i, line in enumerate(lines) if line.split() == ["step", "seconds", "bytes"])
    table = lines[header:]
    assert [r.split()[0] for r in table[1:-1]] == STEPS
    assert table[-1] == f"peak RSS: {result.peak_rss_mb} MB"
    by_step = {r.split()[0]: r.split()[1:] for r in table[1:-1]}
    assert by_step["train"][1] == "-"
    assert by_step["linen_to_nnx"][1] == str(result.step_bytes["linen_to_nnx"])
    assert by_step["orbax_save"][1] == str(result.linen_bytes)
    assert len({len(r) for r in table[:-1]}) == 1, table  # right-aligned columns: equal widths


def test_demo_summary_table():
    out = DemoResult(
        linen_bytes=1000,
        nnx_bytes=900,
        seconds={"train": 1.23456, "orbax_save": 0.5, "linen_to_nnx": 0.012},
        step_bytes={"orbax_save": 1000, "linen_to_nnx": 123456},
        max_logit_diff=0.0,
        round_trip_bit_exact=True,
        peak_rss_mb=321.5,
    )
    assert out.table().splitlines() == [
        "step          seconds   bytes",
        "train           1.235       -",
        "orbax_save      0.500    1000",
        "linen_to_nnx    0.012  123456",
        "peak RSS: 321.5 MB",
    ]
    assert set(out.to_dict()) == JSON_KEYS


@pytest.mark.parametrize("as_json", [False, True])
def test_demo_cli_prints_the_table_or_the_dict(monkeypatch, tmp_path, as_json):
    stand_in = DemoResult(
        linen_bytes=1000,
        nnx_bytes=900,
        seconds={"train": 1.5, "linen_to_nnx": 0.25},
        step_bytes={"linen_to_nnx": 4096},
        max_logit_diff=0.0,
        round_trip_bit_exact=True,
        peak_rss_mb=12.5,
    )

    def fake_run_demo(workdir, *, steps=3, say=print):
        assert workdir == str(tmp_path)
        say("progress line")
        say(stand_in.table())
        return stand_in

    monkeypatch.setattr(ckptconv.demo, "run_demo", fake_run_demo)
    args = ["demo", "--workdir", str(tmp_path)] + (["--json"] if as_json else [])
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    if as_json:
        assert json.loads(result.stdout) == stand_in.to_dict()
    else:
        assert result.stdout == f"progress line\n{stand_in.table()}\n"
        assert "{" not in result.stdout
