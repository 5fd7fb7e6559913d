"""Logical axis names of a checkpoint's leaves: from an NNX model, or from name rules.

An NNX model's ``nnx.Param`` paths are what an NNX checkpoint's ``model/<path>/value`` leaves
hold; optimizer leaves ``.../<path>/value`` of the same shape (Adam's moments) get the same
names. Name rules are ``(regex, axes)`` pairs matched with ``re.search`` against each leaf's
'/'-joined path, the first match winning; a names file holds them as a YAML/JSON list of
``{match: REGEX, axes: [name or null, ...]}``. Leaves without names get ``None``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any

from ..errors import ShardingError
from ..io import KeyPath, Leaf, keystr
from .annotate import logical_names

NameRule = tuple[str, "Sequence[str | None]"]
"""One entry of a names file: a path regex and one logical name (or ``None``) per dimension."""


def load_name_rules(path: str | os.PathLike[str]) -> list[NameRule]:
    """Reads a names file: a YAML/JSON list of ``{match: REGEX, axes: [name or null, ...]}``.

    Raises:
        ShardingError: the file cannot be read or parsed, or an entry is malformed or its
            regex invalid (naming the entry).
    """
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        raise ShardingError(f"names file {path}: {' '.join(str(e).split())}") from e
    if not isinstance(data, list):
        raise ShardingError(f"names file {path}: expected a list of {{match, axes}} entries")
    rules = []
    for i, entry in enumerate(data):
        if not isinstance(entry, dict) or set(entry) != {"match", "axes"}:
            raise ShardingError(
                f"names file {path}: entry {i} is not {{match: REGEX, axes: [...]}}"
            )
        axes = entry["axes"]
        if not isinstance(axes, list) or not all(a is None or isinstance(a, str) for a in axes):
            raise ShardingError(f"names file {path}: entry {i}: axes must be names or null")
        rules.append((str(entry["match"]), tuple(axes)))
    compile_name_rules(rules, where=f"names file {path}")
    return rules


def compile_name_rules(rules: Sequence[NameRule], *, where: str = "names") -> list:
    """Compiles the regexes of name rules; raises ``ShardingError`` naming a bad one."""
    out = []
    for i, (pattern, axes) in enumerate(rules):
        try:
            out.append((re.compile(pattern), tuple(axes)))
        except re.error as e:
            raise ShardingError(f"{where}: entry {i}: bad regex {pattern!r}: {e}") from e
    return out


def names_from_rules(leaves: dict[KeyPath, Leaf], rules: Sequence[NameRule]) -> dict:
    """Logical names per array leaf: the first rule whose regex the path matches."""
    compiled = compile_name_rules(rules)
    out: dict[KeyPath, tuple[str | None, ...] | None] = {}
    for path, leaf in leaves.items():
        text = keystr(path)
        hit = next(((p, a) for p, a in compiled if p.search(text)), None)
        if hit is not None and len(hit[1]) != len(leaf.shape):  # type: ignore[arg-type]
            raise ShardingError(
                f"leaf {text} of shape {leaf.shape}: the names rule {hit[0].pattern!r} gives "
                f"{len(hit[1])} axes {list(hit[1])} for its {len(leaf.shape)} dimensions"  # type: ignore[arg-type]
            )
        out[path] = None if hit is None else hit[1]
    return out


def _model_params(model: Any) -> dict[KeyPath, tuple[tuple[int, ...], Any]]:
    """``{param path: (shape, logical names)}`` of an adapter, abstract Module or State."""
    from flax import nnx

    if callable(getattr(model, "nnx_model", None)):
        model = model.nnx_model()
    if isinstance(model, nnx.Module):
        state = nnx.state(model, nnx.Param)
    elif isinstance(model, nnx.State):
        state = nnx.filter_state(model, nnx.Param)
    else:
        raise ShardingError(
            "logical names come from name rules, a model adapter or an abstract nnx model, "
            f"got {type(model).__name__}"
        )
    out = {}
    for path, var in nnx.to_flat_state(state):
        path = tuple(str(k) for k in path)
        out[path] = (tuple(var.get_value().shape), logical_names(var, path=path))
    return out


def names_from_model(leaves: dict[KeyPath, Leaf], model: Any) -> dict:
    """Logical names per array leaf ``.../<param path>/value`` of the param's shape."""
    params = _model_params(model)
    out: dict[KeyPath, tuple[str | None, ...] | None] = {}
    matched = 0
    for path, leaf in leaves.items():
        found = None
        if path[-1] == "value":
            found = next(
                (path[k:-1] for k in range(1, len(path) - 1) if path[k:-1] in params), None
            )
        if found is not None and params[found][0] != leaf.shape:
            if path[0] == "model":
                raise ShardingError(
                    f"leaf {keystr(path)} has shape {leaf.shape} but the model's param "
                    f"{keystr(found)} has shape {params[found][0]}: the model does not fit"
                )
            found = None
        matched += found is not None
        out[path] = None if found is None else params[found][1]
    if params and not matched:
        raise ShardingError(
            "no leaf model/<param>/value of the checkpoint is a param of the model "
            "(reshard an NNX checkpoint, or give --names)"
        )
    return out


def leaf_names(leaves: dict[KeyPath, Leaf], names: Any) -> dict:
    """Logical names (or ``None``) of every array leaf.

    Args:
        leaves: the checkpoint's array leaves.
        names: name rules (a list or tuple of ``(regex, axes)``), exact names (a ``dict``
            ``{path: axes}``; leaves it lacks have none), or a model adapter (with
            ``nnx_model()``), an abstract ``nnx.Module`` or its ``nnx.State``.

    Returns:
        ``{path: names tuple or None}`` for every leaf of ``leaves``.

    Raises:
        ShardingError: a bad regex, names that do not fit a leaf's rank, or a model that
            does not fit the checkpoint.
    """
    if isinstance(names, list | tuple):
        return names_from_rules(leaves, names)
    if isinstance(names, dict):
        return {p: None if names.get(p) is None else tuple(names[p]) for p in leaves}
    return names_from_model(leaves, names)


def resolve_names(names_file: str | None, model_spec: str | None, model_config: str | None):
    """The logical names the CLI's options give: a ``--names`` file, else the model.

    Returns:
        Name rules (:func:`load_name_rules`) or a model adapter.

    Raises:
        ConfigError: ``--names`` together with a model option, or no source of names.
    """
    from ..errors import ConfigError
    from ..models.adapter import resolve_model

    if names_file is None:
        return resolve_model(model_spec, model_config)
    if model_config is not None or model_spec is not None:
        raise ConfigError("give one of --names, --model and --model-config")
    return load_name_rules(names_file)
