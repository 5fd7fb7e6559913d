"""Conversion plans, computed from checkpoint metadata alone.

A :class:`Plan` lists every output leaf with the expression that produces it. It is printable
(``--dry-run``), checkable against a target abstract NNX state before any data is written,
and invertible: the facts needed to undo it (source layout, optimizer chain length, step
dtype, renames, stacking axes, collections) are recorded in the output checkpoint's custom
metadata, so ``nnx-to-linen`` returns the original tree byte for byte.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ..errors import LayoutError, PlanError
from ..io.leaf import KeyPath, Leaf, keystr
from . import rules
from .expr import is_data_movement
from .layouts import OutLeaf, get_layout, matching_layouts, resolve_layout
from .mapping import Mapping, map_tree, undo_tree
from .tree import PARAMS, TrainTree

INFO_KEY = "ckptconv"
LINEN_LAYOUTS = ("maxtext", "flax", "params")
DEFAULT_LINEN_SCAN_AXIS = 1
DEFAULT_NNX_SCAN_AXIS = 0
LINEN_AXIS_OPTION = "--linen-scan-axis"
NNX_AXIS_OPTION = "--nnx-scan-axis"


@dataclasses.dataclass(frozen=True)
class ConvertOptions:
    """Options of a conversion, in either direction.

    Scan axes follow numpy exactly. An axis ``a`` of a stacked leaf of rank ``n`` (the rank
    with the layer axis) must satisfy ``-n <= a < n``; a negative one counts from the end, per
    leaf, as in ``numpy.moveaxis`` (moving a stacked axis) and ``numpy.stack`` (stacking
    layers): with ``nnx_scan_axis=-1`` every stacked param has its layer axis last. The value
    given is recorded as given, so ``nnx-to-linen`` resolves it against the same ranks and
    inverts the move exactly. An axis out of range for any stacked param is a
    :class:`~ckptconv.errors.PlanError` naming the leaf, its rank and the axis (never clamped).
    Other collections of a layer family (rng state, caches), at any depth under the layer,
    are stacked with the params, always at axis 0, and split on axis 0. A leaf stored for
    some layers only (a param, or state the layers share, which NNX stores once) cannot be
    stacked: ``scan_layers=True`` refuses it, naming it (``params_only`` drops the non-param
    collections). Scan axes must be integers.

    Attributes:
        layout: the *source's* layout name; ``None`` detects it. A layout that contradicts
            detection is refused, naming the detected one (``nnx-to-linen`` reads ``nnx``
            only; ``target_layout`` picks the Linen layout it writes).
        target_layout: for ``nnx-to-linen``: ``maxtext`` or ``flax``; ``None`` uses the
            layout recorded at conversion time, else ``maxtext``.
        renames: ``(regex, replacement)`` pairs applied to '/'-joined model paths.
        scan_layers: ``True`` stacks numbered layer families, ``False`` unstacks scanned
            ones, ``None`` keeps the source's choice (or undoes a recorded change).
        linen_scan_axis: stacking axis of Linen params; ``None`` reads it from the recorded
            metadata, else 1 (MaxText's ``param_scan_axis``).
        nnx_scan_axis: stacking axis of NNX params; ``None`` reads it from the recorded
            metadata, else 0.
        dtype: cast floating params (and their optimizer mirrors) to this floating dtype
            (one of :data:`~ckptconv.convert.rules.FLOAT_DTYPES`); others are refused.
        params_only: keep the params only (no optimizer state, step or other collections).
        families: names of layer families (``layers`` stacks ``layers_0``, ``layers_1``...).
        mapping: a mapping file's rules (:mod:`~ckptconv.convert.mapping`), applied to the
            source's model paths before ``renames``. With a mapping the stacked axes of
            ``layers`` families are moved only on request (``scan_layers``): the mapping says
            where every axis goes. ``nnx-to-linen`` applies it to the NNX model paths instead
            of undoing the recorded one.
    """

    layout: str | None = None
    target_layout: str | None = None
    renames: tuple[tuple[str, str], ...] = ()
    scan_layers: bool | None = None
    linen_scan_axis: int | None = None
    nnx_scan_axis: int | None = None
    dtype: str | None = None
    params_only: bool = False
    families: tuple[str, ...] = rules.DEFAULT_FAMILIES
    mapping: Mapping | None = None


DEFAULT_OPTIONS = ConvertOptions()


@dataclasses.dataclass
class Plan:
    """Every output leaf of a conversion and how to compute it.

    Attributes:
        direction: ``linen-to-nnx`` or ``nnx-to-linen``.
        source_layout: the source's layout name.
        target_layout: the output's layout name.
        leaves: the output leaves in write order.
        custom_metadata: written into the output checkpoint (records how to invert).
    """

    direction: str
    source_layout: str
    target_layout: str
    leaves: list[OutLeaf]
    custom_metadata: dict

    @property
    def nbytes(self) -> int:
        """Bytes of array data the plan writes."""
        return sum(_nbytes(o) for o in self.leaves)

    def output_leaves(self) -> dict[KeyPath, Leaf]:
        """Returns the output's metadata, as a reader of the result would see it."""
        return {
            o.path: Leaf(o.path, None if o.expr is None else o.expr.shape, _dtype_of(o))
            for o in self.leaves
        }

    def to_dict(self) -> dict:
        """Returns a JSON-serialisable description (``--dry-run --json``)."""
        return {
            "direction": self.direction,
            "source_layout": self.source_layout,
            "target_layout": self.target_layout,
            "bytes": self.nbytes,
            "leaves": [
                {
                    "path": keystr(o.path),
                    "shape": None if o.expr is None else list(o.expr.shape),
                    "dtype": _dtype_of(o),
                    "from": None if o.expr is None else o.expr.describe(),
                    "exact": o.expr is None or is_data_movement(o.expr),
                }
                for o in self.leaves
            ],
            "custom_metadata": self.custom_metadata,
        }

    def describe(self) -> str:
        """Returns the plan as text, one output leaf a line (``--dry-run``)."""
        lines = [
            f"{self.direction}: {self.source_layout} -> {self.target_layout}, "
            f"{len(self.leaves)} leaves, {self.nbytes / 1e6:.1f} MB"
        ]
        for o in self.leaves:
            if o.expr is None:
                lines.append(f"  {keystr(o.path)}  <empty>")
            else:
                shape = "x".join(map(str, o.expr.shape)) or "scalar"
                lines.append(f"  {keystr(o.path)}  {o.expr.dtype}[{shape}]  <- {o.expr.describe()}")
        return "\n".join(lines)


def _dtype_of(o: OutLeaf) -> str | None:
    return None if o.expr is None else o.expr.dtype


def _nbytes(o: OutLeaf) -> int:
    if o.expr is None:
        return 0
    return Leaf(o.path, o.expr.shape, o.expr.dtype).nbytes


def recorded_info(custom_metadata: dict | None) -> dict:
    """Returns the ckptconv facts recorded in a checkpoint's custom metadata (or ``{}``)."""
    if isinstance(custom_metadata, dict) and isinstance(custom_metadata.get(INFO_KEY), dict):
        return dict(custom_metadata[INFO_KEY])
    return {}


def _kinds(tree: TrainTree) -> dict[str, str]:
    return {"/".join(p): k for p, (k, _) in tree.model.items() if k != PARAMS}


def _params_only(tree: TrainTree) -> None:
    tree.model = {p: (k, e) for p, (k, e) in tree.model.items() if k == PARAMS}
    tree.opt_state = None
    tree.step = None


def parse_source(
    leaves: dict[KeyPath, Leaf], custom_metadata: dict | None, layout: str | None, where: str
) -> TrainTree:
    """Parses a checkpoint's metadata into a TrainTree with the given or detected layout.

    Raises:
        LayoutError: when no layout is detected, or ``layout`` contradicts detection (see
            :func:`~ckptconv.convert.layouts.resolve_layout`), or the tree does not parse.
    """
    lay, confirmed = resolve_layout(leaves, layout, where)
    try:
        return lay.parse(leaves, recorded_info(custom_metadata))
    except LayoutError as e:
        if confirmed:
            raise
        raise LayoutError(f"{e} (read as --layout {layout}; no layout was detected)") from e


def _parse_nnx_source(
    leaves: dict[KeyPath, Leaf], custom_metadata: dict | None, layout: str | None, where: str
) -> TrainTree:
    """Parses the source of ``nnx-to-linen``, which must be an NNX checkpoint."""
    found = [m.name for m in matching_layouts(leaves)]
    detected = found[0] if len(found) == 1 else None
    if detected not in (None, "nnx"):
        forced = f" (--layout {layout} names the source's layout)" if layout else ""
        raise LayoutError(
            f"{where}: is a {detected} checkpoint (detected), not nnx{forced}: nnx-to-linen "
            "reads NNX checkpoints; use linen-to-nnx to convert it"
        )
    if layout not in (None, "nnx"):
        what = "an nnx checkpoint (detected)" if detected else "expected to be nnx"
        raise LayoutError(
            f"{where}: --layout {layout} names the source's layout, and the source of "
            f"nnx-to-linen is {what}; use --to {layout} to pick the Linen layout to write"
        )
    return parse_source(leaves, custom_metadata, "nnx", where)


def parse_linen_source(
    leaves: dict[KeyPath, Leaf], custom_metadata: dict | None, layout: str | None, where: str
) -> TrainTree:
    """Parses the source of ``linen-to-nnx``, which must be a Linen checkpoint."""
    found = [m.name for m in matching_layouts(leaves)]
    if layout != "params" and (found == ["nnx"] or (layout == "nnx" and not found)):
        forced = f" (--layout {layout} names the source's layout)" if layout else ""
        what = "is an nnx checkpoint (detected)" if found == ["nnx"] else "is read as nnx"
        raise LayoutError(
            f"{where}: {what}{forced}: linen-to-nnx reads Linen checkpoints (maxtext, flax, "
            "params); use nnx-to-linen to convert it"
        )
    return parse_source(leaves, custom_metadata, layout, where)


def plan_linen_to_nnx(
    leaves: dict[KeyPath, Leaf],
    custom_metadata: dict | None = None,
    options: ConvertOptions = DEFAULT_OPTIONS,
    *,
    where: str = "source",
) -> Plan:
    """Plans a Linen (MaxText or Flax) -> NNX conversion from the source's metadata.

    Args:
        leaves: the source's leaves (``CheckpointReader.leaves()``).
        custom_metadata: the source's custom metadata (MaxText records ``scan_layers``).
        options: the conversion options.
        where: how to name the source in errors.

    Returns:
        The plan.

    Raises:
        LayoutError: when the source is not a Linen layout.
        PlanError: when a rule cannot be applied.
    """
    if options.dtype:
        _check_dtype(options.dtype)
    layout = options.layout or (options.mapping.layout if options.mapping else None)
    tree = parse_linen_source(leaves, custom_metadata, layout, where)
    src_layout = tree.info["source_layout"]
    if options.params_only:
        _params_only(tree)
    steps = map_tree(tree, options.mapping) if options.mapping else None
    mapping = rules.rename(tree, options.renames)
    recorded = recorded_info(custom_metadata)
    linen_axis = _pick_axis(
        options.linen_scan_axis,
        recorded.get("linen_scan_axis"),
        DEFAULT_LINEN_SCAN_AXIS,
        LINEN_AXIS_OPTION,
        where,
    )
    nnx_axis = _pick_axis(
        options.nnx_scan_axis, None, DEFAULT_NNX_SCAN_AXIS, NNX_AXIS_OPTION, where
    )
    change = None
    if steps is None or options.scan_layers is not None:
        change = _restack(
            tree,
            options.scan_layers,
            (linen_axis, LINEN_AXIS_OPTION),
            (nnx_axis, NNX_AXIS_OPTION),
            options.families,
        )
    if options.dtype:
        rules.cast_params(tree, options.dtype)
    info = {
        "source_layout": src_layout,
        "opt_len": len(tree.opt_state) if tree.opt_state is not None else 0,
        "kinds": _kinds(tree),
        "linen_scan_axis": linen_axis,
        "nnx_scan_axis": nnx_axis,
        "scan_change": change,
        "renames": mapping,
        "families": list(options.families),
    }
    if steps is not None:
        info["mapping"] = steps
        info["restack"] = options.scan_layers is not None
    if tree.step is not None:
        info["step_dtype"] = tree.step.dtype
    out = get_layout("nnx").emit(tree)
    meta = {INFO_KEY: info}
    return Plan("linen-to-nnx", src_layout, "nnx", out, meta)


def plan_nnx_to_linen(
    leaves: dict[KeyPath, Leaf],
    custom_metadata: dict | None = None,
    options: ConvertOptions = DEFAULT_OPTIONS,
    *,
    where: str = "source",
) -> Plan:
    """Plans an NNX -> Linen conversion, undoing a recorded ``linen-to-nnx`` exactly.

    Args:
        leaves: the source's leaves.
        custom_metadata: the source's custom metadata (holds what ``linen-to-nnx`` recorded).
        options: the conversion options; explicit ones override the recorded facts.
        where: how to name the source in errors.

    Returns:
        The plan.

    Raises:
        LayoutError: when the source is not an NNX checkpoint, or ``options.layout`` names
            another layout (the source's layout; ``options.target_layout`` is the output's).
        PlanError: when a rule cannot be applied.
    """
    if options.dtype:
        _check_dtype(options.dtype)
    tree = _parse_nnx_source(leaves, custom_metadata, options.layout, where)
    info = recorded_info(custom_metadata)
    target = _linen_target(options.target_layout, info.get("source_layout"), where)
    lay = get_layout(target)
    if options.params_only:
        _params_only(tree)
    families = tuple(info.get("families", options.families))
    linen_axis = _pick_axis(
        options.linen_scan_axis,
        info.get("linen_scan_axis"),
        DEFAULT_LINEN_SCAN_AXIS,
        LINEN_AXIS_OPTION,
        where,
    )
    nnx_axis = _pick_axis(
        options.nnx_scan_axis,
        info.get("nnx_scan_axis"),
        DEFAULT_NNX_SCAN_AXIS,
        NNX_AXIS_OPTION,
        where,
    )
    scan_layers = options.scan_layers
    if scan_layers is None and info.get("scan_change") == "scanned":
        scan_layers = False
    elif scan_layers is None and info.get("scan_change") == "unscanned":
        scan_layers = True
    if (info.get("restack", True) and options.mapping is None) or scan_layers is not None:
        _restack(
            tree,
            scan_layers,
            (nnx_axis, NNX_AXIS_OPTION),
            (linen_axis, LINEN_AXIS_OPTION),
            families,
        )
    inverse = {new: old for old, new in info.get("renames", {}).items()}
    rules.apply_mapping(tree, inverse)
    if options.mapping is not None:
        map_tree(tree, options.mapping)
    elif info.get("mapping"):
        undo_tree(tree, _recorded_steps(info["mapping"], where))
    rules.rename(tree, options.renames)
    if options.dtype:
        rules.cast_params(tree, options.dtype)
    if tree.step is not None:
        tree.info["step_dtype"] = info.get("step_dtype", "int32")
    out = lay.emit(tree)
    meta: dict = {}
    if target == "maxtext":
        meta["scan_layers"] = rules.is_scanned(tree, families)
    return Plan("nnx-to-linen", "nnx", target, out, meta)


def _linen_target(explicit: str | None, recorded, where: str) -> str:
    """The Linen layout ``nnx-to-linen`` writes: ``--to``, else the recorded one, else maxtext.

    Raises:
        PlanError: the recorded layout is unknown, or the layout is not a Linen one.
    """
    if explicit is None and recorded not in (None, *LINEN_LAYOUTS):
        raise PlanError(
            f"{where}: unknown recorded layout {recorded!r} in the custom metadata: expected "
            f"{', '.join(LINEN_LAYOUTS)}; pass --to to pick the Linen layout to write"
        )
    target = explicit or recorded or "maxtext"
    if target not in LINEN_LAYOUTS:
        raise PlanError(
            f"nnx-to-linen: the target layout must be one of {', '.join(LINEN_LAYOUTS)}, "
            f"found {target}"
        )
    return target


def _restack(
    tree: TrainTree,
    scan_layers: bool | None,
    src: tuple[int, str],
    dst: tuple[int, str],
    families,
) -> str | None:
    """Keeps, splits or builds layer stacks; returns ``"scanned"``/``"unscanned"`` or None.

    A scanned source keeps its stacks (moving the params' axis ``src -> dst``) unless
    ``scan_layers`` is False; an unscanned one is stacked at ``dst`` when ``scan_layers`` is
    True. ``src`` and ``dst`` are ``(axis, option name)``: the name is for errors.
    """
    before = rules.Stacking(src[0], tuple(families), src[1])
    after = rules.Stacking(dst[0], tuple(families), dst[1])
    if rules.is_scanned(tree, families):
        if scan_layers is False:
            rules.unscan(tree, before)
            return "unscanned"
        rules.move_scan_axis(tree, before, after)
        return None
    if scan_layers:
        rules.scan(tree, after)
        return "scanned"
    return None


def _recorded_steps(batches, where: str) -> list[list[dict]]:
    """The recorded mapping steps, checked to be lists of step dicts."""
    if not isinstance(batches, list) or not all(
        isinstance(b, list) and all(isinstance(s, dict) and "op" in s for s in b) for b in batches
    ):
        raise PlanError(
            f"{where}: the mapping recorded in the custom metadata is not a list of steps"
        )
    return batches


def _pick_axis(explicit, recorded, default: int, option: str, where: str) -> int:
    """The explicit scan axis, else the recorded one, else ``default``; each an integer.

    Raises:
        PlanError: when the explicit or the recorded axis is not an integer.
    """
    if explicit is not None:
        value, what = explicit, option
    elif recorded is not None:
        value, what = recorded, f"{where}: the {option[2:].replace('-', '_')} recorded in"
        what += " the custom metadata"
    else:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise PlanError(f"{what}: expected an integer axis, found {value!r}")
    return value


def _check_dtype(name: str) -> None:
    """Refuses a ``--dtype`` that is unknown or not floating (a cast to int8 is garbage)."""
    from ..io import numpy_dtype

    allowed = ", ".join(sorted(rules.FLOAT_DTYPES))
    try:
        dt = numpy_dtype(name)
    except TypeError as e:
        raise PlanError(
            f"--dtype {name}: not a dtype numpy knows; expected a floating dtype ({allowed})"
        ) from e
    if dt.name not in rules.FLOAT_DTYPES:
        raise PlanError(
            f"--dtype {name}: expected a floating dtype ({allowed}), found {dt.name} "
            f"({_dtype_kind(dt)})"
        )


def _dtype_kind(dt: np.dtype) -> str:
    kinds = {"i": "integer", "u": "unsigned integer", "b": "boolean", "c": "complex"}
    return kinds.get(dt.kind, "not one ckptconv casts to")


@dataclasses.dataclass(frozen=True)
class Mismatch:
    """One difference between a plan's output and a target tree."""

    path: str
    problem: str
    expected: str
    found: str

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}: expected {self.expected}, found {self.found}"


def check_against(
    plan_leaves: dict[KeyPath, Leaf], target: dict[KeyPath, tuple[tuple[int, ...], str]]
) -> list[Mismatch]:
    """Compares a plan's output leaves with a target's ``{path: (shape, dtype)}``.

    Only the target's top-level trees (``model``) are checked for extra leaves: an
    optimizer state and a step have no counterpart in a model.

    Returns:
        Every mismatched, missing and extra leaf, in that order, each sorted by path.
    """
    out: list[Mismatch] = []
    for path, (shape, dtype) in target.items():
        leaf = plan_leaves.get(path)
        if leaf is None:
            out.append(Mismatch(keystr(path), "missing", f"{dtype}{list(shape)}", "nothing"))
        elif leaf.shape != tuple(shape) or leaf.dtype != dtype:
            out.append(
                Mismatch(
                    keystr(path),
                    "mismatch",
                    f"{dtype}{list(shape)}",
                    f"{leaf.dtype}{list(leaf.shape or ())}",
                )
            )
    roots = {p[0] for p in target}
    for path, leaf in plan_leaves.items():
        if path[0] in roots and path not in target and not leaf.empty:
            out.append(
                Mismatch(keystr(path), "extra", "nothing", f"{leaf.dtype}{list(leaf.shape or ())}")
            )
    order = {"mismatch": 0, "missing": 1, "extra": 2}
    return sorted(out, key=lambda m: (order[m.problem], m.path))


def mismatch_error(problems: list[Mismatch], what: str) -> PlanError:
    """A one-line PlanError listing the first five problems (``what: p1; p2 ... (and N more)``)."""
    shown = "; ".join(str(p) for p in problems[:5])
    more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
    return PlanError(f"{what}: {shown}{more}")


def require_target(plan: Plan, target: dict | None) -> None:
    """Raises a PlanError naming every difference when ``plan``'s output does not match.

    Args:
        plan: the plan.
        target: ``{path: (shape, dtype)}`` (see :func:`abstract_tree_leaves`), or None.
    """
    if target is None:
        return
    problems = check_against(plan.output_leaves(), target)
    if problems:
        raise mismatch_error(problems, "output does not match the target")


def abstract_tree_leaves(model) -> dict[KeyPath, tuple[tuple[int, ...], str]]:
    """Returns the NNX checkpoint leaves a model should have: ``{path: (shape, dtype)}``.

    Args:
        model: an NNX module (concrete or from ``nnx.eval_shape``), its ``nnx.State``, or a
            pure dict of arrays / ``jax.ShapeDtypeStruct``.

    Returns:
        Leaves keyed as Orbax writes ``{"model": nnx.state(model)}``: ``("model", ..., "value")``.
    """
    from flax import nnx

    if isinstance(model, nnx.Module):
        model = nnx.state(model)
    if isinstance(model, nnx.State):
        model = nnx.to_pure_dict(model)
    out: dict[KeyPath, tuple[tuple[int, ...], str]] = {}

    def walk(node, prefix: KeyPath) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, (*prefix, str(k)))
        elif hasattr(node, "shape") and hasattr(node, "dtype"):
            out[("model", *prefix, "value")] = (tuple(node.shape), np.dtype(node.dtype).name)

    walk(model, ())
    return out
