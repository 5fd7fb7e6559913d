import json

import numpy as np
import pytest

from ckptconv.engine import decode_checkpoint, parse_prompt_ids
from ckptconv.errors import EngineError
from ckptconv.testing import assert_one_line_error, run_cli


def test_fixture_b_greedy_matches_maxtext(fixture_config, reference, nnx_ckpts):
    ref = reference("B")
    prompt = ref["tokens"][0].tolist()
    result = decode_checkpoint(nnx_ckpts["B"], fixture_config("B"), prompt, max_new_tokens=8)
    assert result.generated_ids == ref["greedy"].tolist()
    assert result.logits.shape == (8, 128) and result.logits.dtype == np.float32
    np.testing.assert_allclose(result.logits[0], ref["logits"][0, -1], atol=1e-5, rtol=0)
    assert result.to_dict()["prompt_ids"] == prompt


def test_cli_decode_fixture_a_on_a_mesh(maxtext_fixtures, reference, nnx_ckpts, tmp_path):
    ref = reference("A")
    logits_out = tmp_path / "logits.npy"
    code, out, err = run_cli(
        "decode",
        nnx_ckpts["A"],
        "--model-config",
        maxtext_fixtures / "A" / "config.json",
        "--prompt-ids",
        ",".join(map(str, ref["tokens"][0])),
        "--max-new-tokens",
        8,
        "--mesh",
        "data=2,tensor=4",
        "--logits-out",
        logits_out,
        "--json",
    )
    assert code == 0, err
    doc = json.loads(out)
    assert doc["prompt_ids"] == ref["tokens"][0].tolist()
    assert doc["generated_ids"] == ref["greedy"].tolist()
    assert doc["mesh"] == {"data": 2, "tensor": 4} and doc["sampler"] == "greedy"
    # 2 KV heads on a 4-way tensor axis: replicated, reported, no warning on stderr
    assert "decoder/layers/self_attention/KVCache_0/cached_ar_key[3]" in doc["replicated"]
    assert err == ""
    logits = np.load(logits_out)
    assert logits.shape == (8, 256) and logits.dtype == np.float32
    np.testing.assert_allclose(logits[0], ref["logits"][0, -1], atol=1e-5, rtol=0)
    assert [int(t) for t in np.argmax(logits, axis=-1)] == doc["generated_ids"]


def test_cli_decode_linen_checkpoint_in_memory(maxtext_fixtures, reference):
    ref = reference("B")
    before = sorted(p.name for p in (maxtext_fixtures / "B").iterdir())
    code, out, err = run_cli(
        "decode",
        maxtext_fixtures / "B" / "ckpt",
        "--model-config",
        maxtext_fixtures / "B" / "config.json",
        "--prompt-ids",
        ",".join(map(str, ref["tokens"][0])),
        "--sampler",
        "topk:1",  # top-1 sampling is greedy whatever the seed
        "--seed",
        "7",
    )
    assert code == 0, err
    assert out.split() == [str(t) for t in ref["greedy"]]
    assert sorted(p.name for p in (maxtext_fixtures / "B").iterdir()) == before


@pytest.mark.parametrize(
    "extra, needles",
    [
        (["--prompt-ids", "1,x"], ["--prompt-ids '1,x'"]),
        (["--prompt-ids", ",".join(["1"] * 17)], ["17 tokens", "max_prefill_predict_length=16"]),
        (["--prompt-ids", "1,256"], ["token id 256", "[0, 256)"]),
        (["--prompt-ids", "1", "--mesh", "data=3,tensor=4"], ["needs 12 devices"]),
        (["--prompt-ids", "1", "--sampler", "beam"], ["malformed sampler 'beam'"]),
        (["--prompt-ids", "1", "--max-new-tokens", "0"], ["--max-new-tokens 0"]),
    ],
    ids=["ids", "too-long", "vocab", "mesh", "sampler", "budget"],
)
def test_cli_decode_errors(extra, needles, maxtext_fixtures, nnx_ckpts):
    code, _, err = run_cli(
        "decode", nnx_ckpts["A"], "--model-config", maxtext_fixtures / "A" / "config.json", *extra
    )
    assert_one_line_error(code, err, *needles)


def test_cli_decode_config_mismatch_names_the_path(maxtext_fixtures, nnx_ckpts):
    code, _, err = run_cli(
        "decode",
        nnx_ckpts["A"],
        "--model-config",
        maxtext_fixtures / "B" / "config.json",
        "--prompt-ids",
        "1,2",
    )
    assert_one_line_error(code, err, str(nnx_ckpts["A"]), "decoder/")


def test_parse_prompt_ids():
    assert parse_prompt_ids(" 1, 7 ,42") == [1, 7, 42]
    for bad in ("", "1,,2", "-1", "1.5"):
        with pytest.raises(EngineError, match="--prompt-ids"):
            parse_prompt_ids(bad)
