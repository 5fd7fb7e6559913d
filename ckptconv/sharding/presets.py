"""Named rule sets: MaxText's defaults and a small FSDP + tensor-parallel set.

- ``maxtext``: the ``logical_axis_rules`` of MaxText's ``configs/base.yml`` (MaxText 0.2.5),
  over its twelve mesh axes (``diloco, data, stage, fsdp, fsdp_transpose, context,
  context_usp_ulysses, context_autoregressive, tensor, tensor_sequence, expert,
  autoregressive``). Shipped as ``maxtext_rules.json`` beside this module. On a mesh with only
  some of these axes the others drop out as if of size 1, which is what MaxText does.
- ``fsdp-tp``: parameters sharded over ``fsdp`` (embedding dimension) and ``tensor`` (heads,
  MLP, vocabulary), AR KV-cache slots over ``data`` and cache heads over ``tensor``; norms,
  head dimensions, layers and sequence replicated. Activation names are not covered.
"""

from __future__ import annotations

import functools
import importlib.resources
import pathlib

from ..errors import ShardingError
from .rules import LogicalAxisRules

FSDP_TP_MESH_AXES = ("data", "fsdp", "tensor")

_FSDP_TP_RULES = (
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("kv_head_dim", None),
    ("kv", None),
    ("qkv", None),
    ("norm", None),
    ("layers", None),
    ("cache_batch", "data"),
    # Prefill runs one prompt at a time: a batch of 1 cannot be split.
    ("cache_batch_prefill", None),
    ("cache_sequence", None),
    ("cache_heads", "tensor"),
    ("cache_kv", None),
)


@functools.cache
def maxtext() -> LogicalAxisRules:
    """Returns MaxText's default (base.yml) logical axis rules, with its mesh axes declared.

    Example:
        >>> names = ("cache_batch", "cache_sequence", "cache_heads", "cache_kv")
        >>> maxtext().to_partition_spec(names)
        P(None, None, ('autoregressive', 'tensor', 'tensor_sequence'), None)
    """
    resource = importlib.resources.files(__package__).joinpath("maxtext_rules.json")
    return LogicalAxisRules.from_text(
        resource.read_text(), source=f"{__package__}/maxtext_rules.json", yaml_first=False
    )


def maxtext_mesh_axes() -> tuple[str, ...]:
    """Returns MaxText's mesh axis names in MaxText's order.

    Example:
        >>> maxtext_mesh_axes()[:3]
        ('diloco', 'data', 'stage')
    """
    return maxtext().mesh_axes or ()


@functools.cache
def fsdp_tp() -> LogicalAxisRules:
    """Returns the small ``fsdp-tp`` preset over mesh axes ``(data, fsdp, tensor)``.

    Example:
        >>> fsdp_tp().to_partition_spec(("embed", "mlp"))
        P('fsdp', 'tensor')
    """
    return LogicalAxisRules(_FSDP_TP_RULES, mesh_axes=FSDP_TP_MESH_AXES)


_PRESETS = {"maxtext": maxtext, "fsdp-tp": fsdp_tp}
PRESET_NAMES: tuple[str, ...] = tuple(_PRESETS)


def get_preset(name: str) -> LogicalAxisRules:
    """Returns the rules preset of this name.

    Args:
        name: one of :data:`PRESET_NAMES` (``"maxtext"``, ``"fsdp-tp"``).

    Returns:
        The preset's rules, with their mesh axes declared.

    Raises:
        ShardingError: the name is unknown; the message lists the known presets.

    Example:
        >>> get_preset("maxtext").to_partition_spec(("layers",))
        P('stage',)
    """
    try:
        factory = _PRESETS[name]
    except KeyError:
        raise ShardingError(
            f"unknown logical axis rules preset {name!r}; known presets: {', '.join(PRESET_NAMES)}"
        ) from None
    return factory()


def load_rules(name_or_path: str | pathlib.Path) -> LogicalAxisRules:
    """Returns a preset by name (``"maxtext"``, ``"fsdp-tp"``) or reads rules from a file.

    Args:
        name_or_path: a preset name or the path of a JSON/YAML rules file.

    Returns:
        The rules.

    Raises:
        ShardingError: it is neither a known preset nor an existing file.

    Example:
        >>> load_rules("fsdp-tp").to_partition_spec(("embed", "mlp"))
        P('fsdp', 'tensor')
    """
    if isinstance(name_or_path, str) and name_or_path in PRESET_NAMES:
        return get_preset(name_or_path)
    path = pathlib.Path(name_or_path)
    if not path.is_file():
        raise ShardingError(
            f"{str(name_or_path)!r} is neither a rules preset ({', '.join(PRESET_NAMES)}) "
            "nor an existing rules file"
        )
    return LogicalAxisRules.from_file(path)
