"""Resharding for a mesh: its time against ``cp -r``, its peak RSS, and sharded restores.

Builds a synthetic float32 checkpoint (OCDBT + zarr3) of about ``--size-gb`` GB in which every
array is stored as ONE chunk, as Orbax's single-device ``PyTreeCheckpointHandler(use_zarr3=True)``
writes it (``write_shape`` the whole array, one ``sharding_indexed`` inner chunk): eight
matrices of ``[2d, d]`` or ``[d, 2d]`` (embedding, logits, two unscanned MLP blocks), a scanned
attention kernel ``[4, d, 16, d/16]``, a norm scale and an unnamed ``step`` scalar; ``d`` is
chosen from the size (4352 for 1.5 GB: 151 MB matrices, a 303 MB scanned kernel). Logical
names come from a ``--names`` file; the rules are the ``maxtext`` preset. Then, interleaved
per round, each in a fresh subprocess under GNU time, with an untimed ``sync`` after each:

* ``cp -r`` of the source plus ``sync`` (the floor: moving the bytes once), and ``cp -r`` plus
  an fsync of each copied file (what ckptconv does: its own files only);
* ``ckptconv reshard SRC DST --mesh fsdp=4,tensor=2 --rules maxtext --names FILE``;
* a sharded restore with plain Orbax, ``StandardCheckpointer().restore(path, target)`` with
  ``NamedSharding`` targets on a (4, 2) mesh of 8 simulated CPU devices
  (``XLA_FLAGS=--xla_force_host_platform_device_count=8``, set before jax is imported), from
  the single-chunk source and from a resharded copy made once before the rounds.

Reported: median wall seconds (the reshard also with its own ``seconds``, start-up
excluded) as a ratio to the faster ``cp -r``, max peak RSS (GNU time's ``%M`` of the command
itself); for each restore the seconds of the ``restore`` call, the process's wall and peak
RSS, and from TensorStore's metrics (``experimental_collect_matching_metrics``, process-wide,
no per-device breakdown) the bytes read from disk and the chunk-cache entries read and decoded
during the restore; the per-device figure is that total divided by the 8 devices. Beside them,
modelled from each array's stored grid: the bytes a device's reads must decode (every stored
decode unit, an inner chunk of the ``sharding_indexed`` codec, that its shard overlaps, largest
over devices) against the bytes of its shard. Then the issue's targets (reshard peak RSS <=
600 MB) with MET / NOT MET.

The checkpoints are read from the page cache (the machine has RAM to spare): the restores
measure decoding and placing the shards, not the disk.

Usage:
    python benchmarks/bench_reshard.py [--size-gb 1.5] [--repeat 3] [--small] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np
from bench_convert import finish, timed  # benchmarks/ is on sys.path when a benchmark is run

MESH = "fsdp=4,tensor=2"
DEVICES = 8
RSS_TARGET_MB = 600.0
LAYERS, HEADS = 4, 16


def shapes(d: int) -> dict[tuple[str, ...], tuple[tuple[int, ...], tuple[str | None, ...] | None]]:
    """Each leaf's shape and logical names (``None``: unnamed, replicated) for width ``d``."""
    dense = {}
    for i in range(2):
        mlp = ("params", "decoder", f"dense_layers_{i}", "mlp")
        dense[(*mlp, "wi_0", "kernel")] = ((d, 2 * d), ("embed", "mlp"))
        dense[(*mlp, "wi_1", "kernel")] = ((d, 2 * d), ("embed", "mlp"))
        dense[(*mlp, "wo", "kernel")] = ((2 * d, d), ("mlp", "embed"))
    return {
        ("params", "token_embedder", "embedding"): ((2 * d, d), ("vocab", "embed")),
        ("params", "decoder", "logits_dense", "kernel"): ((d, 2 * d), ("embed", "vocab")),
        **dense,
        ("params", "decoder", "layers", "self_attention", "query", "kernel"): (
            (LAYERS, d, HEADS, d // HEADS),
            ("layers", "embed", "heads", "kv"),
        ),
        ("params", "decoder", "decoder_norm", "scale"): ((d,), ("norm",)),
        ("step",): ((), None),
    }


def width(size_gb: float) -> int:
    """The ``d`` (a multiple of 256) whose checkpoint is nearest ``size_gb`` GB."""
    per_d2 = sum(math.prod(s) for s, _ in shapes(256).values()) / 256**2 * 4  # bytes / d^2
    return max(256, round(math.sqrt(size_gb * 1e9 / per_d2) / 256) * 256)


def build_checkpoint(path: pathlib.Path, names_file: pathlib.Path, d: int) -> int:
    """Writes the single-chunk source and its names file; returns the bytes of its arrays."""
    from ckptconv.io import CheckpointWriter

    rng = np.random.default_rng(0)
    leaves = shapes(d)
    total = 0
    # chunk_bytes larger than any array: one stored chunk per array, as Orbax on one device.
    with CheckpointWriter(path, use_zarr3=True, chunk_bytes=1 << 62) as w:
        for key, (shape, _) in leaves.items():
            if not shape:
                w.write(key, np.array(3, np.int32))
                continue
            h = w.create(key, shape, "float32")
            assert h.chunk_shape == shape, (key, h.chunk_shape)
            h.write(None, rng.standard_normal(shape, np.float32))
            total += math.prod(shape) * 4
    rules = [
        {"match": "^" + "/".join(k) + "$", "axes": list(n)} for k, (_, n) in leaves.items() if n
    ]
    names_file.write_text(json.dumps(rules, indent=1))
    return total


# The restoring subprocess: XLA_FLAGS must be set before jax is imported.
RESTORE = r"""
import os, sys
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
import json, math, time
import jax, numpy as np, orbax.checkpoint as ocp, tensorstore as ts
from jax.sharding import NamedSharding
from ckptconv.io import CheckpointReader
from ckptconv.sharding import make_mesh
from ckptconv.sharding.leaf_names import load_name_rules
from ckptconv.sharding.presets import load_rules
from ckptconv.sharding.reshard import plan_shardings
from ckptconv.testing import restore_target

path, names, mesh_spec, out = sys.argv[1:5]
reader = CheckpointReader(path)
mesh = make_mesh(mesh_spec)
assert mesh.devices.size == len(jax.devices()) == 8, jax.devices()
planned, _ = plan_shardings(
    reader.leaves(), mesh=mesh, rules=load_rules("maxtext"), names=load_name_rules(names))
shardings = {s.path: NamedSharding(mesh, s.spec) for s in planned}
target = restore_target(reader, shardings.__getitem__)

def counters():
    metrics = ts.experimental_collect_matching_metrics("/tensorstore/")
    found = {m["name"]: m["values"] for m in metrics}
    read = sum(v["value"] for v in found.get("/tensorstore/kvstore/file/bytes_read", []))
    decoded = sum(v["value"] for v in found.get("/tensorstore/cache/kvs_cache_read", [])
                  if v.get("category") == "changed")
    return read, decoded

before = counters()
start = time.perf_counter()
tree = ocp.StandardCheckpointer().restore(path, target)
jax.block_until_ready(tree)
seconds = time.perf_counter() - start
after = counters()

# Modelled: the stored decode units (inner chunks) each device's shard overlaps.
def units(doc):
    outer = doc["chunk_grid"]["configuration"]["chunk_shape"]
    codec = doc["codecs"][0]
    return codec["configuration"]["chunk_shape"] if codec["name"] == "sharding_indexed" else outer

decode = {d: 0 for d in jax.devices()}
shard = dict(decode)
for p, s in shardings.items():
    shape, item = reader.leaves()[p].shape, np.dtype(reader.leaves()[p].dtype).itemsize
    unit = units(reader.zarr_metadata(p)) if shape else []
    for dev, index in s.devices_indices_map(shape).items():
        covered, own = 1, 1
        for n, c, sl in zip(shape, unit, index):
            lo, hi = sl.indices(n)[:2]
            covered *= min(n, -(-hi // c) * c) - lo // c * c
            own *= hi - lo
        decode[dev] += covered * item
        shard[dev] += own * item
json.dump({"seconds": seconds, "bytes_read": after[0] - before[0],
           "decoded_entries": after[1] - before[1],
           "decode_per_device": max(decode.values()), "shard_per_device": max(shard.values())},
          open(out, "w"))
"""


def bench(work: pathlib.Path, size_gb: float, repeat: int) -> dict:
    """Builds the source, reshards it once, then runs every case ``repeat`` times, interleaved."""
    src, names = work / "single_chunk", work / "names.json"
    d = width(size_gb)
    t = time.perf_counter()
    nbytes = build_checkpoint(src, names, d)
    print(
        f"built {src}: {nbytes / 1e9:.2f} GB of arrays (d={d}, one chunk each) in "
        f"{time.perf_counter() - t:.1f} s",
        flush=True,
    )
    cli = [sys.executable, "-m", "ckptconv.cli"]
    reshard = [*cli, "reshard", "--mesh", MESH, "--rules", "maxtext", "--names", str(names)]
    resharded = work / "resharded"
    timed([*reshard, str(src), str(resharded)])
    os.sync()

    def reshard_case(dst: pathlib.Path) -> list[str]:
        cmd = " ".join(f"'{a}'" for a in [*reshard, str(src), str(dst), "--json"])
        return ["sh", "-c", f"{cmd} > '{dst}.json'"]

    def restore_case(ckpt: pathlib.Path):
        return lambda dst: [
            sys.executable,
            "-c",
            RESTORE,
            str(ckpt),
            str(names),
            MESH,
            f"{dst}.json",
        ]

    cases = {
        "cp -r + sync": lambda dst: ["sh", "-c", f"cp -r '{src}' '{dst}' && sync"],
        "cp -r + fsync files": lambda dst: [
            "sh",
            "-c",
            f"cp -r '{src}' '{dst}' && find '{dst}' -type f -exec sync {{}} +",
        ],
        "ckptconv reshard": reshard_case,
        "restore: single-chunk source": restore_case(src),
        "restore: resharded": restore_case(resharded),
    }
    results: dict[str, dict] = {name: {"wall": [], "rss": [], "docs": []} for name in cases}
    for r in range(repeat):
        for name, make in cases.items():
            dst = work / f"out_{r}"
            wall, rss = timed(make(dst))
            doc_file = pathlib.Path(f"{dst}.json")
            if doc_file.exists():
                results[name]["docs"].append(json.loads(doc_file.read_text()))
                doc_file.unlink()
            shutil.rmtree(dst, ignore_errors=True)
            os.sync()  # untimed: the next case does not pay for this one's dirty pages
            results[name]["wall"].append(wall)
            results[name]["rss"].append(rss)
            print(f"  round {r + 1}: {name}: {wall:.2f} s, {rss:.0f} MB", flush=True)
    base = min(
        statistics.median(results[n]["wall"]) for n in ("cp -r + sync", "cp -r + fsync files")
    )
    rows = {}
    for name, res in results.items():
        med = statistics.median(res["wall"])
        row = {
            "median_s": round(med, 3),
            "ratio_to_cp": round(med / base, 2),
            "peak_rss_mb": round(max(res["rss"]), 1),
        }
        docs = res["docs"]
        if name == "ckptconv reshard":
            row["reshard_seconds"] = round(statistics.median(x["seconds"] for x in docs), 3)
            row["copied_leaves"] = docs[0]["copied_leaves"]
            row["leaves"] = [[x["path"], x["spec"], x["shard_shape"]] for x in docs[0]["leaves"]]
        elif docs:
            row["restore_s"] = round(statistics.median(x["seconds"] for x in docs), 3)
            for key in ("bytes_read", "decoded_entries", "decode_per_device", "shard_per_device"):
                row[key] = int(statistics.median(x[key] for x in docs))
        rows[name] = row
    shutil.rmtree(src)
    shutil.rmtree(resharded)
    return {"width": d, "array_bytes": nbytes, "mesh": MESH, "devices": DEVICES, "cases": rows}


def print_report(rep: dict, repeat: int) -> None:
    """Prints the copy table, the restore table and the targets."""
    cases = rep["cases"]
    print(
        f"\n{rep['array_bytes'] / 1e9:.2f} GB of float32 arrays (d={rep['width']}, one chunk "
        f"per array), mesh {rep['mesh']} on {rep['devices']} simulated CPU devices, "
        f"median of {repeat}:"
    )
    print(f"  {'case':30s} {'median s':>9s} {'x cp -r':>8s} {'peak RSS MB':>12s}")
    for name in ("cp -r + sync", "cp -r + fsync files", "ckptconv reshard"):
        row = cases[name]
        print(
            f"  {name:30s} {row['median_s']:9.3f} {row['ratio_to_cp']:8.2f} "
            f"{row['peak_rss_mb']:12.1f}"
        )
    row = cases["ckptconv reshard"]
    print(
        f"  (reshard's own seconds, start-up excluded: {row['reshard_seconds']:.3f}; "
        f"{row['copied_leaves']} leaves copied without decoding); device shards:"
    )
    for path, spec, shard in row["leaves"]:
        print(f"    {path}: {spec} -> {shard}")
    print(
        f"  sharded restore (Orbax, NamedSharding targets)  {'restore s':>9s} {'wall s':>7s} "
        f"{'RSS MB':>7s} {'read MB':>8s} {'/device':>8s} {'decodes':>8s} "
        f"{'decode MB/dev':>13s} {'shard MB/dev':>12s}"
    )
    for name in ("restore: single-chunk source", "restore: resharded"):
        row = cases[name]
        print(
            f"  {name:47s} {row['restore_s']:9.3f} {row['median_s']:7.2f} "
            f"{row['peak_rss_mb']:7.0f} {row['bytes_read'] / 1e6:8.1f} "
            f"{row['bytes_read'] / rep['devices'] / 1e6:8.1f} {row['decoded_entries']:8d} "
            f"{row['decode_per_device'] / 1e6:13.1f} {row['shard_per_device'] / 1e6:12.1f}"
        )
    print(
        "  (read MB, decodes: TensorStore metrics of the whole process, /device = read MB / "
        f"{rep['devices']}; decode MB/dev: modelled from the stored grid, largest device)"
    )
    src, out = cases["restore: single-chunk source"], cases["restore: resharded"]
    print(
        f"  restore s, source / resharded: {src['restore_s'] / out['restore_s']:.2f} (above 1: "
        "the resharded output restores faster); bytes to decode per device, source / "
        f"resharded: {src['decode_per_device'] / out['decode_per_device']:.1f} (modelled)"
    )
    rss = cases["ckptconv reshard"]["peak_rss_mb"]
    met = "MET" if rss <= RSS_TARGET_MB else "NOT MET"
    print(f"  target reshard peak RSS <= {RSS_TARGET_MB:.0f} MB: {rss:.1f} {met}")


def main() -> None:
    """Runs the benchmark; see the module docstring."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-gb", type=float, default=1.5)
    p.add_argument("--repeat", type=int, default=None, help="default 3 (--small: 1)")
    p.add_argument("--small", action="store_true", help="a quick run at about 0.1 GB")
    p.add_argument("--workdir", default=None)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    size = 0.1 if args.small else args.size_gb
    repeat = args.repeat or (1 if args.small else 3)
    work = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="bench-reshard-"))
    work.mkdir(parents=True, exist_ok=True)
    rep = bench(work, size, repeat)
    print_report(rep, repeat)
    finish(rep, args, work)


if __name__ == "__main__":
    main()
