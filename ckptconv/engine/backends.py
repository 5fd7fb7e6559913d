"""How the engine runs a model: one backend per cache protocol of :mod:`ckptconv.models.adapter`.

A backend holds the abstract params and caches with their shardings, and three traced bodies:
``prefill`` (one padded prompt, batch 1), ``insert`` (a prefix's cache into one slot, along each
leaf's slot axis) and ``generate`` (one step for every slot). The engine jits them.

- :class:`CacheVariableBackend`: the model holds ``nnx.Cache`` variables with logical names.
  A ``prefill``-mode model (one row) and an ``autoregressive``-mode model (one row per slot)
  share one graph of params; the slot axis of every cache variable is the one named
  ``cache_batch`` (``cache_batch_prefill`` in the prefill model). Caches are sharded by
  :mod:`ckptconv.sharding`'s cache rules.
- :class:`ExplicitCacheBackend`: the adapter's ``init_cache`` / ``cache_batch_axes`` /
  ``nnx_decode``. The prompt is prefilled into a one-row cache of the full length and copied
  into its slot; padding positions past the prompt hold garbage that the model masks (it
  attends only to positions up to the query's) until generate overwrites them. Explicit caches
  carry no logical names, so they are replicated; params are sharded from the model's own
  Variable metadata as for the other backend. Non-``Param`` variables of an abstract model are
  zero-filled.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from ..errors import EngineError
from ..models import layout
from ..models.adapter import describe
from ..sharding import (
    LogicalAxisRules,
    ar_kv_cache_partition_specs,
    param_partition_specs,
    prefill_kv_cache_partition_specs,
)
from . import params as P


def _zeros(tree: Any) -> Any:
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), tree)


def _slot_axis(adapter: Any, path: P.Path, var: nnx.Variable, name: str) -> int:
    names = tuple(var.get_metadata().get("out_sharding") or ())
    for axis_name in (name, layout.CACHE_BATCH, layout.CACHE_BATCH_PREFILL):
        if axis_name in names:
            return names.index(axis_name)
    raise EngineError(
        f"model {describe(adapter)}: cache variable {'/'.join(path)} has no slot axis: its "
        f"logical names are {list(names) or 'absent'}, expected one named {name}"
    )


class CacheVariableBackend:
    """Engine bodies for a model whose caches are ``nnx.Cache`` variables (see module)."""

    def __init__(
        self, adapter: Any, slots: int, mesh: Mesh, rules: LogicalAxisRules, kw: dict[str, Any]
    ):
        self._adapter = adapter
        ar = adapter.nnx_cached_model(mode="autoregressive", batch=slots)
        prefill = adapter.nnx_cached_model(mode="prefill", batch=1)
        self._prefix_filter = getattr(adapter, "prefix_filter", nnx.Cache)
        self._ar_graphdef, self.abstract_params, self.abstract_cache = nnx.split(
            ar, nnx.Param, nnx.Cache
        )
        self._prefill_graphdef, _, self._abstract_prefill_cache = nnx.split(
            prefill, nnx.Param, nnx.Cache
        )
        abstract_prefix = nnx.state(prefill, self._prefix_filter)
        self._slot_axes = {
            path: _slot_axis(adapter, path, var, layout.CACHE_BATCH)
            for path, var in P.variables_by_path(self.abstract_cache).items()
        }
        for path, var in P.variables_by_path(abstract_prefix).items():
            _slot_axis(adapter, path, var, layout.CACHE_BATCH_PREFILL)
        self.param_shardings = P.sharding_state(
            self.abstract_params, param_partition_specs(ar, rules, mesh, **kw), mesh
        )
        self.cache_shardings = P.sharding_state(
            self.abstract_cache, ar_kv_cache_partition_specs(ar, rules, mesh, **kw), mesh
        )
        prefix_specs = prefill_kv_cache_partition_specs(prefill, rules, mesh, **kw)
        self.prefix_shardings = P.sharding_state(abstract_prefix, prefix_specs, mesh)

    def init_cache(self) -> Any:
        """The zero AR cache."""
        return _zeros(self.abstract_cache)

    def prefill(self, params: Any, tokens: jax.Array, true_length: jax.Array) -> tuple[Any, Any]:
        """``(logits [1, T, V], prefix cache)`` of one padded prompt."""
        index = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
        segments = (index < true_length).astype(jnp.int32)
        model = nnx.merge(self._prefill_graphdef, params, _zeros(self._abstract_prefill_cache))
        logits = self._adapter.nnx_prefill(model, tokens, index, segments)
        return logits, nnx.state(model, self._prefix_filter)

    def insert(self, prefix_cache: Any, cache: Any, slot: jax.Array) -> Any:
        """``cache`` with ``prefix_cache`` written into ``slot``."""
        rows = {p: v.get_value() for p, v in P.variables_by_path(prefix_cache).items()}

        def put(path: P.Path, var: nnx.Variable) -> jax.Array:
            value = var.get_value()
            if path not in rows:
                return value
            row = rows[path].astype(value.dtype)
            return jax.lax.dynamic_update_slice_in_dim(value, row, slot, self._slot_axes[path])

        return P.state_like(cache, put)

    def generate(
        self, params: Any, cache: Any, tokens: jax.Array, positions: jax.Array
    ) -> tuple[jax.Array, Any]:
        """``(logits [N, V], new cache)`` of one step for every slot."""
        model = nnx.merge(self._ar_graphdef, params, cache)
        logits = self._adapter.nnx_generate(model, tokens, positions)[:, 0]
        return logits, nnx.state(model, nnx.Cache)


class ExplicitCacheBackend:
    """Engine bodies for an adapter with an explicit cache pytree (see module)."""

    def __init__(
        self, adapter: Any, slots: int, mesh: Mesh, rules: LogicalAxisRules, kw: dict[str, Any]
    ):
        self._adapter = adapter
        model = adapter.nnx_model()
        self._graphdef, self.abstract_params, self._other = nnx.split(model, nnx.Param, ...)
        length = int(adapter.max_target_length)
        self.abstract_cache = jax.eval_shape(
            lambda: adapter.init_cache(model, batch=slots, max_length=length)
        )
        self._abstract_prefill_cache = jax.eval_shape(
            lambda: adapter.init_cache(model, batch=1, max_length=length)
        )
        self._axes = self._check_axes(self.abstract_cache, slots)
        self._check_axes(self._abstract_prefill_cache, 1)
        rep = P.replicated(mesh)
        self.param_shardings = P.sharding_state(
            self.abstract_params, param_partition_specs(model, rules, mesh, **kw), mesh
        )
        self.cache_shardings = jax.tree.map(lambda _: rep, self.abstract_cache)
        self.prefix_shardings = jax.tree.map(lambda _: rep, self._abstract_prefill_cache)

    def _check_axes(self, cache: Any, batch: int) -> Any:
        where = f"model {describe(self._adapter)}"
        try:
            axes = self._adapter.cache_batch_axes(cache)
            flat = jax.tree_util.tree_flatten_with_path(cache)[0]
            axes_flat = jax.tree.structure(cache).flatten_up_to(axes)
        except (TypeError, ValueError, KeyError) as e:
            raise EngineError(
                f"{where}: cache_batch_axes does not return one axis per cache leaf: {e}"
            ) from e
        for (kp, leaf), axis in zip(flat, axes_flat, strict=True):
            name = jax.tree_util.keystr(kp)
            ok = isinstance(axis, int) and -len(leaf.shape) <= axis < len(leaf.shape)
            if not ok or leaf.shape[axis] != batch:
                raise EngineError(
                    f"{where}: cache leaf {name} of shape {list(leaf.shape)} has no slot axis: "
                    f"cache_batch_axes gives {axis!r}, expected an axis of size {batch} "
                    f"(the cache's batch)"
                )
        return axes

    def _model(self, params: Any) -> Any:
        return nnx.merge(self._graphdef, params, _zeros(self._other))

    def init_cache(self) -> Any:
        """The zero cache of every slot."""
        return _zeros(self.abstract_cache)

    def prefill(self, params: Any, tokens: jax.Array, true_length: jax.Array) -> tuple[Any, Any]:
        """``(logits [1, T, V], one-row cache)`` of one padded prompt."""
        del true_length  # padding past it is masked by position (see module)
        index = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
        cache = _zeros(self._abstract_prefill_cache)
        logits, cache = self._adapter.nnx_decode(self._model(params), tokens, index, cache)
        return jnp.asarray(logits, jnp.float32), cache

    def insert(self, prefix_cache: Any, cache: Any, slot: jax.Array) -> Any:
        """``cache`` with the one-row ``prefix_cache`` written into ``slot``."""
        return jax.tree.map(
            lambda full, row, axis: jax.lax.dynamic_update_slice_in_dim(
                full, row.astype(full.dtype), slot, axis
            ),
            cache,
            prefix_cache,
            self._axes,
        )

    def generate(
        self, params: Any, cache: Any, tokens: jax.Array, positions: jax.Array
    ) -> tuple[jax.Array, Any]:
        """``(logits [N, V], new cache)`` of one step for every slot."""
        logits, cache = self._adapter.nnx_decode(self._model(params), tokens, positions, cache)
        return jnp.asarray(logits[:, 0], jnp.float32), cache
