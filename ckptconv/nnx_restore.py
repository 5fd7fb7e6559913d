"""Restoring an NNX checkpoint written by ckptconv into live NNX objects, with plain Orbax.

The checkpoint is ``{"model": nnx.state(model), "optimizer": nnx.state(optimizer)}`` as
Orbax writes ``nnx.State`` (every leaf ends in ``value``). This module is the README's plain
Orbax snippet plus checks whose errors name the path, and sharded restore: with a mesh and
logical axis rules, every parameter is restored straight into its ``NamedSharding``, each
device reading only its shard. Equivalent plain Orbax::

    abstract = {"model": nnx.state(model), "optimizer": nnx.state(optimizer)}
    restored = ocp.StandardCheckpointer().restore(path, abstract)
    nnx.update(model, restored["model"])
    nnx.update(optimizer, restored["optimizer"])
"""

from __future__ import annotations

import os
from typing import Any

from .convert.plan import abstract_tree_leaves, check_against
from .errors import CheckpointFormatError, PlanError
from .io.sources import CheckpointSource, open_source


def _target(pure: Any, shardings: Any) -> Any:
    """Pure dict of arrays -> Orbax target: string keys, a ``value`` level, ShapeDtypeStructs."""
    import jax  # JAX loads only when restoring: conversions need TensorStore alone.

    if isinstance(pure, dict):
        return {
            str(k): _target(v, None if shardings is None else shardings[k]) for k, v in pure.items()
        }
    return {"value": jax.ShapeDtypeStruct(pure.shape, pure.dtype, sharding=shardings)}


def _values(pure: Any, restored: Any) -> Any:
    """Restored Orbax tree -> the same structure (and key types) as ``pure``."""
    if isinstance(pure, dict):
        return {k: _values(v, restored[str(k)]) for k, v in pure.items()}
    return restored["value"]


def _read_with_tensorstore(reader: CheckpointSource, target: Any, path: tuple = ()) -> Any:
    """Restores ``target`` (dicts of ShapeDtypeStructs) from ``reader``, as Orbax would.

    Used where Orbax cannot open the checkpoint (``s3://`` locations, msgpack sources). A
    sharded leaf is read one shard per device (each device reads only its slab); typed PRNG
    keys are rebuilt from their stored key data and recorded implementation.
    """
    import jax

    if isinstance(target, dict):
        return {k: _read_with_tensorstore(reader, v, (*path, k)) for k, v in target.items()}
    if jax.dtypes.issubdtype(target.dtype, jax.dtypes.prng_key):
        impl = (reader.ext_metadata(path) or {}).get("random_key_impl")
        key = jax.random.wrap_key_data(reader.read(path), impl=impl)
        return key if target.sharding is None else jax.device_put(key, target.sharding)
    if target.sharding is None:
        return jax.numpy.asarray(reader.read(path))
    return jax.make_array_from_callback(
        target.shape, target.sharding, lambda index: reader.read(path, index)
    )


def _fill(obj: Any, restored: Any) -> None:
    from flax import nnx

    state = nnx.state(obj)
    pure = nnx.to_pure_dict(state)
    nnx.replace_by_pure_dict(state, _values(pure, restored))
    nnx.update(obj, state)


def param_shardings(model: Any, *, mesh: Any, rules: Any = "maxtext") -> Any:
    """Returns ``NamedSharding``s for every variable of ``model`` from its logical names.

    Params use :func:`~ckptconv.sharding.param_partition_specs`; other variables (rng state,
    caches) are replicated.

    Args:
        model: an NNX module (concrete or abstract).
        mesh: the ``jax.sharding.Mesh``.
        rules: a preset name, a rules file, or a ``LogicalAxisRules``.

    Returns:
        A pure-dict tree shaped like ``nnx.to_pure_dict(nnx.state(model))``.
    """
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    from .sharding import LogicalAxisRules, load_rules, named_shardings, param_partition_specs

    if not isinstance(rules, LogicalAxisRules):
        rules = load_rules(rules)
    if rules.mesh_axes is None:
        # Rules that do not declare their mesh axes must name only axes of this mesh, so a
        # typo is an error instead of a silently replicated dimension.
        rules.validate(mesh)
    params = named_shardings(param_partition_specs(model, rules, mesh), mesh)
    full = nnx.to_pure_dict(nnx.state(model))

    def merge(node: Any, sub: Any) -> Any:
        if isinstance(node, dict):
            return {k: merge(v, None if sub is None else sub.get(k)) for k, v in node.items()}
        return sub if sub is not None else NamedSharding(mesh, PartitionSpec())

    return merge(full, params)


def restore(
    path: str | os.PathLike,
    model: Any,
    optimizer: Any = None,
    *,
    mesh: Any = None,
    rules: Any = "maxtext",
    shardings: Any = None,
    strict: bool = True,
) -> Any:
    """Restores an NNX checkpoint into ``model`` (and ``optimizer``) in place.

    Args:
        path: the NNX checkpoint (as written by ``ckptconv linen-to-nnx``).
        model: the NNX module to fill (its state's shapes and dtypes must match), or a model
            adapter (:class:`~ckptconv.models.ModelAdapter`) or its ``"module:function"``
            spec, whose ``nnx_model()`` (concrete or abstract) is filled and returned.
        optimizer: an ``nnx.Optimizer`` over ``model`` to fill from ``optimizer/...``.
        mesh: restore the model's arrays sharded on this mesh, with shardings computed from
            the variables' logical names and ``rules`` (each device reads only its shard).
        rules: logical axis rules for ``mesh``: a preset name, a file, or ``LogicalAxisRules``.
        shardings: explicit shardings instead, a pure-dict tree shaped like
            ``nnx.to_pure_dict(nnx.state(model))``.
        strict: when False, checkpoint leaves the model does not hold (e.g. MaxText's rng
            state, for a model without rng streams) are skipped; a leaf the model holds but
            the checkpoint lacks, or of another shape or dtype, is always an error.

    Returns:
        The filled model.

    Raises:
        CheckpointFormatError: when the checkpoint cannot be read.
        PlanError: when the checkpoint's tree does not match the model (every missing, extra
            or mismatched path is named).
        ShardingError: when a dimension is not divisible by its mesh axes.
        ConfigError: when a ``"module:function"`` spec cannot be loaded.

    Example:
        >>> model = Transformer(config, rngs=nnx.Rngs(0))  # doctest: +SKIP
        >>> ckptconv.restore("nnx_ckpt", model, mesh=make_mesh("data=2,tensor=4"))  # doctest: +SKIP
    """
    import orbax.checkpoint as ocp
    from flax import nnx

    model = _as_module(model)
    reader = open_source(path)
    leaves = reader.leaves()
    model_leaves = {p: x for p, x in leaves.items() if p[0] == "model"}
    problems = check_against(model_leaves, abstract_tree_leaves(model))
    if not strict:
        problems = [p for p in problems if p.problem != "extra"]
    if problems:
        shown = "; ".join(str(p) for p in problems[:5])
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        hint = (
            " (strict=False skips leaves the model lacks)" if problems[0].problem == "extra" else ""
        )
        raise PlanError(f"{reader.location}: does not match the model: {shown}{more}{hint}")
    if shardings is None and mesh is not None:
        shardings = param_shardings(model, mesh=mesh, rules=rules)
    target = {"model": _target(nnx.to_pure_dict(nnx.state(model)), shardings)}
    if optimizer is not None:
        if not any(p[0] == "optimizer" for p in leaves):
            raise PlanError(f"{reader.location}: has no optimizer state to restore")
        target["optimizer"] = _target(nnx.to_pure_dict(nnx.state(optimizer)), None)
    args = ocp.args.PyTreeRestore(
        item=target,
        restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True,
    )
    location = reader.location.local_path
    if location is None or reader.format_name not in ("ocdbt", "zarr"):
        # An object store (Orbax needs a path) or a format Orbax does not read: read through
        # the source, one shard at a time.
        restored = _read_with_tensorstore(reader, target)
    else:
        try:
            restored = ocp.PyTreeCheckpointer().restore(os.path.abspath(location), args=args)
        except (ValueError, KeyError, FileNotFoundError) as e:
            raise CheckpointFormatError(f"{reader.location}: Orbax cannot restore it: {e}") from e
    _fill(model, restored["model"])
    if optimizer is not None:
        _fill(optimizer, restored["optimizer"])
    return model


def _as_module(model: Any) -> Any:
    """An ``nnx.Module`` as is; an adapter (or its spec) as its ``nnx_model()``."""
    from flax import nnx

    if isinstance(model, str):
        from .models.adapter import load_adapter

        model = load_adapter(model)
    if not isinstance(model, nnx.Module) and callable(getattr(model, "nnx_model", None)):
        return model.nnx_model()
    return model
