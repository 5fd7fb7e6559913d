"""Choosing a checkpoint's format from what is on disk: a small registry, no if-chains.

Every format registers a :class:`SourceFormat`: a cheap ``detect`` (file names and magic
bytes only, never raising) and an ``open``. :func:`open_source` asks each one; exactly one
must claim the location. When none does, the Orbax format opens it anyway, because its
messages say best what is wrong with a folder (missing, a temporary folder of an interrupted
write, a step folder without an item, ...).
"""

from __future__ import annotations

import os
from typing import Protocol

from ...errors import CheckpointFormatError
from ..location import Location
from .base import CheckpointSource


class SourceFormat(Protocol):
    """One readable checkpoint format.

    Attributes:
        name: the registry name (``"orbax"``, ``"msgpack"``).
        description: what it reads, for messages.
    """

    name: str
    description: str

    def detect(self, location: Location) -> bool:
        """Whether ``location`` holds a checkpoint of this format (cheap; never raises)."""
        ...

    def open(self, location: Location) -> CheckpointSource:
        """Opens the checkpoint lazily (metadata only)."""
        ...


_FORMATS: dict[str, SourceFormat] = {}
_FALLBACK = "orbax"


def register_format(fmt: SourceFormat) -> SourceFormat:
    """Adds a format to the registry (a later one of the same name replaces it)."""
    _FORMATS[fmt.name] = fmt
    return fmt


def format_names() -> list[str]:
    """The registered format names."""
    _load_builtin()
    return sorted(_FORMATS)


def open_source(location: str | os.PathLike[str] | Location) -> CheckpointSource:
    """Opens the checkpoint at ``location`` in whichever format it is.

    Example:
        >>> src = open_source("checkpoints/checkpoint_1000")  # a Flax msgpack file
        >>> src.format_name
        'msgpack'

    Args:
        location: a path, URL or :class:`~ckptconv.io.Location`: an Orbax item, step folder
            or CheckpointManager root; a Flax msgpack file or a folder of them; a Hugging Face
            ``flax_model.msgpack`` (single or sharded with its index).

    Returns:
        The opened source.

    Raises:
        CheckpointFormatError: nothing readable is there, or two formats are (naming both).
    """
    _load_builtin()
    loc = Location.parse(location)
    found = [f for f in _FORMATS.values() if f.detect(loc)]
    if len(found) > 1:
        names = " and ".join(f"{f.name} ({f.description})" for f in found)
        raise CheckpointFormatError(
            f"{loc}: expected one checkpoint format, found {names}; pass the file or folder "
            "of the one to read"
        )
    return (found[0] if found else _FORMATS[_FALLBACK]).open(loc)


def _load_builtin() -> None:
    if _FORMATS:
        return
    from . import msgpack, orbax

    register_format(orbax.FORMAT)
    register_format(msgpack.FORMAT)
