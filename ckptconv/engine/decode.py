"""Decoding one prompt with the engine: what ``ckptconv decode`` runs.

The random stream is fixed by the seed alone: the prefill samples with
``fold_in(key(seed), 0)`` and generate step ``i`` with ``fold_in(key(seed), i)``, so the same
seed gives the same tokens on any mesh.
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from ..errors import EngineError
from ..sharding import LogicalAxisRules, ShardingFallbackWarning, make_mesh
from .engine import Engine
from .sampling import GREEDY, Sampler


@dataclasses.dataclass(frozen=True)
class DecodeResult:
    """One decoded prompt.

    Attributes:
        prompt_ids: The prompt.
        generated_ids: The generated tokens, the prefill's first.
        logits: ``[len(generated_ids), vocab]`` float32: row 0 at the last prompt position,
            row ``i`` from generate step ``i``.
        sampler: The sampler, as the CLI spells it.
        temperature: The sampler's temperature.
        seed: The seed of the random stream.
        mesh: Axis sizes of the mesh the engine ran on.
        seconds: Wall time of ``load``, ``prefill`` (compile included) and ``generate``.
        replicated: Cache or param dimensions the mesh does not divide, replicated instead
            (``path[dim]``; see ``Engine.fallbacks``).
    """

    prompt_ids: list[int]
    generated_ids: list[int]
    logits: np.ndarray
    sampler: str
    temperature: float
    seed: int
    mesh: dict[str, int]
    seconds: dict[str, float]
    replicated: list[str] = dataclasses.field(default_factory=list)

    def save_logits(self, path: str | os.PathLike) -> None:
        """Saves the logits as a float32 ``[N, vocab]`` ``.npy`` file.

        Raises:
            EngineError: The file cannot be written.
        """
        try:
            with open(path, "wb") as f:
                np.save(f, self.logits.astype(np.float32))
        except OSError as e:
            raise EngineError(f"cannot write logits to {path}: {e}") from e

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (the logits are left out)."""
        out = dataclasses.asdict(self)
        del out["logits"]
        out["seconds"] = {k: round(v, 4) for k, v in self.seconds.items()}
        return out


def parse_prompt_ids(text: str) -> list[int]:
    """Parses ``"1,7,42"`` into token ids.

    Raises:
        EngineError: The text is empty or holds something other than non-negative integers.

    Example:
        >>> parse_prompt_ids("1, 7,42")
        [1, 7, 42]
    """
    parts = [p.strip() for p in text.split(",")]
    if not text.strip() or any(not p.isdigit() for p in parts):
        raise EngineError(
            f"--prompt-ids {text!r}: expected comma-separated non-negative integers, e.g. 1,7,42"
        )
    return [int(p) for p in parts]


def step_key(seed: int, step: int) -> jax.Array:
    """The PRNG key of ``step`` (0: the prefill) for ``seed``."""
    return jax.random.fold_in(jax.random.key(seed), step)


def check_request(
    engine: Engine, prompt_ids: Sequence[int], max_new_tokens: int
) -> tuple[np.ndarray, int]:
    """Checks a prompt and a token budget against the engine; returns the padded prompt.

    Raises:
        EngineError: A bad prompt, or more tokens than the AR cache holds.
    """
    if not 1 <= max_new_tokens <= engine.max_decode_steps + 1:
        raise EngineError(
            f"--max-new-tokens {max_new_tokens} is outside [1, {engine.max_decode_steps + 1}] "
            "(max_target_length - max_prefill_length + 1 for this model)"
        )
    return engine.pad_tokens(list(prompt_ids))


def decode(
    engine: Engine,
    params: Any,
    prompt_ids: Sequence[int],
    *,
    max_new_tokens: int = 8,
    sampler: Sampler = GREEDY,
    seed: int = 0,
    slot: int = 0,
) -> DecodeResult:
    """Prefills ``prompt_ids``, inserts it into ``slot`` and generates until done.

    Args:
        engine: The engine.
        params: From ``engine.load_params``.
        prompt_ids: The prompt.
        max_new_tokens: Tokens to produce (the prefill's first included).
        sampler: How to pick tokens.
        seed: Seed of the random stream (see module).
        slot: The decode slot to use.

    Returns:
        The tokens and the logits that produced them.

    Raises:
        EngineError: A bad prompt, or more tokens than the AR cache holds.
    """
    padded, n = check_request(engine, prompt_ids, max_new_tokens)
    start = time.perf_counter()
    prefix, first = engine.prefill(
        params=params, padded_tokens=padded, true_length=n, sampler=sampler, rng=step_key(seed, 0)
    )
    state = engine.insert(prefix, engine.init_decode_state(), slot)
    tokens = [int(np.asarray(first.data)[0, 0])]
    logits = [np.asarray(state.logits)[slot]]
    prefill_s = time.perf_counter() - start
    start = time.perf_counter()
    for step in range(1, max_new_tokens):
        state, result = engine.generate(params, state, sampler=sampler, rng=step_key(seed, step))
        tokens.append(int(np.asarray(result.data)[slot, 0]))
        logits.append(np.asarray(state.logits)[slot])
    generate_s = time.perf_counter() - start
    return DecodeResult(
        prompt_ids=[int(t) for t in prompt_ids],
        generated_ids=tokens,
        logits=np.stack(logits).astype(np.float32),
        sampler=sampler.describe(),
        temperature=sampler.temperature,
        seed=seed,
        mesh={str(k): int(v) for k, v in engine.mesh.shape.items()},
        seconds={"prefill": prefill_s, "generate": generate_s},
    )


def decode_checkpoint(
    ckpt: str | os.PathLike,
    model: Any,
    prompt_ids: Sequence[int],
    *,
    max_new_tokens: int = 8,
    mesh: str | Mesh | None = None,
    rules: str | LogicalAxisRules = "maxtext",
    sampler: Sampler = GREEDY,
    seed: int = 0,
) -> DecodeResult:
    """Loads a checkpoint (NNX, or Linen converted in memory) and decodes one prompt.

    Args:
        ckpt: The checkpoint.
        model: A model adapter, or a ``ModelConfig`` (the reference decoder's adapter).
        prompt_ids: The prompt.
        max_new_tokens: Tokens to produce.
        mesh: A mesh, or its text (``"data=2,tensor=4"``); None: one device.
        rules: Logical axis rules or a preset name.
        sampler: How to pick tokens.
        seed: Seed of the random stream.

    Returns:
        The result, with the load time in ``seconds["load"]``.

    Raises:
        CkptconvError: A bad prompt, checkpoint, config or mesh (one-line messages).
    """
    if isinstance(mesh, str):
        mesh = make_mesh(mesh)
    with warnings.catch_warnings():
        # Reported in the result instead, so the CLI's stderr holds only errors.
        warnings.simplefilter("ignore", ShardingFallbackWarning)
        engine = Engine(model, mesh=mesh, rules=rules, max_concurrent_decodes=1)
    check_request(engine, prompt_ids, max_new_tokens)
    start = time.perf_counter()
    params = engine.load_params(ckpt)
    load_s = time.perf_counter() - start
    result = decode(
        engine, params, prompt_ids, max_new_tokens=max_new_tokens, sampler=sampler, seed=seed
    )
    replicated = [f"{f.path}[{f.dim}]" for f in engine.fallbacks]
    seconds = {"load": load_s, **result.seconds}
    return dataclasses.replace(result, seconds=seconds, replicated=replicated)
