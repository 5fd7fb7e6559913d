"""Multi-process conversion: the work split, failure handling, and real processes vs one."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import linen as nn
from flax.training import train_state

from ckptconv.convert import ConvertOptions, convert, make_plan
from ckptconv.convert.distributed import (
    GroupStoppedError,
    ProcessGroup,
    convert_distributed,
    split_work,
)
from ckptconv.convert.launch import launch
from ckptconv.io import CheckpointReader, CheckpointWriter
from ckptconv.testing import assert_same_checkpoint, scanned_maxtext_shapes

pytestmark = pytest.mark.filterwarnings("ignore:Sharding info not provided")

WORKER = pathlib.Path(__file__).with_name("_distributed_worker.py")
E, L, M, V = 16, 4, 64, 24
LARGEST = ("params", "params", "decoder", "layers", "mlp", "wi", "kernel")
SMALL_SLABS = 2048
# name: (ConvertOptions fields, slab bytes). Copies, then casts (decoded slabs), then
# unstacking (slabs of a stacked array split among layers).
CASES = {
    "copy": ({}, 64 << 20),
    "cast": ({"dtype": "bfloat16"}, SMALL_SLABS),
    "unscan": ({"scan_layers": False}, SMALL_SLABS),
}


class FakeKeyValue:
    """jax.distributed's key-value client, in memory, shared by threads standing for processes."""

    def __init__(self) -> None:
        self.data: dict[str, str] = {}
        self.lock = threading.Lock()

    def key_value_set(self, key: str, value: str, allow_overwrite: bool = False) -> None:
        with self.lock:
            if key in self.data and not allow_overwrite:
                raise RuntimeError(f"ALREADY_EXISTS: {key}")
            self.data[key] = value

    def key_value_dir_get(self, key: str) -> list[tuple[str, str]]:
        with self.lock:
            return [(k, v) for k, v in self.data.items() if k.startswith(key)]


def in_threads(n: int, fn, *, timeout: float = 30.0) -> list:
    """Runs ``fn(group)`` for ``n`` groups sharing one fake store; returns results or errors."""
    kv = FakeKeyValue()
    groups = [ProcessGroup(kv, i, n, namespace="test", timeout=timeout) for i in range(n)]

    def call(group):
        try:
            return fn(group)
        except Exception as e:  # noqa: BLE001 - returned for the test to inspect
            return e

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(call, groups))


def assert_restores_with_orbax(path) -> None:
    """Plain Orbax (one process, no target) restores every array with the stored bytes."""
    restored = ocp.PyTreeCheckpointer().restore(str(path))
    reader = CheckpointReader(path)
    for key, leaf in reader.leaves().items():
        value = restored
        for k in key:
            value = value[int(k)] if isinstance(value, list) else value[k]
        if not leaf.empty:
            if jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
                value = jax.random.key_data(value)  # stored as its uint32 key data
            got, want = np.asarray(value), reader.read(key)
            assert got.dtype == want.dtype and got.tobytes() == want.tobytes(), key


def assert_nothing_committed(folder: pathlib.Path, dst: pathlib.Path) -> None:
    assert not dst.exists()
    assert not list(folder.rglob("commit_success.txt"))


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> pathlib.Path:
    """A MaxText-layout scanned checkpoint, many chunks per array; the mlp kernel is largest."""
    path = tmp_path_factory.mktemp("synthetic") / "linen"
    rng = np.random.default_rng(0)
    shapes = scanned_maxtext_shapes(emb=E, layers=L, mlp=M, vocab=V)
    with CheckpointWriter(path, chunk_bytes=1024, custom_metadata={"scan_layers": True}) as w:
        for rel, shape in shapes.items():
            w.write(("params", "params", *rel), rng.standard_normal(shape).astype(np.float32))
        w.write(("step",), np.array(7, np.int32))
    return path


@pytest.fixture(scope="module")
def flax_state(tmp_path_factory) -> pathlib.Path:
    """A Flax TrainState (MLP, AdamW) saved by ocp.StandardCheckpointer (zarr2)."""

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(4)(nn.relu(nn.Dense(8)(x)))

    model = MLP()
    params = model.init(jax.random.key(0), jnp.ones((1, 3)))["params"]
    state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=optax.adamw(1e-3))
    path = tmp_path_factory.mktemp("flax") / "state"
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(path, state)
    ckptr.wait_until_finished()
    return path


@pytest.fixture(scope="module")
def sources(maxtext_fixtures, synthetic, flax_state) -> dict[str, pathlib.Path]:
    return {"A": maxtext_fixtures / "A" / "ckpt", "flax": flax_state, "synthetic": synthetic}


@pytest.fixture(scope="module")
def reference(sources, tmp_path_factory):
    """The single-process conversion of (source, case), made once."""
    made: dict[tuple[str, str], pathlib.Path] = {}

    def get(source: str, case: str) -> pathlib.Path:
        if (source, case) not in made:
            out = tmp_path_factory.mktemp("ref") / f"{source}-{case}"
            convert(sources[source], out, options=ConvertOptions(**CASES[case][0]))
            made[source, case] = out
        return made[source, case]

    return get


# --- the split -------------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(CASES))
def test_split_is_deterministic_balanced_and_splits_the_largest_array(synthetic, case):
    reader = CheckpointReader(synthetic)
    plan = make_plan(reader, "linen-to-nnx", ConvertOptions(**CASES[case][0]))
    slab_bytes = CASES[case][1]
    one = split_work(plan, reader, 1, slab_bytes=slab_bytes)
    assert {p.process for t in one for p in t.pieces} == {0}
    for n in (2, 3, 4):
        tasks = split_work(plan, reader, n, slab_bytes=slab_bytes)
        again = split_work(plan, CheckpointReader(synthetic), n, slab_bytes=slab_bytes)
        assert tasks == again
        assert [t.leaves for t in tasks] == [t.leaves for t in one]
        for kinds in (("copy",), ("decode", "layers")):
            pieces = [p for t in tasks if t.kind in kinds for p in t.pieces]
            if not pieces:
                continue
            total = sum(p.nbytes for p in pieces)
            largest = max(p.nbytes for p in pieces)
            for i in range(n):
                share = sum(p.nbytes for p in pieces if p.process == i)
                assert abs(share - total / n) <= largest, (kinds, i, share, total)
        wi = [t for t in tasks if any("wi" in leaf.path for leaf in t.leaves)]
        assert len({p.process for t in wi for p in t.pieces}) >= 2, "the largest array is split"


# --- several processes as threads (fast): same bytes as one process ----------------------------


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("source", ["A", "flax", "synthetic"])
def test_threads_write_what_one_process_writes(sources, reference, tmp_path, source, case, n):
    options, slab_bytes = CASES[case]
    dst = tmp_path / "out"
    results = in_threads(
        n,
        lambda g: convert_distributed(
            sources[source], dst, group=g, options=ConvertOptions(**options), slab_bytes=slab_bytes
        ),
    )
    for r in results:
        if isinstance(r, Exception):
            raise r
    assert sum(r.bytes_written for r in results) == results[0].plan.nbytes
    assert_same_checkpoint(reference(source, case), dst)
    folders = sorted(p.name for p in dst.iterdir() if p.name.startswith("ocdbt.process_"))
    assert folders == [f"ocdbt.process_{i}" for i in range(n)]
    assert not [p for p in dst.iterdir() if p.name.startswith(".ckptconv")]
    assert not [p for p in tmp_path.iterdir() if p.name != "out"]


def test_failure_in_one_thread_stops_all_and_commits_nothing(synthetic, tmp_path):
    dst = tmp_path / "out"

    def run(group):
        def progress(done, total, path):
            if group.process_id == 1:
                raise RuntimeError("disk on fire")
            time.sleep(0.05)

        return convert_distributed(synthetic, dst, group=group, progress=progress)

    results = in_threads(3, run)
    assert isinstance(results[1], RuntimeError)
    for i in (0, 2):
        assert isinstance(results[i], GroupStoppedError)
        assert "process 1 of 3 failed: RuntimeError: disk on fire" in str(results[i])
        assert results[i].exit_code == 3
    assert_nothing_committed(tmp_path, dst)
    assert not list(tmp_path.iterdir()), "the unfinished folder is deleted"


def test_barrier_times_out_naming_the_missing_process():
    kv = FakeKeyValue()
    group = ProcessGroup(kv, 0, 3, namespace="t", timeout=0.5)
    kv.key_value_set("t/barrier/written/1", "1")
    start = time.monotonic()
    with pytest.raises(GroupStoppedError, match=r"barrier 'written'.*waiting for process 2$"):
        group.barrier("written")
    assert time.monotonic() - start < 5


def test_barrier_waits_while_others_make_progress():
    kv = FakeKeyValue()
    other = ProcessGroup(kv, 1, 2, namespace="t")
    events = []
    polls = 12  # at least 12 * 0.05 s of polling: longer than the 0.1 s timeout below

    class PeerStepsOnEachPoll:
        """Process 0's client: before each of its polls, process 1 takes one step.

        Process 1 reports progress on each of the first ``polls`` polls, then arrives: the
        barrier must outlast its timeout because progress is made, and return only after
        process 1 arrives. Steps follow polls, so the order does not depend on the clock.
        """

        def key_value_set(self, *args, **kwargs):
            kv.key_value_set(*args, **kwargs)

        def key_value_dir_get(self, key):
            step = sum(e.startswith("progress") for e in events)
            if step < polls:
                other.report_progress()
                events.append(f"progress {step}")
            elif "peer arrives" not in events:
                events.append("peer arrives")
                other.barrier("done")  # process 0 is there already: returns at once
            return kv.key_value_dir_get(key)

    group = ProcessGroup(PeerStepsOnEachPoll(), 0, 2, namespace="t", timeout=0.1)
    group.barrier("done")  # must neither time out (progress is made) nor return early
    events.append("barrier returned")
    assert events == [f"progress {i}" for i in range(polls)] + ["peer arrives", "barrier returned"]


def test_existing_destination_is_refused_by_every_process(sources, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    results = in_threads(2, lambda g: convert_distributed(sources["A"], dst, group=g))
    assert all("--force" in str(r) and not isinstance(r, GroupStoppedError) for r in results)
    assert list(tmp_path.iterdir()) == [dst]


# --- real processes ----------------------------------------------------------------------------


def cli(*args, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "ckptconv.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize("n", [2, 4])
def test_launch_cli_writes_what_one_process_writes(sources, reference, tmp_path, n):
    dst = tmp_path / "out"
    proc = cli("launch", "-n", n, "--", "linen-to-nnx", sources["A"], dst)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for i in range(n):
        assert f"[{i}] process {i} of {n}: wrote {dst}" in proc.stdout
    assert_same_checkpoint(reference("A", "copy"), dst)
    assert_restores_with_orbax(dst)
    assert (dst / f"ocdbt.process_{n - 1}" / "manifest.ocdbt").exists()


@pytest.mark.parametrize("n", [2, 4])
def test_launched_processes_convert_every_kind_of_source(sources, reference, tmp_path, n):
    jobs = [
        ("A", "cast"),
        ("flax", "copy"),
        ("synthetic", "unscan"),
        ("synthetic", "cast"),
    ]
    spec = {
        "jobs": [
            {
                "src": str(sources[s]),
                "dst": str(tmp_path / f"{s}-{c}"),
                "options": CASES[c][0],
                "slab_bytes": CASES[c][1],
            }
            for s, c in jobs
        ],
        # With 2 processes, also restore one output sharded over both processes' devices.
        "restore": str(tmp_path / "synthetic-unscan") if n == 2 else None,
    }
    err = _Lines()
    status = launch(
        n, [json.dumps(spec)], command=[sys.executable, str(WORKER)], stdout=err, stderr=err
    )
    assert status == 0, err.text[-3000:]
    for s, c in jobs:
        assert_same_checkpoint(reference(s, c), tmp_path / f"{s}-{c}")
        assert_restores_with_orbax(tmp_path / f"{s}-{c}")
    if n == 2:
        assert "[0] restored shards:" in err.text and "[1] restored shards:" in err.text


class _Lines:
    """A text stream that keeps what is written (launch writes from several threads)."""

    def __init__(self) -> None:
        self.text = ""
        self.lock = threading.Lock()

    def write(self, s: str) -> None:
        with self.lock:
            self.text += s

    def flush(self) -> None:
        pass


def test_killed_process_stops_launch_and_rerun_succeeds(synthetic, reference, tmp_path):
    dst = tmp_path / "out"
    spec = {
        "jobs": [{"src": str(synthetic), "dst": str(dst), "options": {"dtype": "bfloat16"}}],
        "victim": 2,
        "mode": "kill",
        "delay": 0.5,
    }
    out = _Lines()
    start = time.monotonic()
    status = launch(
        4, [json.dumps(spec)], command=[sys.executable, str(WORKER)], stdout=out, stderr=out
    )
    elapsed = time.monotonic() - start
    assert status == 128 + 9, out.text[-3000:]
    assert elapsed < 30
    last = out.text.strip().splitlines()[-1]
    assert last == (
        "ckptconv launch: error: process 2 of 4 was killed by SIGKILL first; "
        "the others were stopped"
    )
    assert_nothing_committed(tmp_path, dst)
    args = ("linen-to-nnx", synthetic, dst, "--force", "--dtype", "bfloat16")
    proc = cli("launch", "-n", 4, "--", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_checkpoint(reference("synthetic", "cast"), dst)


def test_failed_process_is_named_by_the_others(synthetic, tmp_path):
    dst = tmp_path / "out"
    spec = {
        "jobs": [{"src": str(synthetic), "dst": str(dst), "slab_bytes": SMALL_SLABS}],
        "victim": 1,
        "mode": "raise",
        "delay": 0.2,
    }
    out = _Lines()
    status = launch(
        2, [json.dumps(spec)], command=[sys.executable, str(WORKER)], stdout=out, stderr=out
    )
    assert status == 1, out.text[-3000:]
    assert "[0] ckptconv: error: process 1 of 2 failed: RuntimeError: injected failure" in out.text
    assert "process 1 of 2 exited with status 1 first" in out.text
    assert_nothing_committed(tmp_path, dst)
    assert not list(tmp_path.iterdir())


def test_launch_refuses_other_commands(tmp_path):
    proc = cli("launch", "-n", 2, "--", "inspect", tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "linen-to-nnx, nnx-to-linen" in proc.stderr


def test_one_process_is_a_plain_conversion(sources, reference, tmp_path):
    dst = tmp_path / "out"
    proc = cli("linen-to-nnx", sources["A"], dst, "--num-processes", 1, "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["cloned"] is True  # the single-process fast path
    assert_same_checkpoint(reference("A", "copy"), dst)
