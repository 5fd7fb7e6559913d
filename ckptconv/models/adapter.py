"""The model adapter protocol: how ckptconv's model-facing features reach any NNX model.

``verify``, ``decode``, ``annotate``, ``ckptconv.restore`` and the
:class:`~ckptconv.engine.Engine` never build a model themselves: they ask an adapter. Any object
with the methods of :class:`ModelAdapter` works (duck typing); the reference decoder's adapter
(:class:`~ckptconv.models.reference_adapter.ReferenceAdapter`) is registered as the default.

The engine needs more than a full forward pass. An adapter supplies it in one of two ways:

- **Cache variables** (:data:`CACHE_VARIABLE_METHODS`): the model keeps its KV cache in
  ``nnx.Cache`` variables whose logical names put the slot axis at ``cache_batch`` (decode) or
  ``cache_batch_prefill`` (prefill), as the reference twin and MaxText's NNX models do.
- **An explicit cache pytree** (:data:`EXPLICIT_CACHE_METHODS`), as tunix and gemma models do:
  ``init_cache(model, *, batch, max_length)``, ``cache_batch_axes(cache)`` (the slot axis of
  each leaf, a pytree of ints shaped like the cache) and
  ``nnx_decode(model, tokens, positions, cache) -> (logits, cache)``.

Either way the engine also reads the adapter's ``vocab_size``, ``max_prefill_length`` and
``max_target_length`` attributes (:data:`ENGINE_ATTRIBUTES`).

Users name an adapter on the command line as ``module:function``: :func:`load_adapter` imports
the module, calls the function with no arguments and checks the result.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from ..errors import ConfigError, EngineError

REQUIRED_METHODS = ("nnx_model", "nnx_forward")
"""What every adapter has."""

EXPLICIT_CACHE_METHODS = ("init_cache", "cache_batch_axes", "nnx_decode")
"""The engine's explicit-cache protocol."""

CACHE_VARIABLE_METHODS = ("nnx_cached_model", "nnx_prefill", "nnx_generate")
"""The engine's ``nnx.Cache``-variable protocol (see :class:`CacheVariableAdapter`)."""

ENGINE_ATTRIBUTES = ("vocab_size", "max_prefill_length", "max_target_length")
"""Sizes the engine reads from either kind of engine-capable adapter."""


@runtime_checkable
class ModelAdapter(Protocol):
    """What verify, decode, annotate and restore need from a model (duck-typed).

    Example:
        >>> from ckptconv.models import ModelConfig
        >>> from ckptconv.models.reference_adapter import ReferenceAdapter
        >>> isinstance(ReferenceAdapter(ModelConfig()), ModelAdapter)
        True
    """

    def nnx_model(self) -> Any:
        """The NNX model, concrete or from ``nnx.eval_shape``.

        Its state tree is what an NNX checkpoint's ``model/`` holds.
        """

    def nnx_forward(self, model: Any, tokens: Any, positions: Any) -> Any:
        """Full causal forward: int32 ``[B, L]`` tokens and positions -> logits ``[B, L, V]``."""


class ExplicitCacheAdapter(ModelAdapter, Protocol):
    """An adapter whose model takes and returns its KV cache as a pytree."""

    vocab_size: int
    max_prefill_length: int
    max_target_length: int

    def init_cache(self, model: Any, *, batch: int, max_length: int) -> Any:
        """A zero cache for ``batch`` rows of ``max_length`` positions (may be abstract)."""

    def cache_batch_axes(self, cache: Any) -> Any:
        """The slot (batch) axis of every cache leaf: a pytree of ints shaped like ``cache``."""

    def nnx_decode(self, model: Any, tokens: Any, positions: Any, cache: Any) -> tuple[Any, Any]:
        """``[B, L]`` tokens at ``[B, L]`` positions -> ``(logits [B, L, V], new cache)``.

        Row ``b`` writes its keys and values at its own positions and attends to the cache's
        positions ``<=`` each query's position, so rows of different lengths share one call.
        """


class CacheVariableAdapter(ModelAdapter, Protocol):
    """An adapter whose model holds its KV cache in ``nnx.Cache`` variables.

    The cache variables carry logical axis names (``out_sharding`` metadata); the slot axis is
    named ``cache_batch`` in a decode model and ``cache_batch_prefill`` in a prefill model.
    Optionally ``prefix_filter``: an ``nnx`` filter of the prefill cache variables a prefill
    hands to a decode slot (default ``nnx.Cache``, all of them).
    """

    vocab_size: int
    max_prefill_length: int
    max_target_length: int

    def nnx_cached_model(self, *, mode: str, batch: int) -> Any:
        """The abstract model with ``batch`` cache rows for ``prefill`` or ``autoregressive``."""

    def nnx_prefill(self, model: Any, tokens: Any, positions: Any, segment_ids: Any) -> Any:
        """Prefill ``[1, T]`` (``segment_ids`` 1 real, 0 pad) -> logits ``[1, T, V]``."""

    def nnx_generate(self, model: Any, tokens: Any, positions: Any) -> Any:
        """One decode step ``[N, 1]`` at per-row positions -> logits ``[N, 1, V]``."""


def missing_methods(adapter: Any, names: tuple[str, ...]) -> list[str]:
    """The names of ``names`` that ``adapter`` lacks or holds as non-callables."""
    return [n for n in names if not callable(getattr(adapter, n, None))]


def describe(adapter: Any) -> str:
    """How error messages name an adapter: its spec if it was loaded from one, else its type."""
    return getattr(adapter, "_ckptconv_spec", None) or type(adapter).__name__


def engine_kind(adapter: Any) -> str | None:
    """``"explicit"``, ``"variables"`` or None: which engine protocol ``adapter`` supports."""
    if not missing_methods(adapter, EXPLICIT_CACHE_METHODS):
        return "explicit"
    if not missing_methods(adapter, CACHE_VARIABLE_METHODS):
        return "variables"
    return None


def check_engine_support(adapter: Any) -> str:
    """The engine protocol of ``adapter``; raises if it supports neither.

    Raises:
        EngineError: Neither protocol is complete, or a size attribute is missing (naming
            what is missing).
    """
    kind = engine_kind(adapter)
    if kind is None:
        lacks = missing_methods(adapter, EXPLICIT_CACHE_METHODS)
        raise EngineError(
            f"model {describe(adapter)}: cannot run in the engine: it lacks "
            f"{', '.join(lacks)} (explicit cache) and "
            f"{', '.join(missing_methods(adapter, CACHE_VARIABLE_METHODS))} (nnx.Cache variables)"
        )
    absent = [n for n in ENGINE_ATTRIBUTES if not isinstance(getattr(adapter, n, None), int)]
    if absent:
        raise EngineError(
            f"model {describe(adapter)}: the engine needs integer attributes "
            f"{', '.join(absent)}, which it lacks"
        )
    return kind


_REGISTRY: dict[str, Callable[..., Any]] = {}
DEFAULT = "reference"
"""The registered name of the default adapter (the reference decoder)."""


def register_adapter(name: str, factory: Callable[..., Any]) -> None:
    """Registers ``factory`` (returning an adapter) under ``name``.

    Example:
        >>> register_adapter("mine", lambda config=None: object())
        >>> get_adapter("mine") is not None
        True
    """
    _REGISTRY[str(name)] = factory


def get_adapter(name: str = DEFAULT, *args: Any, **kwargs: Any) -> Any:
    """Builds the adapter registered as ``name`` with ``factory(*args, **kwargs)``.

    Raises:
        ConfigError: No adapter is registered under ``name``.
    """
    if name not in _REGISTRY:
        raise ConfigError(
            f"no model adapter is registered as {name!r}; registered: "
            f"{', '.join(sorted(_REGISTRY))}"
        )
    return _REGISTRY[name](*args, **kwargs)


def as_adapter(model: Any) -> Any:
    """``model`` as an adapter: a ``ModelConfig`` selects the default, an adapter passes.

    Raises:
        ConfigError: ``model`` lacks the required methods.
    """
    from .config import ModelConfig

    if isinstance(model, ModelConfig):
        return get_adapter(DEFAULT, model)
    missing = missing_methods(model, REQUIRED_METHODS)
    if missing:
        raise ConfigError(
            f"model {describe(model)}: expected a ModelConfig or a model adapter; it lacks "
            f"{', '.join(missing)}"
        )
    return model


def call_factory(spec: str, option: str = "--model") -> Any:
    """Imports ``module:function`` and returns what the function returns, called bare.

    Args:
        spec: e.g. ``"examples.tunix_gemma:adapter"``; the module is imported as Python would
            (from ``sys.path``, then from the working directory, as ``python -m`` would).
        option: the option the spec comes from, for errors.

    Raises:
        ConfigError: The spec is malformed, the module or function cannot be imported, or
            the function raises.
    """
    module_name, sep, attr = str(spec).partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"{option} {spec!r}: expected module:function, e.g. mypkg.models:adapter")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())  # last: never shadows an installed package
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - any import failure is the user's to fix
        raise ConfigError(
            f"{option} {spec}: cannot import module {module_name}: {type(e).__name__}: {e}"
        ) from e
    factory: Any = module
    for part in attr.split("."):
        if not hasattr(factory, part):
            raise ConfigError(f"{option} {spec}: module {module_name} has no attribute {attr}")
        factory = getattr(factory, part)
    if not callable(factory):
        raise ConfigError(f"{option} {spec}: {attr} is a {type(factory).__name__}, not a function")
    try:
        return factory()
    except Exception as e:  # noqa: BLE001 - the user's function failed: say so, on one line
        raise ConfigError(f"{option} {spec}: {attr}() raised {type(e).__name__}: {e}") from e


def load_adapter(spec: str) -> Any:
    """Imports ``module:function``, calls the function with no arguments, checks the result.

    Args:
        spec: e.g. ``"examples.tunix_gemma:adapter"`` (see :func:`call_factory`).

    Returns:
        The adapter.

    Raises:
        ConfigError: The spec cannot be called (see :func:`call_factory`), or its result
            lacks ``nnx_model`` / ``nnx_forward`` (named).
    """
    adapter = call_factory(spec)
    attr = str(spec).partition(":")[2]
    missing = missing_methods(adapter, REQUIRED_METHODS)
    if missing:
        raise ConfigError(
            f"--model {spec}: {attr}() returned a {type(adapter).__name__} that lacks "
            f"{', '.join(missing)} (a model adapter needs {', '.join(REQUIRED_METHODS)})"
        )
    try:
        adapter._ckptconv_spec = str(spec)
    except (AttributeError, TypeError):
        pass  # slots or frozen: messages fall back to the type name
    return adapter


def resolve_model(model_spec: str | None, model_config: str | None) -> Any:
    """The adapter the CLI's ``--model`` / ``--model-config`` options name (exactly one).

    Args:
        model_spec: ``module:function`` (see :func:`load_adapter`), or None.
        model_config: A ``ModelConfig`` JSON/YAML file (the reference adapter), or None.

    Returns:
        The adapter.

    Raises:
        ConfigError: Both or neither are given, or either cannot be loaded.
    """
    from .config import ModelConfig

    if (model_spec is None) == (model_config is None):
        given = "both" if model_spec is not None else "neither"
        raise ConfigError(
            f"give exactly one of --model MODULE:FUNCTION and --model-config FILE ({given} given)"
        )
    if model_spec is not None:
        return load_adapter(model_spec)
    return get_adapter(DEFAULT, ModelConfig.load(model_config))
