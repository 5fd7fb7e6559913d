"""Checkpoints on S3, against a real S3-compatible server (moto) on 127.0.0.1.

Conversions to, from and between S3 locations are bit-identical to the all-local ones; an
interrupted write leaves a prefix every command refuses; storage failures are one-line errors.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner

from ckptconv.cli import main
from ckptconv.convert import compare, convert
from ckptconv.errors import DestinationExistsError, IncompleteCheckpointError
from ckptconv.io import CheckpointReader, CheckpointWriter, Location
from ckptconv.testing import assert_one_line_error, assert_same_checkpoint


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr, result.exception


def assert_cli_error(result, *needles):
    code, _, err, exc = result
    assert isinstance(exc, SystemExit), exc  # no uncaught exception, so no traceback
    assert_one_line_error(code, err, *needles)


def test_round_trip_through_s3_is_bit_identical_to_local(s3, maxtext_fixtures, tmp_path):
    _, url = s3
    src = maxtext_fixtures / "A" / "ckpt"
    convert(src, tmp_path / "nnx")
    convert(tmp_path / "nnx", tmp_path / "linen", direction="nnx-to-linen")

    code, out, err, _ = run("linen-to-nnx", src, f"{url}/nnx", "--json")
    assert code == 0, err
    assert json.loads(out)["destination"] == f"{url}/nnx"
    code, _, err, _ = run("nnx-to-linen", f"{url}/nnx", f"{url}/linen")
    assert code == 0, err
    convert(f"{url}/linen", tmp_path / "nnx_again")
    convert(f"{url}/nnx", tmp_path / "linen_again", direction="nnx-to-linen")

    assert_same_checkpoint(tmp_path / "nnx", f"{url}/nnx")
    assert_same_checkpoint(tmp_path / "linen", f"{url}/linen")
    assert_same_checkpoint(src, f"{url}/linen")
    assert_same_checkpoint(tmp_path / "nnx", tmp_path / "nnx_again")
    assert_same_checkpoint(src, tmp_path / "linen_again")
    assert compare(src, f"{url}/nnx").bit_exact
    assert compare(f"{url}/linen", f"{url}/nnx").bit_exact
    assert CheckpointReader(f"{url}/nnx").custom_metadata == (
        CheckpointReader(tmp_path / "nnx").custom_metadata
    )

    for local, remote in ((tmp_path / "nnx", f"{url}/nnx"), (src, f"{url}/linen")):
        code_l, out_l, _, _ = run("inspect", local, "--json")
        code_r, out_r, err_r, _ = run("inspect", remote, "--json")
        assert code_l == code_r == 0, err_r
        doc_l, doc_r = json.loads(out_l), json.loads(out_r)
        assert doc_r["location"] == remote
        assert {k: v for k, v in doc_r.items() if k != "location"} == {
            k: v for k, v in doc_l.items() if k != "location"
        }
    code, out, _, _ = run("compare", src, f"{url}/nnx", "--json")
    assert code == 0 and json.loads(out)["bit_exact"]


def test_writer_and_reader_on_s3(s3):
    _, url = s3
    rows = np.arange(12 * 5, dtype=np.float32).reshape(12, 5)
    with CheckpointWriter(f"{url}/w", use_zarr3=False, chunk_bytes=64) as w:
        assert w.temporary_location is None  # written in place
        handle = w.create(("params", "w"), rows.shape, "float32")
        for i in range(0, 12, 4):
            handle.write((slice(i, i + 4),), rows[i : i + 4])
        w.write_empty(("opt_state",), value_type="Dict")
    loc = Location.parse(f"{url}/w")
    names = loc.list_dir()
    assert "commit_success.txt" in names and ".ckptconv-incomplete" not in names
    assert {"_METADATA", "_sharding", "_CHECKPOINT_METADATA", "manifest.ocdbt"} <= set(names)
    reader = CheckpointReader(loc)
    np.testing.assert_array_equal(reader.read(("params", "w")), rows)
    np.testing.assert_array_equal(reader.read(("params", "w"), (slice(3, 9),)), rows[3:9])


def test_existing_destination_needs_force_and_force_replaces_it(s3, maxtext_fixtures):
    _, url = s3
    src = maxtext_fixtures / "A" / "ckpt"
    dst = f"{url}/out"
    convert(src, dst)
    stray = Location.parse(dst).join("stray-object")
    stray.write_bytes(b"left over")
    with pytest.raises(DestinationExistsError, match="--force"):
        convert(src, dst)
    assert stray.exists()  # untouched without force
    convert(src, dst, force=True)
    assert not stray.exists()  # the old objects were deleted first
    assert compare(src, dst).bit_exact
    with pytest.raises(DestinationExistsError, match="hold the source"):
        convert(f"{url}/out", url, direction="nnx-to-linen", force=True)
    assert compare(src, dst).bit_exact


def test_missing_commit_marker_is_refused_on_s3(s3, maxtext_fixtures):
    _, url = s3
    convert(maxtext_fixtures / "A" / "ckpt", f"{url}/ckpt")
    Location.parse(f"{url}/ckpt/commit_success.txt").delete_tree()
    with pytest.raises(IncompleteCheckpointError, match="commit_success.txt") as info:
        CheckpointReader(f"{url}/ckpt")
    assert "\n" not in str(info.value)


KILL_SCRIPT = """
import sys, time
from ckptconv.convert import convert
def slow(done, total, path):
    print("leaf", flush=True)
    time.sleep(0.2)
convert(sys.argv[1], sys.argv[2], progress=slow)
"""


def test_killed_conversion_to_s3_is_refused_everywhere_and_force_rerun_succeeds(
    s3, maxtext_fixtures
):
    _, url = s3
    src = maxtext_fixtures / "A" / "ckpt"
    config = maxtext_fixtures / "A" / "config.json"
    dst = f"{url}/out"
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_SCRIPT, str(src), dst], stdout=subprocess.PIPE, text=True
    )
    for _ in range(5):
        assert proc.stdout.readline().startswith("leaf")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert Location.parse(dst).exists()  # a partial prefix is left
    assert not Location.parse(dst).join("commit_success.txt").exists()

    for args in (
        ("inspect", dst),
        ("compare", src, dst),
        ("compare", dst, src),
        ("linen-to-nnx", dst, f"{url}/other"),
        ("nnx-to-linen", dst, f"{url}/other"),
        ("decode", dst, "--model-config", config, "--prompt-ids", "1,2"),
        ("verify", src, dst, "--model-config", config, "--max-new-tokens", "1"),
    ):
        assert_cli_error(run(*args), dst, "interrupted")
    # The partial prefix is a destination that exists: only --force replaces it.
    assert_cli_error(run("linen-to-nnx", src, dst), "--force")
    start = time.monotonic()
    code, _, err, _ = run("linen-to-nnx", src, dst, "--force")
    assert code == 0, err
    assert time.monotonic() - start < 30
    assert compare(src, dst).bit_exact
    assert ".ckptconv-incomplete" not in Location.parse(dst).list_dir()


def test_decode_from_s3_matches_local(s3, maxtext_fixtures, tmp_path):
    _, url = s3
    src = maxtext_fixtures / "A" / "ckpt"
    config = maxtext_fixtures / "A" / "config.json"
    convert(src, tmp_path / "nnx")
    convert(src, f"{url}/nnx")
    # Sharded: each device reads its own slab of each parameter from S3.
    args = ("--model-config", config, "--prompt-ids", "1,2,3", "--max-new-tokens", "3")
    args += ("--mesh", "data=2,tensor=4", "--json", "--logits-out")
    code_l, out_l, err_l, _ = run("decode", tmp_path / "nnx", *args, tmp_path / "local.npy")
    code_r, out_r, err_r, _ = run("decode", f"{url}/nnx", *args, tmp_path / "s3.npy")
    assert code_l == 0 and code_r == 0, (err_l, err_r)
    assert json.loads(out_l)["generated_ids"] == json.loads(out_r)["generated_ids"]
    np.testing.assert_array_equal(np.load(tmp_path / "local.npy"), np.load(tmp_path / "s3.npy"))


# -- storage failures: one line, non-zero exit, within 30 seconds -----------------------------


def test_wrong_credentials_are_a_one_line_error(s3, maxtext_fixtures, monkeypatch):
    _, url = s3
    src = maxtext_fixtures / "A" / "ckpt"
    convert(src, f"{url}/ckpt")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    start = time.monotonic()
    assert_cli_error(run("inspect", f"{url}/ckpt"), "refused the credentials")
    assert_cli_error(run("linen-to-nnx", src, f"{url}/new"), "refused the credentials")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAUNKNOWNKEY000000")
    assert_cli_error(run("compare", src, f"{url}/ckpt"), "refused the credentials")
    assert time.monotonic() - start < 30


def test_missing_bucket_is_a_one_line_error(s3, maxtext_fixtures):
    src = maxtext_fixtures / "A" / "ckpt"
    start = time.monotonic()
    missing = "s3://no-such-bucket-here/ckpt"
    assert_cli_error(run("inspect", missing), "bucket 'no-such-bucket-here' does not exist")
    assert_cli_error(run("linen-to-nnx", src, missing), "does not exist")
    assert_cli_error(run("nnx-to-linen", missing, "out"), "does not exist")
    assert time.monotonic() - start < 30


def test_unreachable_endpoint_is_a_one_line_error_in_a_few_seconds(s3, maxtext_fixtures):
    _, url = s3
    with socket.socket() as sock:  # a port nothing listens on once closed
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    src = maxtext_fixtures / "A" / "ckpt"
    start = time.monotonic()
    result = run("--s3-endpoint", closed, "inspect", f"{url}/ckpt")
    assert_cli_error(result, "cannot reach", closed)
    assert time.monotonic() - start < 30
    # A real process, for exit code and stderr as a user sees them.
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "ckptconv.cli", "--s3-endpoint", closed, "linen-to-nnx", str(src)]
        + [f"{url}/out"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert time.monotonic() - start < 30
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot reach" in lines[0] and "Traceback" not in proc.stderr


def test_missing_moto_fails_the_s3_tests_instead_of_skipping_them(tmp_path):
    # A `moto` that cannot be imported, first on the path of a nested pytest run.
    hidden = tmp_path / "hidden" / "moto"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'moto'\", name='moto')\n"
    )
    path = os.pathsep.join(filter(None, [str(hidden.parent), os.environ.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
        + [f"{pathlib.Path(__file__).resolve()}::test_writer_and_reader_on_s3"],
        cwd=pathlib.Path(__file__).resolve().parents[2],
        env={**os.environ, "PYTHONPATH": path},
        capture_output=True,
        text=True,
        timeout=300,
    )
    summary = proc.stdout.strip().splitlines()[-1]
    assert proc.returncode == pytest.ExitCode.TESTS_FAILED, proc.stdout[-3000:]
    assert "1 error" in summary and "skipped" not in summary, proc.stdout[-3000:]
    assert "pip install -e '.[test]'" in proc.stdout, proc.stdout[-3000:]
