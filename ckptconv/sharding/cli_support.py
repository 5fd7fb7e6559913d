"""The ``ckptconv annotate`` command's one library call: build, annotate, serialise."""

from __future__ import annotations

from typing import Any

from ..errors import ShardingError


def annotate_model(
    model: Any,
    mesh_spec: str,
    rules: str,
    mode: str,
    *,
    cache_batch: int | None = None,
    replicate_indivisible: bool = False,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Annotates an NNX model: the reference decoder of a config file, or an adapter's.

    Args:
        model: a ``ModelConfig`` JSON or YAML file (ckptconv or MaxText names), or a model
            adapter (:class:`~ckptconv.models.ModelAdapter`); ``prefill`` and ``ar`` need one
            whose caches are ``nnx.Cache`` variables (``nnx_cached_model``).
        mesh_spec: e.g. ``"data=2,tensor=4"``; an abstract mesh of these sizes is used, so
            the devices need not be present (``-1`` sizes need the real devices).
        rules: a preset name or a rules file.
        mode: ``params``, ``prefill`` or ``ar``.
        cache_batch: KV-cache rows; default 1 for prefill, the device count for ``ar``.
        replicate_indivisible: replicate indivisible dimensions instead of failing.

    Returns:
        JSON-ready rows (path, shape, logical names, spec, shard shape) and the replicated
        indivisible dimensions (path, dim, size, the mesh axes), as plain lists and dicts.

    Raises:
        ShardingError: for an unknown mesh axis, a repeated logical name or an indivisible
            dimension (naming the path), or a cache mode for a model without cache variables.
    """
    import warnings

    import jax

    from ..models import ModelConfig, get_adapter
    from ..models.adapter import DEFAULT, describe
    from .annotate import Fallback, ShardingFallbackWarning, annotation_rows
    from .mesh import make_mesh, parse_mesh_spec
    from .presets import load_rules

    adapter = get_adapter(DEFAULT, ModelConfig.load(model)) if isinstance(model, str) else model
    # Planning needs axis sizes only: an abstract mesh lets a laptop annotate for a pod.
    sizes = parse_mesh_spec(mesh_spec)
    if any(v == -1 for v in sizes.values()):
        mesh = make_mesh(mesh_spec)
    else:
        mesh = jax.sharding.AbstractMesh(tuple(sizes.values()), tuple(sizes))
    axis_rules = load_rules(rules)
    if axis_rules.mesh_axes is None:
        axis_rules.validate(mesh)
    model_mode = {"params": "prefill", "prefill": "prefill", "ar": "autoregressive"}[mode]
    if cache_batch is None:
        cache_batch = jax.device_count() if mode == "ar" else 1
    if cache_batch < 1:
        raise ShardingError(f"--cache-batch {cache_batch}: expected a positive row count")
    if callable(getattr(adapter, "nnx_cached_model", None)):
        abstract = adapter.nnx_cached_model(mode=model_mode, batch=cache_batch)
    elif mode == "params":
        abstract = adapter.nnx_model()
    else:
        raise ShardingError(
            f"--mode {mode}: model {describe(adapter)} keeps no nnx.Cache variables "
            "(it lacks nnx_cached_model); annotate its params with --mode params"
        )
    report: list[Fallback] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ShardingFallbackWarning)
        rows = annotation_rows(
            abstract,
            axis_rules,
            mesh,
            mode,
            replicate_indivisible=replicate_indivisible,
            report=report,
        )
    out = [
        {
            "path": r["path"],
            "shape": list(r["shape"]),
            "logical_names": None if r["logical_names"] is None else list(r["logical_names"]),
            "spec": spec_to_json(r["spec"], len(r["shape"])),
            "shard_shape": list(r["shard_shape"]),
        }
        for r in rows
    ]
    fallbacks = [
        {"path": f.path, "dim": f.dim, "size": f.size, "axes": list(f.axes)} for f in report
    ]
    return out, fallbacks


def spec_to_json(spec: Any, rank: int) -> list[str | list[str] | None]:
    """A ``PartitionSpec`` as JSON: one entry per dimension, as PartitionSpec holds them.

    ``None`` (replicated) is ``null``, one mesh axis its name, several a list of names; the
    list is padded with ``null`` to the array's rank.

    Example:
        >>> spec_to_json(PartitionSpec(None, ("fsdp", "tensor")), 3)
        [None, ['fsdp', 'tensor'], None]
    """
    entries: list[str | list[str] | None] = []
    for entry in tuple(spec):
        if entry is None:
            entries.append(None)
        elif isinstance(entry, str):
            entries.append(entry)
        else:
            entries.append([str(a) for a in entry])
    return entries + [None] * (rank - len(entries))
