"""``ckptconv demo``: the main job end to end on an embedded default, in a temporary folder.

1. Train the reference Linen decoder for a few adamw steps (a Flax ``TrainState``).
2. Save it with Orbax, as a training job would.
3. Convert it to NNX with ckptconv (streamed, atomic).
4. Restore it with plain Orbax into the NNX twin and an ``nnx.Optimizer``.
5. Check the NNX logits equal the Linen logits bit for bit.
6. Convert back to Linen and check the round trip is bit-exact.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import tempfile
import time
from collections.abc import Callable

import numpy as np

from .convert import compare, convert
from .convert.run import peak_rss_bytes
from .errors import CkptconvError

DEMO_CONFIG = {
    "emb_dim": 64,
    "num_query_heads": 4,
    "num_kv_heads": 2,
    "head_dim": 16,
    "mlp_dim": 128,
    "num_decoder_layers": 2,
    "vocab_size": 256,
    "scan_layers": True,
    "param_scan_axis": 1,
    "nnx_scan_axis": 0,
    "dtype": "float32",
    "weight_dtype": "float32",
    "max_target_length": 64,
    "max_prefill_predict_length": 16,
}


@dataclasses.dataclass(frozen=True)
class DemoResult:
    """What the demo measured.

    Attributes:
        linen_bytes: size of the saved Linen checkpoint folder.
        nnx_bytes: size of the converted NNX checkpoint folder.
        seconds: each step's wall time, in the order the steps ran.
        max_logit_diff: the largest |NNX logit - Linen logit| (0.0 expected).
        round_trip_bit_exact: whether Linen -> NNX -> Linen gave back the same bytes.
        peak_rss_mb: the process's peak resident memory.
        step_bytes: the bytes each step wrote or read, for the steps that move bytes (shown
            in :meth:`table`, not part of :meth:`to_dict`).
    """

    linen_bytes: int
    nnx_bytes: int
    seconds: dict[str, float]
    max_logit_diff: float
    round_trip_bit_exact: bool
    peak_rss_mb: float
    step_bytes: dict[str, int] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict:
        """Returns a JSON-serialisable summary (what ``ckptconv demo --json`` prints)."""
        out = dataclasses.asdict(self)
        del out["step_bytes"]
        return out

    def table(self) -> str:
        """The summary as an aligned table (step, seconds, bytes), then the peak RSS line.

        Example:
            >>> print(result.table())  # doctest: +SKIP
            step          seconds   bytes
            train           1.235       -
            linen_to_nnx    0.012  123456
            peak RSS: 321.5 MB
        """
        rows = [("step", "seconds", "bytes")] + [
            (name, f"{secs:.3f}", str(self.step_bytes.get(name, "-")))
            for name, secs in self.seconds.items()
        ]
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = [
            f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}".rstrip() for r in rows
        ]
        lines.append(f"peak RSS: {self.peak_rss_mb} MB")
        return "\n".join(lines)


def _dir_bytes(path: pathlib.Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _train_linen(config, steps: int):
    import jax
    import jax.numpy as jnp
    import optax
    from flax.training import train_state

    from .models import linen as linen_models

    model = linen_models.Transformer(config)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, (4, 16)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(16, dtype=jnp.int32), (4, 16))
    variables = model.init(jax.random.key(0), tokens, positions)
    state = train_state.TrainState.create(
        apply_fn=model.apply, params=variables["params"], tx=optax.adamw(1e-2)
    )

    def loss_fn(params):
        logits = state.apply_fn({"params": params}, tokens[:, :-1], positions[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    @jax.jit
    def step(state):
        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(grads=grads), loss

    for _ in range(steps):
        state, _ = step(state)
    return model, state, tokens, positions


def _save_with_orbax(state, path: pathlib.Path, times: dict[str, float], say) -> None:
    """Step 2: saves the Linen ``TrainState`` with Orbax, as a training job would."""
    import orbax.checkpoint as ocp

    t = time.perf_counter()
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(path, state)
    ckptr.wait_until_finished()
    times["orbax_save"] = time.perf_counter() - t
    say(f"saved the Linen TrainState with Orbax: {path} ({_dir_bytes(path)} bytes)")


def _restore_and_check_logits(config, nnx_path, linen, inputs, times, say) -> float:
    """Steps 4 and 5: restores into the NNX twin and an optimizer; checks the logits.

    Args:
        config: the model config.
        nnx_path: the converted checkpoint.
        linen: ``(Linen model, its TrainState)``.
        inputs: ``(tokens, positions)``.
        times: receives ``nnx_restore``.
        say: where progress lines go.

    Returns:
        The max |NNX logit - Linen logit| (always 0.0: anything else raises).

    Raises:
        CkptconvError: the optimizer step or the logits differ.
    """
    import jax
    import optax
    from flax import nnx

    from .models import nnx as nnx_models
    from .nnx_restore import restore

    linen_model, state = linen
    tokens, positions = inputs
    t = time.perf_counter()
    model = nnx_models.Transformer(config, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.Param)
    restore(nnx_path, model, optimizer)
    times["nnx_restore"] = time.perf_counter() - t
    if int(optimizer.step.value) != int(state.step):
        raise CkptconvError(f"optimizer step {int(optimizer.step.value)} != {int(state.step)}")

    linen_logits = np.asarray(linen_model.apply({"params": state.params}, tokens, positions))
    nnx_logits = np.asarray(jax.jit(lambda m, t, p: m(t, p))(model, tokens, positions))
    diff = float(np.max(np.abs(linen_logits - nnx_logits)))
    say(
        f"restored with plain Orbax into the NNX twin and nnx.Optimizer (step "
        f"{int(optimizer.step.value)}): max |logit diff| vs Linen = {diff:g}"
    )
    if diff != 0.0:
        raise CkptconvError(f"NNX logits differ from Linen logits by {diff:g}")
    return diff


def _convert_back(nnx_path, linen_path, back_path, times, say):
    """Step 6: converts back to Linen; returns the result and the comparison with the original.

    Raises:
        CkptconvError: the round trip is not bit-exact.
    """
    back = convert(nnx_path, back_path, direction="nnx-to-linen")
    times["nnx_to_linen"] = back.seconds
    report = compare(linen_path, back_path)
    say(
        f"converted back to Linen: {back_path}; compare: {len(report.leaves)} leaves, "
        f"{'bit-exact' if report.bit_exact else 'DIFFERENT'}"
    )
    if not report.bit_exact:
        raise CkptconvError(f"round trip differs: {report.to_dict()}")
    return back, report


def run_demo(
    workdir: str | os.PathLike | None = None,
    *,
    steps: int = 3,
    say: Callable[[str], None] = print,
) -> DemoResult:
    """Runs the demo and returns what it measured.

    Args:
        workdir: folder for the checkpoints; a temporary folder (removed after) when None.
        steps: adamw steps to train before saving.
        say: where progress lines go.

    Returns:
        Sizes, times, the max logit difference (0.0 expected) and the round-trip verdict.

    Raises:
        CkptconvError: when any check fails.
    """
    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="ckptconv-demo-") as tmp:
            return run_demo(tmp, steps=steps, say=say)
    from .models import ModelConfig

    root = pathlib.Path(workdir).absolute()
    config = ModelConfig(**DEMO_CONFIG)
    times: dict[str, float] = {}

    t = time.perf_counter()
    linen_model, state, tokens, positions = _train_linen(config, steps)
    times["train"] = time.perf_counter() - t
    say(
        f"trained the reference Linen decoder {steps} adamw steps ({config.num_decoder_layers} "
        f"scanned layers, emb {config.emb_dim}, vocab {config.vocab_size})"
    )

    linen_path = root / "linen"
    _save_with_orbax(state, linen_path, times, say)

    nnx_path = root / "nnx"
    result = convert(linen_path, nnx_path, direction="linen-to-nnx")
    times["linen_to_nnx"] = result.seconds
    say(
        f"converted to NNX: {nnx_path} ({result.bytes_written} array bytes, "
        f"{result.seconds:.3f} s, {result.plan.source_layout} -> nnx)"
    )

    diff = _restore_and_check_logits(
        config, nnx_path, (linen_model, state), (tokens, positions), times, say
    )
    back, report = _convert_back(nnx_path, linen_path, root / "linen_again", times, say)

    linen_bytes, nnx_bytes = _dir_bytes(linen_path), _dir_bytes(nnx_path)
    out = DemoResult(
        linen_bytes=linen_bytes,
        nnx_bytes=nnx_bytes,
        seconds={k: round(v, 4) for k, v in times.items()},
        step_bytes={
            "orbax_save": linen_bytes,
            "linen_to_nnx": result.bytes_written,
            "nnx_restore": nnx_bytes,
            "nnx_to_linen": back.bytes_written,
        },
        max_logit_diff=diff,
        round_trip_bit_exact=report.bit_exact,
        peak_rss_mb=round(peak_rss_bytes() / 2**20, 1),
    )
    say(out.table())
    return out
