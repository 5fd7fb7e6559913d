import json

import pytest
from click.testing import CliRunner

from ckptconv.cli import main
from ckptconv.io import CheckpointReader, CheckpointWriter

PERTURBED = ("model", "decoder", "decoder_norm", "scale", "value")


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def _perturbed_copy(src, dst, path, delta):
    """A copy of ``src`` with element 0 of one leaf changed by ``delta``."""
    reader = CheckpointReader(src)
    with CheckpointWriter(
        dst, use_zarr3=reader.use_zarr3, custom_metadata=reader.custom_metadata
    ) as writer:
        for p, leaf in reader.leaves().items():
            if leaf.empty:
                writer.write_empty(p, key_types=reader.key_types(p))
                continue
            value = reader.read(p)
            if p == path:
                value = value.copy()
                value.flat[0] += delta
            ext = reader.ext_metadata(p) or {}
            writer.write(
                p,
                value,
                key_types=reader.key_types(p),
                random_key_impl=ext.get("random_key_impl"),
            )


@pytest.fixture(scope="module")
def perturbed(nnx_ckpts, tmp_path_factory):
    dst = tmp_path_factory.mktemp("perturbed") / "A"
    _perturbed_copy(nnx_ckpts["A"], dst, PERTURBED, 0.25)
    return dst


def test_verify_agrees_on_a_faithful_conversion(maxtext_fixtures, nnx_ckpts):
    code, out, err = run(
        "verify",
        maxtext_fixtures / "A" / "ckpt",
        nnx_ckpts["A"],
        "--model-config",
        maxtext_fixtures / "A" / "config.json",
        "--json",
    )
    assert code == 0, err
    doc = json.loads(out)
    assert doc["ok"] and doc["tokens_agree"] and doc["steps_agreeing"] == 8
    assert len(doc["max_abs_diff"]) == 8 and doc["worst_abs_diff"] <= 1e-5


def test_verify_fails_when_one_weight_is_perturbed(maxtext_fixtures, perturbed):
    code, out, err = run(
        "verify",
        maxtext_fixtures / "A" / "ckpt",
        perturbed,
        "--model-config",
        maxtext_fixtures / "A" / "config.json",
        "--prompt-ids",
        "5,17,99,3",
        "--max-new-tokens",
        "4",
    )
    assert code == 1, err
    lines = out.strip().splitlines()
    assert len(lines) == 5 and lines[-1].startswith("DIFFERENT")
    assert lines[0].startswith("step 0: ")


def test_verify_argument_errors(maxtext_fixtures, nnx_ckpts):
    config = maxtext_fixtures / "A" / "config.json"
    linen = maxtext_fixtures / "A" / "ckpt"
    for a, b, needle in [
        (linen, linen, "is not an NNX checkpoint"),
        (nnx_ckpts["A"], nnx_ckpts["A"], "needs a Linen one"),
    ]:
        code, _, err = run("verify", a, b, "--model-config", config)
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
