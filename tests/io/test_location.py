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


@pytest.mark.parametrize("url", ["ftp://x/y", "hdfs://nn/path"])
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


@pytest.mark.parametrize("scheme, driver", [("s3", "s3"), ("gs", "gcs")])
def test_object_store_urls_parse_to_bucket_and_prefix(scheme, driver, monkeypatch):
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    loc = Location.parse(f"{scheme}://bucket-a//run/./ckpt/")
    assert loc.scheme == scheme and loc.path == "bucket-a/run/ckpt"
    assert str(loc) == f"{scheme}://bucket-a/run/ckpt"
    assert loc.kvstore_spec() == {"driver": driver, "bucket": "bucket-a", "path": "run/ckpt/"}
    assert loc.join("2", "items").parent == loc.join("2")
    assert Location.parse(f"{scheme}://bucket-a").kvstore_spec()["path"] == ""
    assert Location.parse(f"{scheme}://bucket-a").parent == Location.parse(f"{scheme}://bucket-a")
    assert loc.local_path is None and not loc.has_atomic_rename
    # TensorStore accepts the spec with this module's context (no request is made to open it).
    ts.KvStore.open(loc.kvstore_spec(), context=loc.ts_context()).result()


def test_s3_endpoint_and_region_come_from_the_environment_or_configure_s3(monkeypatch):
    from ckptconv.io import configure_s3

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    loc = Location.parse("s3://bucket-a/ckpt")
    spec = loc.kvstore_spec()
    assert spec["endpoint"] == "http://127.0.0.1:9" and spec["aws_region"] == "eu-west-3"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:10")
    assert loc.kvstore_spec()["endpoint"] == "http://127.0.0.1:10"
    try:
        configure_s3(endpoint="http://127.0.0.1:11", region="us-west-2")
        spec = loc.kvstore_spec()
        assert spec["endpoint"] == "http://127.0.0.1:11" and spec["aws_region"] == "us-west-2"
    finally:
        configure_s3()
    assert loc.kvstore_spec()["endpoint"] == "http://127.0.0.1:10"
    with pytest.raises(CheckpointFormatError, match="http"):
        configure_s3(endpoint="127.0.0.1:9000")


@pytest.mark.parametrize("url", ["s3://", "gs:///prefix", "s3://."])
def test_object_store_url_without_bucket_is_refused(url):
    with pytest.raises(CheckpointFormatError, match="no bucket"):
        Location.parse(url)


def test_is_within_and_atomic_rename(tmp_path):
    a = Location.parse("s3://b/run/ckpt")
    assert a.join("x").is_within(a) and a.is_within(a)
    assert not Location.parse("s3://b/run/ckpt2").is_within(a)
    assert not Location.parse("gs://b/run/ckpt/x").is_within(a)
    assert Location.parse(tmp_path).has_atomic_rename
    assert not Location.parse("memory://x").has_atomic_rename
    assert Location.parse("memory://x").parent == Location.parse("memory://")


def test_memory_write_and_delete_tree():
    loc = Location.parse("memory://tests/location/delete")
    loc.join("a/b").write_bytes(b"1")
    loc.join("c").write_bytes(b"2")
    Location.parse("memory://tests/location/delete2/k").write_bytes(b"3")
    assert loc.list_dir() == ["a", "c"]
    loc.join("a").delete_tree()
    assert loc.list_dir() == ["c"]
    loc.delete_tree()
    assert not loc.exists()
    assert Location.parse("memory://tests/location/delete2/k").read_bytes() == b"3"


def test_file_write_and_delete_tree(tmp_path):
    loc = Location.parse(tmp_path / "d")
    loc.join("sub", "f").write_bytes(b"x")
    assert (tmp_path / "d" / "sub" / "f").read_bytes() == b"x"
    loc.join("sub", "f").delete_tree()
    assert not (tmp_path / "d" / "sub" / "f").exists()
    loc.delete_tree()
    assert not (tmp_path / "d").exists()
    loc.delete_tree()  # nothing there: not an error


def test_memory_folder_is_its_key_prefix_only():
    loc = Location.parse("memory://tests/location/prefix")
    for name in ("a/x", "a/y/z", "a0", "a.b", "ab/c"):
        loc.join(name).write_bytes(b"1")
    assert loc.join("a").list_dir() == ["x", "y"]
    assert loc.list_dir() == ["a", "a.b", "a0", "ab"]
    loc.join("a").delete_tree()
    assert not loc.join("a").exists() and not loc.join("a").is_dir()
    assert loc.list_dir() == ["a.b", "a0", "ab"]
    loc.delete_tree()
    assert not loc.exists()
