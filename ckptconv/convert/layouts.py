"""Checkpoint layouts: how each framework arranges a training state on disk.

One class per layout, registered by name, each able to recognise its tree from metadata,
parse it into a :class:`~ckptconv.convert.tree.TrainTree` and emit a tree back:

* ``maxtext``: ``params/params/<model>``, ``opt_state`` as a list with empty entries and
  ``mu``/``nu`` under an extra ``params`` level, ``step`` int32, ``nnx_aux/model/<rng state>``.
* ``flax``: ``flax.training.train_state.TrainState``: ``params/<model>``, ``opt_state`` tuple
  with empty entries, ``step``, other Linen collections (``batch_stats``) beside them.
* ``params``: the whole checkpoint is one params tree (what model libraries and Hugging Face
  save: ``StandardCheckpointer().save(path, params)``, ``flax_model.msgpack``): no ``params/``
  level, no optimizer, no step. Detected when no other layout fits; forced with
  ``--layout params`` (which reads any tree as bare params).
* ``nnx``: ``model/<nnx.state(model)>`` and ``optimizer/<nnx.state(nnx.Optimizer)>``, every
  leaf ending in ``value``; ``optimizer/step`` uint32; ``opt_state`` keyed by chain position
  with empty entries omitted; other collections merged into the model tree.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Protocol

from ..errors import LayoutError
from ..io.leaf import KeyPath, Leaf, keystr
from .expr import Expr, Src, cast
from .tree import PARAMS, OptEntry, TrainTree, find_mirrors, merge_collection

SEQUENCE_KEY = 1
DICT_KEY = 2


@dataclasses.dataclass(frozen=True)
class OutLeaf:
    """One leaf of a conversion's output.

    Attributes:
        path: the output key path.
        expr: how to compute it from source leaves; ``None`` for an empty leaf.
        key_types: Orbax key types of the path (1 sequence index, 2 dict key).
    """

    path: KeyPath
    expr: Expr | None
    key_types: tuple[int, ...]


class Layout(Protocol):
    """A checkpoint layout: recognise, parse into a TrainTree, and emit."""

    name: str

    def matches(self, leaves: dict[KeyPath, Leaf]) -> bool:
        """Whether ``leaves`` look like this layout."""
        ...

    def parse(self, leaves: dict[KeyPath, Leaf], info: dict) -> TrainTree:
        """Parses source leaves (with recorded conversion facts ``info``) into a TrainTree."""
        ...

    def emit(self, tree: TrainTree) -> list[OutLeaf]:
        """Returns the output leaves of ``tree`` in this layout."""
        ...


_REGISTRY: dict[str, Layout] = {}


def register(layout: Layout) -> Layout:
    """Registers a layout under its name."""
    _REGISTRY[layout.name] = layout
    return layout


def get_layout(name: str) -> Layout:
    """Returns the layout called ``name``.

    Raises:
        LayoutError: for an unknown name, listing the known ones.
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise LayoutError(
            f"unknown layout {name!r}: expected one of {', '.join(sorted(_REGISTRY))}"
        ) from None


def layout_names() -> list[str]:
    """Returns the registered layout names."""
    return sorted(_REGISTRY)


def matching_layouts(leaves: dict[KeyPath, Leaf]) -> list[Layout]:
    """Returns every registered layout whose ``matches`` accepts ``leaves``."""
    return [lay for lay in _REGISTRY.values() if lay.matches(leaves)]


def resolve_layout(
    leaves: dict[KeyPath, Leaf], forced: str | None, where: str = "checkpoint"
) -> tuple[Layout, bool]:
    """Returns the layout to parse ``leaves`` as, and whether detection confirmed it.

    Without ``forced`` this is :func:`detect_layout`. A forced layout (``--layout``, the
    *source's* layout) must agree with detection: when one layout, or several, match and
    ``forced`` is not among them, the checkpoint is not what the user says, and it is
    refused naming what was detected. When nothing matches, ``forced`` is used as given.

    Args:
        leaves: the checkpoint's leaves.
        forced: the layout named by the user, or None.
        where: how to name the checkpoint in errors.

    Returns:
        ``(layout, confirmed)``; ``confirmed`` is False when ``forced`` is used although no
        layout matched.

    Raises:
        LayoutError: for an unknown name, or a forced layout that contradicts detection.
    """
    if forced is None:
        return detect_layout(leaves, where), True
    lay = get_layout(forced)
    if forced == ParamsLayout.name:
        return lay, True  # any tree reads as a bare params tree: the user says it is one
    found = [m.name for m in matching_layouts(leaves)]
    if found and forced not in found:
        detected = " or ".join(found)
        raise LayoutError(
            f"{where}: --layout {forced} names the source's layout, but the source is "
            f"detected as {detected}; omit --layout to read it as {detected}"
        )
    return lay, bool(found)


def detect_layout(leaves: dict[KeyPath, Leaf], where: str = "checkpoint") -> Layout:
    """Returns the one layout that matches ``leaves``.

    Raises:
        LayoutError: when no layout, or more than one, matches.
    """
    found = matching_layouts(leaves)
    if len(found) == 1:
        return found[0]
    tops = sorted({p[0] for p in leaves if p})
    if not found:
        if ParamsLayout.accepts(leaves):
            return get_layout(ParamsLayout.name)
        raise LayoutError(
            f"{where}: unknown layout: expected top-level keys params/opt_state/step "
            f"(maxtext, flax), model/optimizer (nnx), or a bare params tree of arrays "
            f"(params), found {tops} with empty leaves"
        )
    names = ", ".join(lay.name for lay in found)
    raise LayoutError(f"{where}: ambiguous layout ({names}); pass --layout")


def _src(leaf: Leaf) -> Src:
    return Src(leaf.path, leaf.shape, leaf.dtype)  # type: ignore[arg-type]


def _split_opt_state(
    leaves: dict[KeyPath, Leaf], root: KeyPath
) -> tuple[dict[int, dict[KeyPath, Expr]], set[int], int]:
    """Groups the leaves under ``root`` by chain position: (entries, empty positions, length)."""
    entries: dict[int, dict[KeyPath, Expr]] = {}
    empty: set[int] = set()
    n = len(root)
    for path, leaf in leaves.items():
        if path[:n] != root:
            continue
        rest = path[n:]
        if not rest or not rest[0].isdigit():
            raise LayoutError(
                f"{keystr(path)}: expected an optax chain position under {keystr(root)}, "
                f"found {rest[0] if rest else 'a leaf'!r}"
            )
        pos = int(rest[0])
        if leaf.empty:
            if len(rest) == 1:
                empty.add(pos)
            continue
        entries.setdefault(pos, {})[rest[1:]] = _src(leaf)
    length = max([*entries, *empty], default=-1) + 1
    return entries, empty, length


def _build_opt_state(
    entries: dict[int, dict[KeyPath, Expr]],
    length: int,
    param_paths: set[KeyPath],
    wrapper: KeyPath,
) -> list[OptEntry | None]:
    return [
        find_mirrors(entries[i], param_paths, wrapper) if i in entries else None
        for i in range(length)
    ]


def _emit_opt_state(
    opt_state: list[OptEntry | None], root: KeyPath, wrapper: KeyPath, suffix: KeyPath, linen: bool
) -> list[OutLeaf]:
    out: list[OutLeaf] = []
    pos_type = SEQUENCE_KEY if linen else DICT_KEY
    for i, entry in enumerate(opt_state):
        base = (*root, str(i))
        types = (DICT_KEY,) * len(root) + (pos_type,)
        if entry is None:
            if linen:
                out.append(OutLeaf(base, None, types))
            continue
        for p, e in entry.leaves.items():
            path = base + p + suffix
            out.append(OutLeaf(path, e, types + (DICT_KEY,) * (len(p) + len(suffix))))
        for root_p, tree in entry.mirrors.items():
            for p, e in tree.items():
                path = base + root_p + wrapper + p + suffix
                out.append(OutLeaf(path, e, types + (DICT_KEY,) * (len(path) - len(types))))
    return out


def _dict_leaf(path: KeyPath, e: Expr) -> OutLeaf:
    return OutLeaf(path, e, (DICT_KEY,) * len(path))


class _LinenLayout:
    """Shared parsing and emission of the two Linen train-state layouts."""

    name: ClassVar[str]
    params_root: ClassVar[KeyPath]
    mirror_wrapper: ClassVar[KeyPath]
    known_tops: ClassVar[frozenset[str]]

    def _collection_root(self, kind: str) -> KeyPath:
        return (kind,)

    def _kind_of_top(self, path: KeyPath) -> tuple[str, KeyPath]:
        return path[0], path[1:]

    def parse(self, leaves: dict[KeyPath, Leaf], info: dict) -> TrainTree:  # noqa: D102
        model: dict[KeyPath, tuple[str, Expr]] = {}
        others: dict[str, dict[KeyPath, Expr]] = {}
        step = None
        n = len(self.params_root)
        for path, leaf in leaves.items():
            top = path[0]
            if top == "opt_state":
                continue
            if leaf.empty:
                raise LayoutError(
                    f"{keystr(path)}: expected an array outside opt_state, found an empty leaf"
                )
            if path == ("step",):
                step = _src(leaf)
            elif path[:n] == self.params_root and len(path) > n:
                model[path[n:]] = (PARAMS, _src(leaf))
            else:
                kind, rel = self._kind_of_top(path)
                others.setdefault(kind, {})[rel] = _src(leaf)
        for kind, coll in others.items():
            merge_collection(model, kind, coll)
        tree = TrainTree(model=model, step=step)
        entries, empty, length = _split_opt_state(leaves, ("opt_state",))
        if entries or empty:
            params = set(tree.params())
            tree.opt_state = _build_opt_state(entries, length, params, self.mirror_wrapper)
        tree.info = {"source_layout": self.name}
        if step is not None:
            tree.info["step_dtype"] = step.dtype
        return tree

    def emit(self, tree: TrainTree) -> list[OutLeaf]:  # noqa: D102
        out: list[OutLeaf] = []
        for path, (kind, e) in tree.model.items():
            root = self.params_root if kind == PARAMS else self._collection_root(kind)
            out.append(_dict_leaf(root + path, e))
        if tree.opt_state is not None:
            out += _emit_opt_state(tree.opt_state, ("opt_state",), self.mirror_wrapper, (), True)
        if tree.step is not None:
            dtype = tree.info.get("step_dtype", "int32")
            out.append(_dict_leaf(("step",), cast(tree.step, dtype)))
        return out


class MaxTextLayout(_LinenLayout):
    """MaxText's Linen ``TrainState`` (``<step>/items``)."""

    name = "maxtext"
    params_root = ("params", "params")
    mirror_wrapper = ("params",)
    known_tops = frozenset({"params", "opt_state", "step", "nnx_aux"})

    def matches(self, leaves: dict[KeyPath, Leaf]) -> bool:  # noqa: D102
        params = [p for p in leaves if p[0] == "params"]
        return (
            bool(params)
            and all(len(p) > 2 and p[1] == "params" for p in params)
            and {p[0] for p in leaves} <= self.known_tops
        )

    def _collection_root(self, kind: str) -> KeyPath:
        return ("nnx_aux", "model") if kind == "nnx_aux" else (kind,)

    def _kind_of_top(self, path: KeyPath) -> tuple[str, KeyPath]:
        if path[:2] == ("nnx_aux", "model"):
            return "nnx_aux", path[2:]
        raise LayoutError(
            f"{keystr(path)}: expected params/params/..., opt_state/..., step or "
            "nnx_aux/model/... in a MaxText checkpoint"
        )


class FlaxLayout(_LinenLayout):
    """A ``flax.training.train_state.TrainState`` (plus Linen collections) saved with Orbax."""

    name = "flax"
    params_root = ("params",)
    mirror_wrapper = ()
    known_tops = frozenset()

    def matches(self, leaves: dict[KeyPath, Leaf]) -> bool:  # noqa: D102
        tops = {p[0] for p in leaves}
        if "params" not in tops or tops & {"model", "optimizer"}:
            return False
        return not MaxTextLayout().matches(leaves)


class NNXLayout:
    """``{"model": nnx.state(model), "optimizer": nnx.state(nnx.Optimizer)}`` as Orbax saves it."""

    name = "nnx"
    suffix: KeyPath = ("value",)

    def matches(self, leaves: dict[KeyPath, Leaf]) -> bool:  # noqa: D102
        tops = {p[0] for p in leaves}
        # nnx.State saved by Orbax: every array leaf ends in 'value' (a bare params tree whose
        # root module happens to be called 'model' does not).
        return (
            "model" in tops
            and tops <= {"model", "optimizer"}
            and all(p[-1] == "value" for p, leaf in leaves.items() if not leaf.empty)
        )

    def parse(self, leaves: dict[KeyPath, Leaf], info: dict) -> TrainTree:  # noqa: D102
        kinds: dict[str, str] = info.get("kinds", {})
        model: dict[KeyPath, tuple[str, Expr]] = {}
        opt_leaves: dict[KeyPath, Leaf] = {}
        step = None
        for path, leaf in leaves.items():
            if path[-1] != "value" or leaf.empty:
                raise LayoutError(
                    f"{keystr(path)}: expected an array leaf ending in 'value' (as Orbax writes "
                    f"nnx.State), found {'an empty leaf' if leaf.empty else repr(path[-1])}"
                )
            inner = path[:-1]
            if inner[0] == "model":
                rel = inner[1:]
                model[rel] = (kinds.get("/".join(rel), PARAMS), _src(leaf))
            elif inner == ("optimizer", "step"):
                step = _src(leaf)
            elif inner[:2] == ("optimizer", "opt_state"):
                opt_leaves[inner] = leaf
            else:
                raise LayoutError(
                    f"{keystr(path)}: expected model/..., optimizer/step or "
                    "optimizer/opt_state/... in an NNX checkpoint"
                )
        tree = TrainTree(model=model, step=step, info={**info, "source_layout": self.name})
        if opt_leaves or step is not None:
            entries, _, length = _split_opt_state(opt_leaves, ("optimizer", "opt_state"))
            length = max(length, int(info.get("opt_len", 0)))
            tree.opt_state = _build_opt_state(entries, length, set(tree.params()), ())
        return tree

    def emit(self, tree: TrainTree) -> list[OutLeaf]:  # noqa: D102
        out = [_dict_leaf(("model", *p, "value"), e) for p, (_, e) in tree.model.items()]
        if tree.opt_state is not None:
            out += _emit_opt_state(
                tree.opt_state, ("optimizer", "opt_state"), (), ("value",), False
            )
        if tree.step is not None:
            out.append(_dict_leaf(("optimizer", "step", "value"), cast(tree.step, "uint32")))
        return out


class ParamsLayout:
    """A bare params tree: every leaf of the checkpoint is a parameter at its own path."""

    name = "params"

    @staticmethod
    def accepts(leaves: dict[KeyPath, Leaf]) -> bool:
        """Whether ``leaves`` can be read as bare params (arrays only, at least one)."""
        return bool(leaves) and not any(leaf.empty for leaf in leaves.values())

    def matches(self, leaves: dict[KeyPath, Leaf]) -> bool:  # noqa: D102
        return False  # the fallback of detect_layout, never a match of its own

    def parse(self, leaves: dict[KeyPath, Leaf], info: dict) -> TrainTree:  # noqa: D102
        model: dict[KeyPath, tuple[str, Expr]] = {}
        for path, leaf in leaves.items():
            if leaf.empty:
                raise LayoutError(
                    f"{keystr(path)}: expected an array in a bare params tree, found an empty "
                    "leaf (an optimizer entry?): pass --layout flax or maxtext"
                )
            model[path] = (PARAMS, _src(leaf))
        return TrainTree(model=model, info={"source_layout": self.name})

    def emit(self, tree: TrainTree) -> list[OutLeaf]:  # noqa: D102
        if tree.opt_state is not None or tree.step is not None:
            raise LayoutError(
                "the params layout holds params only, found optimizer state or a step: pass "
                "--params-only, or --to flax / --to maxtext to keep them"
            )
        others = sorted({k for k, _ in tree.model.values() if k != PARAMS})
        if others:
            raise LayoutError(
                f"the params layout holds params only, found collections {others}: pass "
                "--params-only, or --to flax to keep them"
            )
        return [_dict_leaf(path, e) for path, (_, e) in tree.model.items()]


register(MaxTextLayout())
register(FlaxLayout())
register(NNXLayout())
register(ParamsLayout())
