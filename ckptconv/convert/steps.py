"""Concrete mapping steps: what a mapping file did to each leaf, recorded and invertible.

A mapping file's rules are patterns; applied to a checkpoint they become *steps*, one per
leaf (or group of leaves) each rule touched, naming real paths and axes. Steps are plain
JSON dicts so that the output checkpoint records them, and each has an exact inverse, so the
reverse conversion needs no mapping file:

============  ===========================================  =================
``op``        fields                                       inverse
============  ===========================================  =================
``rename``    ``from``, ``to``                             ``rename``
``transpose`` ``path``, ``perm``                           ``transpose``
``reshape``   ``path``, ``shape``, ``from``                ``reshape``
``split``     ``from``, ``to`` (list), ``axis``, ``sizes`` ``concat``
``concat``    ``from`` (list), ``to``, ``axis``, ``sizes`` ``split``
``stack``     ``from`` (list), ``to``, ``axis``            ``unstack``
``unstack``   ``from``, ``to`` (list), ``axis``            ``stack``
``cast``      ``path``, ``dtype``, ``from``                ``cast``
``drop``      ``path``                                     (none: ``ignore``)
============  ===========================================  =================

A rule's steps are disjoint, so they run as one batch (:func:`run_batch`) on a dict of
``'/'``-joined path -> ``(kind, expression)``, keeping the order of the leaves.
"""

from __future__ import annotations

from collections.abc import Iterable

from ..errors import PlanError
from .expr import Expr, cast, concat, reshape, slice_axis, stack, take, transpose

Step = dict
Items = dict[str, tuple[str, Expr]]


_IN_PLACE = frozenset({"transpose", "reshape", "cast", "drop"})  # steps on one ``path``


def _as_list(paths) -> list[str]:
    return list(paths) if isinstance(paths, list) else [paths]


def _inputs(step: Step) -> list[str]:
    return [step["path"]] if step["op"] in _IN_PLACE else _as_list(step["from"])


def _outputs(step: Step) -> list[str]:
    if step["op"] == "drop":
        return []
    return [step["path"]] if step["op"] in _IN_PLACE else _as_list(step["to"])


def _compute(step: Step, xs: list[tuple[str, Expr]]) -> list[tuple[str, Expr]]:
    """The outputs ``(kind, expr)`` of one step from its inputs, in ``_outputs`` order."""
    op, (kind, x) = step["op"], xs[0]
    if op in ("rename", "drop"):
        return [(kind, x)] if op == "rename" else []
    if op == "transpose":
        return [(kind, transpose(x, step["perm"]))]
    if op == "reshape":
        return [(kind, reshape(x, step["shape"]))]
    if op == "cast":
        return [(kind, cast(x, step["dtype"]))]
    if op == "split":
        out, lo = [], 0
        for n in step["sizes"]:
            out.append((kind, slice_axis(x, step["axis"], lo, lo + n)))
            lo += n
        return out
    if op == "unstack":
        return [(kind, take(x, step["axis"], i)) for i in range(len(step["to"]))]
    join = concat if op == "concat" else stack
    return [(kind, join([e for _, e in xs], step["axis"]))]


def inverse(step: Step) -> Step | None:
    """Returns the step that undoes ``step`` (``None`` for ``drop``, which cannot be undone)."""
    op = step["op"]
    if op == "rename":
        return {"op": "rename", "from": step["to"], "to": step["from"]}
    if op == "transpose":
        perm = step["perm"]
        return {
            "op": "transpose",
            "path": step["path"],
            "perm": [perm.index(i) for i in range(len(perm))],
        }
    if op in ("reshape", "cast"):
        key = "shape" if op == "reshape" else "dtype"
        return {"op": op, "path": step["path"], key: step["from"], "from": step[key]}
    if op in ("split", "concat"):
        other = "concat" if op == "split" else "split"
        return {
            "op": other,
            "from": step["to"],
            "to": step["from"],
            "axis": step["axis"],
            "sizes": step["sizes"],
        }
    if op in ("stack", "unstack"):
        other = "unstack" if op == "stack" else "stack"
        return {"op": other, "from": step["to"], "to": step["from"], "axis": step["axis"]}
    return None


def invert(batches: Iterable[list[Step]]) -> list[list[Step]]:
    """Returns the batches that undo ``batches``: reversed, each step inverted."""
    out = []
    for batch in reversed(list(batches)):
        inv = [s for s in (inverse(step) for step in batch) if s is not None]
        if inv:
            out.append(inv)
    return out


def run_batch(items: Items, batch: list[Step], *, partial: bool = False, what: str = "") -> Items:
    """Runs one rule's disjoint steps on ``items``, keeping the order of the leaves.

    Args:
        items: ``'/'``-joined path -> ``(kind, expression)``.
        batch: the steps.
        partial: for a tree that mirrors part of the model (an optimizer's ``mu``): a step
            whose inputs are all absent is skipped; one with some inputs absent is refused.
        what: names the tree in errors.

    Returns:
        The new items: each step's outputs take the place of its first input.

    Raises:
        PlanError: for a missing input, an input used twice, or an output path taken.
    """
    placed: dict[str, list[tuple[str, tuple[str, Expr]]]] = {}
    used: set[str] = set()
    for step in batch:
        names = _inputs(step)
        present = [n for n in names if n in items]
        if partial and not present:
            continue
        missing = [n for n in names if n not in items]
        if missing or used.intersection(names):
            problem = "missing" if missing else "used twice"
            bad = (missing or sorted(used.intersection(names)))[0]
            raise PlanError(f"{what}{bad}: a {step['op']} step's input is {problem}")
        used.update(names)
        outs = _compute(step, [items[n] for n in names])
        placed[names[0]] = list(zip(_outputs(step), outs, strict=True))
    out: Items = {}
    for path, value in items.items():
        if path not in used:
            _put(out, path, value, what)
        for new, v in placed.get(path, ()):
            _put(out, new, v, what)
    return out


def _put(out: Items, path: str, value: tuple[str, Expr], what: str) -> None:
    if path in out:
        raise PlanError(f"{what}{path}: two leaves map to this path")
    out[path] = value
