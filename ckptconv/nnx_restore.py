"""Restoring an NNX checkpoint written by ckptconv into live NNX objects, with plain Orbax.

The checkpoint is ``{"model": nnx.state(model), "optimizer": nnx.state(optimizer)}`` as
Orbax writes ``nnx.State``; this is the snippet the README shows, with checks and errors
that name the path. Equivalent plain Orbax::

    abstract = {"model": nnx.state(model), "optimizer": nnx.state(optimizer)}
    restored = ocp.StandardCheckpointer().restore(path, abstract)
    nnx.update(model, restored["model"])
    nnx.update(optimizer, restored["optimizer"])
"""

from __future__ import annotations

import os

import jax

from .convert.plan import abstract_tree_leaves, check_against
from .errors import CheckpointFormatError, PlanError
from .io import CheckpointReader


def _abstract(state, shardings=None):
    if shardings is None:
        return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    return jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
    )


def restore(
    path: str | os.PathLike, model, optimizer=None, *, shardings=None, strict: bool = True
) -> None:
    """Restores an NNX checkpoint into ``model`` (and ``optimizer``) in place.

    Args:
        path: the NNX checkpoint (as written by ``ckptconv linen-to-nnx``).
        model: the NNX module to fill; its state's shapes and dtypes must match.
        optimizer: an ``nnx.Optimizer`` over ``model`` to fill from ``optimizer/...``.
        shardings: optional pytree of ``jax.sharding.Sharding`` shaped like
            ``nnx.state(model)``; each array is restored straight into that sharding.
        strict: when False, checkpoint leaves the model does not hold (e.g. MaxText's rng
            state, for a model without rng streams) are skipped; a leaf the model holds but
            the checkpoint lacks, or of another shape or dtype, is always an error.

    Raises:
        CheckpointFormatError: when the checkpoint cannot be read.
        PlanError: when the checkpoint's tree does not match the model (every missing, extra
            or mismatched path is named).

    Example:
        >>> model = Transformer(config, rngs=nnx.Rngs(0))  # doctest: +SKIP
        >>> ckptconv.restore("nnx_ckpt", model)  # doctest: +SKIP
    """
    import orbax.checkpoint as ocp
    from flax import nnx

    reader = CheckpointReader(path)
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
    target = {"model": _abstract(nnx.state(model), shardings)}
    if optimizer is not None:
        if not any(p[0] == "optimizer" for p in leaves):
            raise PlanError(f"{reader.location}: has no optimizer state to restore")
        target["optimizer"] = _abstract(nnx.state(optimizer))
    args = ocp.args.PyTreeRestore(
        item=target,
        restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True,
    )
    location = reader.location.local_path or reader.location
    try:
        restored = ocp.PyTreeCheckpointer().restore(os.path.abspath(str(location)), args=args)
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise CheckpointFormatError(f"{reader.location}: Orbax cannot restore it: {e}") from e
    nnx.update(model, restored["model"])
    if optimizer is not None:
        nnx.update(optimizer, restored["optimizer"])
