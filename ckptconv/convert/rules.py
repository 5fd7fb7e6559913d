"""Invertible rules on a :class:`TrainTree`'s model paths.

Every rule transforms the model variables and, identically, every optimizer tree that
mirrors the params (``mu``, ``nu``, ...), so the optimizer state never diverges from the
params. Params of scanned layers are stacked at the Linen ``param_scan_axis`` (or the NNX
stacking axis); every other collection (rng state, caches, batch stats) is stacked at axis 0
and is sliced on its own axis.

Rules:
    * :func:`rename`: regex renames of '/'-joined model paths; the applied mapping is returned
      so that the reverse conversion can undo it exactly.
    * :func:`move_scan_axis`: move the stacked axis of scanned params.
    * :func:`unscan`: ``<family>/...`` stacked -> ``<family>_{i}/...``.
    * :func:`scan`: ``<family>_{i}/...`` -> one stacked ``<family>/...``.
    * :func:`cast_params`: dtype cast of floating params and their mirrors (on request only).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

from ..errors import PlanError
from ..io.leaf import KeyPath, keystr
from .expr import Expr, cast, move_axis, stack, take
from .tree import PARAMS, TrainTree

DEFAULT_FAMILIES = ("layers", "dense_layers", "moe_layers")
FLOAT_DTYPES = frozenset({"float16", "bfloat16", "float32", "float64"})

PathFn = Callable[[KeyPath, Expr, bool], "dict[KeyPath, Expr]"]


def _map_tree(tree: TrainTree, fn: PathFn) -> None:
    """Applies ``fn(path, expr, is_param) -> {new_path: expr}`` to the model and the mirrors."""
    model: dict[KeyPath, tuple[str, Expr]] = {}
    for path, (kind, e) in tree.model.items():
        for p, x in fn(path, e, kind == PARAMS).items():
            if p in model:
                raise PlanError(f"{keystr(p)}: two model leaves map to this path")
            model[p] = (kind, x)
    tree.model = model
    for entry in tree.opt_state or ():
        if entry is None:
            continue
        for root, mirror in entry.mirrors.items():
            new: dict[KeyPath, Expr] = {}
            for path, e in mirror.items():
                new.update(fn(path, e, True))
            entry.mirrors[root] = new


def rename(tree: TrainTree, rules: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Renames model paths with regexes applied in order to the '/'-joined path.

    Args:
        tree: the tree, changed in place.
        rules: ``(pattern, replacement)`` pairs for :func:`re.sub`.

    Returns:
        The mapping of every changed path, old '/'-joined path to new.

    Raises:
        PlanError: for an invalid regex, an empty result, or two paths renamed onto one.
    """
    compiled = []
    for pattern, repl in rules:
        try:
            compiled.append((re.compile(pattern), repl))
        except re.error as e:
            raise PlanError(f"--rename {pattern}={repl}: invalid regex: {e}") from e
    if not compiled:
        return {}
    mapping: dict[str, str] = {}

    def fn(path: KeyPath, e: Expr, is_param: bool) -> dict[KeyPath, Expr]:
        old = "/".join(path)
        new = old
        for rx, repl in compiled:
            new = rx.sub(repl, new)
        if new != old:
            if not new or "" in new.split("/"):
                raise PlanError(f"{old}: --rename gives an empty path component ({new!r})")
            mapping[old] = new
        return {tuple(new.split("/")): e}

    _map_tree(tree, fn)
    return mapping


def apply_mapping(tree: TrainTree, mapping: dict[str, str]) -> None:
    """Renames model paths by an exact old -> new mapping (the inverse of :func:`rename`)."""
    if not mapping:
        return

    def fn(path: KeyPath, e: Expr, is_param: bool) -> dict[KeyPath, Expr]:
        joined = "/".join(path)
        return {tuple(mapping.get(joined, joined).split("/")): e}

    _map_tree(tree, fn)


def _stacked_index(path: KeyPath, families: Iterable[str]) -> int | None:
    """Index of the first path segment that is a scanned layer family, or None."""
    fams = set(families)
    for i, seg in enumerate(path[:-1]):
        if seg in fams:
            return i
    return None


def _axis(is_param: bool, param_axis: int, ndim: int) -> int:
    """Stacking axis of a leaf: params at ``param_axis`` (clamped to the rank), others at 0."""
    return min(param_axis, ndim - 1) if is_param else 0


def is_scanned(tree: TrainTree, families: Iterable[str] = DEFAULT_FAMILIES) -> bool:
    """Whether the model holds stacked (scanned) layer families."""
    return any(_stacked_index(p, families) is not None for p in tree.model)


def move_scan_axis(
    tree: TrainTree, src: int, dst: int, families: Iterable[str] = DEFAULT_FAMILIES
) -> None:
    """Moves the stacked axis of scanned params (and their mirrors) from ``src`` to ``dst``."""
    if src == dst:
        return

    def fn(path: KeyPath, e: Expr, is_param: bool) -> dict[KeyPath, Expr]:
        if not is_param or _stacked_index(path, families) is None:
            return {path: e}
        nd = len(e.shape)
        return {path: move_axis(e, _axis(True, src, nd), _axis(True, dst, nd))}

    _map_tree(tree, fn)


def unscan(tree: TrainTree, param_axis: int, families: Iterable[str] = DEFAULT_FAMILIES) -> None:
    """Splits every stacked family ``<f>/...`` into ``<f>_{i}/...``, slicing each leaf.

    Params are split on ``param_axis``; other collections on axis 0. Every leaf, of any rank,
    is sliced: nothing is copied whole into every layer.

    Raises:
        PlanError: when the leaves of one family disagree on the number of layers.
    """
    counts: dict[KeyPath, tuple[int, KeyPath]] = {}

    def fn(path: KeyPath, e: Expr, is_param: bool) -> dict[KeyPath, Expr]:
        k = _stacked_index(path, families)
        if k is None:
            return {path: e}
        if not e.shape:
            raise PlanError(f"{keystr(path)}: a scanned leaf must have a layer axis, found ()")
        axis = _axis(is_param, param_axis, len(e.shape))
        n = e.shape[axis]
        fam = path[: k + 1]
        seen = counts.setdefault(fam, (n, path))
        if seen[0] != n:
            raise PlanError(
                f"{keystr(path)}: expected {seen[0]} layers on axis {axis} "
                f"(as {keystr(seen[1])}), found {n}"
            )
        return {(*path[:k], f"{path[k]}_{i}", *path[k + 1 :]): take(e, axis, i) for i in range(n)}

    _map_tree(tree, fn)


def scan(tree: TrainTree, param_axis: int, families: Iterable[str] = DEFAULT_FAMILIES) -> None:
    """Stacks every numbered family ``<f>_{i}/...`` (``f`` in ``families``) into ``<f>/...``.

    Params are stacked at ``param_axis``; other collections at axis 0.

    Raises:
        PlanError: naming the path when a layer is missing, or shapes or dtypes differ.
    """
    rx = re.compile(rf"^({'|'.join(re.escape(f) for f in families)})_(\d+)$")

    def family_key(path: KeyPath) -> tuple[KeyPath, int, KeyPath] | None:
        for k, seg in enumerate(path[:-1]):
            m = rx.match(seg)
            if m:
                return (*path[:k], m.group(1)), int(m.group(2)), path[k + 1 :]
        return None

    def restack(items: dict[KeyPath, Expr], is_param_of: Callable[[KeyPath], bool]):
        groups: dict[tuple[KeyPath, KeyPath], dict[int, Expr]] = {}
        out: dict[KeyPath, Expr] = {}
        members: dict[KeyPath, set[int]] = {}
        for path, e in items.items():
            fk = family_key(path)
            if fk is None:
                out[path] = e
                continue
            fam, i, rest = fk
            groups.setdefault((fam, rest), {})[i] = e
            members.setdefault(fam, set()).add(i)
        for (fam, rest), layers in groups.items():
            n = max(members[fam]) + 1
            path = (*fam, *rest)
            if len(layers) < n and not is_param_of(path):
                # A collection stored for some layers only (MaxText keeps the rng state of
                # layers_0 alone when unscanned) cannot be stacked: keep it per layer.
                for i, e in layers.items():
                    out[(*fam[:-1], f"{fam[-1]}_{i}", *rest)] = e
                continue
            for i in range(n):
                if i not in layers:
                    name = f"{fam[-1]}_{i}"
                    missing = keystr((*fam[:-1], name, *rest))
                    raise PlanError(
                        f"{missing}: missing while stacking {keystr(fam)}_0..{n - 1} "
                        f"(found layers {sorted(layers)})"
                    )
            xs = [layers[i] for i in range(n)]
            first = xs[0]
            for i, x in enumerate(xs):
                if x.shape != first.shape or x.dtype != first.dtype:
                    where = keystr((*fam[:-1], f"{fam[-1]}_{i}", *rest))
                    raise PlanError(
                        f"{where}: expected {first.dtype}{list(first.shape)} like layer 0, "
                        f"found {x.dtype}{list(x.shape)}"
                    )
            axis = min(param_axis, len(first.shape)) if is_param_of(path) else 0
            out[path] = stack(xs, axis)
        return out

    stacked_kind: dict[KeyPath, str] = {}
    for path, (kind, _) in tree.model.items():
        fk = family_key(path)
        stacked_kind[(*fk[0], *fk[2]) if fk else path] = kind
    restacked = restack(
        {p: e for p, (_, e) in tree.model.items()}, lambda p: stacked_kind.get(p) == PARAMS
    )
    kinds = {p: k for p, (k, _) in tree.model.items()}
    tree.model = {p: (kinds.get(p) or stacked_kind[p], e) for p, e in restacked.items()}
    for entry in tree.opt_state or ():
        if entry is None:
            continue
        for root, mirror in entry.mirrors.items():
            entry.mirrors[root] = restack(mirror, lambda p: True)


def cast_params(tree: TrainTree, dtype: str) -> None:
    """Casts floating params and their optimizer mirrors to ``dtype`` (a lossy, explicit step)."""

    def fn(path: KeyPath, e: Expr, is_param: bool) -> dict[KeyPath, Expr]:
        if is_param and e.dtype in FLOAT_DTYPES:
            return {path: cast(e, dtype)}
        return {path: e}

    _map_tree(tree, fn)
