"""Helpers shared by ckptconv's tests and benchmarks (like ``numpy.testing``).

- :func:`start_s3_server` / :func:`stop_process`: a local S3-compatible server (moto) on
  127.0.0.1, for the object-storage tests and the ``--s3`` benchmark;
- :data:`TINY_CONFIG`: the sizes of a tiny float32 reference decoder;
- :func:`random_linen_params`: a Linen params tree of random values, without compiling
  initializers;
- :func:`scanned_maxtext_shapes`: the params of a small scanned MaxText-layout decoder;
- :func:`assert_same_checkpoint`: two checkpoints hold the same leaves and the same bytes;
- :func:`edited_copy`: a copy of a checkpoint with some arrays changed;
- :func:`run_cli` / :func:`assert_one_line_error`: run the ``ckptconv`` command in-process and
  check its one-line ``ckptconv: error: ...`` messages.

Limits: these are test utilities; they favour plain checks and clear failures over speed, and
:func:`start_s3_server` needs ``moto[server]`` (a test dependency, ``pip install -e '.[test]'``).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

TINY_CONFIG: dict[str, Any] = dict(
    emb_dim=32,
    num_query_heads=4,
    num_kv_heads=2,
    head_dim=8,
    mlp_dim=64,
    num_decoder_layers=2,
    vocab_size=64,
    dtype="float32",
    weight_dtype="float32",
    max_target_length=24,
    max_prefill_predict_length=8,
)
"""``ModelConfig`` fields of a tiny float32 reference decoder (fixture-B-like sizes)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (closed again at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_s3_server(*, timeout: float = 30.0) -> tuple[subprocess.Popen, str]:
    """Starts ``moto.server`` on a free port of 127.0.0.1 and waits until it accepts connections.

    Moto accepts any credentials until its IAM authentication is turned on (the caller's
    choice). Stop it with :func:`stop_process`.

    Args:
        timeout: Seconds to wait for the server to listen.

    Returns:
        The server process and its endpoint URL (``http://127.0.0.1:<port>``).

    Raises:
        RuntimeError: The server exited or did not listen within ``timeout``.
    """
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, endpoint
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                stop_process(proc)
                raise RuntimeError(f"moto server did not start on {endpoint}") from None
            time.sleep(0.1)


def stop_process(proc: subprocess.Popen, *, timeout: float = 10.0) -> None:
    """Terminates ``proc`` and waits for it; kills it if it outlives ``timeout`` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def random_linen_params(config: Any, seed: int = 0) -> dict[str, Any]:
    """A Linen params tree of random values for ``config``, fast.

    Shapes come from ``jax.eval_shape`` of ``init`` (nothing is compiled); values from numpy:
    norm scales near 1, kernels scaled by ``1 / sqrt(fan_in)``.

    Args:
        config: A :class:`~ckptconv.models.ModelConfig`.
        seed: The numpy seed; the same seed gives the same values.

    Returns:
        The ``params`` tree of :class:`ckptconv.models.linen.Transformer`, as JAX arrays.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    from .models import linen

    tokens = jnp.zeros((1, 2), jnp.int32)
    shapes = jax.eval_shape(linen.Transformer(config).init, jax.random.key(0), tokens, tokens)
    rng = np.random.default_rng(seed)

    def value(path, s):
        noise = rng.standard_normal(s.shape).astype(np.float32)
        if jax.tree_util.keystr(path).endswith("['scale']"):
            return jnp.asarray(1 + 0.1 * noise, s.dtype)
        return jnp.asarray(noise / np.sqrt(s.shape[0]), s.dtype)

    return jax.tree_util.tree_map_with_path(value, shapes["params"])


def scanned_maxtext_shapes(
    *, emb: int, layers: int, mlp: int, vocab: int
) -> dict[tuple[str, ...], tuple[int, ...]]:
    """The params of a small scanned MaxText-layout decoder (layers at axis 1), by shape.

    Args:
        emb: The embedding size.
        layers: The number of stacked layers.
        mlp: The MLP's hidden size.
        vocab: The vocabulary size.

    Returns:
        Each param's shape, by its path below ``params/params``: an embedding, a final norm and,
        stacked on axis 1, an MLP kernel, a 4-d attention-output kernel and a norm scale.
    """
    return {
        ("token_embedder", "embedding"): (vocab, emb),
        ("decoder", "decoder_norm", "scale"): (emb,),
        ("decoder", "layers", "mlp", "wi", "kernel"): (emb, layers, mlp),
        ("decoder", "layers", "attn", "out", "kernel"): (2, layers, 4, emb),
        ("decoder", "layers", "norm", "scale"): (emb, layers),
    }


def assert_same_checkpoint(a: Any, b: Any) -> None:
    """Asserts the same leaves (paths, shapes, dtypes, key types) and the same bytes in each.

    Args:
        a: A checkpoint location (path or URL).
        b: Another.

    Raises:
        AssertionError: naming the first leaf that differs.
    """
    from .io import CheckpointReader

    ra, rb = CheckpointReader(a), CheckpointReader(b)
    assert ra.leaves() == rb.leaves()
    for path, leaf in ra.leaves().items():
        assert ra.key_types(path) == rb.key_types(path), path
        if not leaf.empty:
            x, y = ra.read(path), rb.read(path)
            assert x.dtype == y.dtype and x.tobytes() == y.tobytes(), path


def edited_copy(src: Any, dst: Any, edit: Callable[[tuple, Any], Any]) -> Any:
    """Copies checkpoint ``src`` to ``dst`` with each array replaced by ``edit(path, array)``.

    Empty leaves, key types, the random-key implementation of key leaves, the custom metadata
    and the zarr version are kept.

    Args:
        src: A checkpoint location (path or URL).
        dst: Where to write the copy.
        edit: Given a leaf's path and its array (a numpy array it must not change in place),
            returns the array to write.

    Returns:
        ``dst``.
    """
    from .io import CheckpointReader, CheckpointWriter

    reader = CheckpointReader(src)
    with CheckpointWriter(
        dst, use_zarr3=reader.use_zarr3, custom_metadata=reader.custom_metadata
    ) as writer:
        for p, leaf in reader.leaves().items():
            if leaf.empty:
                writer.write_empty(p, key_types=reader.key_types(p))
                continue
            ext = reader.ext_metadata(p) or {}
            writer.write(
                p,
                edit(p, reader.read(p)),
                key_types=reader.key_types(p),
                random_key_impl=ext.get("random_key_impl"),
            )
    return dst


def restore_target(reader: Any, sharding: Callable[[tuple], Any] | None = None) -> dict:
    """The nested ``jax.ShapeDtypeStruct`` target Orbax restores a checkpoint into.

    Args:
        reader: A ``CheckpointReader`` (or source) of the checkpoint.
        sharding: ``sharding(path)`` gives each array's sharding; None: no sharding.

    Returns:
        ``{key: ... {key: ShapeDtypeStruct}}`` of every non-empty leaf.
    """
    import jax

    from .io import numpy_dtype

    target: dict = {}
    for path, leaf in reader.leaves().items():
        if leaf.empty:
            continue
        node = target
        for k in path[:-1]:
            node = node.setdefault(k, {})
        shard = None if sharding is None else sharding(path)
        node[path[-1]] = jax.ShapeDtypeStruct(leaf.shape, numpy_dtype(leaf.dtype), sharding=shard)
    return target


def as_numpy(x: Any) -> Any:
    """An array's values as numpy; typed PRNG keys (Orbax restores them so) as their key data."""
    import jax
    import numpy as np

    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    return np.asarray(x)


def tree_get(tree: Any, path: tuple) -> Any:
    """The node of a restored tree at a checkpoint key path (list entries by their index)."""
    for k in path:
        tree = tree[int(k) if isinstance(tree, list) else k]
    return tree


def run_cli(*args: Any) -> tuple[int, str, str]:
    """Runs ``ckptconv ARGS...`` in-process; returns ``(exit_code, stdout, stderr)``."""
    from click.testing import CliRunner

    from .cli import main

    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def assert_one_line_error(code: int, err: str, *needles: str) -> str:
    """Asserts exit code 2 and one ``ckptconv: error: ...`` line holding every needle.

    Returns:
        The error line.
    """
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ckptconv: error: "), err
    assert "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]
