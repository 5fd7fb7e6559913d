"""The layout-neutral form of a training checkpoint that every layout parses into.

Linen and NNX checkpoints hold the same things in different places: model variables (params
and other collections), an optax state whose mean/variance trees mirror the params, and a
step counter. :class:`TrainTree` holds them once, as lazy expressions, so that every rule
(renames, layer stacking, axis moves, casts) is written once and applied identically to the
params and to every optimizer tree that mirrors them.
"""

from __future__ import annotations

import dataclasses

from ..errors import LayoutError
from ..io.leaf import KeyPath, keystr
from .expr import Expr

PARAMS = "params"


@dataclasses.dataclass
class OptEntry:
    """One position of an optax chain state.

    Attributes:
        leaves: leaves that do not mirror the params (``count``, schedule state), keyed by
            their path inside the entry.
        mirrors: trees that mirror the model params (``mu``, ``nu``, ...), keyed by their root
            inside the entry; each maps a model-relative param path to its expression.
    """

    leaves: dict[KeyPath, Expr] = dataclasses.field(default_factory=dict)
    mirrors: dict[KeyPath, dict[KeyPath, Expr]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class TrainTree:
    """A checkpoint in layout-neutral form.

    Attributes:
        model: model variables by model-relative path: ``(kind, expr)`` where kind is
            ``"params"`` or the name of another Linen collection (``batch_stats``, ``nnx_aux``).
        opt_state: the optax chain by position, ``None`` for an empty position; ``None`` when
            the checkpoint has no optimizer state.
        step: the step counter, or ``None``.
        info: facts needed to invert the conversion (source layout, chain length, dtypes...).
    """

    model: dict[KeyPath, tuple[str, Expr]]
    opt_state: list[OptEntry | None] | None = None
    step: Expr | None = None
    info: dict = dataclasses.field(default_factory=dict)

    def params(self) -> dict[KeyPath, Expr]:
        """Returns the params only, by model-relative path."""
        return {p: e for p, (k, e) in self.model.items() if k == PARAMS}


def find_mirrors(
    entry_leaves: dict[KeyPath, Expr], param_paths: set[KeyPath], wrapper: KeyPath
) -> OptEntry:
    """Splits one optax entry into leaves and trees that mirror the params.

    A subtree mirrors the params when its leaf paths, below ``wrapper``, are exactly the
    param paths (MaxText nests ``mu``/``nu`` under an extra ``params`` level: ``wrapper``
    is then ``("params",)``). Only the wrapper at the mirror's root is stripped; a key named
    ``params`` anywhere else is kept.

    Args:
        entry_leaves: the entry's leaves by path inside the entry.
        param_paths: the model-relative param paths.
        wrapper: the levels between a mirror root and the model paths.

    Returns:
        The entry with its mirrors found.
    """
    out = OptEntry()
    if not param_paths:
        out.leaves = dict(entry_leaves)
        return out
    n = len(wrapper)
    groups: dict[KeyPath, list[KeyPath]] = {}
    for p in entry_leaves:
        for i in range(len(p)):
            groups.setdefault(p[:i], []).append(p)
    by_root: dict[KeyPath, dict[KeyPath, Expr]] = {}
    claimed: set[KeyPath] = set()
    for root in sorted(groups, key=len):
        below = groups[root]
        if len(below) != len(param_paths) or any(root[: len(c)] == c for c in by_root):
            continue
        rel = [p[len(root) :] for p in below]
        if all(r[:n] == wrapper for r in rel) and {r[n:] for r in rel} == param_paths:
            by_root[root] = {r[n:]: entry_leaves[p] for r, p in zip(rel, below, strict=True)}
            claimed.update(below)
    out.mirrors = by_root
    out.leaves = {p: e for p, e in entry_leaves.items() if p not in claimed}
    return out


def merge_collection(
    model: dict[KeyPath, tuple[str, Expr]], kind: str, leaves: dict[KeyPath, Expr]
) -> None:
    """Merges a Linen collection into the model tree at its module paths, in place.

    Raises:
        LayoutError: when a path is already taken by another collection, or a leaf of one
            collection sits where the other has a module (one path a prefix of the other).
    """
    for path, e in leaves.items():
        if path in model:
            raise LayoutError(
                f"{kind}/{keystr(path)}: collides with {model[path][0]}/{keystr(path)} when "
                "merging Linen collections into one NNX model tree"
            )
        model[path] = (kind, e)
    clash = prefix_conflict(model)
    if clash is not None:
        leaf, below = clash
        raise LayoutError(
            f"{model[leaf][0]}/{keystr(leaf)}: is a leaf where {model[below][0]}/"
            f"{keystr(below)} needs a module, when merging Linen collections into one NNX "
            "model tree"
        )


def prefix_conflict(paths) -> tuple[KeyPath, KeyPath] | None:
    """Returns ``(leaf, other)`` where leaf path ``leaf`` is a proper prefix of ``other``.

    A tree cannot hold both: ``leaf`` would be an array and a subtree at once.
    """
    leaves = set(paths)
    for p in sorted(leaves):
        for i in range(1, len(p)):
            if p[:i] in leaves:
                return p[:i], p
    return None


def check_no_prefix(model: dict[KeyPath, tuple[str, Expr]], when: str) -> None:
    """Raises a PlanError when a model leaf path is a proper prefix of another.

    Args:
        model: the model tree.
        when: what produced the tree (for the error, e.g. ``"after --rename"``).
    """
    from ..errors import PlanError

    clash = prefix_conflict(model)
    if clash is not None:
        leaf, below = clash
        raise PlanError(f"{keystr(leaf)}: is a leaf and also the module of {keystr(below)} {when}")
