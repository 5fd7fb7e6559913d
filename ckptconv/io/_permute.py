"""Axis permutations expressed in zarr metadata, so that stored chunk bytes can stay as they are.

An output array ``np.transpose(source, perm)`` can reuse the source's encoded chunks verbatim
when only its metadata changes:

- zarr3: a ``transpose`` codec ``{"name": "transpose", "configuration": {"order": P}}`` in
  front of the codec chain, with the shape and the (outer) chunk grid permuted. A source that
  already starts with a ``transpose`` codec gets the composed order (no nested codecs); an
  order that composes to the identity removes the codec, giving back the original metadata.
  Codecs after it (``sharding_indexed`` with its inner chunk shape, ``bytes``, ``zstd``) see
  the stored array and are kept unchanged.
- zarr2 has no transpose codec, only the chunk memory ``order`` (``"C"`` or ``"F"``, i.e. the
  identity or the reversal of the axes): a permutation is expressible only when it turns the
  stored order into one of those two (for instance swapping the axes of a 2-d array).

In both formats a multi-chunk array's chunk keys are renamed: the chunk at grid index ``g`` of
the source becomes the chunk at ``g`` permuted by ``perm``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

Perm = tuple[int, ...]


def identity(ndim: int) -> Perm:
    """Returns the identity permutation of ``ndim`` axes."""
    return tuple(range(ndim))


def is_identity(perm: Sequence[int]) -> bool:
    """Whether ``perm`` leaves every axis in place."""
    return all(i == p for i, p in enumerate(perm))


def inverse(perm: Sequence[int]) -> Perm:
    """Returns the permutation that undoes ``perm``."""
    out = [0] * len(perm)
    for i, p in enumerate(perm):
        out[p] = i
    return tuple(out)


def compose(first: Sequence[int], then: Sequence[int]) -> Perm:
    """Returns ``P`` with ``transpose(transpose(x, first), then) == transpose(x, P)``."""
    return tuple(first[i] for i in then)


def permute(values: Sequence[Any], perm: Sequence[int]) -> list[Any]:
    """Returns ``values`` reordered as the axes of ``np.transpose(x, perm)``."""
    return [values[p] for p in perm]


def check_perm(perm: Sequence[int], ndim: int) -> Perm:
    """Returns ``perm`` as a tuple after checking that it permutes ``ndim`` axes.

    Raises:
        ValueError: it is not a permutation of ``range(ndim)``.
    """
    perm = tuple(int(p) for p in perm)
    if sorted(perm) != list(range(ndim)):
        raise ValueError(f"expected a permutation of {ndim} axes, found {list(perm)}")
    return perm


def _zarr3_transpose_order(codec: dict[str, Any], ndim: int) -> Perm:
    order = codec.get("configuration", {}).get("order")
    # Early drafts of the zarr v3 spec spelled the two memory orders as letters.
    if order == "C":
        return identity(ndim)
    if order == "F":
        return tuple(reversed(range(ndim)))
    return check_perm(order, ndim)


def permuted_metadata(doc: dict[str, Any], perm: Sequence[int], *, zarr3: bool) -> dict | None:
    """Returns the zarr metadata of ``np.transpose(array, perm)`` over the same stored chunks.

    Args:
        doc: the source's parsed ``zarr.json`` (zarr3) or ``.zarray`` (zarr2).
        perm: the axis permutation, as for ``np.transpose``.
        zarr3: whether ``doc`` is zarr v3 metadata.

    Returns:
        The new metadata document, or ``None`` when the format cannot express ``perm`` over
        the stored bytes (zarr2, unless the result is C or F order).

    Raises:
        ValueError: ``perm`` does not fit the array's rank, or the document is malformed.
    """
    shape = list(doc["shape"])
    perm = check_perm(perm, len(shape))
    out = copy.deepcopy(doc)
    if is_identity(perm):
        return out
    # The stored bytes hold transpose(logical, stored) in C order; the new logical array is
    # transpose(old logical, perm), so the new stored order is inverse(perm)[stored].
    inv = inverse(perm)
    out["shape"] = permute(shape, perm)
    if zarr3:
        codecs = list(out["codecs"])
        stored = identity(len(shape))
        if codecs and codecs[0].get("name") == "transpose":
            stored = _zarr3_transpose_order(codecs[0], len(shape))
            codecs = codecs[1:]
        order = tuple(inv[i] for i in stored)
        if not is_identity(order):
            codecs = [{"name": "transpose", "configuration": {"order": list(order)}}, *codecs]
        out["codecs"] = codecs
        grid = out["chunk_grid"]["configuration"]
        grid["chunk_shape"] = permute(list(grid["chunk_shape"]), perm)
        if out.get("dimension_names") is not None:
            out["dimension_names"] = permute(list(out["dimension_names"]), perm)
        return out
    ndim = len(shape)
    stored = identity(ndim) if doc.get("order", "C") == "C" else tuple(reversed(range(ndim)))
    order = tuple(inv[i] for i in stored)
    if is_identity(order):
        out["order"] = "C"
    elif order == tuple(reversed(range(ndim))):
        out["order"] = "F"
    else:
        return None
    out["chunks"] = permute(list(doc["chunks"]), perm)
    return out


class ChunkKeys:
    """Parses and formats an array's chunk keys (relative to the array's key prefix).

    zarr3 ``default`` encoding: ``c/0/1`` (``c`` for a scalar); zarr3 ``v2`` encoding and
    zarr2: ``0.1`` (``0`` for a scalar); the separator is taken from the metadata.

    Args:
        doc: the array's zarr metadata.
        zarr3: whether ``doc`` is zarr v3 metadata.
    """

    def __init__(self, doc: dict[str, Any], *, zarr3: bool) -> None:
        self.ndim = len(doc["shape"])
        if zarr3:
            encoding = doc.get("chunk_key_encoding") or {"name": "default"}
            default = encoding.get("name", "default") == "default"
            config = encoding.get("configuration") or {}
            self._sep = config.get("separator", "/" if default else ".")
            self._prefix = "c" if default else ""
        else:
            self._sep = doc.get("dimension_separator") or "."
            self._prefix = ""

    def parse(self, key: str) -> tuple[int, ...] | None:
        """Returns the grid index of a chunk key, or ``None`` for a key that is not one."""
        if self.ndim == 0:
            return () if key == (self._prefix or "0") else None
        body = key
        if self._prefix:
            if not key.startswith(self._prefix + self._sep):
                return None
            body = key[len(self._prefix) + len(self._sep) :]
        parts = body.split(self._sep)
        if len(parts) != self.ndim or not all(p.isdigit() for p in parts):
            return None
        return tuple(int(p) for p in parts)

    def grid_index(self, key: str, grid: Sequence[int]) -> tuple[int, ...] | None:
        """Returns the index of a chunk key on ``grid``, or ``None`` for a key that is none."""
        index = self.parse(key)
        if index is None or any(i >= g for i, g in zip(index, grid, strict=True)):
            return None
        return index

    def format(self, index: Sequence[int]) -> str:
        """Returns the chunk key of a grid index."""
        if not index:
            return self._prefix or "0"
        body = self._sep.join(str(i) for i in index)
        return f"{self._prefix}{self._sep}{body}" if self._prefix else body
