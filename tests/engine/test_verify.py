"""``ckptconv verify``: a weights check and a decode check, in float32 and bfloat16 (finding 6)."""

import json

import numpy as np
import orbax.checkpoint as ocp
import pytest

from ckptconv.convert import convert
from ckptconv.engine.verify import compare_decode, compare_weights, decode_atol, weights_atol
from ckptconv.testing import edited_copy, run_cli

LAYERS = ("model", "decoder", "layers")
WI_0 = (*LAYERS, "mlp", "wi_0", "kernel", "value")


def _one_row_times_1_01(path, value):
    """Row 0 of layer 0's ``wi_0`` kernel times 1.01 (about one bfloat16 ulp)."""
    if path != WI_0:
        return value
    value = value.copy()
    value[0, 0, :] *= np.float32(1.01)
    return value


def _layers_0_and_1_swapped(path, value):
    """Every float param of the stacked layers with layers 0 and 1 exchanged (NNX axis 0)."""
    if path[:3] != LAYERS or value.dtype.kind != "f":
        return value
    return value[[1, 0, *range(2, value.shape[0])]]


def _variants(root, nnx_ckpt):
    """The faithful conversion and its two broken copies, by name."""
    out = {"faithful": nnx_ckpt}
    for name, edit in (("row", _one_row_times_1_01), ("swapped", _layers_0_and_1_swapped)):
        edited_copy(nnx_ckpt, root / name, edit)
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def fixture_a(maxtext_fixtures, nnx_ckpts, tmp_path_factory):
    """Fixture A (float32): (Linen checkpoint, model config, NNX checkpoints by variant)."""
    root = tmp_path_factory.mktemp("verify_a")
    a = maxtext_fixtures / "A"
    return a / "ckpt", a / "config.json", _variants(root, nnx_ckpts["A"])


@pytest.fixture(scope="module")
def bf16(make_config, random_linen_params, tmp_path_factory):
    """A tiny bfloat16-activation model with float32 weights (MaxText's bf16 config), saved as
    a MaxText Linen checkpoint and converted with ``ckptconv.convert``."""
    root = tmp_path_factory.mktemp("verify_bf16")
    config = make_config(dtype="bfloat16", weight_dtype="float32", scan_layers=True)
    params = random_linen_params(config, seed=0)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(root / "linen", {"params": {"params": params}, "step": np.int32(0)})
    ckptr.wait_until_finished()
    (root / "config.json").write_text(json.dumps(config.to_dict()))
    convert(root / "linen", root / "nnx")
    return root / "linen", root / "config.json", _variants(root, root / "nnx")


def _verify_json(linen, config, nnx, *extra):
    code, out, err = run_cli("verify", linen, nnx, "--model-config", config, "--json", *extra)
    assert code in (0, 1), err
    doc = json.loads(out)
    assert code == (0 if doc["ok"] else 1)
    return doc


@pytest.mark.parametrize("model", ["fixture_a", "bf16"])
def test_verify_passes_and_fails_as_in_finding_6(model, request):
    linen, config, nnx = request.getfixturevalue(model)
    dtype = "float32" if model == "fixture_a" else "bfloat16"

    doc = _verify_json(linen, config, nnx["faithful"])
    assert doc["ok"] and doc["dtype"] == dtype
    weights, dec = doc["weights"], doc["decode"]
    # The twins are bit-identical on the same weights, in either dtype.
    assert weights["ok"] and weights["worst_abs_diff"] == 0.0
    assert weights["atol"] == pytest.approx(weights_atol(weights["logit_scale"]))
    assert dec["ok"] and dec["tokens_agree"] and dec["ties"] == []
    assert dec["atol"] == pytest.approx(decode_atol(dtype, dec["logit_scale"]))
    assert dec["atol_rule"] == f"32 {dtype} eps x logit_scale"
    assert 0 < dec["worst_abs_diff"] <= dec["atol"] and len(dec["kl_divergence"]) == 8
    if dtype == "bfloat16":
        # The cached decode rounds differently from the full forward: far above the old
        # single atol of 1e-4 (the false alarm of finding 6), and as large as what a 1.01
        # change of one row does, which only the exact weights check can see.
        assert dec["worst_abs_diff"] > 1e-2

    for broken in ("row", "swapped"):
        doc = _verify_json(linen, config, nnx[broken], "--max-new-tokens", "4")
        assert not doc["ok"] and not doc["weights"]["ok"], broken
        assert doc["weights"]["worst_abs_diff"] > 100 * doc["weights"]["atol"]
        # The engine and the NNX full forward read the same broken weights: they agree.
        assert doc["decode"]["ok"], broken


def test_verify_text_output_prints_both_checks_and_tolerances(fixture_a):
    linen, config, nnx = fixture_a
    args = ("--model-config", config, "--prompt-ids", "5,17,99,3", "--max-new-tokens", "4")
    code, out, err = run_cli("verify", linen, nnx["row"], *args)
    assert code == 1, err
    lines = out.strip().splitlines()
    assert len(lines) == 7 and all(lines[i].startswith(f"step {i}: ") for i in range(4))
    assert lines[4].startswith("weights: FAILED") and "atol=" in lines[4]
    assert "4 float32 eps x logit scale" in lines[4]
    assert lines[5].startswith("decode: ok") and "32 float32 eps x logit scale" in lines[5]
    assert lines[6] == "DIFFERENT: weights FAILED, decode ok (float32)"


def test_atol_overrides_the_decode_tolerance(bf16):
    linen, config, nnx = bf16
    doc = _verify_json(linen, config, nnx["faithful"], "--max-new-tokens", "3", "--atol", "1e-4")
    assert not doc["ok"] and doc["weights"]["ok"] and not doc["decode"]["ok"]
    assert doc["decode"]["atol"] == 1e-4 and doc["decode"]["atol_rule"] == "--atol"
    code, _, err = run_cli(
        "verify", linen, nnx["faithful"], "--model-config", config, "--atol", "-1"
    )
    assert code == 2 and "--atol" in err


def test_no_false_alarm_on_fixture_b(maxtext_fixtures, nnx_ckpts):
    b = maxtext_fixtures / "B"
    args = ("--model-config", b / "config.json", "--max-new-tokens", "4")
    code, out, err = run_cli("verify", b / "ckpt", nnx_ckpts["B"], *args)
    assert code == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 7 and lines[-1] == "agree: weights ok, decode ok (float32)"
    assert lines[4].startswith("weights: ok") and "max|diff|=0 <= atol=" in lines[4]
    assert lines[5].startswith("decode: ok") and "tokens 4/4 agree (0 near ties)" in lines[5]


def test_compare_weights_is_exact_up_to_float32_noise():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((3, 16)).astype(np.float32) * 4
    scale = float(np.abs(logits).max())
    assert compare_weights(logits, logits.copy()).ok
    one_ulp = np.nextafter(logits, np.float32(np.inf))
    assert compare_weights(logits, one_ulp).ok
    check = compare_weights(logits, logits + np.float32(1e-5 * scale))
    assert not check.ok and check.atol == pytest.approx(4 * 2.0**-23 * scale)
    nan = logits.copy()
    nan[1, 2] = np.nan
    assert not compare_weights(logits, nan).ok


def test_compare_decode_tokens_and_near_ties():
    full = np.zeros((3, 8), np.float32)
    full[:, 0] = 4.0  # the logit scale
    full[:, 1] = 4.0 - 0.05  # a near tie in bfloat16 (atol = 32 * 2**-7 * 4 = 1.0)
    full[:, 2] = 1.0
    engine = full.copy()
    engine[1, 1] += 0.06  # the engine picks token 1 at step 1
    check = compare_decode(engine, [0, 1, 0], full, "bfloat16")
    assert check.atol == 1.0 and check.ok and check.ties == [1] and not check.tokens_agree
    assert check.reference_ids == [0, 0, 0] and check.kl_divergence[0] == 0.0
    assert check.kl_divergence[1] > 0
    # In float32 the same gap is no tie: the step fails.
    check = compare_decode(engine, [0, 1, 0], full, "float32")
    assert check.atol == pytest.approx(32 * 2.0**-23 * 4) and check.ties == [] and not check.ok
    # A token that is not even close to the best fails whatever the logits say.
    assert not compare_decode(full, [0, 2, 0], full, "bfloat16").ok
    # --atol replaces the rule.
    check = compare_decode(engine, [0, 1, 0], full, "bfloat16", atol=0.01)
    assert check.atol == 0.01 and check.atol_rule == "--atol" and not check.ok


def test_verify_argument_errors(maxtext_fixtures, nnx_ckpts):
    config = maxtext_fixtures / "A" / "config.json"
    linen = maxtext_fixtures / "A" / "ckpt"
    for a, b, needle in [
        (linen, linen, "is not an NNX checkpoint"),
        (nnx_ckpts["A"], nnx_ckpts["A"], "needs a Linen one"),
    ]:
        code, _, err = run_cli("verify", a, b, "--model-config", config)
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
