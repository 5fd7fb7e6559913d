"""compare() reads leaves slab by slab and still sees every difference."""

from __future__ import annotations

import importlib

import numpy as np

from ckptconv.io import CheckpointWriter


def write(path, w):
    with CheckpointWriter(path) as writer:
        writer.write(("params", "w"), w)
        writer.write(("params", "s"), np.array(2.0, np.float32))


def test_slabbed_compare_finds_a_difference_in_the_last_slab(tmp_path, monkeypatch):
    module = importlib.import_module("ckptconv.convert.compare")

    monkeypatch.setattr(module, "SLAB_BYTES", 64)  # 4 rows of 4 float32 per slab
    w = np.arange(40, dtype=np.float32).reshape(10, 4)
    write(tmp_path / "a", w)
    write(tmp_path / "b", w)
    changed = w.copy()
    changed[9, 3] += 0.5
    write(tmp_path / "c", changed)

    reads = []
    from ckptconv.io import CheckpointReader

    real = CheckpointReader.read
    monkeypatch.setattr(
        CheckpointReader, "read", lambda self, p, i=None: reads.append(i) or real(self, p, i)
    )
    same = module.compare(tmp_path / "a", tmp_path / "b")
    assert same.bit_exact
    assert (slice(8, 10),) in reads  # the 10-row leaf was read in slabs, not whole

    diff = module.compare(tmp_path / "a", tmp_path / "c")
    w_diff = next(d for d in diff.leaves if d.path == "params/w")
    assert not diff.equal and w_diff.max_abs_diff == 0.5
    assert module.compare(tmp_path / "a", tmp_path / "c", atol=0.5).equal
    assert not module.compare(tmp_path / "a", tmp_path / "c", atol=0.4).equal
