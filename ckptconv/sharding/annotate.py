"""Partition specs for an abstract NNX model's parameters and KV caches.

The logical names of each ``nnx.Variable`` are read from its metadata (``out_sharding``, flax
>= 0.12.4; older flax: ``sharding_names`` / ``sharding``) and mapped to mesh axes with a
:class:`~ckptconv.sharding.rules.LogicalAxisRules`. Parameters are the ``nnx.Param``
variables, caches the ``nnx.Cache`` variables. Results are pure-dict trees shaped like
``nnx.to_pure_dict(state)`` with a ``PartitionSpec`` per leaf.

Stacked layers: ``nnx.vmap`` / ``nnx.scan`` with ``transform_metadata={nnx.PARTITION_NAME:
"layers"}`` insert ``"layers"`` into ``out_sharding`` at the stacked axis themselves (flax
0.12.8 stores nothing else on the variable). If a variable's names are one shorter than its
rank and its metadata carries a ``partition_name`` key (set by hand or by another tool), that
name (``"layers"`` when the value is not a string) is inserted at ``layer_axis``.

Limits: this reads flax's variable metadata, whose keys have changed between flax releases;
only ``out_sharding``, ``sharding_names`` and ``sharding`` are understood.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
from flax import nnx, traverse_util
from jax.sharding import NamedSharding, PartitionSpec

from ..errors import ShardingError
from .rules import LogicalAxisRules, axes_size, spec_axes

_NAME_KEYS = ("out_sharding", "sharding_names", "sharding")
_PARTITION_NAME = nnx.PARTITION_NAME  # "partition_name"

Mode = Literal["params", "prefill", "ar"]
MODES: tuple[str, ...] = ("params", "prefill", "ar")
PREFILL_BATCH = "cache_batch_prefill"
AR_BATCH = "cache_batch"


class ShardingFallbackWarning(UserWarning):
    """A dimension was replicated because its size is not divisible by its mesh axes."""


@dataclasses.dataclass(frozen=True)
class Fallback:
    """One dimension replicated by ``replicate_indivisible=True``.

    Attributes:
        path: the variable's '/'-joined path, e.g. ``"layers/attn/key"``.
        dim: the dimension index.
        size: the dimension's size.
        axes: the mesh axes it would have been sharded over.
    """

    path: str
    dim: int
    size: int
    axes: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class _Annotated:
    path: tuple[Any, ...]
    shape: tuple[int, ...]
    names: tuple[str | None, ...] | None
    spec: PartitionSpec


def _pathstr(path: Sequence[Any]) -> str:
    return "/".join(str(k) for k in path) if path else "<root>"


def _variables(abstract_model: Any, var_type: type) -> list[tuple[tuple[Any, ...], Any]]:
    """Returns ``(path, Variable)`` pairs of ``var_type`` from a Module or a State."""
    if isinstance(abstract_model, nnx.State):
        state = nnx.filter_state(abstract_model, var_type)
    elif isinstance(abstract_model, nnx.Module):
        state = nnx.state(abstract_model, var_type)
    else:
        raise ShardingError(
            "expected an abstract nnx.Module (from nnx.eval_shape) or its nnx.State, got "
            f"{type(abstract_model).__name__}"
        )
    return [(tuple(path), var) for path, var in nnx.to_flat_state(state)]


def _shape(var: Any, path: tuple[Any, ...]) -> tuple[int, ...]:
    value = var.get_value() if isinstance(var, nnx.Variable) else var
    shape = getattr(value, "shape", None)
    if shape is None:
        raise ShardingError(f"variable {_pathstr(path)} holds {type(value).__name__}, not an array")
    return tuple(shape)


def logical_names(var: Any, *, path: Sequence[Any] = (), layer_axis: int = 0):
    """Returns one logical name per dimension of an ``nnx.Variable``, or ``None`` if unnamed.

    Args:
        var: the variable (abstract or concrete).
        path: its path, for error messages.
        layer_axis: where to insert the layer name when the names are one short and the
            variable carries ``partition_name`` metadata.

    Returns:
        A tuple as long as the variable's rank, or ``None`` when it has no names.

    Raises:
        ShardingError: the names do not fit the rank, or are not names.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> with nnx.use_eager_sharding(False):
        ...     v = nnx.Param(jnp.zeros((2, 3)), out_sharding=("embed", "mlp"))
        >>> logical_names(v)
        ('embed', 'mlp')
    """
    path = tuple(path)
    metadata = var.get_metadata() if isinstance(var, nnx.Variable) else {}
    names = None
    for key in _NAME_KEYS:
        if metadata.get(key):
            names = metadata[key]
            break
    if names is None:
        return None
    if isinstance(names, jax.sharding.Sharding):
        raise ShardingError(
            f"variable {_pathstr(path)} carries a concrete sharding {names}, not logical names"
        )
    if isinstance(names, str) or not isinstance(names, Sequence | PartitionSpec):
        raise ShardingError(
            f"variable {_pathstr(path)}: logical names must be a sequence, got {names!r}"
        )
    names = tuple(names)
    for n in names:
        if n is not None and not isinstance(n, str):
            raise ShardingError(
                f"variable {_pathstr(path)}: logical names must be strings or None, "
                f"got {n!r} in {names}"
            )
    shape = _shape(var, path)
    if len(names) == len(shape) - 1 and metadata.get(_PARTITION_NAME):
        layer_name = metadata[_PARTITION_NAME]
        if not isinstance(layer_name, str):
            layer_name = "layers"
        if not -len(shape) <= layer_axis < len(shape):
            raise ShardingError(
                f"variable {_pathstr(path)}: layer_axis {layer_axis} is outside its "
                f"{len(shape)} dimensions"
            )
        axis = layer_axis % len(shape)
        names = names[:axis] + (layer_name,) + names[axis:]
    if len(names) != len(shape):
        raise ShardingError(
            f"variable {_pathstr(path)} has shape {shape} but {len(names)} logical names {names}"
        )
    return names


def _fit(
    spec: PartitionSpec,
    shape: tuple[int, ...],
    mesh: Any,
    *,
    path: str,
    replicate_indivisible: bool,
    report: list[Fallback] | None,
) -> PartitionSpec:
    """Checks divisibility of each sharded dimension; replicates or raises when it fails."""
    entries = list(spec)
    for dim, (entry, size) in enumerate(zip(entries, shape, strict=False)):
        axes = spec_axes(entry)
        parts = axes_size(axes, mesh)
        if parts > 1 and size % parts:
            if not replicate_indivisible:
                raise ShardingError(
                    f"variable {path}: dimension {dim} of size {size} is not divisible by mesh "
                    f"axes {axes} ({parts} devices); pass replicate_indivisible=True "
                    "(--replicate-indivisible) to replicate it, or choose other rules or mesh"
                )
            fallback = Fallback(path, dim, size, axes)
            if report is not None:
                report.append(fallback)
            warnings.warn(
                f"variable {path}: dimension {dim} of size {size} is not divisible by mesh axes "
                f"{axes} ({parts} devices); replicating it",
                ShardingFallbackWarning,
                stacklevel=4,
            )
            entries[dim] = None
    return PartitionSpec(*entries)


def _annotate(
    abstract_model: Any,
    rules: LogicalAxisRules,
    mesh: Any,
    mode: str,
    replicate_indivisible: bool,
    report: list[Fallback] | None,
    layer_axis: int,
) -> list[_Annotated]:
    """The one body behind the public spec functions: ``mode`` picks the variables and checks.

    Called directly by each public function (those of :func:`_spec_function` and
    :func:`annotation_rows`, never through another helper), so that the ``stacklevel`` of
    :func:`_fit`'s warning points at the user's call.
    """
    if mode not in MODES:
        raise ShardingError(f"unknown annotation mode {mode!r}; expected one of {MODES}")
    out = []
    for path, var in _variables(abstract_model, nnx.Param if mode == "params" else nnx.Cache):
        shape = _shape(var, path)
        names = logical_names(var, path=path, layer_axis=layer_axis)
        if mode in ("prefill", "ar") and names is not None:
            wanted, other = (
                (PREFILL_BATCH, AR_BATCH) if mode == "prefill" else (AR_BATCH, PREFILL_BATCH)
            )
            if other in names:
                built = "autoregressive" if other == AR_BATCH else "prefill"
                raise ShardingError(
                    f"cache {_pathstr(path)} has logical names {names} with {other!r}: the "
                    f"model was built for {built} mode, but {mode} caches use {wanted!r}"
                )
        if names is None:
            spec = PartitionSpec()
        else:
            try:
                spec = rules.to_partition_spec(names, mesh=mesh)
            except ShardingError as e:
                raise ShardingError(f"variable {_pathstr(path)}: {e}") from e
            spec = _fit(
                spec,
                shape,
                mesh,
                path=_pathstr(path),
                replicate_indivisible=replicate_indivisible,
                report=report,
            )
        out.append(_Annotated(path, shape, names, spec))
    return out


def _to_tree(entries: list[_Annotated]) -> dict[Any, Any]:
    return traverse_util.unflatten_dict({e.path: e.spec for e in entries})


def _spec_function(mode: str, name: str, doc: str) -> Callable[..., dict[Any, Any]]:
    """Builds the public spec function of ``mode``: the three differ only in mode and docs.

    The function built calls :func:`_annotate` itself, so that the ``stacklevel`` of
    :func:`_fit`'s warning points at the user's call.
    """

    def specs(
        abstract_model: Any,
        rules: LogicalAxisRules,
        mesh: Any,
        *,
        replicate_indivisible: bool = False,
        report: list[Fallback] | None = None,
        layer_axis: int = 0,
    ) -> dict[Any, Any]:
        entries = _annotate(
            abstract_model, rules, mesh, mode, replicate_indivisible, report, layer_axis
        )
        return _to_tree(entries)

    specs.__name__ = specs.__qualname__ = name
    specs.__doc__ = doc
    return specs


param_partition_specs = _spec_function(
    "params",
    "param_partition_specs",
    """Returns a ``PartitionSpec`` for every ``nnx.Param`` of an abstract model.

    Args:
        abstract_model: an ``nnx.Module`` from ``nnx.eval_shape(lambda: Model(...))``, or its
            ``nnx.State``.
        rules: the logical axis rules.
        mesh: the ``Mesh`` (or ``AbstractMesh``); absent or size-1 axes drop out.
        replicate_indivisible: replicate a dimension whose size its mesh axes do not divide,
            instead of raising; each case is appended to ``report`` and warned about
            (:class:`ShardingFallbackWarning`).
        report: optional list that receives one :class:`Fallback` per replicated dimension.
        layer_axis: stacked axis for variables whose names lack the layer name (see module).

    Returns:
        A pure-dict tree shaped like ``nnx.to_pure_dict(nnx.state(model, nnx.Param))``; an
        unnamed variable gets ``PartitionSpec()``.

    Raises:
        ShardingError: names do not fit a variable's rank, or a dimension is not divisible
            (naming the path, dimension, size and mesh axes).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from flax import nnx
        >>> from ckptconv.sharding import get_preset
        >>> class M(nnx.Module):
        ...     def __init__(self):
        ...         self.w = nnx.Param(jnp.zeros((4, 8)), out_sharding=("embed", "mlp"))
        >>> with nnx.use_eager_sharding(False):
        ...     model = nnx.eval_shape(M)
        >>> mesh = jax.sharding.AbstractMesh((1, 1), ("fsdp", "tensor"))
        >>> param_partition_specs(model, get_preset("fsdp-tp"), mesh)
        {'w': P(None, None)}
    """,
)


prefill_kv_cache_partition_specs = _spec_function(
    "prefill",
    "prefill_kv_cache_partition_specs",
    """Returns a ``PartitionSpec`` for every ``nnx.Cache`` of a model built in prefill mode.

    Prefill caches name their batch axis ``cache_batch_prefill``.

    Args:
        abstract_model: an abstract ``nnx.Module`` (or its ``nnx.State``) in prefill mode.
        rules: the logical axis rules.
        mesh: the mesh; absent or size-1 axes drop out.
        replicate_indivisible: see :func:`param_partition_specs`.
        report: see :func:`param_partition_specs`.
        layer_axis: see :func:`param_partition_specs`.

    Returns:
        A pure-dict tree shaped like ``nnx.to_pure_dict(nnx.state(model, nnx.Cache))``.

    Raises:
        ShardingError: a cache is named ``cache_batch`` (the model was built for AR mode), or
            as for :func:`param_partition_specs`.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from flax import nnx
        >>> from ckptconv.sharding import get_preset
        >>> names = ("cache_batch_prefill", "cache_sequence", "cache_heads", "cache_kv")
        >>> class M(nnx.Module):
        ...     def __init__(self):
        ...         self.k = nnx.Cache(jnp.zeros((1, 16, 4, 8)), out_sharding=names)
        >>> with nnx.use_eager_sharding(False):
        ...     model = nnx.eval_shape(M)
        >>> mesh = jax.sharding.AbstractMesh((2, 4), ("data", "tensor"))
        >>> prefill_kv_cache_partition_specs(model, get_preset("fsdp-tp"), mesh)
        {'k': P(None, None, 'tensor', None)}
    """,
)


ar_kv_cache_partition_specs = _spec_function(
    "ar",
    "ar_kv_cache_partition_specs",
    """Returns a ``PartitionSpec`` for every ``nnx.Cache`` of a model built in AR mode.

    Autoregressive (decode) caches name their slot axis ``cache_batch``. The arguments and the
    result are those of :func:`prefill_kv_cache_partition_specs`, for a model (or its
    ``nnx.State``) built in AR mode.

    Raises:
        ShardingError: a cache is named ``cache_batch_prefill`` (the model was built for
            prefill), or as for :func:`param_partition_specs`.

    Example:
        An ``nnx.State`` of abstract caches serves as well as the module:

        >>> import jax, jax.numpy as jnp
        >>> from flax import nnx
        >>> from ckptconv.sharding import get_preset
        >>> names = ("cache_batch", "cache_sequence", "cache_heads", "cache_kv")
        >>> k = jax.ShapeDtypeStruct((4, 16, 4, 8), jnp.float32)
        >>> with nnx.use_eager_sharding(False):
        ...     state = nnx.State({"k": nnx.Cache(k, out_sharding=names)})
        >>> mesh = jax.sharding.AbstractMesh((2, 4), ("data", "tensor"))
        >>> ar_kv_cache_partition_specs(state, get_preset("fsdp-tp"), mesh)
        {'k': P('data', None, 'tensor', None)}
    """,
)


def named_shardings(specs: Any, mesh: jax.sharding.Mesh) -> Any:
    """Turns a tree of ``PartitionSpec`` into the same tree of ``NamedSharding`` on ``mesh``.

    Args:
        specs: a tree whose leaves are ``PartitionSpec`` (e.g. from
            :func:`param_partition_specs`).
        mesh: the concrete mesh.

    Returns:
        The tree of shardings, e.g. for ``jax.device_put`` or ``jax.jit(out_shardings=...)``.

    Example:
        >>> import jax
        >>> from jax.sharding import PartitionSpec as P
        >>> mesh = jax.make_mesh((1,), ("tensor",), devices=jax.devices()[:1])
        >>> named_shardings({"w": P(None, "tensor")}, mesh)["w"].spec
        P(None, 'tensor')
    """
    return jax.tree.map(
        lambda spec: NamedSharding(mesh, spec),
        specs,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def shard_shape(shape: Sequence[int], spec: PartitionSpec, mesh: Any) -> tuple[int, ...]:
    """Returns the shape of one device's shard of an array of ``shape`` sharded by ``spec``.

    Args:
        shape: the global shape.
        spec: the partition spec (may be shorter than the rank: trailing dims replicated).
        mesh: the mesh (``Mesh`` or ``AbstractMesh``).

    Returns:
        The per-device shape.

    Raises:
        ShardingError: the spec has more entries than the rank, or a dimension is not
            divisible by its mesh axes.

    Example:
        >>> import jax
        >>> from jax.sharding import PartitionSpec as P
        >>> mesh = jax.sharding.AbstractMesh((2, 4), ("data", "tensor"))
        >>> shard_shape((8, 12, 3), P("data", ("tensor",)), mesh)
        (4, 3, 3)
    """
    shape = tuple(shape)
    entries = tuple(spec)
    if len(entries) > len(shape):
        raise ShardingError(f"spec {spec} has {len(entries)} entries for shape {shape}")
    out = []
    for dim, size in enumerate(shape):
        axes = spec_axes(entries[dim]) if dim < len(entries) else ()
        parts = axes_size(axes, mesh)
        if size % parts:
            raise ShardingError(
                f"dimension {dim} of size {size} (shape {shape}) is not divisible by mesh axes "
                f"{axes} ({parts} devices)"
            )
        out.append(size // parts)
    return tuple(out)


def annotation_rows(
    abstract_model: Any,
    rules: LogicalAxisRules,
    mesh: Any,
    mode: Mode,
    *,
    replicate_indivisible: bool = False,
    report: list[Fallback] | None = None,
    layer_axis: int = 0,
) -> list[dict[str, Any]]:
    """Returns one row per variable, for printing (the CLI's ``annotate`` command).

    Args:
        abstract_model: an abstract ``nnx.Module`` or its ``nnx.State``.
        rules: the logical axis rules.
        mesh: the mesh.
        mode: ``"params"`` (``nnx.Param``), ``"prefill"`` or ``"ar"`` (``nnx.Cache``).
        replicate_indivisible: see :func:`param_partition_specs`.
        report: see :func:`param_partition_specs`.
        layer_axis: see :func:`param_partition_specs`.

    Returns:
        Dicts with keys ``path`` ('/'-joined str), ``shape``, ``logical_names`` (tuple or
        ``None``), ``spec`` (``PartitionSpec``) and ``shard_shape``, sorted by path.

    Raises:
        ShardingError: an unknown mode, or as for the spec functions.

    Example:
        One row for the one param of an abstract state:

        >>> import jax
        >>> from flax import nnx
        >>> from ckptconv.sharding import get_preset
        >>> w = jax.ShapeDtypeStruct((4, 8), "float32")
        >>> with nnx.use_eager_sharding(False):
        ...     state = nnx.State({"w": nnx.Param(w, out_sharding=("embed", "mlp"))})
        >>> mesh = jax.sharding.AbstractMesh((2, 4), ("fsdp", "tensor"))
        >>> [row] = annotation_rows(state, get_preset("fsdp-tp"), mesh, "params")
        >>> row["path"], row["spec"], row["shard_shape"]
        ('w', P('fsdp', 'tensor'), (2, 2))
    """
    entries = _annotate(
        abstract_model, rules, mesh, mode, replicate_indivisible, report, layer_axis
    )
    return [
        {
            "path": _pathstr(e.path),
            "shape": e.shape,
            "logical_names": e.names,
            "spec": e.spec,
            "shard_shape": shard_shape(e.shape, e.spec, mesh),
        }
        for e in sorted(entries, key=lambda e: tuple(map(str, e.path)))
    ]
