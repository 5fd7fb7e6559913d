"""Loading parameters for the engine, sharded, from a checkpoint or from memory.

Sources, all checked against the abstract NNX model before any array is placed:

- an NNX checkpoint written by ``ckptconv linen-to-nnx``: restored with Orbax straight into the
  parameter shardings (:func:`ckptconv.restore`); leaves the model does not hold (such
  as MaxText's RNG state) are skipped;
- a Linen checkpoint (MaxText or Flax ``TrainState``): converted in memory, one leaf at a time,
  by the same plan ``ckptconv linen-to-nnx`` executes (nothing is written to disk);
- an ``nnx.State`` or ``nnx.Module`` holding ``nnx.Param`` variables;
- a Linen ``params`` tree (a mapping, optionally wrapped in ``{"params": ...}``), whose stacked
  layer axis is at ``param_scan_axis``.

The model comes from a :class:`~ckptconv.models.ModelAdapter`. Linen sources need an adapter
that converts Linen params (``linen_param_shapes``, ``from_linen_params`` and
``convert_options``, as the reference adapter has); any adapter loads NNX sources.

The helpers :func:`state_like` and :func:`sharding_state` build trees shaped exactly like an
``nnx.State`` (same variables and metadata), which is what ``jax.jit``'s ``out_shardings`` and
Orbax's restore targets need.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx, traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ..errors import CkptconvError, LayoutError, PlanError
from ..models.adapter import as_adapter, describe

Path = tuple[str, ...]


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def _names(keypath: tuple[Any, ...]) -> Path:
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in keypath)


def state_like(state: Any, fn: Callable[[Path, nnx.Variable], Any]) -> Any:
    """A copy of an ``nnx.State`` whose variables hold ``fn(path, variable)`` as their value.

    Args:
        state: The state (its variables may hold arrays or ``ShapeDtypeStruct``).
        fn: Called with the variable's path (a tuple of names, as in ``nnx.to_pure_dict``)
            and the variable.

    Returns:
        A state with the same structure and variable metadata.

    Example:
        >>> import jax.numpy as jnp
        >>> s = nnx.State({"w": nnx.Param(jnp.zeros(2))})
        >>> state_like(s, lambda path, v: path)["w"].get_value()
        ('w',)
    """
    return jax.tree_util.tree_map_with_path(
        lambda kp, var: var.replace(fn(_names(kp), var)), state, is_leaf=_is_variable
    )


def variables_by_path(state: Any) -> dict[Path, nnx.Variable]:
    """The variables of an ``nnx.State`` keyed by their path."""
    flat = jax.tree_util.tree_flatten_with_path(state, is_leaf=_is_variable)[0]
    return {_names(kp): var for kp, var in flat}


def lookup(tree: Mapping[str, Any], path: Path) -> Any:
    """The leaf of a nested dict at ``path``."""
    node: Any = tree
    for key in path:
        # Paths are names; pure dicts key list entries (nnx.List, ModuleList) by int.
        node = node[key] if key in node or not key.isdigit() else node[int(key)]
    return node


def sharding_state(state: Any, specs: Mapping[str, Any], mesh: Mesh) -> Any:
    """An ``nnx.State``-shaped tree of ``NamedSharding`` from a pure-dict tree of specs.

    Args:
        state: The (abstract) state.
        specs: ``PartitionSpec`` per leaf, shaped like ``nnx.to_pure_dict(state)`` (what
            :func:`ckptconv.sharding.param_partition_specs` and the cache functions return).
        mesh: The mesh.

    Returns:
        The shardings, usable as ``out_shardings`` or as a restore target.
    """
    return state_like(state, lambda path, _: NamedSharding(mesh, lookup(specs, path)))


def replicated(mesh: Mesh) -> NamedSharding:
    """The fully replicated sharding on ``mesh``."""
    return NamedSharding(mesh, PartitionSpec())


def abstract_model(model: Any, *, model_mode: str = "train", cache_batch: int = 1) -> Any:
    """The adapter's NNX model, abstract: ``nnx_model()`` in train mode, else its cached model.

    Args:
        model: A ``ModelConfig`` (the default adapter) or a model adapter.
        model_mode: ``train``, ``prefill`` or ``autoregressive``.
        cache_batch: Cache rows of an inference-mode model.
    """
    adapter = as_adapter(model)
    if model_mode == "train":
        return adapter.nnx_model()
    return adapter.nnx_cached_model(mode=model_mode, batch=cache_batch)


def _check_leaves(want: Mapping[Any, Any], have: Mapping[Any, Any], where: str, model: str) -> None:
    """Raises a :class:`LayoutError` naming the first param ``have`` lacks, adds or mismatches.

    Args:
        want: The expected ``{path: array or ShapeDtypeStruct}``.
        have: The given ``{path: array}``.
        where: What is checked (named first in the message).
        model: What ``want`` describes (``"the model"``, ``"the model config"``).
    """
    for p in sorted(want.keys() - have.keys()):
        raise LayoutError(f"{where}: lacks param {'/'.join(p)} that {model} has")
    for p in sorted(have.keys() - want.keys()):
        raise LayoutError(f"{where}: has param {'/'.join(map(str, p))} that {model} lacks")
    for p, s in sorted(want.items()):
        leaf = have[p]
        if tuple(leaf.shape) != tuple(s.shape) or np.dtype(leaf.dtype) != np.dtype(s.dtype):
            raise LayoutError(
                f"{where}: param {'/'.join(p)} is {np.dtype(leaf.dtype).name}"
                f"{list(leaf.shape)} but {model} expects {np.dtype(s.dtype).name}"
                f"{list(s.shape)}"
            )


def _check_tree(expected: Any, got: Any, where: str) -> None:
    want = {p: v.get_value() for p, v in variables_by_path(expected).items()}
    have = {p: v.get_value() for p, v in variables_by_path(got).items()}
    _check_leaves(want, have, where, "the model")


_LINEN_METHODS = ("linen_param_shapes", "from_linen_params", "convert_options")


def _linen_support(adapter: Any, what: str) -> None:
    lacks = [n for n in _LINEN_METHODS if not callable(getattr(adapter, n, None))]
    if lacks:
        raise LayoutError(
            f"{what}: model {describe(adapter)} cannot load Linen params (it lacks "
            f"{', '.join(lacks)}); convert with ckptconv linen-to-nnx and load the NNX checkpoint"
        )


def linen_shapes(model: Any) -> dict[Path, Any]:
    """The Linen model's params as ``{path: ShapeDtypeStruct}`` (traced, nothing computed).

    Args:
        model: A ``ModelConfig`` or an adapter with ``linen_param_shapes``.
    """
    adapter = as_adapter(model)
    _linen_support(adapter, "Linen params")
    return adapter.linen_param_shapes()


def check_linen_params(want: Mapping[Path, Any], tree: Mapping[Any, Any], where: str) -> None:
    """Checks a Linen params tree (or ``{path: leaf}``) against the Linen model's shapes.

    Raises:
        LayoutError: A param is missing, extra, or of another shape or dtype (naming it).
    """
    have = tree if all(isinstance(k, tuple) for k in tree) else traverse_util.flatten_dict(tree)
    _check_leaves(want, have, where, "the model config")


def _place(abstract: Any, values: Any, shardings: Any) -> Any:
    """``values`` (a state of the same variables) placed with ``shardings``."""
    by_path = {p: v.get_value() for p, v in variables_by_path(values).items()}
    placement = {p: v.get_value() for p, v in variables_by_path(shardings).items()}
    return state_like(abstract, lambda path, _: jax.device_put(by_path[path], placement[path]))


def _from_nnx_checkpoint(path: str, adapter: Any, shardings: Any) -> Any:
    from .. import restore  # the public ``ckptconv.restore`` function

    model = adapter.nnx_model()
    params = nnx.to_pure_dict(shardings)
    rep = _first_mesh_sharding(shardings)
    # Other variables (rng state, counters) are restored replicated; the params into shardings.
    full = _merge_shardings(nnx.to_pure_dict(nnx.state(model)), params, rep)
    restore(path, model, shardings=full, strict=False)
    return nnx.state(model, nnx.Param)


def _first_mesh_sharding(shardings: Any) -> Any:
    leaves = [v.get_value() for v in variables_by_path(shardings).values()]
    return replicated(leaves[0].mesh) if leaves else None


def _merge_shardings(node: Any, sub: Any, rep: Any) -> Any:
    if isinstance(node, dict):
        return {
            k: _merge_shardings(v, None if not isinstance(sub, dict) else sub.get(k), rep)
            for k, v in node.items()
        }
    return sub if sub is not None else rep


def _from_linen_checkpoint(reader: Any, adapter: Any, abstract: Any, shardings: Any) -> Any:
    from ..convert import ConvertOptions, abstract_tree_leaves, check_against, plan_linen_to_nnx
    from ..convert.expr import evaluate

    _linen_support(adapter, str(reader.location))
    options = ConvertOptions(params_only=True, **adapter.convert_options())
    where = str(reader.location)
    plan = plan_linen_to_nnx(reader.leaves(), reader.custom_metadata, options, where=where)
    target = abstract_tree_leaves(nnx.to_pure_dict(abstract))
    problems = [p for p in check_against(plan.output_leaves(), target) if p.problem != "extra"]
    if problems:
        shown = "; ".join(str(p) for p in problems[:5])
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise PlanError(f"{where}: does not match the model config: {shown}{more}")
    exprs = {out.path: out.expr for out in plan.leaves if out.path in target}
    placement = {p: v.get_value() for p, v in variables_by_path(shardings).items()}
    return state_like(
        abstract,
        lambda path, _: jax.device_put(
            evaluate(exprs[("model", *path, "value")], reader.read), placement[path]
        ),
    )


def load_params(
    source: str | os.PathLike | Any, *, model: Any, abstract: Any, shardings: Any
) -> Any:
    """Loads parameters from any supported source (see module) into ``shardings``.

    Args:
        source: A checkpoint path, an ``nnx.State`` / ``nnx.Module``, or a Linen params tree.
        model: A model adapter (or a ``ModelConfig``: the default adapter).
        abstract: The abstract ``nnx.Param`` state of the model.
        shardings: A tree of ``NamedSharding`` shaped like ``abstract``.

    Returns:
        The ``nnx.Param`` state, every array placed with its sharding.

    Raises:
        CheckpointFormatError: The checkpoint cannot be read.
        PlanError: The checkpoint does not match the config (the message names the path and
            the mismatched leaves).
        LayoutError: An in-memory tree does not match the model.
    """
    adapter = as_adapter(model)
    if isinstance(source, str | os.PathLike):
        from ..convert import detect_layout
        from ..io.sources import open_source

        reader = open_source(source)
        try:
            layout = detect_layout(reader.leaves(), str(reader.location)).name
        except CkptconvError as e:
            raise PlanError(f"{reader.location}: not a checkpoint ckptconv can decode: {e}") from e
        if layout == "nnx":
            return _from_nnx_checkpoint(os.fspath(source), adapter, shardings)
        return _from_linen_checkpoint(reader, adapter, abstract, shardings)
    if isinstance(source, nnx.Module):
        source = nnx.state(source, nnx.Param)
    if isinstance(source, nnx.State):
        values = nnx.filter_state(source, nnx.Param)
        _check_tree(abstract, values, "NNX params")
        return _place(abstract, values, shardings)
    if isinstance(source, Mapping):
        if set(source) == {"params"}:
            source = source["params"]
        check_linen_params(linen_shapes(adapter), source, "Linen params")
        values = adapter.from_linen_params(source)
        return _place(abstract, values, shardings)
    raise LayoutError(
        f"cannot load params from a {type(source).__name__}: expected a checkpoint path, an "
        "nnx.State, an nnx.Module or a Linen params mapping"
    )
