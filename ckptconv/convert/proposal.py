"""``ckptconv map``: a mapping file proposed from a checkpoint and a target NNX model.

The source side is the checkpoint's model tree as the mapping rules see it (the layout's
wrapper levels stripped: a bare params tree as stored, a TrainState's ``params``); the target
side is the NNX model's state as its checkpoint stores it (``model/`` and ``value`` off).
Matching itself is :func:`~ckptconv.convert.propose.propose`.
"""

from __future__ import annotations

import os
from typing import Any

from ..io.sources import open_source
from .plan import abstract_tree_leaves, parse_linen_source
from .propose import Proposal, propose

Leaves = dict[str, tuple[tuple[int, ...], str]]


def source_leaves(src: str | os.PathLike, layout: str | None = None) -> tuple[Leaves, str]:
    """Returns the model leaves of a Linen checkpoint by '/'-joined path, and its layout.

    Raises:
        CkptconvError: the checkpoint cannot be read or fits no Linen layout.
    """
    source = open_source(src)
    tree = parse_linen_source(source.leaves(), source.custom_metadata, layout, str(source.location))
    leaves = {"/".join(p): (tuple(e.shape), e.dtype) for p, (_, e) in tree.model.items()}
    return leaves, tree.info["source_layout"]


def target_leaves(model: Any) -> Leaves:
    """Returns an NNX model's (or adapter's, or state's) leaves by '/'-joined model path."""
    if callable(getattr(model, "nnx_model", None)):
        model = model.nnx_model()
    return {"/".join(p[1:-1]): v for p, v in abstract_tree_leaves(model).items()}


def propose_for(src: str | os.PathLike, model: Any, *, layout: str | None = None) -> Proposal:
    """Proposes the mapping of checkpoint ``src`` onto NNX ``model``.

    Example:
        >>> p = propose_for("linen_ckpt", abstract_port)  # doctest: +SKIP
        >>> print(p.table()); open("port.yaml", "w").write(p.to_yaml())  # doctest: +SKIP

    Args:
        src: a Linen checkpoint.
        model: an NNX model (concrete or abstract), its state, or a model adapter.
        layout: the source's layout; None detects it.

    Returns:
        The proposal: rules, matches, ambiguities and what is left unmatched.
    """
    leaves, found = source_leaves(src, layout)
    return propose(leaves, target_leaves(model), layout=found)
