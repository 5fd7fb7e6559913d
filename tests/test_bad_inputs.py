"""Bad inputs and faults through the CLI: exit 2, one line, no traceback, nothing lost.

Each case builds its input in a fresh folder (a copy of fixture A, damaged as the case says),
runs one command, and checks the contract every command keeps for user errors:

- exit code 2 and exactly one line on stderr, starting ``ckptconv: error:``, no traceback;
- the line names what the case expects it to name (a path, an option, a leaf);
- the source is unchanged (hash of every file before and after);
- nothing that looks like a complete checkpoint appears at the destination or beside it
  (an existing destination is left exactly as it was).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
from collections.abc import Callable

import pytest
from click.testing import CliRunner

from ckptconv.cli import main


def tree_hash(path: pathlib.Path) -> str | None:
    """A hash of every file name and byte under ``path`` (``None`` if nothing is there)."""
    if not os.path.lexists(path):
        return None
    h = hashlib.sha256()
    if path.is_file():
        h.update(path.read_bytes())
        return h.hexdigest()
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            p = os.path.join(root, name)
            h.update(os.path.relpath(p, path).encode())
            with open(p, "rb") as f:
                h.update(f.read())
    return h.hexdigest()


def complete_checkpoints(folder: pathlib.Path) -> list[str]:
    """Folders under ``folder`` that hold a commit marker (look complete)."""
    if not folder.is_dir():
        return []
    return sorted(
        os.path.relpath(root, folder)
        for root, _, files in os.walk(folder)
        if "commit_success.txt" in files
    )


@dataclasses.dataclass
class Case:
    """What one bad-input case runs and what its error line must name."""

    argv: list[str]
    src: pathlib.Path | None  # hashed before and after
    dst: pathlib.Path | None  # must not look complete afterwards (or stay as it was)
    needles: tuple[str, ...] = ()


Builder = Callable[[pathlib.Path, pathlib.Path], Case]
CASES: dict[str, Builder] = {}


def case(name: str):
    def register(fn: Builder) -> Builder:
        CASES[name] = fn
        return fn

    return register


def convert(src, dst, *extra, needles=(), direction="linen-to-nnx") -> Case:
    return Case([direction, str(src), str(dst), *map(str, extra)], src, dst, tuple(needles))


def data_files(src: pathlib.Path) -> list[pathlib.Path]:
    """The data files, largest first (the small ones are old B-tree nodes nothing refers to)."""
    files = [p for p in (src / "ocdbt.process_0" / "d").iterdir() if p.is_file()]
    return sorted(files, key=lambda p: -p.stat().st_size)


# -- missing, truncated and corrupted sources -------------------------------------------------


@case("source-missing")
def _(tmp, a):
    return convert(tmp / "missing", tmp / "out", needles=[str(tmp / "missing")])


@case("source-empty-folder")
def _(tmp, a):
    (tmp / "empty").mkdir()
    return convert(tmp / "empty", tmp / "out", needles=["empty"])


@case("source-is-a-file")
def _(tmp, a):
    (tmp / "file").write_bytes(b"not a checkpoint")
    return convert(tmp / "file", tmp / "out", needles=["file"])


@case("metadata-truncated")
def _(tmp, a):
    meta = a / "_METADATA"
    meta.write_bytes(meta.read_bytes()[:100])
    return convert(a, tmp / "out", needles=["_METADATA"])


@case("metadata-garbled")
def _(tmp, a):
    (a / "_METADATA").write_bytes(b"\x00\xff garbage")
    return convert(a, tmp / "out", needles=["_METADATA"])


@case("metadata-wrong-json-shape")
def _(tmp, a):
    (a / "_METADATA").write_text(json.dumps({"tree_metadata": [1, 2, 3]}))
    return convert(a, tmp / "out", needles=["_METADATA"])


@case("metadata-missing")
def _(tmp, a):
    (a / "_METADATA").unlink()
    return convert(a, tmp / "out", needles=[str(a)])


@case("manifest-missing")
def _(tmp, a):
    (a / "manifest.ocdbt").unlink()
    return convert(a, tmp / "out", needles=["manifest.ocdbt"])


@case("manifest-truncated")
def _(tmp, a):
    m = a / "manifest.ocdbt"
    m.write_bytes(m.read_bytes()[:20])
    return convert(a, tmp / "out", needles=[str(a)])


@case("data-file-missing")
def _(tmp, a):
    data_files(a)[0].unlink()
    return convert(a, tmp / "out", needles=["missing"])


@case("data-file-truncated")
def _(tmp, a):
    f = data_files(a)[0]
    f.write_bytes(f.read_bytes()[:10])
    return convert(a, tmp / "out", needles=[str(a)])


@case("data-files-truncated-decoding")
def _(tmp, a):
    for f in data_files(a):
        f.write_bytes(f.read_bytes()[:10])
    return convert(a, tmp / "out", "--dtype", "bfloat16", needles=[str(a)])


@case("interrupted-write-as-source")
def _(tmp, a):
    (tmp / "crashed").mkdir()
    tmp_src = tmp / "crashed" / ".A.ckptconv-tmp-0123456789ab"
    shutil.copytree(a, tmp_src)
    (tmp_src / ".ckptconv-incomplete").write_bytes(b"x")
    return convert(tmp_src, tmp / "out", needles=["interrupted write"])


@case("inspect-truncated-metadata")
def _(tmp, a):
    meta = a / "_METADATA"
    meta.write_bytes(meta.read_bytes()[:50])
    return Case(["inspect", str(a)], a, None, ("_METADATA",))


@case("compare-missing-b")
def _(tmp, a):
    return Case(["compare", str(a), str(tmp / "nope")], a, None, ("nope",))


def flax_msgpack(tmp) -> pathlib.Path:
    """A Flax msgpack file (``flax.serialization.to_bytes``) of a small TrainState-like dict."""
    import numpy as np
    from flax import serialization

    tree = {"params": {"w": np.arange(64, dtype=np.float32).reshape(8, 8)}, "step": 3}
    path = tmp / "msgpack" / "checkpoint_3"
    path.parent.mkdir()
    path.write_bytes(serialization.to_bytes(tree))
    return path


@case("msgpack-truncated")
def _(tmp, a):
    f = flax_msgpack(tmp)
    f.write_bytes(f.read_bytes()[:-40])
    return convert(f, tmp / "out", needles=[str(f)])


@case("msgpack-array-overruns-file")
def _(tmp, a):
    f = flax_msgpack(tmp)
    data = bytearray(f.read_bytes())
    i = data.index(b"\xc5\x01\x00")  # the bin16 header of the array's 256 bytes
    data[i + 1 : i + 3] = b"\xff\xff"  # now declares 65535 bytes
    f.write_bytes(bytes(data))
    return convert(f, tmp / "out", needles=[str(f)])


@case("msgpack-unknown-extension")
def _(tmp, a):
    import msgpack

    f = tmp / "weird.msgpack"
    f.write_bytes(msgpack.packb({"params": {"w": msgpack.ExtType(42, b"xx")}}))
    return convert(f, tmp / "out", needles=[str(f), "42"])


@case("msgpack-index-names-missing-shard")
def _(tmp, a):
    from flax import serialization

    folder = tmp / "hf"
    folder.mkdir()
    (folder / "flax_model-00001-of-00002.msgpack").write_bytes(
        serialization.to_bytes({"a": {"kernel": __import__("numpy").ones(2, "float32")}})
    )
    (folder / "flax_model.msgpack.index.json").write_text(
        json.dumps(
            {
                "metadata": {"total_size": 16},
                "weight_map": {
                    "a/kernel": "flax_model-00001-of-00002.msgpack",
                    "b/kernel": "flax_model-00002-of-00002.msgpack",
                },
            }
        )
    )
    return convert(folder, tmp / "out", needles=["flax_model-00002-of-00002.msgpack"])


@case("folder-holding-two-formats")
def _(tmp, a):
    f = flax_msgpack(tmp)
    shutil.copytree(a, f.parent / "5")  # an Orbax step folder beside the msgpack step files
    return convert(f.parent, tmp / "out", needles=["msgpack", "orbax"])


# -- destinations ------------------------------------------------------------------------------


@case("destination-exists")
def _(tmp, a):
    (tmp / "out").mkdir()
    (tmp / "out" / "keep.txt").write_text("precious")
    return convert(a, tmp / "out", needles=["--force", "out"])


@case("destination-inside-source")
def _(tmp, a):
    return convert(a, a / "nested", "--force", needles=["inside"])


@case("destination-is-source")
def _(tmp, a):
    return convert(a, a, "--force", needles=["must not be the source"])


@case("destination-parent-is-a-file")
def _(tmp, a):
    (tmp / "afile").write_bytes(b"")
    return convert(a, tmp / "afile" / "out", needles=["afile", "found a file"])


@case("destination-on-a-full-disk")
def _(tmp, a):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs to fill needs root; this run is not root")
    mnt = tmp / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(mnt)], check=True)
    return convert(a, mnt / "out", needles=["no space left on device", str(mnt)])


# -- options -----------------------------------------------------------------------------------


# Options refused on fixture A (linen-to-nnx into tmp/out): the options, then the needles.
OPTION_CASES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "unknown-dtype": (("--dtype", "float7"), ("float7",)),
    "integer-dtype-cast": (("--dtype", "int8"), ("int8",)),
    "rename-without-equals": (("--rename", "nope"), ("REGEX=REPLACEMENT",)),
    "rename-invalid-regex": (("--rename", "(unclosed=x"), ("(unclosed", "regex")),
    "rename-collision": (("--rename", "^decoder/.*=decoder/same"), ("decoder/same",)),
    "rename-empty-component": (("--rename", "decoder_norm="), ("empty",)),
    "target-not-module-function": (("--target", "nocolon"), ("module:function",)),
    "target-not-importable": (("--target", "no_such_mod_xyz:f"), ("no_such_mod_xyz",)),
}


def option_case(options: tuple[str, ...], needles: tuple[str, ...]) -> Builder:
    """The case converting fixture A with ``options``, its error line naming ``needles``."""
    return lambda tmp, a: convert(a, tmp / "out", *options, needles=needles)


for _name, (_options, _needles) in OPTION_CASES.items():
    case(_name)(option_case(_options, _needles))


@case("linen-source-given-to-nnx-to-linen")
def _(tmp, a):
    return convert(a, tmp / "out", direction="nnx-to-linen", needles=["maxtext"])


@case("target-shape-mismatch")
def _(tmp, a):
    (tmp / "bad_target_mod.py").write_text(
        "import jax\n"
        "def model():\n"
        "    return {'token_embedder': {'embedding': jax.ShapeDtypeStruct((256, 32), 'float32')}}\n"
    )
    sys.path.insert(0, str(tmp))
    return convert(
        a,
        tmp / "out",
        "--params-only",
        "--target",
        "bad_target_mod:model",
        needles=["token_embedder/embedding/value", "expected float32[256, 32]"],
    )


@case("s3-endpoint-not-http")
def _(tmp, a):
    return Case(["--s3-endpoint", "ftp://host", "inspect", str(a)], a, None, ("ftp://host", "http"))


# -- sharding, models, engine ------------------------------------------------------------------


def annotate(tmp, a, *extra, needles=()) -> Case:
    cfg = pathlib.Path(__file__).parent / "fixtures" / "maxtext" / "A" / "config.json"
    return Case(["annotate", "--model-config", str(cfg), *map(str, extra)], None, None, needles)


@case("mesh-indivisible")
def _(tmp, a):
    return annotate(tmp, a, "--mesh", "data=2,tensor=4", needles=["tensor", "size 2"])


@case("mesh-unknown-axis-in-rules")
def _(tmp, a):
    rules = tmp / "rules.json"
    rules.write_text(json.dumps([["embed", "fsdpp"], ["mlp", "tensor"]]))
    return annotate(tmp, a, "--mesh", "fsdp=4,tensor=2", "--rules", rules, needles=["fsdpp"])


@case("mesh-too-many-devices")
def _(tmp, a):
    return Case(
        [
            "decode",
            str(a),
            "--model-config",
            str(pathlib.Path(__file__).parent / "fixtures" / "maxtext" / "A" / "config.json"),
            "--prompt-ids",
            "1,2",
            "--mesh",
            "data=4,tensor=4",
        ],
        a,
        None,
        ("data=4,tensor=4",),
    )


@case("mesh-spec-garbled")
def _(tmp, a):
    return annotate(tmp, a, "--mesh", "data:2", needles=["data:2"])


@case("rules-file-missing")
def _(tmp, a):
    return annotate(
        tmp, a, "--mesh", "fsdp=8", "--rules", tmp / "no_rules.json", needles=["no_rules"]
    )


@case("rules-file-garbled")
def _(tmp, a):
    rules = tmp / "rules.json"
    rules.write_text("[[embed, ")
    return annotate(tmp, a, "--mesh", "fsdp=8", "--rules", rules, needles=["rules.json"])


@case("rules-file-unreadable")
def _(tmp, a):
    rules = tmp / "rules_dir.json"
    rules.mkdir()  # a folder where a file is expected: unreadable whoever runs the test
    return annotate(tmp, a, "--mesh", "fsdp=8", "--rules", rules, needles=["rules_dir.json"])


@case("model-config-missing")
def _(tmp, a):
    return Case(
        ["annotate", "--model-config", str(tmp / "nocfg.json"), "--mesh", "fsdp=8"],
        None,
        None,
        ("nocfg.json",),
    )


@case("model-config-unknown-key")
def _(tmp, a):
    cfg = tmp / "cfg.json"
    cfg.write_text(json.dumps({"emb_dim": 32, "no_such_option": 3}))
    return Case(
        ["annotate", "--model-config", str(cfg), "--mesh", "fsdp=8"],
        None,
        None,
        ("no_such_option",),
    )


@case("prompt-ids-garbled")
def _(tmp, a):
    cfg = pathlib.Path(__file__).parent / "fixtures" / "maxtext" / "A" / "config.json"
    return Case(
        ["decode", str(a), "--model-config", str(cfg), "--prompt-ids", "1,x,3"], a, None, ("1,x,3",)
    )


@pytest.fixture
def src_a(maxtext_fixtures, tmp_path):
    src = tmp_path / "A"
    shutil.copytree(maxtext_fixtures / "A" / "ckpt", src)
    return src


def test_the_table_is_large_enough():
    assert len(CASES) >= 30


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input(name, src_a, tmp_path):
    built = CASES[name](tmp_path, src_a)
    src_before = tree_hash(built.src) if built.src is not None else None
    dst_before = tree_hash(built.dst) if built.dst is not None else None
    complete_before = complete_checkpoints(built.dst.parent) if built.dst is not None else []
    saved_path = list(sys.path)
    try:
        result = CliRunner().invoke(main, built.argv)
    finally:
        sys.path[:] = saved_path
        sys.modules.pop("bad_target_mod", None)
        if (tmp_path / "small").is_dir() and os.path.ismount(tmp_path / "small"):
            leftovers = os.listdir(tmp_path / "small")
            subprocess.run(["umount", str(tmp_path / "small")], check=True)
            assert leftovers == [], leftovers
    err = result.stderr
    assert result.exit_code == 2, (result.exit_code, err, result.stdout, result.exception)
    assert "Traceback" not in err and "Traceback" not in result.stdout
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("ckptconv: error: "), err
    for needle in built.needles:
        assert needle in lines[0], (needle, lines[0])
    if built.src is not None:
        assert tree_hash(built.src) == src_before, "the source changed"
    if built.dst is not None:
        assert tree_hash(built.dst) == dst_before, "the destination changed"
        assert complete_checkpoints(built.dst.parent) == complete_before
        parent = built.dst.parent
        siblings = (
            [n for n in os.listdir(parent) if ".ckptconv-tmp-" in n] if parent.is_dir() else []
        )
        assert siblings == [], siblings
