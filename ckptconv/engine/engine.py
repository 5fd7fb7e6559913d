"""The NNX inference engine, with JetStream's interface and continuous batching.

:class:`Engine` runs any NNX model a :class:`~ckptconv.models.ModelAdapter` describes (a
``ModelConfig`` selects the reference decoder's adapter). It splits the model once into a graph
definition and states (``nnx.split``) and merges them inside its jitted functions
(``nnx.merge``), so no Python model object is rebuilt per step. Parameters are jit arguments,
never closed-over constants. How the cache is built, prefilled and copied into a slot depends
on the adapter's cache protocol (:mod:`ckptconv.engine.backends`); what follows describes the
``nnx.Cache``-variable protocol of the reference decoder.

- ``prefill`` runs one prompt through a batch-1 ``prefill``-mode model. Prompts are padded to
  power-of-two buckets (at least :data:`MIN_BUCKET`, at most ``max_prefill_predict_length``), so
  each bucket compiles once. It returns a :class:`~ckptconv.engine.state.Prefix` and the first
  sampled token.
- ``insert`` copies the prefix's cache variables into one slot of the ``autoregressive`` cache,
  along each variable's ``cache_batch`` axis. That also resets the slot's AR index, lengths and
  segment ids (the prefill wrote them as zeros). The prefix carries no AR keys and values:
  a slot's stale ones stay in place, masked by the reset index until overwritten.
- ``generate`` feeds every slot's last token at its own position, samples the next one, and
  advances the slots that are active and still have room. The decode state is donated.
- ``free_slot`` marks a slot idle; a later ``insert`` refills it while the others keep decoding.

Sharding: parameters, the AR cache and the prefill cache get the partition specs of
:mod:`ckptconv.sharding` for the engine's rules and mesh. With ``replicate_indivisible=True``
(the default) a dimension its mesh axes do not divide is replicated instead (for example 2 KV
heads on a 4-way ``tensor`` axis); each such case is listed in :attr:`Engine.fallbacks` and
warned about. The per-slot bookkeeping arrays and the logits are replicated.

Limits: one sample per slot; no prefix caching (``existing_prefix``); a slot takes at most
``max_target_length - max_prefill_predict_length`` generate steps after its prefill (later
tokens come back with ``valid == 0``).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from ..errors import ConfigError, EngineError
from ..models.adapter import as_adapter, check_engine_support, describe
from ..sharding import Fallback, LogicalAxisRules, get_preset, make_mesh
from . import params as P
from .backends import CacheVariableBackend, ExplicitCacheBackend
from .sampling import GREEDY, Sampler, sample
from .state import DecodeState, Prefix, ResultTokens

MIN_BUCKET = 8
"""Smallest prefill bucket: shorter prompts pad to this length."""


def prefill_buckets(max_prefill_length: int) -> tuple[int, ...]:
    """Padded prompt lengths: powers of two from :data:`MIN_BUCKET`, then the maximum.

    Example:
        >>> prefill_buckets(48)
        (8, 16, 32, 48)
    """
    out, size = [], MIN_BUCKET
    while size < max_prefill_length:
        out.append(size)
        size *= 2
    out.append(max_prefill_length)
    return tuple(out)


class Engine:
    """Prefill, insert and generate for an NNX model (JetStream's engine API).

    Args:
        model: A model adapter supporting one of the engine's cache protocols, or a
            ``ModelConfig`` (the reference decoder's adapter).
        mesh: The device mesh; ``None`` uses one device.
        rules: Logical axis rules, or a preset name (``maxtext``, ``fsdp-tp``).
        max_concurrent_decodes: Decode slots N (rows of the AR KV cache).
        replicate_indivisible: Replicate dimensions the mesh does not divide (see module)
            instead of raising :class:`~ckptconv.errors.ShardingError`.

    Raises:
        EngineError: ``max_concurrent_decodes`` is not positive, or the adapter supports no
            cache protocol or has a cache without a findable slot axis.
        ShardingError: Unknown rules, or an indivisible dimension when not replicating.
        ConfigError: The config leaves no room for an AR cache.

    Example:
        >>> from ckptconv.models import ModelConfig, linen
        >>> config = ModelConfig(emb_dim=32, num_query_heads=4, num_kv_heads=1, head_dim=8,
        ...                      mlp_dim=64, num_decoder_layers=1, vocab_size=64,
        ...                      dtype="float32", max_target_length=24,
        ...                      max_prefill_predict_length=8)
        >>> tokens = jnp.zeros((1, 1), jnp.int32)
        >>> linen_params = linen.Transformer(config).init(jax.random.key(0), tokens, tokens)
        >>> engine = Engine(config, max_concurrent_decodes=2)
        >>> params = engine.load_params(linen_params)  # or an NNX checkpoint path
        >>> padded, n = engine.pad_tokens([1, 7, 42])
        >>> prefix, first = engine.prefill(params=params, padded_tokens=padded, true_length=n)
        >>> state = engine.insert(prefix, engine.init_decode_state(), slot=0)
        >>> state, result = engine.generate(params, state)
        >>> [result.get_result_at_slot(s).valid.tolist() for s in (0, 1)]
        [[[1]], [[0]]]
    """

    def __init__(
        self,
        model: Any,
        *,
        mesh: Mesh | None = None,
        rules: str | LogicalAxisRules = "maxtext",
        max_concurrent_decodes: int = 8,
        replicate_indivisible: bool = True,
    ):
        if int(max_concurrent_decodes) < 1:
            raise EngineError(
                f"max_concurrent_decodes must be positive, got {max_concurrent_decodes}"
            )
        self._adapter = as_adapter(model)
        kind = check_engine_support(self._adapter)
        self._slots = int(max_concurrent_decodes)
        self._vocab = int(self._adapter.vocab_size)
        self._max_prefill = int(self._adapter.max_prefill_length)
        self._max_decode = int(self._adapter.max_target_length) - self._max_prefill
        self._mesh = mesh if mesh is not None else make_mesh("data=1", jax.devices()[:1])
        self._rules = get_preset(rules) if isinstance(rules, str) else rules
        self._buckets = prefill_buckets(self._max_prefill)
        self.fallbacks: list[Fallback] = []
        """Dimensions replicated because the mesh does not divide them."""

        kw = {"replicate_indivisible": replicate_indivisible, "report": self.fallbacks}
        backend = CacheVariableBackend if kind == "variables" else ExplicitCacheBackend
        self._backend = backend(self._adapter, self._slots, self._mesh, self._rules, kw)
        if self._max_decode < 1:
            raise ConfigError(
                f"model {describe(self._adapter)}: max_target_length "
                f"{self._adapter.max_target_length} must exceed max_prefill_length "
                f"{self._max_prefill} for an AR cache"
            )
        self._abstract_params = self._backend.abstract_params
        self._param_shardings = self._backend.param_shardings
        self.build_programs(self._backend.cache_shardings, self._backend.prefix_shardings)
        self._no_key = jax.random.key(0)
        # The prefill and AR caches both hold the prefill variables: report each once.
        self.fallbacks[:] = list(dict.fromkeys(self.fallbacks))

    def build_programs(self, cache_shardings: Any, prefix_cache_shardings: Any = None) -> None:
        """(Re)builds the jitted ``init``, ``prefill``, ``insert``, ``generate`` and ``free``.

        The constructor calls it with the backend's shardings. A subclass that swaps the
        model calls (its ``_backend``, an object with the ``init_cache``, ``prefill``,
        ``insert`` and ``generate`` of :mod:`ckptconv.engine.backends`; e.g. the Linen engine
        of ``benchmarks/bench_engine.py``) calls it again so that its programs are jitted,
        sharded and donated exactly as this class's.

        Args:
            cache_shardings: ``NamedSharding`` tree of the decode state's cache; the other
                decode-state fields and the logits are replicated.
            prefix_cache_shardings: the same for a prefill's cache, or ``None`` to leave the
                prefix's placement to XLA.
        """
        rep = P.replicated(self._mesh)
        self._state_shardings = DecodeState(cache_shardings, rep, rep, rep, rep, rep)
        prefill_out = {}
        if prefix_cache_shardings is not None:
            prefill_out["out_shardings"] = (Prefix(prefix_cache_shardings, rep, rep, rep), rep)
        self._init_jit = jax.jit(self._init_impl, out_shardings=self._state_shardings)
        self._prefill_jit = jax.jit(self._prefill_impl, static_argnames="sampler", **prefill_out)
        self._insert_jit = jax.jit(
            self._insert_impl, donate_argnums=1, out_shardings=self._state_shardings
        )
        self._generate_jit = jax.jit(
            self._generate_impl,
            static_argnames="sampler",
            donate_argnums=1,
            out_shardings=(self._state_shardings, rep),
        )
        self._free_jit = jax.jit(
            self._free_impl, donate_argnums=0, out_shardings=self._state_shardings
        )

    # -- properties ---------------------------------------------------------------------------
    @property
    def config(self) -> Any:
        """The adapter's model config (``None`` for an adapter without one)."""
        return getattr(self._adapter, "config", None)

    @property
    def adapter(self) -> Any:
        """The model adapter."""
        return self._adapter

    @property
    def max_concurrent_decodes(self) -> int:
        """Decode slots."""
        return self._slots

    @property
    def samples_per_slot(self) -> int:
        """Samples per slot (always 1)."""
        return 1

    @property
    def max_prefill_length(self) -> int:
        """Longest prompt (``max_prefill_predict_length``)."""
        return self._max_prefill

    @property
    def max_decode_steps(self) -> int:
        """Generate steps a slot can take after its prefill (the AR cache length)."""
        return self._max_decode

    @property
    def prefill_buckets(self) -> tuple[int, ...]:
        """The padded prompt lengths, each compiled once."""
        return self._buckets

    @property
    def mesh(self) -> Mesh:
        """The device mesh."""
        return self._mesh

    @property
    def param_shardings(self) -> Any:
        """``NamedSharding`` per parameter, shaped like the params state."""
        return self._param_shardings

    def compile_counts(self) -> dict[str, int]:
        """How many programs each jitted function holds (one per shape/sampler seen)."""
        jits = {
            "init_decode_state": self._init_jit,
            "prefill": self._prefill_jit,
            "insert": self._insert_jit,
            "generate": self._generate_jit,
            "free_slot": self._free_jit,
        }
        return {name: fn._cache_size() for name, fn in jits.items()}

    # -- params -------------------------------------------------------------------------------
    def load_params(self, source: str | os.PathLike | Any) -> Any:
        """Loads parameters into the engine's shardings.

        Args:
            source: An NNX checkpoint path (restored straight into the shardings), a Linen
                checkpoint path (converted in memory), an ``nnx.State`` / ``nnx.Module`` of the
                model's params, or a Linen params tree.

        Returns:
            The ``nnx.Param`` state to pass as ``params``.

        Raises:
            CheckpointFormatError: The checkpoint cannot be read.
            PlanError: A checkpoint does not match the config (naming the path).
            LayoutError: An in-memory tree does not match the model.
        """
        return P.load_params(
            source,
            model=self._adapter,
            abstract=self._abstract_params,
            shardings=self._param_shardings,
        )

    # -- prompts ------------------------------------------------------------------------------
    def bucket_for(self, length: int) -> int:
        """The padded length of a prompt of ``length`` tokens.

        Raises:
            EngineError: The prompt is empty or longer than ``max_prefill_length``.
        """
        if length < 1:
            raise EngineError("the prompt is empty; give at least one token id")
        if length > self.max_prefill_length:
            raise EngineError(
                f"prompt of {length} tokens exceeds max_prefill_predict_length="
                f"{self.max_prefill_length}"
            )
        return next(b for b in self._buckets if b >= length)

    def pad_tokens(self, token_ids: Any) -> tuple[np.ndarray, int]:
        """Pads a prompt with zeros to its bucket.

        Args:
            token_ids: A sequence of token ids.

        Returns:
            ``(padded int32 [bucket], true_length)``.

        Raises:
            EngineError: The prompt is empty, too long, or holds ids outside the vocabulary.
        """
        ids = np.asarray(token_ids)
        if ids.ndim != 1 or not (ids.size == 0 or np.issubdtype(ids.dtype, np.integer)):
            raise EngineError(f"prompt token ids must be a 1-D list of integers, got {ids!r}")
        n = int(ids.shape[0])
        padded = np.zeros((self.bucket_for(n),), np.int32)
        self._check_ids(ids)
        padded[:n] = ids
        return padded, n

    def _check_ids(self, ids: np.ndarray) -> None:
        bad = (ids < 0) | (ids >= self._vocab)
        if bad.any():
            raise EngineError(
                f"token id {int(ids[bad][0])} is outside the vocabulary [0, {self._vocab})"
            )

    def _key(self, sampler: Sampler, rng: jax.Array | None) -> jax.Array:
        if not isinstance(sampler, Sampler):
            raise EngineError(f"sampler must be a ckptconv.engine.Sampler, got {sampler!r}")
        if rng is not None:
            return rng
        if sampler.needs_rng:
            raise EngineError(f"sampler {sampler.describe()} needs an rng key (rng=...)")
        return self._no_key

    def _slot(self, slot: int) -> np.int32:
        if not 0 <= int(slot) < self._slots:
            raise EngineError(f"slot {slot} is outside [0, {self._slots})")
        return np.int32(slot)

    # -- JetStream API ------------------------------------------------------------------------
    def init_decode_state(self) -> DecodeState:
        """An empty decode state: zero caches, every slot free, sharded as the engine's."""
        return self._init_jit()

    def prefill(
        self,
        *,
        params: Any,
        padded_tokens: Any,
        true_length: int,
        sampler: Sampler | None = None,
        rng: jax.Array | None = None,
        existing_prefix: Any = None,
    ) -> tuple[Prefix, ResultTokens]:
        """Runs one prompt; returns its prefix and the first sampled token.

        Args:
            params: From :meth:`load_params`.
            padded_tokens: ``[T]`` or ``[1, T]`` token ids; the first ``true_length`` are the
                prompt. They are re-padded to the smallest bucket that fits ``true_length``.
            true_length: The prompt's length.
            sampler: How to pick the first token (None: greedy).
            rng: A PRNG key; required unless the sampler is greedy.
            existing_prefix: Not supported (must be None).

        Returns:
            ``(prefix, result)``; ``result`` has one row: token, valid 1, length 1.

        Raises:
            EngineError: Bad shapes, an empty or too long prompt, ids outside the vocabulary,
                or a missing ``rng``.
        """
        if existing_prefix is not None:
            raise EngineError("prefill with an existing_prefix is not supported")
        tokens = np.asarray(padded_tokens)
        if tokens.ndim == 2 and tokens.shape[0] == 1:
            tokens = tokens[0]
        if tokens.ndim != 1:
            raise EngineError(f"padded_tokens must be [T] or [1, T], got shape {tokens.shape}")
        n = int(true_length)
        if not 1 <= n <= tokens.shape[0]:
            raise EngineError(f"true_length {n} is outside [1, {tokens.shape[0]}]")
        padded, _ = self.pad_tokens(tokens[:n])
        sampler = GREEDY if sampler is None else sampler
        return self._prefill_jit(
            params, padded[None], np.int32(n), self._key(sampler, rng), sampler=sampler
        )

    def insert(self, prefix: Prefix, decode_state: DecodeState, slot: int) -> DecodeState:
        """Puts a prefilled prompt into ``slot`` (the decode state is donated).

        Raises:
            EngineError: ``slot`` is out of range.
        """
        return self._insert_jit(prefix, decode_state, self._slot(slot))

    def generate(
        self,
        params: Any,
        decode_state: DecodeState,
        sampler: Sampler | None = None,
        rng: jax.Array | None = None,
    ) -> tuple[DecodeState, ResultTokens]:
        """One decode step for every slot (the decode state is donated).

        Args:
            params: From :meth:`load_params`.
            decode_state: From :meth:`init_decode_state`, :meth:`insert` or a previous step.
            sampler: How to pick the next tokens (None: greedy).
            rng: A PRNG key; required unless the sampler is greedy.

        Returns:
            ``(decode_state, result)``; ``result`` has one row per slot, valid 0 for free or
            exhausted slots.
        """
        sampler = GREEDY if sampler is None else sampler
        return self._generate_jit(params, decode_state, self._key(sampler, rng), sampler=sampler)

    def free_slot(self, decode_state: DecodeState, slot: int) -> DecodeState:
        """Marks ``slot`` free (the decode state is donated); its results turn invalid."""
        return self._free_jit(decode_state, self._slot(slot))

    def free_resource(self, slot: int) -> None:
        """JetStream's hook for paged caches: nothing to free here."""
        del slot

    def warmup(self, params: Any, samplers: tuple[Sampler, ...] = (GREEDY,)) -> None:
        """Compiles every bucket's prefill, and insert, generate and free, for ``samplers``."""
        key = jax.random.key(0)
        for sampler in samplers:
            state = self.init_decode_state()
            for bucket in self._buckets:
                prefix, _ = self.prefill(
                    params=params,
                    padded_tokens=np.zeros((bucket,), np.int32),
                    true_length=bucket,
                    sampler=sampler,
                    rng=key,
                )
                state = self.insert(prefix, state, 0)
            state, result = self.generate(params, state, sampler=sampler, rng=key)
            self.free_slot(state, 0)
            jax.block_until_ready(result.data)

    # -- jitted bodies ------------------------------------------------------------------------
    def _init_impl(self) -> DecodeState:
        n, v = self._slots, self._vocab
        zeros = jnp.zeros((n,), jnp.int32)
        return DecodeState(
            cache=self._backend.init_cache(),
            tokens=zeros,
            positions=zeros,
            generated=zeros,
            active=jnp.zeros((n,), jnp.bool_),
            logits=jnp.zeros((n, v), jnp.float32),
        )

    def _prefill_impl(
        self, params: Any, tokens: jax.Array, true_length: jax.Array, rng: jax.Array, *, sampler
    ) -> tuple[Prefix, ResultTokens]:
        logits, prefix_cache = self._backend.prefill(params, tokens, true_length)
        last = jax.lax.dynamic_index_in_dim(logits[0], true_length - 1, axis=0, keepdims=True)
        token = sample(last, sampler, rng)
        one = jnp.ones((1,), jnp.int32)
        prefix = Prefix(prefix_cache, token, true_length, last)
        return prefix, ResultTokens(jnp.stack([token, one, one], axis=1))

    def _insert_impl(self, prefix: Prefix, state: DecodeState, slot: jax.Array) -> DecodeState:
        return DecodeState(
            cache=self._backend.insert(prefix.cache, state.cache, slot),
            tokens=state.tokens.at[slot].set(prefix.token[0]),
            positions=state.positions.at[slot].set(prefix.true_length),
            generated=state.generated.at[slot].set(1),
            active=state.active.at[slot].set(True),
            logits=state.logits.at[slot].set(prefix.logits[0]),
        )

    def _generate_impl(
        self, params: Any, state: DecodeState, rng: jax.Array, *, sampler
    ) -> tuple[DecodeState, ResultTokens]:
        tokens, positions = state.tokens[:, None], state.positions[:, None]
        logits, cache = self._backend.generate(params, state.cache, tokens, positions)
        new = sample(logits, sampler, rng)
        # A slot has room while its generate steps so far (generated - 1) fit the AR cache.
        valid = state.active & (state.generated - 1 < self.max_decode_steps)
        generated = jnp.where(valid, state.generated + 1, state.generated)
        next_state = DecodeState(
            cache=cache,
            tokens=jnp.where(valid, new, state.tokens),
            positions=jnp.where(valid, state.positions + 1, state.positions),
            generated=generated,
            active=state.active,
            logits=jnp.where(valid[:, None], logits, state.logits),
        )
        data = jnp.stack([new, valid.astype(jnp.int32), generated], axis=1)
        return next_state, ResultTokens(data)

    def _free_impl(self, state: DecodeState, slot: jax.Array) -> DecodeState:
        return state.replace(
            active=state.active.at[slot].set(False),
            generated=state.generated.at[slot].set(0),
        )
