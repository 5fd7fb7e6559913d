"""Token samplers: greedy, temperature, top-k and top-p, with explicit RNG keys.

A :class:`Sampler` is a frozen (hashable) dataclass, so the engine passes it to its jitted
functions as a static argument: each distinct sampler compiles once, and the random key is an
ordinary array argument, so the same key always gives the same tokens.

Limits: ``k`` and the temperature are compile-time constants (``jax.lax.top_k`` needs a static
``k``); a server that varies them per request compiles once per distinct value.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from ..errors import EngineError

KINDS = ("greedy", "temperature", "topk", "topp")


@dataclasses.dataclass(frozen=True)
class Sampler:
    """How the next token is picked from a row of logits.

    Attributes:
        kind: ``greedy`` (argmax), ``temperature`` (sample the whole vocabulary),
            ``topk`` (sample the ``k`` most likely tokens) or ``topp`` (sample the smallest set
            of most likely tokens whose probability reaches ``p``).
        temperature: Logits are divided by this before sampling (not used by ``greedy``).
        k: For ``topk``: how many tokens to keep.
        p: For ``topp``: the probability mass to keep, in ``(0, 1]``.

    Raises:
        EngineError: An unknown kind or an out-of-range parameter.

    Example:
        >>> Sampler("topk", k=4, temperature=0.7)
        Sampler(kind='topk', temperature=0.7, k=4, p=1.0)
    """

    kind: str = "greedy"
    temperature: float = 1.0
    k: int = 0
    p: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise EngineError(f"unknown sampler {self.kind!r}; expected one of {', '.join(KINDS)}")
        if not self.temperature > 0:
            raise EngineError(f"sampler temperature must be positive, got {self.temperature}")
        if self.kind == "topk" and self.k < 1:
            raise EngineError(f"top-k sampling needs k >= 1, got {self.k}")
        if self.kind == "topp" and not 0 < self.p <= 1:
            raise EngineError(f"top-p sampling needs 0 < p <= 1, got {self.p}")

    @property
    def needs_rng(self) -> bool:
        """Whether the sampler draws random numbers (every kind but ``greedy``)."""
        return self.kind != "greedy"

    def describe(self) -> str:
        """The sampler as the CLI spells it (``greedy``, ``topk:40``, ``topp:0.9``, ...)."""
        if self.kind == "topk":
            return f"topk:{self.k}"
        if self.kind == "topp":
            return f"topp:{self.p:g}"
        return self.kind


GREEDY = Sampler()


def parse_sampler(spec: str, temperature: float | None = None) -> Sampler:
    """Parses ``greedy``, ``temperature``, ``topk:K`` or ``topp:P`` (the CLI's spelling).

    Args:
        spec: The sampler text.
        temperature: The temperature, or None for 1.0. Giving one with ``greedy`` is an error,
            since greedy decoding ignores it.

    Returns:
        The sampler.

    Raises:
        EngineError: The text is malformed or a value is out of range.

    Example:
        >>> parse_sampler("topp:0.9", temperature=0.8)
        Sampler(kind='topp', temperature=0.8, k=0, p=0.9)
    """
    text = spec.strip().lower()
    kind, _, value = text.partition(":")
    if kind == "greedy" and temperature is not None:
        raise EngineError(
            "--temperature has no effect with the greedy sampler; use --sampler temperature, "
            "topk:K or topp:P"
        )
    temp = 1.0 if temperature is None else float(temperature)
    if kind in ("topk", "topp") and value:
        try:
            number = int(value) if kind == "topk" else float(value)
        except ValueError:
            raise EngineError(f"sampler {spec!r}: {value!r} is not a number") from None
        if kind == "topk":
            return Sampler("topk", temperature=temp, k=number)
        return Sampler("topp", temperature=temp, p=number)
    if kind in ("greedy", "temperature") and not value:
        return Sampler(kind, temperature=temp)
    raise EngineError(f"malformed sampler {spec!r}; expected greedy, temperature, topk:K or topp:P")


def sample(logits: jax.Array, sampler: Sampler, rng: jax.Array) -> jax.Array:
    """Picks one token per row of ``logits [B, V]`` (float32); returns ``[B]`` int32.

    Row ``i`` draws with the key ``fold_in(rng, i)``, so a row's token depends only on the key,
    its index and its own logits, not on the other rows or on ``B``.

    Args:
        logits: The rows to sample from.
        sampler: How to pick (static under ``jit``).
        rng: A PRNG key (ignored by ``greedy``).

    Returns:
        The token ids.

    Example:
        >>> logits = jnp.array([[0.0, 3.0, 1.0]])
        >>> sample(logits, GREEDY, jax.random.key(0)).tolist()
        [1]
    """
    logits = logits.astype(jnp.float32)
    if sampler.kind == "greedy":
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    rows = jnp.arange(logits.shape[0], dtype=jnp.uint32)
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rng, rows)
    draw = functools.partial(_draw, sampler=sampler)
    return jax.vmap(draw)(keys, logits / jnp.float32(sampler.temperature)).astype(jnp.int32)


def _draw(key: jax.Array, scaled: jax.Array, *, sampler: Sampler) -> jax.Array:
    """One token from one row of temperature-scaled logits ``[V]``."""
    if sampler.kind == "temperature":
        return jax.random.categorical(key, scaled)
    if sampler.kind == "topk":
        top, index = jax.lax.top_k(scaled, min(sampler.k, scaled.shape[-1]))
        return index[jax.random.categorical(key, top)]
    # top-p: keep the most likely tokens until their probability reaches p; the most likely
    # token is always kept, so the set is never empty.
    order = jnp.argsort(-scaled)
    ranked = scaled[order]
    probs = jax.nn.softmax(ranked)
    before = jnp.cumsum(probs) - probs
    masked = jnp.where(before < jnp.float32(sampler.p), ranked, -jnp.inf)
    return order[jax.random.categorical(key, masked)]
