"""Conversion speed and memory, measured side by side in one run.

Builds a synthetic MaxText-layout Linen checkpoint (OCDBT + zarr3, scanned layers stacked at
axis 1, like MaxText writes; ``--opt`` adds AdamW ``mu``/``nu``, tripling the bytes) and times,
each in a fresh subprocess:

* ``cp -r`` of the checkpoint plus ``sync`` (the floor: moving the bytes once), and ``cp -r``
  plus an fsync of each copied file (``sync`` flushes the whole machine, other tenants' dirty
  pages included, while ckptconv fsyncs its own files only);
* the naive Orbax way: restore the whole tree, rename and move axes with numpy, save;
* ``python -c "import ckptconv.cli"``: the fixed start-up cost inside every ckptconv case;
* ``ckptconv linen-to-nnx`` keeping the scan axis (renames only);
* ``ckptconv linen-to-nnx`` moving the scan axis 1 -> 0;
* ``ckptconv nnx-to-linen`` (the reverse, axis 0 -> 1, from the output of the previous case);
* ``ckptconv linen-to-nnx --unscan-layers`` and ``--dtype bfloat16``: conversions that must
  decode and re-encode every value (peak RSS of "any conversion").

Cases run interleaved, with an untimed ``sync`` after each, so no case pays for writing back
another's dirty pages. Peak RSS is GNU time's ``%M`` for the command itself: the conversion
process (or for the shell cases, its largest process), not this script. Each case is
repeated ``--repeat`` times; the median wall time and the max peak RSS are printed, every
time also as a ratio to the faster of the two ``cp -r`` baselines (the stricter comparison),
then the targets of the performance issue with MET / NOT MET. ``--sizes 16,32`` runs several
sizes (16 layers of emb 1024, mlp 4096, vocab 32000 float32 is 1.34 GB of arrays) and prints
how peak RSS grows with the checkpoint.

``--s3`` also starts a local S3-compatible server (moto, ``pip install 'moto[server]'``) on
127.0.0.1 and times the conversion to it (``linen-to-nnx`` local -> S3, axis 1 -> 0) and from
it (``nnx-to-linen`` S3 -> local and S3 -> S3), each as a ratio to the same conversion on the
local disk. The server is a single Python process: the ratios say what talking to an object
store through TensorStore costs here, not what a real bucket would sustain.

``--processes 1,2`` times multi-process conversion instead (``ckptconv launch -n P``; P=1 is
a plain ``ckptconv`` run): the axis move (copies chunks), ``--unscan-layers`` and
``--dtype bfloat16`` (decode and encode every value), with the wall time of the whole command
(start-up of every process included), its speed-up over P=1, the conversion time each process
reports, and each process's peak RSS (from its ``--json`` summary, ``ru_maxrss``; the launcher
itself is not counted).

Usage:
    python benchmarks/bench_convert.py [--sizes 16,32] [--opt] [--repeat 3] [--s3] [--json]
    python benchmarks/bench_convert.py --processes 1,2 [--sizes 16] [--repeat 3] [--json]
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

from ckptconv.testing import start_s3_server, stop_process

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
                # Stream whole chunks along the first axis: building never holds a whole
                # array, and no chunk is written twice (which would leave dead bytes).
                step = h.chunk_shape[0] if shape else 1
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


def start_s3_bucket() -> tuple[subprocess.Popen, str]:
    """Starts moto's S3 server on a free port of 127.0.0.1 with one bucket.

    Returns:
        The server process and the bucket's ``s3://`` URL; the AWS variables that point the
        conversions at it are set in this process's environment (inherited by the cases).
    """
    import boto3

    proc, endpoint = start_s3_server()
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_REGION="us-east-1",
        AWS_ENDPOINT_URL=endpoint,
    )
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="ckptconv-bench")
    return proc, "s3://ckptconv-bench"


# S3 cases and the local-disk case each is compared with.
S3_CASES = {
    "s3: local -> s3, axis 1->0": "ckptconv axis 1->0",
    "s3: s3 -> local, nnx-to-linen": "ckptconv nnx-to-linen",
    "s3: s3 -> s3, nnx-to-linen": "ckptconv nnx-to-linen",
}


def build_timed(work: pathlib.Path, layers: int, with_opt: bool) -> tuple[pathlib.Path, int]:
    """Builds ``work/linen_<layers>`` and prints its size and build time; returns both."""
    src = work / f"linen_{layers}"
    t = time.perf_counter()
    nbytes = build_checkpoint(src, layers, with_opt)
    print(
        f"built {src}: {nbytes / 1e9:.2f} GB of arrays in {time.perf_counter() - t:.1f} s",
        flush=True,
    )
    return src, nbytes


def bench_size(
    work: pathlib.Path, layers: int, with_opt: bool, repeat: int, s3_root: str | None = None
) -> dict:
    """Builds one checkpoint and runs every case ``repeat`` times (interleaved)."""
    src, nbytes = build_timed(work, layers, with_opt)
    cli = [sys.executable, "-m", "ckptconv.cli"]
    nnx_ref = work / f"nnx_ref_{layers}"
    subprocess.run(
        [*cli, "linen-to-nnx", str(src), str(nnx_ref)], check=True, stdout=subprocess.DEVNULL
    )
    os.sync()
    cases = {
        "cp -r + sync": lambda d: ["sh", "-c", f"cp -r '{src}' '{d}' && sync"],
        "cp -r + fsync files": lambda d: [
            "sh",
            "-c",
            f"cp -r '{src}' '{d}' && find '{d}' -type f -exec sync {{}} +",
        ],
        "naive orbax": lambda d: [sys.executable, "-c", NAIVE, str(src), str(d)],
        "start-up (import only)": lambda d: [sys.executable, "-c", "import ckptconv.cli"],
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
        "ckptconv unscan (decodes)": lambda d: [
            *cli,
            "linen-to-nnx",
            str(src),
            str(d),
            "--unscan-layers",
        ],
        "ckptconv bf16 cast (decodes)": lambda d: [
            *cli,
            "linen-to-nnx",
            str(src),
            str(d),
            "--dtype",
            "bfloat16",
        ],
    }
    if s3_root is not None:
        from ckptconv.io import Location

        nnx_s3 = f"{s3_root}/nnx_ref_{layers}"
        subprocess.run(
            [*cli, "linen-to-nnx", str(src), nnx_s3], check=True, stdout=subprocess.DEVNULL
        )
        cases.update(
            {
                "s3: local -> s3, axis 1->0": lambda d: [
                    *cli,
                    "linen-to-nnx",
                    str(src),
                    f"{s3_root}/{d.name}",
                ],
                "s3: s3 -> local, nnx-to-linen": lambda d: [*cli, "nnx-to-linen", nnx_s3, str(d)],
                "s3: s3 -> s3, nnx-to-linen": lambda d: [
                    *cli,
                    "nnx-to-linen",
                    nnx_s3,
                    f"{s3_root}/{d.name}",
                ],
            }
        )
    results: dict[str, dict] = {}
    for r in range(repeat):
        for name, make in cases.items():
            dst = work / f"out_{layers}_{r}"
            wall, rss = timed(make(dst))
            shutil.rmtree(dst, ignore_errors=True)
            if name in S3_CASES:
                Location.parse(f"{s3_root}/{dst.name}").delete_tree()
            # Untimed: flush what this case left dirty (the naive case does not fsync), so the
            # next case does not pay for writing it back.
            os.sync()
            results.setdefault(name, {"wall": [], "rss": []})
            results[name]["wall"].append(wall)
            results[name]["rss"].append(rss)
    base = min(
        statistics.median(results["cp -r + sync"]["wall"]),
        statistics.median(results["cp -r + fsync files"]["wall"]),
    )
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
    if s3_root is not None:
        Location.parse(nnx_s3).delete_tree()
    return {"layers": layers, "array_bytes": nbytes, "with_opt": with_opt, "cases": rows}


# Multi-process cases (--processes): extra arguments of linen-to-nnx.
PROCESS_CASES = {
    "axis 1->0 (copies)": [],
    "unscan (decodes)": ["--unscan-layers"],
    "bf16 cast (decodes)": ["--dtype", "bfloat16"],
}


def timed_processes(cmd: list[str]) -> tuple[float, list[dict]]:
    """Runs a ``--json`` conversion; returns (wall seconds, each process's JSON summary).

    A launched command prefixes every line with ``[i] ``; a plain one prints one document.
    The command runs under GNU time, which is small: a process forked from this (larger)
    script would report this script's pages in its ``ru_maxrss``.
    """
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "%M", *cmd], capture_output=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.decode()[-2000:]}")
    lines: dict[int, list[str]] = {}
    for line in proc.stdout.decode().splitlines():
        index, sep, rest = line.partition("] ")
        if line.startswith("[") and sep and index[1:].isdigit():
            lines.setdefault(int(index[1:]), []).append(rest)
        else:
            lines.setdefault(0, []).append(line)
    return wall, [json.loads("\n".join(doc)) for _, doc in sorted(lines.items())]


def bench_processes(
    work: pathlib.Path, layers: int, with_opt: bool, repeat: int, processes: list[int]
) -> dict:
    """Times PROCESS_CASES with each process count, ``repeat`` times, interleaved."""
    src, nbytes = build_timed(work, layers, with_opt)
    os.sync()
    cli = [sys.executable, "-m", "ckptconv.cli"]
    results: dict[tuple[str, int], dict] = {}
    for r in range(repeat):
        for name, extra in PROCESS_CASES.items():
            for n in processes:
                dst = work / f"out_{layers}_{r}"
                args = ["linen-to-nnx", str(src), str(dst), *extra, "--json"]
                cmd = [*cli, *args] if n == 1 else [*cli, "launch", "-n", str(n), "--", *args]
                wall, docs = timed_processes(cmd)
                shutil.rmtree(dst, ignore_errors=True)
                os.sync()
                row = results.setdefault((name, n), {"wall": [], "seconds": [], "rss": []})
                row["wall"].append(wall)
                row["seconds"].append(max(d["seconds"] for d in docs))
                row["rss"].append([d["peak_rss_mb"] for d in docs])
    shutil.rmtree(src)
    rows = []
    for (name, n), r in results.items():
        base = statistics.median(results[(name, processes[0])]["wall"])
        med = statistics.median(r["wall"])
        rows.append(
            {
                "case": name,
                "processes": n,
                "median_s": round(med, 3),
                "speedup": round(base / med, 2),
                "conversion_s": round(statistics.median(r["seconds"]), 3),
                "peak_rss_mb": [round(max(x), 1) for x in zip(*r["rss"], strict=True)],
            }
        )
    return {"layers": layers, "array_bytes": nbytes, "with_opt": with_opt, "processes": rows}


def print_processes(rep: dict, repeat: int) -> None:
    """Prints one size's multi-process table."""
    print(
        f"\n{rep['layers']} layers, {rep['array_bytes'] / 1e9:.2f} GB of arrays"
        f"{' (with mu/nu)' if rep['with_opt'] else ''}, median of {repeat}, "
        "ckptconv launch -n P (P=1: plain ckptconv):"
    )
    print(
        f"  {'case':22s} {'P':>2s} {'median s':>9s} {'speed-up':>9s} {'convert s':>10s}  "
        "peak RSS MB per process"
    )
    for row in rep["processes"]:
        rss = ", ".join(f"{x:.0f}" for x in row["peak_rss_mb"])
        print(
            f"  {row['case']:22s} {row['processes']:2d} {row['median_s']:9.3f} "
            f"{row['speedup']:9.2f} {row['conversion_s']:10.3f}  {rss}"
        )


CONVERSIONS = (
    "ckptconv renames only",
    "ckptconv axis 1->0",
    "ckptconv nnx-to-linen",
    "ckptconv unscan (decodes)",
    "ckptconv bf16 cast (decodes)",
)


def print_report(rep: dict, repeat: int) -> None:
    """Prints one size's table and its speed targets."""
    print(
        f"\n{rep['layers']} layers, {rep['array_bytes'] / 1e9:.2f} GB of arrays"
        f"{' (with mu/nu)' if rep['with_opt'] else ''}, median of {repeat}:"
    )
    print(f"  {'case':30s} {'median s':>9s} {'x cp -r':>8s} {'peak RSS MB':>12s}")
    # "x cp -r" is relative to the faster cp -r baseline.
    for name, row in rep["cases"].items():
        print(
            f"  {name:30s} {row['median_s']:9.3f} {row['ratio_to_cp']:8.2f} "
            f"{row['peak_rss_mb']:12.1f}"
        )
    cases = rep["cases"]
    naive = cases["naive orbax"]["median_s"]
    checks = [
        ("renames only <= 1.3x cp -r", cases["ckptconv renames only"]["ratio_to_cp"], 1.3),
        ("axis move 1->0 <= 1.5x cp -r", cases["ckptconv axis 1->0"]["ratio_to_cp"], 1.5),
    ]
    for name in ("ckptconv renames only", "ckptconv axis 1->0"):
        speedup = naive / cases[name]["median_s"]
        checks.append((f"naive orbax / {name[9:]} >= 3x", speedup, None))
    worst = max(cases[n]["peak_rss_mb"] for n in CONVERSIONS)
    checks.append(("peak RSS of every conversion <= 600 MB", worst, 600.0))
    for label, value, limit in checks:
        met = value <= limit if limit is not None else value >= 3.0
        print(f"  target {label}: {value:.2f} {'MET' if met else 'NOT MET'}")
    s3_rows = [n for n in S3_CASES if n in cases]
    if s3_rows:
        print("  object storage (local S3 server) vs the same conversion on the local disk:")
        for name in s3_rows:
            local = S3_CASES[name]
            ratio = cases[name]["median_s"] / cases[local]["median_s"]
            print(
                f"    {name:30s} {cases[name]['median_s']:7.3f} s vs {local} "
                f"{cases[local]['median_s']:.3f} s: {ratio:.2f}x local disk"
            )


def main() -> None:
    """Runs the benchmark; see the module docstring."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="16", help="comma-separated layer counts")
    p.add_argument("--opt", action="store_true", help="add adamw mu/nu (3x the bytes)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--workdir", default=None)
    p.add_argument("--s3", action="store_true", help="also time conversions to/from local S3")
    p.add_argument(
        "--processes", default=None, help="e.g. 1,2: time multi-process conversion instead"
    )
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    work = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="bench-convert-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.processes:
        counts = [int(x) for x in args.processes.split(",")]
        reports = []
        for layers in [int(x) for x in args.sizes.split(",")]:
            reports.append(bench_processes(work, layers, args.opt, args.repeat, counts))
            print_processes(reports[-1], args.repeat)
        if args.json:
            print(json.dumps(reports, indent=1))
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
        return
    reports = []
    server, s3_root = start_s3_bucket() if args.s3 else (None, None)
    try:
        for layers in [int(x) for x in args.sizes.split(",")]:
            rep = bench_size(work, layers, args.opt, args.repeat, s3_root)
            reports.append(rep)
            print_report(rep, args.repeat)
    finally:
        if server is not None:
            stop_process(server, timeout=30)
    if len(reports) > 1:
        a, b = reports[0], reports[-1]
        print(
            f"\npeak RSS from {a['array_bytes'] / 1e9:.2f} GB to {b['array_bytes'] / 1e9:.2f} GB "
            "(target: within 10% when the checkpoint doubles):"
        )
        for name in CONVERSIONS:
            ra, rb = a["cases"][name]["peak_rss_mb"], b["cases"][name]["peak_rss_mb"]
            verdict = "MET" if rb <= 1.1 * ra else "NOT MET"
            print(f"  {name:30s} {ra:7.0f} MB -> {rb:7.0f} MB ({rb / ra:.2f}x) {verdict}")
    finish(reports, args, work)


def finish(report, args, work: pathlib.Path) -> None:
    """Prints ``report`` as JSON when asked and removes a work folder the run made itself."""
    if args.json:
        print(json.dumps(report, indent=1))
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
