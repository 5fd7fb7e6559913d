"""Invertible rules on a :class:`TrainTree`'s model paths.

Every rule transforms the model variables and, identically, every optimizer tree that
mirrors the params (``mu``, ``nu``, ...), so the optimizer state never diverges from the
params. Params of scanned layers are stacked at the Linen ``param_scan_axis`` (or the NNX
stacking axis); every other collection (rng state, caches, batch stats), at any depth under
the layer, is stacked with them at axis 0 and is sliced on its own axis. State stored for some
layers only (shared by the layers, see :func:`scan`) cannot be stacked and is refused.

Stacking axes follow numpy: an axis ``a`` of a stacked leaf of rank ``n`` must satisfy
``-n <= a < n`` (:func:`normalize_axis`), a negative one counts from the end exactly as in
``numpy.moveaxis``/``numpy.stack``, and it is resolved per leaf, so the same value undoes
itself in the reverse conversion. An axis out of range for a leaf is a :class:`PlanError`
naming the leaf, its rank and the axis; it is never clamped.

Rules:
    * :func:`rename`: regex renames of '/'-joined model paths; the applied mapping is returned
      so that the reverse conversion can undo it exactly.
    * :func:`move_scan_axis`: move the stacked axis of scanned params.
    * :func:`unscan`: ``<family>/...`` stacked -> ``<family>_{i}/...``.
    * :func:`scan`: ``<family>_{i}/...`` -> one stacked ``<family>/...``.
    * :func:`cast_params`: dtype cast of floating params and their mirrors (on request only).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable

from ..errors import PlanError
from ..io.leaf import KeyPath, keystr
from .expr import Expr, cast, move_axis, stack, take
from .tree import PARAMS, TrainTree, check_no_prefix

DEFAULT_FAMILIES = ("layers", "dense_layers", "moe_layers")
FLOAT_DTYPES = frozenset({"float16", "bfloat16", "float32", "float64"})

PathFn = Callable[[KeyPath, Expr, bool], "dict[KeyPath, Expr]"]


def _map_tree(tree: TrainTree, fn: PathFn, what: str = "by the conversion rules") -> None:
    """Applies ``fn(path, expr, is_param) -> {new_path: expr}`` to the model and the mirrors.

    Raises:
        PlanError: when two leaves map onto one path, or a leaf onto a module's path.
    """
    model: dict[KeyPath, tuple[str, Expr]] = {}
    origin: dict[KeyPath, KeyPath] = {}
    for path, (kind, e) in tree.model.items():
        for p, x in fn(path, e, kind == PARAMS).items():
            if p in model:
                raise PlanError(
                    f"{keystr(p)}: two model leaves map to this path {what} "
                    f"({keystr(origin[p])} and {keystr(path)})"
                )
            model[p] = (kind, x)
            origin[p] = path
    check_no_prefix(model, what)
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

    _map_tree(tree, fn, "after --rename")
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


def normalize_axis(axis: int, ndim: int, path: KeyPath, option: str) -> int:
    """Returns ``axis`` of a rank-``ndim`` stacked leaf as a non-negative index (numpy rules).

    Args:
        axis: the axis, negative counting from the end.
        ndim: the rank of the stacked leaf (with its layer axis).
        path: the leaf's model path, for the error.
        option: the option the axis comes from (``--nnx-scan-axis``), for the error.

    Raises:
        PlanError: when ``axis`` is not in ``-ndim..ndim-1``.
    """
    if not -ndim <= axis < ndim:
        raise PlanError(
            f"{keystr(path)}: {option} {axis} is out of range for this rank-{ndim} stacked "
            f"leaf: expected an axis in {-ndim}..{ndim - 1}"
        )
    return axis % ndim


def _axis(path: KeyPath, is_param: bool, param_axis: int, ndim: int, option: str) -> int:
    """Stacking axis of a rank-``ndim`` stacked leaf: params at ``param_axis``, others at 0."""
    if not is_param:
        return 0
    return normalize_axis(param_axis, ndim, path, option)


def _stacked_rank(path: KeyPath, e: Expr) -> int:
    """Rank of a leaf of a scanned family, which must have a layer axis."""
    if not e.shape:
        raise PlanError(f"{keystr(path)}: a scanned leaf must have a layer axis, found ()")
    return len(e.shape)


def is_scanned(tree: TrainTree, families: Iterable[str] = DEFAULT_FAMILIES) -> bool:
    """Whether the model holds stacked (scanned) layer families."""
    return any(_stacked_index(p, families) is not None for p in tree.model)


@dataclasses.dataclass(frozen=True)
class Stacking:
    """Where the layers of numbered families are stacked.

    Attributes:
        axis: the stacking axis of params (numpy rules against each leaf's rank; other
            collections are stacked at axis 0).
        families: the layer family names (``layers`` stacks ``layers_0``, ``layers_1``...).
        option: the option ``axis`` comes from (``--nnx-scan-axis``), for errors.
    """

    axis: int
    families: tuple[str, ...] = DEFAULT_FAMILIES
    option: str = "scan axis"


def move_scan_axis(tree: TrainTree, src: Stacking, dst: Stacking) -> None:
    """Moves the stacked axis of scanned params (and their mirrors) from ``src`` to ``dst``.

    Both axes are resolved against each leaf's rank as :func:`numpy.moveaxis` does; the
    families are ``src``'s.

    Raises:
        PlanError: naming the leaf, its rank and the axis, when an axis is out of range.
    """

    def fn(path: KeyPath, e: Expr, is_param: bool) -> dict[KeyPath, Expr]:
        if not is_param or _stacked_index(path, src.families) is None:
            return {path: e}
        nd = _stacked_rank(path, e)
        a = _axis(path, True, src.axis, nd, src.option)
        b = _axis(path, True, dst.axis, nd, dst.option)
        return {path: move_axis(e, a, b)}

    _map_tree(tree, fn)


def unscan(tree: TrainTree, stacking: Stacking) -> None:
    """Splits every stacked family ``<f>/...`` into ``<f>_{i}/...``, slicing each leaf.

    Params are split on ``stacking.axis`` (numpy rules against each leaf's rank); other
    collections on axis 0. Every leaf, of any rank, is sliced: nothing is copied whole into
    every layer.

    Raises:
        PlanError: when the leaves of one family disagree on the number of layers, or
            the axis is out of range for a leaf.
    """
    counts: dict[KeyPath, tuple[int, KeyPath]] = {}

    def fn(path: KeyPath, e: Expr, is_param: bool) -> dict[KeyPath, Expr]:
        k = _stacked_index(path, stacking.families)
        if k is None:
            return {path: e}
        axis = _axis(path, is_param, stacking.axis, _stacked_rank(path, e), stacking.option)
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


def scan(tree: TrainTree, stacking: Stacking) -> None:
    """Stacks every numbered family ``<f>_{i}/...`` (``f`` in ``families``) into ``<f>/...``.

    Params are stacked at ``stacking.axis`` (an axis of the stacked leaf, as in
    :func:`numpy.stack`); every other collection (rng state, caches, batch stats), at any
    depth under the layer, is stacked at axis 0, together with the params.

    Every leaf of a family must be stored for every layer. A leaf of another collection
    stored for some layers only is state that the layers share: NNX stores a Variable
    shared by several modules once, at the first path that reaches it (MaxText 0.2.5's
    unscanned decoder keeps the one ``Rngs`` of all its layers under
    ``layers_0/self_attention/rngs``). It has no per-layer form: it is neither copied into
    every layer nor left behind under ``<f>_{i}`` (no scanned model restores that tree),
    it is refused, pointing at ``--params-only``.

    Raises:
        PlanError: naming the path when a leaf misses a layer, shapes, dtypes or
            collections differ between layers, or the axis (from ``stacking.option``) is out
            of range for a leaf.
    """
    family_key = _family_matcher(stacking.families)

    def restack(items: dict[KeyPath, Expr], is_param_of: Callable[[KeyPath], bool]):
        return _restack(items, is_param_of, family_key, stacking.axis, stacking.option)

    stacked_kind: dict[KeyPath, str] = {}
    first_of: dict[KeyPath, KeyPath] = {}
    for path, (kind, _) in tree.model.items():
        fk = family_key(path)
        key = (*fk[0], *fk[2]) if fk else path
        if stacked_kind.setdefault(key, kind) != kind:
            raise PlanError(
                f"{keystr(path)}: expected a {stacked_kind[key]} leaf like "
                f"{keystr(first_of[key])}, found a {kind} leaf: one path of a layer family "
                "holds one collection in every layer"
            )
        first_of.setdefault(key, path)
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


FamilyKey = Callable[[KeyPath], "tuple[KeyPath, int, KeyPath] | None"]


def _family_matcher(families: Iterable[str]) -> FamilyKey:
    """``path -> (family path, layer index, rest)`` for leaves of ``<f>_{i}`` layers, else None."""
    rx = re.compile(rf"^({'|'.join(re.escape(f) for f in families)})_(\d+)$")

    def family_key(path: KeyPath) -> tuple[KeyPath, int, KeyPath] | None:
        for k, seg in enumerate(path[:-1]):
            m = rx.match(seg)
            if m:
                return (*path[:k], m.group(1)), int(m.group(2)), path[k + 1 :]
        return None

    return family_key


def _layer_path(fam: KeyPath, i: int, rest: KeyPath) -> KeyPath:
    return (*fam[:-1], f"{fam[-1]}_{i}", *rest)


def _restack(
    items: dict[KeyPath, Expr],
    is_param_of: Callable[[KeyPath], bool],
    family_key: FamilyKey,
    param_axis: int,
    option: str,
) -> dict[KeyPath, Expr]:
    """Stacks the layer leaves of ``items`` (see :func:`scan`); other leaves pass through."""
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
        missing = [i for i in range(n) if i not in layers]
        if missing:
            why = (
                "a param must be stored for every layer of a scanned family"
                if is_param_of(path)
                else "state stored for some layers only is shared by the layers (NNX "
                "stores it once) and has no per-layer form; --params-only drops the "
                "non-param collections"
            )
            raise PlanError(
                f"{keystr(_layer_path(fam, missing[0], rest))}: missing while stacking "
                f"{keystr(fam)}_0..{n - 1} (found layers {sorted(layers)}): {why}"
            )
        xs = [layers[i] for i in range(n)]
        first = xs[0]
        for i, x in enumerate(xs):
            if x.shape != first.shape or x.dtype != first.dtype:
                raise PlanError(
                    f"{keystr(_layer_path(fam, i, rest))}: expected "
                    f"{first.dtype}{list(first.shape)} like layer 0, "
                    f"found {x.dtype}{list(x.shape)}"
                )
        axis = _axis(path, is_param_of(path), param_axis, len(first.shape) + 1, option)
        out[path] = stack(xs, axis)
    return out


def cast_params(tree: TrainTree, dtype: str) -> None:
    """Casts floating params and their optimizer mirrors to ``dtype`` (a lossy, explicit step)."""

    def fn(path: KeyPath, e: Expr, is_param: bool) -> dict[KeyPath, Expr]:
        if is_param and e.dtype in FLOAT_DTYPES:
            return {path: cast(e, dtype)}
        return {path: e}

    _map_tree(tree, fn)
