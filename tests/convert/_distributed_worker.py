"""One process of a multi-process conversion in tests; ckptconv.convert.launch starts N of them.

Usage: python _distributed_worker.py SPEC_JSON, where the spec holds ``jobs`` (each ``src``,
``dst``, and optionally ``options`` for ConvertOptions, ``slab_bytes``, ``force``), and
optionally ``victim`` and ``mode`` ("kill": that process kills itself with SIGKILL after its
first task; "raise": it raises there), ``delay`` (seconds every process sleeps after each
task) and ``restore`` (a checkpoint every process then restores with Orbax, sharded over all
processes' devices, checking its own shards). Exits as the CLI does: 2 for an error of its
own, 3 when another process failed.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import numpy as np


def sharded_restore(path: str) -> int:
    """Restores every array sharded over the devices of all processes; checks local shards."""
    import jax
    import orbax.checkpoint as ocp
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from ckptconv.io import CheckpointReader

    reader = CheckpointReader(path)
    mesh = Mesh(np.array(jax.devices()), ("x",))
    size = mesh.devices.size
    target: dict = {}
    arrays = {}
    for key, leaf in reader.leaves().items():
        if leaf.empty:
            continue
        arrays[key] = reader.read(key)
        spec = P("x") if leaf.shape and leaf.shape[0] % size == 0 else P()
        node = target
        for k in key[:-1]:
            node = node.setdefault(k, {})
        node[key[-1]] = jax.ShapeDtypeStruct(
            leaf.shape, arrays[key].dtype, sharding=NamedSharding(mesh, spec)
        )
    restored = ocp.StandardCheckpointer().restore(path, target)
    checked = 0
    for key, expected in arrays.items():
        value = restored
        for k in key:
            value = value[k]
        for shard in value.addressable_shards:
            got = np.asarray(shard.data)
            want = expected[shard.index]
            assert got.dtype == want.dtype and got.tobytes() == want.tobytes(), key
            checked += 1
    return checked


def main() -> None:
    spec = json.loads(sys.argv[1])
    from ckptconv.convert import ConvertOptions
    from ckptconv.convert.distributed import convert_distributed, initialize
    from ckptconv.errors import CkptconvError

    rank = int(os.environ["JAX_PROCESS_ID"])
    victim, mode, delay = spec.get("victim"), spec.get("mode"), spec.get("delay", 0.0)

    def progress(done: int, total: int, path: str) -> None:
        if rank == victim and mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if rank == victim and mode == "raise":
            raise RuntimeError(f"injected failure after {path}")
        time.sleep(delay)

    try:
        group = initialize(timeout=spec.get("timeout", 60.0))
        for job in spec["jobs"]:
            convert_distributed(
                job["src"],
                job["dst"],
                group=group,
                options=ConvertOptions(**job.get("options", {})),
                slab_bytes=job.get("slab_bytes", 64 << 20),
                force=job.get("force", False),
                progress=progress,
            )
        if spec.get("restore"):
            print(f"restored shards: {sharded_restore(spec['restore'])}", flush=True)
    except CkptconvError as e:
        print(f"ckptconv: error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
        sys.exit(getattr(e, "exit_code", 2))
    print(f"process {rank}: ok", flush=True)


if __name__ == "__main__":
    main()
