"""Decode throughput of the NNX engine, a Linen engine built the same way, and the bare step.

All three run in one process on the same random float32 weights and the same 8 slots:

* ``nnx``: :class:`ckptconv.engine.Engine` (``nnx.merge`` inside jit, greedy sampling, per-slot
  bookkeeping, decode state donated, one ``[slots, 3]`` result fetched per step);
* ``linen``: the same engine class with its backend (the model calls) swapped for the Linen
  ``Transformer``'s ``apply`` with a mutable ``cache`` collection, jitted, sharded and donated
  identically;
* ``bare``: the jitted NNX forward step alone (tokens in, logits and cache out, cache donated;
  no sampling or bookkeeping), the lower bound.

Each generate loop runs ``--steps`` steps after its programs are compiled; the three loops
alternate for ``--rounds`` rounds. The best round's tokens/s is reported (as ``timeit`` reports
the minimum: on a shared machine the slower rounds measure the other load), with ratios to
``bare`` and NNX/Linen; ``--json`` also gives the medians. Prefill latency (compiled, best of
``--repeat``) is printed per bucket.

The default model is about 100M parameters: emb 768, 12 layers, 12 heads of 64, MLP 2048,
vocabulary 8192, float32. ``--small`` runs a model of about 1M parameters for a quick check.
The Linen model keeps MaxText's layer axis 1 for its stacked params (``--param-scan-axis``);
the NNX twin stacks them at axis 0.

Usage:
    python benchmarks/bench_engine.py [--small] [--steps 16] [--rounds 6] [--repeat 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from ckptconv.engine import Engine
from ckptconv.engine import params as P
from ckptconv.engine.state import DecodeState
from ckptconv.models import ModelConfig, linen
from ckptconv.models.reference_adapter import STALE_AR
from ckptconv.sharding import ar_kv_cache_partition_specs, named_shardings
from ckptconv.testing import random_linen_params

SLOTS = 8
# ModelConfig sizes of the two models: "full" is about 100M parameters, "small" about 1M.
SIZE_FIELDS = (
    "emb_dim num_query_heads num_kv_heads head_dim mlp_dim num_decoder_layers vocab_size "
    "max_target_length max_prefill_predict_length"
).split()
SIZES = {
    "full": (768, 12, 12, 64, 2048, 12, 8192, 512, 128),
    "small": (128, 4, 4, 32, 512, 4, 1024, 256, 64),
}


class LinenBackend:
    """The Linen model's ``apply`` (mutable ``cache`` collection) as an engine backend.

    It has the traced bodies of :mod:`ckptconv.engine.backends` (``init_cache``, ``prefill``,
    ``insert``, ``generate``); the Linen cache dict has the NNX cache's paths, so the NNX
    model's slot axes and partition specs apply to it.
    """

    def __init__(self, config: ModelConfig, slots: int, slot_axes: dict[tuple[str, ...], int]):
        self._model = linen.Transformer(config)
        self._slot_axes = slot_axes
        self._ar_cache = jax.eval_shape(lambda: linen.init_cache(config, slots))
        self._prefill_cache = jax.eval_shape(lambda: linen.init_cache(config, 1, "prefill"))

    def init_cache(self) -> Any:
        return _zeros(self._ar_cache)

    def prefill(self, params, tokens, true_length):
        index = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
        segments = (index < true_length).astype(jnp.int32)
        logits, variables = self._model.apply(
            {"params": params, "cache": _zeros(self._prefill_cache)},
            tokens,
            index,
            segments,
            model_mode="prefill",
            mutable=["cache"],
        )
        flat = {
            p: v
            for p, v in traverse_util.flatten_dict(variables["cache"]).items()
            if p[-1] not in STALE_AR
        }
        return logits, traverse_util.unflatten_dict(flat)

    def insert(self, prefix_cache, cache, slot):
        cache = traverse_util.flatten_dict(cache)
        for path, row in traverse_util.flatten_dict(prefix_cache).items():
            cache[path] = jax.lax.dynamic_update_slice_in_dim(
                cache[path], row.astype(cache[path].dtype), slot, self._slot_axes[path]
            )
        return traverse_util.unflatten_dict(cache)

    def generate(self, params, cache, tokens, positions):
        logits, variables = self._model.apply(
            {"params": params, "cache": cache},
            tokens,
            positions,
            model_mode="autoregressive",
            mutable=["cache"],
        )
        return logits[:, 0], variables["cache"]


def _zeros(tree: Any) -> Any:
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), tree)


class LinenEngine(Engine):
    """:class:`Engine` with a :class:`LinenBackend` in place of the NNX model's backend.

    Everything else is the engine's own code: bucketing, sampling, per-slot bookkeeping,
    donation and output shardings.
    """

    def __init__(self, config: ModelConfig, **kwargs: Any):
        super().__init__(config, **kwargs)
        self._backend = LinenBackend(config, self._slots, self._backend._slot_axes)
        ar = P.abstract_model(config, model_mode="autoregressive", cache_batch=self._slots)
        specs = ar_kv_cache_partition_specs(ar, self._rules, self._mesh, replicate_indivisible=True)
        self.build_programs(named_shardings(specs, self._mesh))

    def load_params(self, source: Any) -> Any:
        """Places a Linen params tree on the engine's mesh (replicated)."""
        return jax.device_put(source, P.replicated(self._mesh))


def fill_slots(engine: Engine, params: Any, prompts: list[np.ndarray]) -> DecodeState:
    state = engine.init_decode_state()
    for slot, prompt in enumerate(prompts):
        padded, n = engine.pad_tokens(prompt)
        prefix, _ = engine.prefill(params=params, padded_tokens=padded, true_length=n)
        state = engine.insert(prefix, state, slot)
    return state


def time_engine(engine: Engine, params: Any, prompts: list[np.ndarray], steps: int) -> float:
    """Tokens/s of ``steps`` generate steps over all slots (one result fetched per step)."""
    state = fill_slots(engine, params, prompts)
    jax.block_until_ready(state)
    start = time.perf_counter()
    for _ in range(steps):
        state, result = engine.generate(params, state)
        np.asarray(result.data)
    return SLOTS * steps / (time.perf_counter() - start)


def make_bare_step(engine: Engine):
    """The jitted NNX forward step alone: logits and the next cache and positions."""
    graphdef = engine._backend._ar_graphdef

    def step(params, cache, tokens, positions):
        model = nnx.merge(graphdef, params, cache)
        logits = model(tokens, positions, model_mode="autoregressive")
        return logits, nnx.state(model, nnx.Cache), positions + 1

    cache_shardings = engine._state_shardings.cache
    return jax.jit(step, donate_argnums=(1, 3), out_shardings=(None, cache_shardings, None))


def time_bare(engine: Engine, bare, params: Any, prompts: list[np.ndarray], steps: int) -> float:
    """Tokens/s of the bare step, inputs kept on the device as the engine keeps them."""
    state = fill_slots(engine, params, prompts)
    cache, tokens, positions = state.cache, state.tokens[:, None], state.positions[:, None]
    jax.block_until_ready((cache, tokens, positions))
    start = time.perf_counter()
    for _ in range(steps):
        logits, cache, positions = bare(params, cache, tokens, positions)
        logits.block_until_ready()
    return SLOTS * steps / (time.perf_counter() - start)


def prefill_latency(engine: Engine, params: Any, repeat: int) -> dict[int, float]:
    """Best wall time (ms) of one compiled prefill per bucket, result on the host."""
    out = {}
    for bucket in engine.prefill_buckets:
        padded = np.arange(1, bucket + 1, dtype=np.int32) % engine.config.vocab_size
        times = []
        for _ in range(repeat + 1):  # the first run compiles
            start = time.perf_counter()
            _, first = engine.prefill(params=params, padded_tokens=padded, true_length=bucket)
            np.asarray(first.data)
            times.append(time.perf_counter() - start)
        out[bucket] = 1e3 * min(times[1:])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="a ~1M-parameter model")
    parser.add_argument("--steps", type=int, default=16, help="generate steps per loop")
    parser.add_argument("--rounds", type=int, default=6, help="alternating rounds")
    parser.add_argument("--repeat", type=int, default=5, help="prefill runs per bucket")
    parser.add_argument(
        "--param-scan-axis",
        type=int,
        default=1,
        help="axis of the Linen model's stacked layer params (MaxText: 1; NNX keeps 0)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args()

    sizes = dict(zip(SIZE_FIELDS, SIZES["small" if args.small else "full"], strict=True))
    config = ModelConfig(
        **sizes, dtype="float32", weight_dtype="float32", param_scan_axis=args.param_scan_axis
    )
    linen_params = random_linen_params(config)
    n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(linen_params))
    nnx_engine = Engine(config, max_concurrent_decodes=SLOTS)
    linen_engine = LinenEngine(config, max_concurrent_decodes=SLOTS)
    nnx_params = nnx_engine.load_params(linen_params)
    lin_params = linen_engine.load_params(linen_params)
    bare = make_bare_step(nnx_engine)
    rng = np.random.default_rng(0)
    top = config.max_prefill_predict_length
    prompts = [rng.integers(1, config.vocab_size, rng.integers(4, top + 1)) for _ in range(SLOTS)]
    prompts = [p.astype(np.int32) for p in prompts]

    start = time.perf_counter()
    nnx_engine.warmup(nnx_params)
    linen_engine.warmup(lin_params)
    time_bare(nnx_engine, bare, nnx_params, prompts, 2)
    compile_s = time.perf_counter() - start

    rates: dict[str, list[float]] = {"nnx": [], "linen": [], "bare": []}
    for _ in range(args.rounds):
        rates["nnx"].append(time_engine(nnx_engine, nnx_params, prompts, args.steps))
        rates["linen"].append(time_engine(linen_engine, lin_params, prompts, args.steps))
        rates["bare"].append(time_bare(nnx_engine, bare, nnx_params, prompts, args.steps))
    tps = {k: max(v) for k, v in rates.items()}
    latency = {
        "nnx": prefill_latency(nnx_engine, nnx_params, args.repeat),
        "linen": prefill_latency(linen_engine, lin_params, args.repeat),
    }
    doc = {
        "params": n_params,
        "slots": SLOTS,
        "steps": args.steps,
        "rounds": args.rounds,
        "device": str(jax.devices()[0].device_kind),
        "param_scan_axis": config.param_scan_axis,
        "compile_s": round(compile_s, 2),
        "tokens_per_s": {k: round(v, 1) for k, v in tps.items()},
        "median_tokens_per_s": {k: round(statistics.median(v), 1) for k, v in rates.items()},
        "nnx_over_bare": round(tps["nnx"] / tps["bare"], 3),
        "linen_over_bare": round(tps["linen"] / tps["bare"], 3),
        "nnx_over_linen": round(tps["nnx"] / tps["linen"], 3),
        "prefill_ms": {
            k: {str(b): round(ms, 2) for b, ms in v.items()} for k, v in latency.items()
        },
        "compiles": {"nnx": nnx_engine.compile_counts(), "linen": linen_engine.compile_counts()},
    }
    if args.json:
        print(json.dumps(doc, indent=1))
        return
    print(
        f"model {n_params / 1e6:.1f}M params float32, {SLOTS} slots, {args.steps} steps x "
        f"{args.rounds} rounds on {doc['device']}, Linen param_scan_axis "
        f"{config.param_scan_axis} (compile + warm-up {compile_s:.1f} s)"
    )
    for name in ("nnx", "linen", "bare"):
        median = doc["median_tokens_per_s"][name]
        ratio = tps[name] / tps["bare"]
        print(f"  {name:6s} {tps[name]:9.1f} tokens/s  (x{ratio:.3f} of bare; median {median})")
    print(f"  nnx / linen = {doc['nnx_over_linen']:.3f}")
    print("  prefill latency (ms):  bucket  nnx  linen")
    for bucket in nnx_engine.prefill_buckets:
        print(f"    {bucket:5d}  {latency['nnx'][bucket]:8.2f}  {latency['linen'][bucket]:8.2f}")


if __name__ == "__main__":
    main()
