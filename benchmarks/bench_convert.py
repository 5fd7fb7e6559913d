"""Conversion speed and memory, measured side by side in one run.

Builds a synthetic MaxText-layout Linen checkpoint (OCDBT + zarr3, scanned layers stacked at
axis 1, like MaxText writes) and times, each in a fresh subprocess so peak RSS is its own:

* ``cp -r`` of the checkpoint plus ``sync`` (the floor: moving the bytes once);
* the naive Orbax way: restore the whole tree, rename and move axes with numpy, save;
* ``ckptconv linen-to-nnx`` keeping the scan axis (renames only);
* ``ckptconv linen-to-nnx`` moving the scan axis 1 -> 0;
* ``ckptconv nnx-to-linen`` (the reverse).

Each is repeated ``--repeat`` times; the median wall time and the max peak RSS are printed,
with every time as a ratio to ``cp -r``. ``--layers`` sets the size (16 layers of emb 1024,
mlp 4096, vocab 32000 float32 is about 1.4 GB; ``--sizes 4,16`` runs several sizes and prints
how peak RSS grows with the checkpoint).

Usage:
    python benchmarks/bench_convert.py [--layers 16] [--sizes 4,16] [--opt] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

EMB, MLP, VOCAB, HEADS, HEAD_DIM = 1024, 4096, 32000, 8, 128


def layer_shapes(layers: int) -> dict[tuple[str, ...], tuple[int, ...]]:
    """MaxText parameter shapes, scanned layers stacked at axis 1."""
    lay = ("decoder", "layers")
    return {
        ("token_embedder", "embedding"): (VOCAB, EMB),
        ("decoder", "decoder_norm", "scale"): (EMB,),
        ("decoder", "logits_dense", "kernel"): (EMB, VOCAB),
        (*lay, "pre_self_attention_layer_norm", "scale"): (EMB, layers),
        (*lay, "post_self_attention_layer_norm", "scale"): (EMB, layers),
        (*lay, "self_attention", "query", "kernel"): (EMB, layers, HEADS, HEAD_DIM),
        (*lay, "self_attention", "key", "kernel"): (EMB, layers, HEADS, HEAD_DIM),
        (*lay, "self_attention", "value", "kernel"): (EMB, layers, HEADS, HEAD_DIM),
        (*lay, "self_attention", "out", "kernel"): (HEADS, layers, HEAD_DIM, EMB),
        (*lay, "mlp", "wi_0", "kernel"): (EMB, layers, MLP),
        (*lay, "mlp", "wi_1", "kernel"): (EMB, layers, MLP),
        (*lay, "mlp", "wo", "kernel"): (MLP, layers, EMB),
    }


def build_checkpoint(path: pathlib.Path, layers: int, with_opt: bool) -> int:
    """Writes a synthetic MaxText checkpoint, streamed one layer slab at a time."""
    from ckptconv.io import CheckpointWriter

    rng = np.random.default_rng(0)
    shapes = layer_shapes(layers)
    roots = [("params", "params")]
    if with_opt:
        roots += [("opt_state", "0", "mu", "params"), ("opt_state", "0", "nu", "params")]
    total = 0
    with CheckpointWriter(path, custom_metadata={"scan_layers": True}) as w:
        for root in roots:
            types = (2, 1) + (2,) * (len(root) - 2) if root[0] == "opt_state" else None
            for rel, shape in shapes.items():
                key = (*root, *rel)
                kt = None if types is None else types + (2,) * len(rel)
                h = w.create(key, shape, "float32", key_types=kt)
                # stream along the first axis so building never holds a whole array
                step = max(1, shape[0] // 8)
                for i in range(0, shape[0], step):
                    part = rng.standard_normal((min(step, shape[0] - i), *shape[1:]), np.float32)
                    h.write((slice(i, i + part.shape[0]),), part)
                total += int(np.prod(shape)) * 4
        if with_opt:
            w.write(("opt_state", "0", "count"), np.array(3, np.int32), key_types=(2, 1, 2))
            w.write_empty(("opt_state", "1"), key_types=(2, 1))
        w.write(("step",), np.array(3, np.int32))
    return total


NAIVE = r"""
import sys, numpy as np, orbax.checkpoint as ocp, jax
src, dst = sys.argv[1], sys.argv[2]
tree = ocp.PyTreeCheckpointer().restore(src)
def conv(t, scanned=False):
    if isinstance(t, dict):
        return {k: conv(v, scanned or k == "layers") for k, v in t.items()}
    a = np.asarray(t)
    return {"value": np.ascontiguousarray(np.moveaxis(a, 1, 0)) if scanned and a.ndim > 1 else a}
out = {"model": conv(tree["params"]["params"])}
if "opt_state" in tree:
    mu = tree["opt_state"][0]
    out["optimizer"] = {"opt_state": {"0": {"count": {"value": np.asarray(mu["count"])},
        "mu": conv(mu["mu"]["params"]), "nu": conv(mu["nu"]["params"])}},
        "step": {"value": np.asarray(tree["step"]).astype(np.uint32)}}
c = ocp.StandardCheckpointer(); c.save(dst, out); c.wait_until_finished()
"""


def timed(cmd: list[str]) -> tuple[float, float]:
    """Runs ``cmd``; returns (wall seconds, its peak RSS in MB from GNU time's ``%M``).

    GNU time measures the command itself: a child forked from this (larger) Python process
    would report the parent's pages too.
    """
    start = time.perf_counter()
    proc = subprocess.run(
        ["/usr/bin/time", "-f", "%M", *cmd], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    wall = time.perf_counter() - start
    err = proc.stderr.decode()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {err[-2000:]}")
    return wall, int(err.strip().splitlines()[-1]) / 1024


def bench_size(work: pathlib.Path, layers: int, with_opt: bool, repeat: int) -> dict:
    src = work / f"linen_{layers}"
    t = time.perf_counter()
    nbytes = build_checkpoint(src, layers, with_opt)
    print(
        f"built {src}: {nbytes / 1e9:.2f} GB of arrays in {time.perf_counter() - t:.1f} s",
        flush=True,
    )
    cli = [sys.executable, "-m", "ckptconv.cli"]
    nnx_ref = work / f"nnx_ref_{layers}"
    subprocess.run(
        [*cli, "linen-to-nnx", str(src), str(nnx_ref)], check=True, stdout=subprocess.DEVNULL
    )
    cases = {
        "cp -r + sync": lambda d: ["sh", "-c", f"cp -r '{src}' '{d}' && sync"],
        "naive orbax": lambda d: [sys.executable, "-c", NAIVE, str(src), str(d)],
        "ckptconv renames only": lambda d: [
            *cli,
            "linen-to-nnx",
            str(src),
            str(d),
            "--nnx-scan-axis",
            "1",
        ],
        "ckptconv axis 1->0": lambda d: [*cli, "linen-to-nnx", str(src), str(d)],
        "ckptconv nnx-to-linen": lambda d: [*cli, "nnx-to-linen", str(nnx_ref), str(d)],
    }
    results: dict[str, dict] = {}
    for r in range(repeat):
        for name, make in cases.items():
            dst = work / f"out_{layers}_{r}"
            wall, rss = timed(make(dst))
            shutil.rmtree(dst)
            results.setdefault(name, {"wall": [], "rss": []})
            results[name]["wall"].append(wall)
            results[name]["rss"].append(rss)
    base = statistics.median(results["cp -r + sync"]["wall"])
    rows = {}
    for name, r in results.items():
        med = statistics.median(r["wall"])
        rows[name] = {
            "median_s": round(med, 3),
            "ratio_to_cp": round(med / base, 2),
            "peak_rss_mb": round(max(r["rss"]), 1),
        }
    shutil.rmtree(src)
    shutil.rmtree(nnx_ref)
    return {"layers": layers, "array_bytes": nbytes, "with_opt": with_opt, "cases": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="16", help="comma-separated layer counts")
    p.add_argument("--opt", action="store_true", help="add adamw mu/nu (3x the bytes)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--workdir", default=None)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    work = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="bench-convert-"))
    work.mkdir(parents=True, exist_ok=True)
    reports = []
    for layers in [int(x) for x in args.sizes.split(",")]:
        rep = bench_size(work, layers, args.opt, args.repeat)
        reports.append(rep)
        print(f"\n{layers} layers, {rep['array_bytes'] / 1e9:.2f} GB, median of {args.repeat}:")
        print(f"  {'case':26s} {'median s':>9s} {'x cp -r':>8s} {'peak RSS MB':>12s}")
        for name, row in rep["cases"].items():
            print(
                f"  {name:26s} {row['median_s']:9.3f} {row['ratio_to_cp']:8.2f} "
                f"{row['peak_rss_mb']:12.1f}"
            )
        naive = rep["cases"]["naive orbax"]["median_s"]
        for name in ("ckptconv renames only", "ckptconv axis 1->0"):
            print(f"  naive orbax / {name}: {naive / rep['cases'][name]['median_s']:.2f}x")
    if len(reports) > 1:
        a, b = reports[0], reports[-1]
        for name in ("ckptconv renames only", "ckptconv axis 1->0", "ckptconv nnx-to-linen"):
            ra, rb = a["cases"][name]["peak_rss_mb"], b["cases"][name]["peak_rss_mb"]
            print(
                f"peak RSS {name}: {ra:.0f} MB at {a['array_bytes'] / 1e9:.2f} GB -> "
                f"{rb:.0f} MB at {b['array_bytes'] / 1e9:.2f} GB ({rb / ra:.2f}x)"
            )
    if args.json:
        print(json.dumps(reports, indent=1))
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
