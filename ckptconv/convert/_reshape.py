"""Slabs through a C-order reshape: which input box an output slab needs.

A C-order reshape splits both shapes into *groups*: runs of axes whose sizes have the same
product, so the array is the outer product of its groups and each group is reshaped on its
own (``[D, H*K] -> [D, H, K]`` has the groups ``[D] -> [D]`` and ``[H*K] -> [H, K]``). An
output slab that restricts only the first axis of a group, taking its other axes whole, is a
contiguous flat range of that group, which lies in a range of the group's first *input* axis
(taking the group's other input axes whole). So a slab of a reshape reads one input box,
slightly larger than needed when the ranges do not align, and never the whole array.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

Group = tuple[tuple[int, ...], tuple[int, ...]]


def reshape_groups(src: Sequence[int], dst: Sequence[int]) -> list[Group]:
    """Returns the groups of a reshape ``src -> dst``: ``(input axes, output axes)`` runs.

    Size-1 axes form groups of their own, with an empty counterpart when the other shape
    has no size-1 axis there.

    Example:
        >>> reshape_groups((4, 6), (4, 2, 3))
        [((0,), (0,)), ((1,), (1, 2))]
    """
    groups: list[Group] = []
    i = j = 0
    while i < len(src) or j < len(dst):
        one_i = i < len(src) and src[i] == 1
        one_j = j < len(dst) and dst[j] == 1
        if one_i or one_j:
            groups.append(((i,) if one_i else (), (j,) if one_j else ()))
            i, j = i + one_i, j + one_j
            continue
        gi, gj, pi, pj = [i], [j], src[i], dst[j]
        i, j = i + 1, j + 1
        while pi != pj:
            if pi < pj:
                gi.append(i)
                pi *= src[i]
                i += 1
            else:
                gj.append(j)
                pj *= dst[j]
                j += 1
        groups.append((tuple(gi), tuple(gj)))
    return groups


def reshape_box(src: Sequence[int], dst: Sequence[int], box: Sequence[int]) -> tuple[int, ...]:
    """Maps an input chunk box to an output box whose slabs read few, whole input boxes.

    In each group the first output axis gets the rows one input box holds (when the box
    takes the group's other input axes whole), the group's other output axes are whole.
    """
    out = list(dst)
    for ins, outs in reshape_groups(src, dst):
        if not outs:
            continue
        rest_in = math.prod(src[a] for a in ins[1:])
        rest_out = math.prod(dst[a] for a in outs[1:])
        whole_rest = all(box[a] >= src[a] for a in ins[1:])
        rows = box[ins[0]] * rest_in // rest_out if ins and whole_rest else 1
        out[outs[0]] = max(1, min(dst[outs[0]], rows))
    return tuple(out)


def evaluate_reshape(
    src: Sequence[int],
    dst: Sequence[int],
    index: tuple[slice, ...],
    read: Callable[[tuple[slice, ...]], np.ndarray],
) -> np.ndarray:
    """Computes the slab ``index`` of ``x.reshape(dst)`` from one box of ``x`` (shape ``src``).

    Args:
        src: the input shape.
        dst: the output shape (same number of elements).
        index: the output slab: one in-bounds slice with step 1 per output axis.
        read: reads the input box given as one slice per input axis.

    Returns:
        The slab, of the slab's shape.
    """
    groups = reshape_groups(src, dst)
    in_index: list[slice] = [slice(0, d) for d in src]
    flat_cuts, widened, final = [], [], []
    for ins, outs in groups:
        rest_out = math.prod(dst[a] for a in outs[1:])
        rest_in = math.prod(src[a] for a in ins[1:])
        lead = index[outs[0]] if outs else slice(0, 1)
        lo, hi = lead.start * rest_out, lead.stop * rest_out
        first = lo // rest_in if ins else 0
        if ins:
            in_index[ins[0]] = slice(first, -(-hi // rest_in))
        flat_cuts.append(slice(lo - first * rest_in, hi - first * rest_in))
        if outs:
            widened += [lead.stop - lead.start, *(dst[a] for a in outs[1:])]
            final += [slice(0, lead.stop - lead.start), *(index[a] for a in outs[1:])]
    box = np.asarray(read(tuple(in_index)))
    flat = box.reshape(_group_sizes(box.shape, groups))
    return flat[tuple(flat_cuts)].reshape(widened)[tuple(final)]


def _group_sizes(shape: Sequence[int], groups: list[Group]) -> list[int]:
    """The flat size of each group of an input box of ``shape``."""
    return [math.prod(shape[a] for a in ins) for ins, _ in groups]
