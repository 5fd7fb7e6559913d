"""The converter never holds the checkpoint in memory (MaxText's converter restores it whole)."""

from __future__ import annotations

import tracemalloc

import numpy as np

from ckptconv.convert import ConvertOptions, compare, convert
from ckptconv.io import CheckpointWriter


def test_decoding_conversion_holds_about_one_slab(tmp_path):
    # 48 arrays of 1 MiB (48 MiB); stacked, the largest output array is 12 MiB.
    rng = np.random.default_rng(0)
    with CheckpointWriter(tmp_path / "src") as w:
        for i in range(12):
            for name in ("a", "b", "c", "d"):
                w.write(
                    ("params", f"layers_{i}", name, "kernel"),
                    rng.standard_normal((512, 512)).astype(np.float32),
                )
        w.write(("step",), np.array(1, np.int32))
    tracemalloc.start()
    try:
        # stacking decodes every value (no byte copy possible): the worst case for memory
        convert(tmp_path / "src", tmp_path / "out", options=ConvertOptions(scan_layers=True))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    total, largest_out = 48 * 2**20, 12 * 2**20
    assert peak < 1.5 * largest_out, (
        f"peak {peak / 2**20:.1f} MiB of numpy for a {total >> 20} MiB checkpoint"
    )
    assert compare(tmp_path / "src", tmp_path / "out").bit_exact
