"""The fast path (verbatim chunk copies) against the decode-and-encode path, bit for bit."""

from __future__ import annotations

import sys

import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest

from ckptconv.convert import ConvertOptions, compare, convert
from ckptconv.io import CheckpointReader, CheckpointWriter
from ckptconv.testing import assert_same_checkpoint, restore_target, scanned_maxtext_shapes

pytestmark = pytest.mark.filterwarnings("ignore:Sharding info not provided")

store_module = sys.modules["ckptconv.io._store"]

E, L, M, V = 8, 3, 12, 10
DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "int8": np.int8}


def build_linen(path, *, zarr3: bool, dtype: str, multi_chunk: bool, seed: int = 0) -> dict:
    """A MaxText-layout scanned checkpoint (layers at axis 1) with AdamW mu/nu."""
    rng = np.random.default_rng(seed)
    dt = DTYPES[dtype]
    model = scanned_maxtext_shapes(emb=E, layers=L, mlp=M, vocab=V)
    itemsize = np.dtype(dt).itemsize
    # A few rows per chunk: the 3-d and 4-d kernels span several chunks.
    chunk_bytes = 2 * L * M * itemsize if multi_chunk else 1 << 20
    arrays = {}
    with CheckpointWriter(
        path, use_zarr3=zarr3, chunk_bytes=chunk_bytes, custom_metadata={"scan_layers": True}
    ) as w:
        roots = [("params", "params"), ("opt_state", "0", "mu", "params")]
        roots.append(("opt_state", "0", "nu", "params"))
        for root in roots:
            for rel, shape in model.items():
                key = (*root, *rel)
                types = (2,) * len(key) if root[0] == "params" else (2, 1) + (2,) * (len(key) - 2)
                x = (rng.standard_normal(shape) * 30).astype(dt)
                w.write(key, x, key_types=types)
                arrays[key] = x
        w.write(("opt_state", "0", "count"), np.array(5, np.int32), key_types=(2, 1, 2))
        w.write_empty(("opt_state", "1"), key_types=(2, 1))
        w.write(("step",), np.array(5, np.int32))
    return arrays


def kernel_codecs(path, key) -> list[str]:
    return [c["name"] for c in CheckpointReader(path).zarr_metadata(key)["codecs"]]


NNX_KERNEL = ("model", "decoder", "layers", "mlp", "wi", "kernel", "value")
LINEN_KERNEL = ("params", "params", "decoder", "layers", "mlp", "wi", "kernel")


@pytest.mark.parametrize("zarr3", [True, False], ids=["zarr3", "zarr2"])
@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("multi_chunk", [False, True], ids=["one-chunk", "multi-chunk"])
def test_fast_path_matches_the_decode_path_both_ways(tmp_path, zarr3, dtype, multi_chunk):
    src = tmp_path / "linen"
    build_linen(src, zarr3=zarr3, dtype=dtype, multi_chunk=multi_chunk)
    fast = convert(src, tmp_path / "nnx_fast")
    slow = convert(src, tmp_path / "nnx_slow", fast=False)
    assert slow.copied_leaves == 0 and not slow.cloned
    assert fast.cloned is zarr3  # zarr2: the decoded kernels would leave dead bytes
    n_arrays = sum(1 for o in fast.plan.leaves if o.expr is not None)
    if zarr3:  # everything but the step (int32 -> uint32) is copied
        assert fast.copied_leaves == n_arrays - 1
        assert kernel_codecs(tmp_path / "nnx_fast", NNX_KERNEL)[0] == "transpose"
    else:  # zarr2 cannot express the 3-d and 4-d axis moves: those are decoded
        assert fast.copied_leaves == n_arrays - 1 - 3 * 2
        scale = ("model", "decoder", "layers", "norm", "scale", "value")
        assert CheckpointReader(tmp_path / "nnx_fast").zarr_metadata(scale)["order"] == "F"
    assert_same_checkpoint(tmp_path / "nnx_slow", tmp_path / "nnx_fast")
    # The reverse, from an output whose kernels carry a transpose codec.
    back = convert(tmp_path / "nnx_fast", tmp_path / "back_fast", direction="nnx-to-linen")
    convert(tmp_path / "nnx_slow", tmp_path / "back_slow", direction="nnx-to-linen", fast=False)
    assert back.copied_leaves > 0
    assert_same_checkpoint(tmp_path / "back_slow", tmp_path / "back_fast")
    assert_same_checkpoint(src, tmp_path / "back_fast")
    if zarr3:  # composed permutations: back to the stored order, no transpose codec at all
        assert "transpose" not in kernel_codecs(tmp_path / "back_fast", LINEN_KERNEL)
    else:
        scale = ("params", "params", "decoder", "layers", "norm", "scale")
        assert CheckpointReader(tmp_path / "back_fast").zarr_metadata(scale)["order"] == "C"


def test_fast_output_restores_with_plain_orbax(tmp_path):
    src = tmp_path / "linen"
    build_linen(src, zarr3=True, dtype="float32", multi_chunk=True)
    convert(src, tmp_path / "fast")
    convert(src, tmp_path / "slow", fast=False)
    slow = CheckpointReader(tmp_path / "slow")
    plain = ocp.PyTreeCheckpointer().restore(str(tmp_path / "fast"))
    target = restore_target(slow)
    with_target = ocp.StandardCheckpointer().restore(str(tmp_path / "fast"), target)
    for path, leaf in slow.leaves().items():
        if leaf.empty:
            continue
        a, b = plain, with_target
        for k in path:
            a, b = a[int(k) if isinstance(a, list) else k], b[k]
        expected = slow.read(path)
        for got in (np.asarray(a), np.asarray(b)):
            assert got.dtype == expected.dtype and got.tobytes() == expected.tobytes(), path


def test_value_copies_when_cloning_does_not_pay(tmp_path, monkeypatch):
    src = tmp_path / "linen"
    build_linen(src, zarr3=True, dtype="bfloat16", multi_chunk=True)
    monkeypatch.setattr(store_module, "CLONE_MAX_UNUSED_FRACTION", -1.0)
    fast = convert(src, tmp_path / "fast")
    assert fast.copied_leaves > 0 and not fast.cloned
    convert(src, tmp_path / "slow", fast=False)
    assert_same_checkpoint(tmp_path / "slow", tmp_path / "fast")


def test_params_only_copies_values_instead_of_cloning(tmp_path):
    src = tmp_path / "linen"
    build_linen(src, zarr3=True, dtype="float32", multi_chunk=False)
    opts = ConvertOptions(params_only=True)
    fast = convert(src, tmp_path / "fast", options=opts)
    assert fast.copied_leaves > 0 and not fast.cloned  # 2/3 of the source would be dead
    convert(src, tmp_path / "slow", options=opts, fast=False)
    assert_same_checkpoint(tmp_path / "slow", tmp_path / "fast")


@pytest.mark.parametrize("zarr3", [True, False], ids=["zarr3", "zarr2"])
@pytest.mark.parametrize("slab_bytes", [64 << 20, 200], ids=["big-slabs", "tiny-slabs"])
def test_unstacking_and_stacking_stay_exact(tmp_path, zarr3, slab_bytes):
    src = tmp_path / "linen"
    build_linen(src, zarr3=zarr3, dtype="float32", multi_chunk=True)
    opts = ConvertOptions(scan_layers=False)
    fast = convert(src, tmp_path / "fast", options=opts, slab_bytes=slab_bytes)
    convert(src, tmp_path / "slow", options=opts, fast=False)
    assert_same_checkpoint(tmp_path / "slow", tmp_path / "fast")
    assert compare(src, tmp_path / "fast").bit_exact
    assert ("model", "decoder", "layers_2", "mlp", "wi", "kernel", "value") in (
        CheckpointReader(tmp_path / "fast").leaves()
    )
    assert fast.copied_leaves > 0  # unscanned leaves (embedding, norms, count) are copied
    back = convert(tmp_path / "fast", tmp_path / "back", direction="nnx-to-linen")
    assert back.copied_leaves > 0
    assert_same_checkpoint(src, tmp_path / "back")


def test_casts_match_the_decode_path(tmp_path):
    src = tmp_path / "linen"
    build_linen(src, zarr3=True, dtype="float32", multi_chunk=True)
    opts = ConvertOptions(dtype="bfloat16")
    convert(src, tmp_path / "fast", options=opts, slab_bytes=300)
    convert(src, tmp_path / "slow", options=opts, fast=False)
    assert_same_checkpoint(tmp_path / "slow", tmp_path / "fast")
    x = CheckpointReader(tmp_path / "fast").read(NNX_KERNEL)
    assert x.dtype == ml_dtypes.bfloat16


def test_composed_permutation_keeps_one_transpose_codec(tmp_path):
    src = tmp_path / "linen"
    arrays = build_linen(src, zarr3=True, dtype="int8", multi_chunk=True)
    convert(src, tmp_path / "nnx")
    opts = ConvertOptions(linen_scan_axis=-1)
    convert(tmp_path / "nnx", tmp_path / "axis2", direction="nnx-to-linen", options=opts)
    assert kernel_codecs(tmp_path / "axis2", LINEN_KERNEL).count("transpose") == 1
    got = CheckpointReader(tmp_path / "axis2").read(LINEN_KERNEL)
    np.testing.assert_array_equal(got, np.moveaxis(arrays[LINEN_KERNEL], 1, 2))
    restored = ocp.PyTreeCheckpointer().restore(str(tmp_path / "axis2"))
    kernel = restored["params"]["params"]["decoder"]["layers"]["mlp"]["wi"]["kernel"]
    np.testing.assert_array_equal(np.asarray(kernel), got)


def test_maxtext_fixture_goes_through_the_fast_path(maxtext_fixtures, tmp_path):
    src = maxtext_fixtures / "A" / "ckpt"
    fast = convert(src, tmp_path / "nnx")
    assert fast.cloned and fast.copied_leaves >= len(fast.plan.leaves) - 5
    query = ("model", "decoder", "layers", "self_attention", "query", "kernel", "value")
    assert kernel_codecs(tmp_path / "nnx", query)[:2] == ["transpose", "sharding_indexed"]
    convert(src, tmp_path / "slow", fast=False)
    assert_same_checkpoint(tmp_path / "slow", tmp_path / "nnx")
    assert compare(src, tmp_path / "nnx").bit_exact
    convert(tmp_path / "nnx", tmp_path / "back", direction="nnx-to-linen")
    assert compare(src, tmp_path / "back").bit_exact
    ra, rb = CheckpointReader(src), CheckpointReader(tmp_path / "back")
    for path, leaf in ra.leaves().items():
        if not leaf.empty:
            assert ra.read(path).tobytes() == rb.read(path).tobytes(), path
