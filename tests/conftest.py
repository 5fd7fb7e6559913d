"""Test-wide setup: 8 simulated CPU devices, set once before JAX is imported."""

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
MAXTEXT_FIXTURES = FIXTURES / "maxtext"


@pytest.fixture(scope="session")
def maxtext_fixtures() -> pathlib.Path:
    """Folder of the real MaxText fixtures A and B copied into the repository."""
    return MAXTEXT_FIXTURES


def pytest_configure(config):  # noqa: D103
    if jax.device_count() != 8:
        raise RuntimeError(f"tests need 8 simulated CPU devices, JAX sees {jax.device_count()}")


@pytest.fixture(scope="session")
def make_config():
    """``make_config(**changes)``: a tiny float32 ModelConfig (fixture-B-like sizes)."""
    from ckptconv.models import ModelConfig
    from ckptconv.testing import TINY_CONFIG

    return lambda **changes: ModelConfig(**{**TINY_CONFIG, **changes})


@pytest.fixture(scope="session")
def random_linen_params():
    """``random_linen_params(config, seed=0)``: see :func:`ckptconv.testing.random_linen_params`."""
    from ckptconv.testing import random_linen_params

    return random_linen_params


# -- a local S3 server (moto) for the object-storage tests ---------------------------------------

import dataclasses  # noqa: E402
import json  # noqa: E402
import urllib.request  # noqa: E402
import uuid  # noqa: E402

from ckptconv.testing import start_s3_server, stop_process  # noqa: E402


@dataclasses.dataclass(frozen=True)
class S3Server:
    """A running moto S3 server: its endpoint, one bucket and one valid access key."""

    endpoint: str
    bucket: str
    key_id: str
    secret: str
    region: str = "us-east-1"


@pytest.fixture(scope="session")
def s3_server():
    """Starts ``moto.server`` on 127.0.0.1 (free port) with request signing checked.

    Moto accepts any credentials unless its IAM authentication is on: the fixture creates an
    IAM user with an access key while it is off, then turns it on, so wrong credentials are
    refused as real S3 refuses them. The server is stopped at the end of the session.
    """
    # A missing test dependency fails the suite rather than skipping the S3 tests.
    try:
        import boto3
        import moto.server  # noqa: F401
    except ImportError as e:
        pytest.fail(f"the S3 tests need moto[server] and boto3 (pip install -e '.[test]'): {e}")
    proc, endpoint = start_s3_server()
    try:
        region = "us-east-1"
        setup = {"endpoint_url": endpoint, "region_name": region}
        iam = boto3.client("iam", aws_access_key_id="x", aws_secret_access_key="x", **setup)
        iam.create_user(UserName="ckptconv")
        allow_all = {"Effect": "Allow", "Action": "*", "Resource": "*"}
        policy = {"Version": "2012-10-17", "Statement": [allow_all]}
        iam.put_user_policy(
            UserName="ckptconv", PolicyName="all", PolicyDocument=json.dumps(policy)
        )
        key = iam.create_access_key(UserName="ckptconv")["AccessKey"]
        request = urllib.request.Request(
            f"{endpoint}/moto-api/reset-auth",
            data=b"0",
            method="POST",
            headers={"Content-Type": "text/plain"},
        )
        urllib.request.urlopen(request, timeout=10).read()
        server = S3Server(endpoint, "ckptconv-tests", key["AccessKeyId"], key["SecretAccessKey"])
        s3 = boto3.client(
            "s3", aws_access_key_id=server.key_id, aws_secret_access_key=server.secret, **setup
        )
        s3.create_bucket(Bucket=server.bucket)
        yield server
    finally:
        stop_process(proc)


@pytest.fixture
def s3(s3_server, monkeypatch, request):
    """The S3 server with its credentials in the environment, and a fresh prefix URL.

    Yields ``(server, url)``: ``url`` is ``s3://<bucket>/<unique prefix>`` for this test.
    """
    from ckptconv.io import configure_s3

    for name in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret)
    monkeypatch.setenv("AWS_REGION", s3_server.region)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    configure_s3()
    prefix = f"{request.node.name.split('[')[0]}-{uuid.uuid4().hex[:8]}"
    yield s3_server, f"s3://{s3_server.bucket}/{prefix}"
    configure_s3()
