r"""Mapping files: a declarative, invertible map of one model tree onto another.

A mapping file is YAML; its rules apply in order to '/'-joined model paths (as ``--rename``
sees them), each to the paths the previous rules produced::

    version: 1
    layout: params            # optional: the source layout
    rules:
      - rename:    {match: '^layer_(\d+)/', to: 'layers/\1/'}
      - split:     {match: '^(.*)/mlp/gating_einsum$', axis: 0,
                    to: ['\1/mlp/gate_proj/kernel', '\1/mlp/up_proj/kernel']}
      - transpose: {match: '/mlp/(gate|up)_proj/kernel$', perm: [1, 0]}
    ignore: []                # regexes of source leaves deliberately dropped

Operations (every ``to`` is a :func:`re.sub` template applied to the matched path; ``match``
is searched in it; every rule takes ``optional: true``, else matching nothing is an error):

* ``rename``: ``to``.
* ``transpose``: ``perm`` (as :func:`numpy.transpose`).
* ``reshape``: ``shape`` (C order, one ``-1`` allowed).
* ``split``: ``axis`` and ``to`` (a list): equal parts, or ``sizes``; the axis is kept.
* ``concat``: ``match`` (a list, one regex per input, in order), ``axis``, ``to``.
* ``stack``: ``to`` and ``axis``; the regex's group ``i`` (else group 1) is the layer number,
  and leaves with one output path are stacked in layer order, every layer present.
* ``unstack``: ``to`` with ``{i}`` for the layer number, and ``axis``.
* ``cast``: ``dtype``, the only lossy rule.

Rules become concrete :mod:`~ckptconv.convert.steps`, applied identically to the model and
to every optimizer tree that mirrors the params, and recorded, so that the reverse
conversion undoes them without the file.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable

import yaml

from ..errors import MappingError, PlanError
from ..io import numpy_dtype
from . import steps as steps_mod
from .expr import Expr, Src
from .steps import Items, Step
from .tree import PARAMS, TrainTree

_KEYS = {
    "rename": ({"match", "to"}, set()),
    "transpose": ({"match", "perm"}, set()),
    "reshape": ({"match", "shape"}, set()),
    "split": ({"match", "axis", "to"}, {"sizes"}),
    "concat": ({"match", "axis", "to"}, set()),
    "stack": ({"match", "to", "axis"}, set()),
    "unstack": ({"match", "to", "axis"}, set()),
    "cast": ({"match", "dtype"}, set()),
}
_TOP = {"version", "layout", "rules", "ignore"}
Shapes = dict[str, tuple[tuple[int, ...], str]]


@dataclasses.dataclass(frozen=True)
class Rule:
    """One rule of a mapping file.

    Attributes:
        op: the operation (``rename``, ``split``, ...).
        args: its arguments, as written.
        index: its position in ``rules`` (from 1).
        text: its text in the file, on one line (for errors).
        optional: whether matching nothing is allowed.
    """

    op: str
    args: dict
    index: int
    text: str
    optional: bool = False

    def name(self) -> str:
        """``rule N (text)``, how errors name this rule."""
        return f"rule {self.index} ({self.text})"


@dataclasses.dataclass(frozen=True)
class Mapping:
    """A parsed mapping file.

    Attributes:
        rules: the rules, in order.
        ignore: regexes of source leaves dropped on purpose.
        layout: the source layout the file names, or None.
        where: the file (for errors).
    """

    rules: tuple[Rule, ...]
    ignore: tuple[str, ...] = ()
    layout: str | None = None
    where: str = "mapping"

    def plan(self, items: Items) -> list[list[Step]]:
        """Returns the steps of every rule (one batch each) on the model ``items``.

        ``items`` is not changed. The first batch drops the ``ignore``d leaves.

        Raises:
            MappingError: naming the rule and the path when a rule cannot apply.
        """
        batches = [[{"op": "drop", "path": p} for p in items if self._ignored(p)]]
        items = steps_mod.run_batch(items, batches[0])
        for rule in self.rules:
            batch = _plan_rule(rule, items, self.where)
            try:
                items = steps_mod.run_batch(items, batch)
                _check_prefixes(items)
            except PlanError as e:
                raise MappingError(f"{self.where}: {rule.name()}: {e}") from e
            batches.append(batch)
        return [b for b in batches if b]

    def _ignored(self, path: str) -> bool:
        return any(re.search(rx, path) for rx in self.ignore)

    def apply_shapes(self, leaves: Shapes) -> Shapes:
        """Returns the ``{path: (shape, dtype)}`` this mapping makes of ``leaves``."""
        items: Items = {
            p: ("params", Src(tuple(p.split("/")), tuple(s), d)) for p, (s, d) in leaves.items()
        }
        for batch in self.plan(items):
            items = steps_mod.run_batch(items, batch)
        return {p: (e.shape, e.dtype) for p, (_, e) in items.items()}


def _check_prefixes(items: Items) -> None:
    paths = sorted(items)
    for a, b in zip(paths, paths[1:], strict=False):
        if b.startswith(a + "/"):
            raise PlanError(f"{a}: is a leaf and also the module of {b}")


def load_mapping(path: str) -> Mapping:
    """Reads and parses a mapping file.

    Raises:
        MappingError: the file cannot be read or is not a valid mapping.
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise MappingError(f"{path}: cannot read the mapping file: {e.strerror or e}") from e
    return parse_mapping(text, path)


def parse_mapping(text: str, where: str = "mapping") -> Mapping:
    r"""Parses a mapping file's text, checking every key, operation and regex.

    Example:
        >>> m = parse_mapping("version: 1\\nrules:\\n  - rename: {match: '^a/', to: 'b/'}\\n")
        >>> m.apply_shapes({"a/w": ((2,), "float32")})
        {'b/w': ((2,), 'float32')}

    Raises:
        MappingError: naming the line for YAML syntax errors, the rule for bad rules.
    """
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise MappingError(f"{where}{line}: YAML syntax error: {problem}") from e
    if not isinstance(data, dict):
        raise MappingError(
            f"{where}: expected a mapping with version and rules, found {type(data).__name__}"
        )
    unknown = sorted(set(map(str, data)) - _TOP)
    if unknown:
        raise MappingError(
            f"{where}: unknown key {unknown[0]!r}: expected {', '.join(sorted(_TOP))}"
        )
    if data.get("version") != 1:
        raise MappingError(f"{where}: version: expected 1, found {data.get('version')!r}")
    rules = data.get("rules") or []
    ignore = data.get("ignore") or []
    if not isinstance(rules, list) or not isinstance(ignore, list):
        raise MappingError(f"{where}: rules and ignore must be lists")
    for rx in ignore:
        _compile(rx, f"{where}: ignore {rx!r}")
    texts = _rule_texts(text, node)
    parsed = tuple(
        _parse_rule(r, i + 1, texts[i] if i < len(texts) else str(r), where)
        for i, r in enumerate(rules)
    )
    layout = data.get("layout")
    return Mapping(parsed, tuple(ignore), None if layout is None else str(layout), where)


def _rule_texts(text: str, node) -> list[str]:
    """The source text of each rule, on one line."""
    rules = next(
        (v for k, v in getattr(node, "value", []) if getattr(k, "value", None) == "rules"), None
    )
    out = []
    for item in getattr(rules, "value", None) or []:
        if not isinstance(getattr(item, "value", None), list):
            out.append(str(getattr(item, "value", item)))
            continue
        raw = text[item.start_mark.index : item.end_mark.index]
        out.append(" ".join(raw.split()))
    return out


def _parse_rule(raw, index: int, text: str, where: str) -> Rule:
    head = f"{where}: rule {index} ({text})"
    if not isinstance(raw, dict) or len(raw) != 1:
        raise MappingError(
            f"{head}: expected one operation ({', '.join(_KEYS)}) with its arguments"
        )
    op, args = next(iter(raw.items()))
    if op not in _KEYS:
        raise MappingError(f"{head}: unknown operation {op!r}: expected one of {', '.join(_KEYS)}")
    if not isinstance(args, dict):
        raise MappingError(f"{head}: expected {{key: value}} arguments, found {args!r}")
    args = dict(args)
    optional = args.pop("optional", False)
    required, extra = _KEYS[op]
    unknown = sorted(set(args) - required - extra)
    if unknown:
        raise MappingError(
            f"{head}: unknown key {unknown[0]!r} for {op}: expected "
            f"{', '.join(sorted(required | extra))}"
        )
    absent = sorted(required - set(args))
    if absent:
        raise MappingError(f"{head}: {op} needs {absent[0]!r}")
    matches = args["match"] if op == "concat" else [args["match"]]
    if op == "concat" and (not isinstance(matches, list) or len(matches) < 2):
        raise MappingError(f"{head}: concat's match lists its inputs' regexes (two or more)")
    for rx in matches:
        _compile(rx, head)
    _check_args(op, args, head)
    return Rule(op, args, index, text, bool(optional))


def _check_args(op: str, args: dict, head: str) -> None:
    """Checks argument types that do not depend on the tree."""
    ints = {"perm": list, "shape": list, "sizes": list}
    for key, kind in ints.items():
        if key in args and not (isinstance(args[key], kind) and all(_is_int(v) for v in args[key])):
            raise MappingError(f"{head}: {key} must be a list of integers, found {args[key]!r}")
    if "axis" in args and not _is_int(args["axis"]):
        raise MappingError(f"{head}: axis must be an integer, found {args['axis']!r}")
    if op == "split" and not (isinstance(args["to"], list) and len(args["to"]) >= 2):
        raise MappingError(f"{head}: split's to lists its outputs (two or more)")
    if op == "split" and "sizes" in args and len(args["sizes"]) != len(args["to"]):
        raise MappingError(
            f"{head}: split has {len(args['to'])} outputs but {len(args['sizes'])} sizes"
        )
    if op == "reshape" and list(args["shape"]).count(-1) > 1:
        raise MappingError(f"{head}: reshape allows one -1, found {args['shape']}")
    if op == "unstack" and "{i}" not in str(args["to"]):
        raise MappingError(f"{head}: unstack's to needs {{i}} for the layer number")
    if op == "cast":
        try:
            numpy_dtype(str(args["dtype"]))
        except TypeError as e:
            raise MappingError(f"{head}: unknown dtype {args['dtype']!r}") from e


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _compile(rx, head: str) -> re.Pattern:
    if not isinstance(rx, str):
        raise MappingError(f"{head}: expected a regex string, found {rx!r}")
    try:
        return re.compile(rx)
    except re.error as e:
        raise MappingError(f"{head}: invalid regex {rx!r}: {e}") from e


def _plan_rule(rule: Rule, items: Items, where: str) -> list[Step]:
    """The steps of one rule on the current model items."""
    head = f"{where}: {rule.name()}"
    try:
        batch = _PLANNERS[rule.op](rule.args, items)
    except PlanError as e:
        raise MappingError(f"{head}: {e}") from e
    except re.error as e:
        raise MappingError(f"{head}: bad replacement template: {e}") from e
    if batch is None and not rule.optional:
        raise MappingError(f"{head}: matches no leaf (add optional: true if that is expected)")
    return batch or []


def _matched(args: dict, items: Items) -> list[tuple[str, re.Pattern]]:
    rx = re.compile(args["match"])
    return [(p, rx) for p in items if rx.search(p)]


def _new_path(rx: re.Pattern, template: str, path: str) -> str:
    new = rx.sub(template, path)
    if not new or "" in new.split("/"):
        raise PlanError(f"{path}: gives an empty path component ({new!r})")
    return new


LeafStep = Callable[[str, re.Pattern, Expr], "Step | None"]


def _per_leaf(make: Callable[[dict], LeafStep]):
    """A planner applying ``make(args)(path, regex, expr)`` to each matched leaf."""

    def planner(args: dict, items: Items) -> list[Step] | None:
        hits = _matched(args, items)
        if not hits:
            return None
        fn = make(args)
        return [s for p, rx in hits if (s := fn(p, rx, items[p][1])) is not None]

    return planner


def _rename(args: dict) -> Callable:
    def fn(path, rx, x):
        new = _new_path(rx, args["to"], path)
        return None if new == path else {"op": "rename", "from": path, "to": new}

    return fn


def _transpose(args: dict) -> Callable:
    def fn(path, rx, x):
        perm = [int(p) for p in args["perm"]]
        if sorted(perm) != list(range(len(x.shape))):
            raise PlanError(
                f"{path}: perm {perm} is not a permutation of the axes of this "
                f"rank-{len(x.shape)} leaf {list(x.shape)}"
            )
        return {"op": "transpose", "path": path, "perm": perm}

    return fn


def _reshape(args: dict) -> Callable:
    def fn(path, rx, x):
        shape = [int(d) for d in args["shape"]]
        size, known = math.prod(x.shape), math.prod(d for d in shape if d != -1)
        if -1 in shape and known and size % known == 0:
            shape[shape.index(-1)] = size // known
        if math.prod(shape) != size or any(d < 0 for d in shape):
            raise PlanError(
                f"{path}: cannot reshape {list(x.shape)} ({size} elements) to {args['shape']}"
            )
        return {"op": "reshape", "path": path, "shape": shape, "from": list(x.shape)}

    return fn


def _axis(axis: int, ndim: int, path: str) -> int:
    if not -ndim <= axis < ndim:
        raise PlanError(f"{path}: axis {axis} is out of range for this rank-{ndim} leaf")
    return axis % ndim


def _split(args: dict) -> Callable:
    def fn(path, rx, x):
        axis = _axis(int(args["axis"]), len(x.shape), path)
        n, parts = x.shape[axis], len(args["to"])
        sizes = [int(s) for s in args.get("sizes") or []]
        if not sizes:
            if n % parts:
                raise PlanError(
                    f"{path}: axis {axis} of size {n} does not divide into {parts} equal parts"
                )
            sizes = [n // parts] * parts
        if sum(sizes) != n or min(sizes) < 1:
            raise PlanError(f"{path}: sizes {sizes} do not add up to axis {axis}'s size {n}")
        to = [_new_path(rx, t, path) for t in args["to"]]
        return {"op": "split", "from": path, "to": to, "axis": axis, "sizes": sizes}

    return fn


def _cast(args: dict) -> Callable:
    def fn(path, rx, x):
        dtype = numpy_dtype(str(args["dtype"])).name
        return (
            None
            if dtype == x.dtype
            else {"op": "cast", "path": path, "dtype": dtype, "from": x.dtype}
        )

    return fn


def _unstack(args: dict) -> Callable:
    def fn(path, rx, x):
        axis = _axis(int(args["axis"]), len(x.shape), path)
        to = [_new_path(rx, args["to"].replace("{i}", str(i)), path) for i in range(x.shape[axis])]
        return {"op": "unstack", "from": path, "to": to, "axis": axis}

    return fn


def _plan_stack(args: dict, items: Items) -> list[Step] | None:
    hits = _matched(args, items)
    if not hits:
        return None
    groups: dict[str, dict[int, str]] = {}
    for path, rx in hits:
        m = rx.search(path)
        number = m.group("i") if "i" in rx.groupindex else (m.group(1) if rx.groups else None)
        if number is None or not number.isdigit():
            raise PlanError(
                f"{path}: the regex's group i (or group 1) must capture the layer "
                f"number, found {number!r}"
            )
        layers = groups.setdefault(_new_path(rx, args["to"], path), {})
        if int(number) in layers:
            raise PlanError(f"{path}: layer {number} of {layers[int(number)]} again")
        layers[int(number)] = path
    out = []
    for dst, layers in groups.items():
        missing = [i for i in range(max(layers) + 1) if i not in layers]
        if missing:
            raise PlanError(f"{dst}: layer {missing[0]} is missing (found {sorted(layers)})")
        src = [layers[i] for i in range(len(layers))]
        _same(src, items, None)
        axis = _axis(int(args["axis"]), len(items[src[0]][1].shape) + 1, src[0])
        out.append({"op": "stack", "from": src, "to": dst, "axis": axis})
    return out


def _plan_concat(args: dict, items: Items) -> list[Step] | None:
    regexes = [re.compile(r) for r in args["match"]]
    groups: dict[str, list[str | None]] = {}
    for k, rx in enumerate(regexes):
        for path in items:
            if rx.search(path):
                slot = groups.setdefault(_new_path(rx, args["to"], path), [None] * len(regexes))
                if slot[k] is not None:
                    raise PlanError(f"{path}: input {k + 1} of concat is already {slot[k]}")
                slot[k] = path
    if not groups:
        return None
    out = []
    for dst, src in groups.items():
        if None in src:
            k = src.index(None)
            raise PlanError(
                f"{dst}: concat's input {k + 1} ({args['match'][k]}) matches no leaf "
                "for this output"
            )
        ndim = len(items[src[0]][1].shape)
        axis = _axis(int(args["axis"]), ndim, src[0])
        _same(src, items, axis)
        sizes = [items[p][1].shape[axis] for p in src]
        out.append({"op": "concat", "from": src, "to": dst, "axis": axis, "sizes": sizes})
    return out


def _same(paths: list[str], items: Items, axis: int | None) -> None:
    """Refuses leaves that disagree on dtype, kind or shape (except along ``axis``)."""
    k0, first = items[paths[0]]

    def key(shape):
        return shape if axis is None else shape[:axis] + shape[axis + 1 :]

    for p in paths[1:]:
        kind, x = items[p]
        if (
            x.dtype != first.dtype
            or kind != k0
            or len(x.shape) != len(first.shape)
            or key(x.shape) != key(first.shape)
        ):
            raise PlanError(
                f"{p}: expected {k0} {first.dtype}{list(first.shape)} like {paths[0]}, "
                f"found {kind} {x.dtype}{list(x.shape)}"
            )


_PLANNERS: dict[str, Callable[[dict, Items], list[Step] | None]] = {
    "rename": _per_leaf(_rename),
    "transpose": _per_leaf(_transpose),
    "reshape": _per_leaf(_reshape),
    "split": _per_leaf(_split),
    "unstack": _per_leaf(_unstack),
    "cast": _per_leaf(_cast),
    "stack": _plan_stack,
    "concat": _plan_concat,
}


def map_tree(tree: TrainTree, mapping: Mapping) -> list[list[Step]]:
    """Applies ``mapping`` to the model and, identically, to every optimizer mirror.

    Returns:
        The steps applied, one batch per rule (what the output records to undo them).

    Raises:
        MappingError: naming the rule and the path when a rule cannot apply.
    """
    batches = mapping.plan({"/".join(p): v for p, v in tree.model.items()})
    run_on_tree(tree, batches, mapping.where)
    return batches


def run_on_tree(tree: TrainTree, batches: list[list[Step]], where: str = "mapping") -> None:
    """Runs recorded steps on the model and on every optimizer mirror (where present)."""
    model = {"/".join(p): v for p, v in tree.model.items()}
    for batch in batches:
        model = steps_mod.run_batch(model, batch, what=f"{where}: ")
    tree.model = {tuple(p.split("/")): v for p, v in model.items()}
    for entry in tree.opt_state or ():
        if entry is None:
            continue
        for root, mirror in entry.mirrors.items():
            items = {"/".join(p): (PARAMS, e) for p, e in mirror.items()}
            for batch in batches:
                what = f"{where}: optimizer mirror {'/'.join(root)}: "
                items = steps_mod.run_batch(items, batch, partial=True, what=what)
            entry.mirrors[root] = {tuple(p.split("/")): e for p, (_, e) in items.items()}


def undo_tree(tree: TrainTree, batches: list[list[Step]]) -> None:
    """Undoes recorded steps (those of :func:`map_tree`) on the model and the mirrors."""
    run_on_tree(tree, steps_mod.invert(batches), "recorded mapping")
