import os
import pathlib

import pytest
import tensorstore as ts

from ckptconv.errors import CheckpointFormatError
from ckptconv.io import Location


def test_plain_relative_path_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    loc = Location.parse("ckpt/items")
    assert loc.scheme == "file"
    assert loc.path == str(tmp_path / "ckpt" / "items")
    assert str(loc) == str(tmp_path / "ckpt" / "items")
    assert loc.local_path == tmp_path / "ckpt" / "items"


def test_file_url_and_pathlike_parse_to_the_same_location(tmp_path):
    plain = Location.parse(tmp_path / "a")
    assert Location.parse(f"file://{tmp_path}/a") == plain
    assert Location.parse(f"file://localhost{tmp_path}/a/") == plain
    assert Location.parse(str(tmp_path / "a")) == plain
    assert Location.parse(plain) is plain
    assert hash(Location.parse(f"file://{tmp_path}/a")) == hash(plain)


def test_file_url_is_percent_decoded():
    assert Location.parse("file:///tmp/with%20space").path == "/tmp/with space"


def test_file_url_with_a_remote_host_is_refused():
    with pytest.raises(CheckpointFormatError, match="otherhost"):
        Location.parse("file://otherhost/data")


@pytest.mark.parametrize("url", ["s3://bucket/prefix", "gs://bucket/prefix", "ftp://x/y"])
def test_unsupported_schemes_are_refused_with_the_scheme_named(url):
    with pytest.raises(CheckpointFormatError) as info:
        Location.parse(url)
    message = str(info.value)
    assert url.split("://")[0] + "://" in message
    assert "\n" not in message


def test_kvstore_spec_of_a_file_location_is_a_folder(tmp_path):
    spec = Location.parse(tmp_path / "ckpt").kvstore_spec()
    assert spec == {"driver": "file", "path": f"{tmp_path}/ckpt/"}
    # TensorStore accepts it as is.
    ts.KvStore.open(spec).result()


def test_join_name_parent(tmp_path):
    loc = Location.parse(tmp_path)
    joined = loc.join("2", "items/_METADATA")
    assert joined.path == f"{tmp_path}/2/items/_METADATA"
    assert joined.name == "_METADATA"
    assert joined.parent.parent == loc.join("2")
    assert loc.join("a", "..", "b") == loc.join("b")


def test_exists_read_and_list_on_local_files(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f.txt").write_bytes(b"hello")
    (tmp_path / "d" / "sub").mkdir()
    loc = Location.parse(tmp_path / "d")
    assert loc.exists() and loc.is_dir()
    assert loc.join("f.txt").exists() and not loc.join("f.txt").is_dir()
    assert not loc.join("missing").exists()
    assert loc.join("f.txt").read_bytes() == b"hello"
    assert loc.list_dir() == ["f.txt", "sub"]
    with pytest.raises(FileNotFoundError):
        loc.join("missing").read_bytes()


def test_memory_location_spec_and_shared_store():
    loc = Location.parse("memory://tests/location/ckpt")
    assert loc.scheme == "memory"
    assert str(loc) == "memory://tests/location/ckpt"
    assert loc.kvstore_spec() == {"driver": "memory", "path": "tests/location/ckpt/"}
    assert not loc.exists()
    kv = ts.KvStore.open(loc.kvstore_spec(), context=loc.ts_context()).result()
    kv.write("_METADATA", b"{}").result()
    kv.write("d/file", b"x").result()
    assert loc.exists() and loc.is_dir()
    assert loc.join("_METADATA").exists()
    assert loc.join("_METADATA").read_bytes() == b"{}"
    assert loc.list_dir() == ["_METADATA", "d"]
    assert Location.parse("memory://tests/location").list_dir() == ["ckpt"]
    with pytest.raises(FileNotFoundError):
        loc.join("nope").read_bytes()


def test_file_context_is_fresh_per_call(tmp_path):
    loc = Location.parse(tmp_path)
    assert loc.ts_context() is not loc.ts_context()


def test_parse_accepts_os_pathlike(tmp_path):
    class P(os.PathLike):
        def __fspath__(self):
            return str(tmp_path)

    assert Location.parse(P()) == Location.parse(pathlib.Path(tmp_path))
