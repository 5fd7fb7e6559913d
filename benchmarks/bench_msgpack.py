"""Converting a Flax msgpack checkpoint of about 2 GB: time against ``cp``, and peak RSS.

Builds a Flax ``TrainState`` checkpoint file (``checkpoint_<step>``: params of ``--layers``
Dense kernels of 4096 x 4096 float32 plus AdamW ``mu``/``nu``, about 2.1 GB for 11 layers) by
streaming Flax's exact msgpack encoding to disk (checked byte for byte against
``flax.serialization.to_bytes`` on a small tree first), so the file is never held in memory.
Then times, each in a fresh subprocess under GNU time, interleaved and repeated:

* ``cp`` of the file plus ``sync`` (moving the bytes once);
* the naive way: ``flax.training.checkpoints.restore_checkpoint`` (the whole file in memory),
  rename to the NNX layout with numpy, ``ocp.StandardCheckpointer().save``;
* ``ckptconv linen-to-nnx checkpoint_<step> out`` (indexes the file in one pass, streams slabs
  from an mmap into a new OCDBT checkpoint).

It prints the median seconds, the ratio to ``cp``, and the max peak RSS (GNU time's ``%M``),
then the issue's target (ckptconv peak RSS <= 600 MB) as MET / NOT MET, and checks the
conversion bit-exact with ``ckptconv compare`` (streamed).

Usage:
    python benchmarks/bench_msgpack.py [--layers 11] [--repeat 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time

import msgpack
import numpy as np

N = 4096
EXT_NDARRAY = 1


def _ext_header(size: int) -> bytes:
    """The header of a msgpack ext 8/16/32 of type 1 with ``size`` payload bytes."""
    if size < 1 << 8:
        return b"\xc7" + struct.pack(">Bb", size, EXT_NDARRAY)
    if size < 1 << 16:
        return b"\xc8" + struct.pack(">Hb", size, EXT_NDARRAY)
    return b"\xc9" + struct.pack(">Ib", size, EXT_NDARRAY)


def _bin_header(size: int) -> bytes:
    if size < 1 << 8:
        return b"\xc4" + struct.pack(">B", size)
    if size < 1 << 16:
        return b"\xc5" + struct.pack(">H", size)
    return b"\xc6" + struct.pack(">I", size)


def write_array(f, shape: tuple[int, ...], dtype: str, rows) -> None:
    """Writes one array as Flax does (ext 1 of ``(shape, dtype, bytes)``), row block by block."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    head = msgpack.packb(list(shape)) + msgpack.packb(dtype)
    payload = b"\x93" + head + _bin_header(nbytes)
    f.write(_ext_header(len(payload) + nbytes) + payload)
    for block in rows:
        f.write(np.ascontiguousarray(block, dtype).tobytes())


def write_tree(f, tree) -> None:
    """Writes a nested dict of (shape, dtype, row-block generator) leaves, ints and empties."""
    count = len(tree)
    f.write(bytes([0x80 | count]) if count < 16 else b"\xde" + struct.pack(">H", count))
    for key, value in tree.items():
        f.write(msgpack.packb(key))
        if isinstance(value, dict):
            write_tree(f, value)
        elif isinstance(value, int):
            f.write(msgpack.packb(value))
        else:
            write_array(f, *value)


def blocks(seed: int, shape: tuple[int, ...], rows: int = 256):
    rng = np.random.default_rng(seed)
    for _ in range(0, shape[0], rows):
        yield rng.standard_normal((rows, *shape[1:]), dtype=np.float32)


def train_state_tree(layers: int, n: int) -> dict:
    def params(seed):
        return {
            f"Dense_{i}": {"kernel": ((n, n), "float32", blocks(seed * 1000 + i, (n, n)))}
            for i in range(layers)
        }

    return {
        "step": 7,
        "params": params(1),
        "opt_state": {
            "0": {"count": 7, "mu": params(2), "nu": params(3)},
            "1": {},
            "2": {},
        },
    }


def check_encoding() -> None:
    """The streamed writer produces flax.serialization.to_bytes' bytes exactly (small tree)."""
    import io

    from flax import serialization

    tree = train_state_tree(2, 256)
    buf = io.BytesIO()
    write_tree(buf, tree)
    expected = train_state_tree(2, 256)

    def materialise(t):
        if isinstance(t, dict):
            return {k: materialise(v) for k, v in t.items()}
        if isinstance(t, int):
            return t
        shape, dtype, gen = t
        return np.concatenate(list(gen)).astype(dtype).reshape(shape)

    if buf.getvalue() != serialization.to_bytes(materialise(expected)):
        raise SystemExit("streamed msgpack differs from flax.serialization.to_bytes")


NAIVE = r"""
import sys, numpy as np, orbax.checkpoint as ocp
from flax.training import checkpoints
src, dst = sys.argv[1], sys.argv[2]
tree = checkpoints.restore_checkpoint(src, None)
def conv(t):
    return {k: conv(v) for k, v in t.items()} if isinstance(t, dict) else {"value": np.asarray(t)}
mu = tree["opt_state"]["0"]
out = {"model": conv(tree["params"]), "optimizer": {"opt_state": {"0": {
    "count": {"value": np.asarray(mu["count"])}, "mu": conv(mu["mu"]), "nu": conv(mu["nu"])}},
    "step": {"value": np.asarray(tree["step"]).astype(np.uint32)}}}
c = ocp.StandardCheckpointer(); c.save(dst, out); c.wait_until_finished()
"""


def timed(cmd: list[str]) -> tuple[float, float]:
    """Runs ``cmd``; returns (wall seconds, its peak RSS in MB from GNU time)."""
    start = time.perf_counter()
    proc = subprocess.run(
        ["/usr/bin/time", "-f", "%M", *cmd], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.decode()[-2000:]}")
    return wall, int(proc.stderr.decode().strip().splitlines()[-1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=11)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    check_encoding()
    work = pathlib.Path(tempfile.mkdtemp(prefix="bench_msgpack_", dir=os.getcwd()))
    try:
        src_dir = work / "flax"
        src_dir.mkdir()
        src = src_dir / "checkpoint_7"
        with open(src, "wb") as f:
            write_tree(f, train_state_tree(args.layers, N))
        os.sync()
        size = src.stat().st_size
        cli = [sys.executable, "-m", "ckptconv.cli"]
        cases = {
            "cp + sync": lambda d: ["sh", "-c", f"cp {src} {d} && sync"],
            "naive flax restore + Orbax save": lambda d: [
                sys.executable,
                "-c",
                NAIVE,
                str(src),
                str(d),
            ],
            "ckptconv linen-to-nnx": lambda d: [*cli, "linen-to-nnx", str(src), str(d)],
        }
        results: dict[str, dict] = {}
        for r in range(args.repeat):
            for name, make in cases.items():
                dst = work / f"out_{r}"
                wall, rss = timed(make(dst))
                if name == "ckptconv linen-to-nnx" and r == 0:
                    cmp = subprocess.run([*cli, "compare", str(src), str(dst)], capture_output=True)
                    if cmp.returncode != 0:
                        raise SystemExit(f"compare failed: {cmp.stdout.decode()[-500:]}")
                if dst.is_dir():
                    shutil.rmtree(dst)
                elif dst.exists():
                    dst.unlink()
                os.sync()
                results.setdefault(name, {"wall": [], "rss": []})
                results[name]["wall"].append(wall)
                results[name]["rss"].append(rss)
        base = statistics.median(results["cp + sync"]["wall"])
        rows = {
            name: {
                "median_s": round(statistics.median(r["wall"]), 3),
                "ratio_to_cp": round(statistics.median(r["wall"]) / base, 2),
                "peak_rss_mb": round(max(r["rss"]), 1),
            }
            for name, r in results.items()
        }
        peak = rows["ckptconv linen-to-nnx"]["peak_rss_mb"]
        report = {
            "file_bytes": size,
            "repeat": args.repeat,
            "rows": rows,
            "compare": "bit-exact",
            "target_peak_rss_le_600mb": peak <= 600,
        }
        if args.json:
            print(json.dumps(report, indent=1))
            return
        print(f"Flax msgpack checkpoint: {size / 1e9:.2f} GB, median of {args.repeat}")
        print(f"{'case':34s} {'seconds':>9s} {'x cp':>6s} {'peak RSS MB':>12s}")
        for name, row in rows.items():
            print(
                f"{name:34s} {row['median_s']:9.2f} {row['ratio_to_cp']:6.2f} "
                f"{row['peak_rss_mb']:12.1f}"
            )
        print("compare (streamed): bit-exact")
        print(f"target: ckptconv peak RSS <= 600 MB: {'MET' if peak <= 600 else 'NOT MET'}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
