"""Build a device mesh from a short text such as ``"data=2,tensor=4"``."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax

from ..errors import ShardingError

_AXIS = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(-?\d+)\s*$")


def parse_mesh_spec(spec: str | Mapping[str, int]) -> dict[str, int]:
    """Parses ``"name=size,name=size"`` (or checks a dict) into an ordered axis -> size dict.

    One size may be ``-1``: it is left for :func:`make_mesh` to infer from the device count.

    Args:
        spec: the text, or a mapping from axis name to size.

    Returns:
        Axis sizes in the given order.

    Raises:
        ShardingError: the text is malformed, a name repeats, a size is not a positive
            integer, or more than one size is ``-1``.

    Example:
        >>> parse_mesh_spec("data=2, tensor=4")
        {'data': 2, 'tensor': 4}
    """
    if isinstance(spec, Mapping):
        items = list(spec.items())
        shown = ",".join(f"{k}={v}" for k, v in items)
    elif isinstance(spec, str):
        shown = spec
        if not spec.strip():
            raise ShardingError("empty mesh spec; expected e.g. 'data=2,tensor=4'")
        items = []
        for part in spec.split(","):
            match = _AXIS.match(part)
            if match is None:
                raise ShardingError(
                    f"malformed mesh spec {spec!r}: {part.strip()!r} is not NAME=SIZE "
                    "(expected e.g. 'data=2,tensor=4')"
                )
            items.append((match.group(1), int(match.group(2))))
    else:
        raise ShardingError(f"a mesh spec is a 'name=size,...' text or a dict, got {spec!r}")
    axes: dict[str, int] = {}
    for name, size in items:
        if not isinstance(name, str) or not name:
            raise ShardingError(f"mesh spec {shown!r}: axis names must be non-empty strings")
        if name in axes:
            raise ShardingError(f"mesh spec {shown!r}: axis {name!r} occurs twice")
        if isinstance(size, bool) or not isinstance(size, int) or (size < 1 and size != -1):
            raise ShardingError(
                f"mesh spec {shown!r}: axis {name!r} has size {size!r}; sizes are positive "
                "integers (or -1 for one axis to take the remaining devices)"
            )
        axes[name] = size
    if list(axes.values()).count(-1) > 1:
        raise ShardingError(f"mesh spec {shown!r}: at most one axis may have size -1")
    return axes


def make_mesh(
    spec: str | Mapping[str, int],
    devices: Sequence[Any] | None = None,
    *,
    axis_types: Sequence[jax.sharding.AxisType] | None = None,
) -> jax.sharding.Mesh:
    """Builds a ``jax.sharding.Mesh`` over the available (or the given) devices.

    Args:
        spec: axis sizes as ``"data=2,tensor=4"`` or ``{"data": 2, "tensor": 4}``; one size
            may be ``-1`` to take the remaining devices.
        devices: the devices to lay out; defaults to ``jax.devices()``.
        axis_types: one ``jax.sharding.AxisType`` per axis; defaults to ``Auto`` for every axis
            (the classic GSPMD behaviour; ``jax.make_mesh`` itself defaults to ``Explicit``).

    Returns:
        The mesh, its devices laid out by ``jax.make_mesh`` for the hardware topology.

    Raises:
        ShardingError: the spec is malformed, or its sizes' product is not the device count.

    Example:
        >>> mesh = make_mesh("data=1,tensor=-1", devices=jax.devices()[:1])
        >>> dict(mesh.shape)
        {'data': 1, 'tensor': 1}
    """
    axes = parse_mesh_spec(spec)
    devs = list(jax.devices() if devices is None else devices)
    shown = ",".join(f"{k}={v}" for k, v in axes.items())
    known = math.prod(v for v in axes.values() if v != -1)
    if -1 in axes.values():
        if len(devs) % known:
            raise ShardingError(
                f"mesh {shown} cannot be filled: {len(devs)} devices are not divisible by {known}"
            )
        axes = {k: (len(devs) // known if v == -1 else v) for k, v in axes.items()}
    total = math.prod(axes.values())
    if total != len(devs):
        raise ShardingError(f"mesh {shown} needs {total} devices, but {len(devs)} are available")
    if axis_types is None:
        axis_types = (jax.sharding.AxisType.Auto,) * len(axes)
    elif len(axis_types) != len(axes):
        raise ShardingError(f"mesh {shown} has {len(axes)} axes but {len(axis_types)} axis types")
    return jax.make_mesh(
        tuple(axes.values()), tuple(axes), axis_types=tuple(axis_types), devices=devs
    )
