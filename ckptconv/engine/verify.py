"""Verify a conversion by decoding: the Linen model on the Linen checkpoint against the engine.

The reference side reads the Linen checkpoint's params as stored (only the layout parse picks
which leaves are params; none of the conversion's rules run) and decodes greedily with full
forward passes of the Linen ``Transformer``: every step reruns the whole sequence, padded to
one fixed length so that it compiles once (causal attention makes the padding invisible). The
other side restores the NNX checkpoint into the :class:`~ckptconv.engine.Engine` and decodes
greedily with its KV cache. Step ``i`` compares the logits of the ``i``-th generated token
(row 0: the last prompt position) and the tokens picked.

The two sides compute the same math in a different order (KV cache versus full sequence), so
float32 logits agree to about 1e-6 rather than bit for bit; hence the tolerance.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh

from ..errors import LayoutError, PlanError
from ..models import ModelConfig, linen
from .decode import check_request, decode
from .engine import Engine
from .params import check_linen_params, linen_shapes

DEFAULT_ATOL = 1e-4


@dataclasses.dataclass(frozen=True)
class VerifyResult:
    """The two decodes side by side.

    Attributes:
        prompt_ids: The prompt.
        linen_ids: Tokens the Linen model picked (full forward passes, greedy).
        engine_ids: Tokens the engine picked from the NNX checkpoint (greedy).
        max_abs_diff: Per step, the largest ``|linen logit - engine logit|``.
        atol: The tolerance on ``max_abs_diff``.
    """

    prompt_ids: list[int]
    linen_ids: list[int]
    engine_ids: list[int]
    max_abs_diff: list[float]
    atol: float

    @property
    def tokens_agree(self) -> bool:
        """Whether both sides picked the same tokens at every step."""
        return self.linen_ids == self.engine_ids

    @property
    def ok(self) -> bool:
        """Tokens agree and every step's logits are within ``atol``."""
        # np.max propagates NaN, and NaN <= atol is False.
        return self.tokens_agree and bool(np.max(self.max_abs_diff) <= self.atol)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary."""
        out = dataclasses.asdict(self)
        out.update(
            tokens_agree=self.tokens_agree,
            ok=self.ok,
            worst_abs_diff=float(np.max(self.max_abs_diff)),
            steps_agreeing=sum(
                a == b for a, b in zip(self.linen_ids, self.engine_ids, strict=True)
            ),
        )
        return out


def read_linen_params(path: str | os.PathLike, config: ModelConfig) -> dict[str, Any]:
    """Reads the params of a Linen checkpoint as stored, checked against ``config``.

    Args:
        path: A MaxText or Flax ``TrainState`` checkpoint.
        config: The model config; the params must match the Linen model's tree.

    Returns:
        The Linen ``params`` tree (numpy arrays).

    Raises:
        CheckpointFormatError: The checkpoint cannot be read.
        PlanError: It is an NNX checkpoint, or its params differ from the model's (naming the
            path).
    """
    from ..convert.expr import evaluate
    from ..convert.plan import parse_source
    from ..io import CheckpointReader

    reader = CheckpointReader(path)
    where = str(reader.location)
    tree = parse_source(reader.leaves(), reader.custom_metadata, None, where)
    if tree.info.get("source_layout") == "nnx":
        raise PlanError(f"{where}: is an NNX checkpoint; the reference side needs a Linen one")
    exprs = tree.params()
    try:
        check_linen_params(linen_shapes(config), exprs, where)
    except LayoutError as e:
        raise PlanError(str(e)) from e
    return traverse_util.unflatten_dict({p: evaluate(e, reader.read) for p, e in exprs.items()})


def linen_greedy(
    config: ModelConfig, params: Any, prompt_ids: Sequence[int], max_new_tokens: int
) -> tuple[list[int], np.ndarray]:
    """Greedy decoding with full forward passes of the Linen model.

    Returns:
        ``(tokens, logits [max_new_tokens, vocab])``, row 0 at the last prompt position.
    """
    model = linen.Transformer(config)
    n = len(prompt_ids)
    total = n + max_new_tokens - 1
    # Params are jit arguments, as in the engine, so XLA does not constant-fold them.
    forward = jax.jit(lambda p, t, pos: model.apply({"params": p}, t, pos))
    sequence = np.zeros((1, total), np.int32)
    sequence[0, :n] = prompt_ids
    positions = np.arange(total, dtype=np.int32)[None]
    tokens, rows = [], []
    for step in range(max_new_tokens):
        row = np.asarray(forward(params, sequence, positions))[0, n - 1 + step]
        token = int(np.argmax(row))
        tokens.append(token)
        rows.append(row)
        if step + 1 < max_new_tokens:
            sequence[0, n + step] = token
    return tokens, np.stack(rows).astype(np.float32)


def default_prompt(config: ModelConfig) -> list[int]:
    """A fixed prompt of up to 8 tokens that fits any vocabulary and prefill length."""
    return [
        (7 * i + 3) % config.vocab_size for i in range(min(8, config.max_prefill_predict_length))
    ]


def verify(
    linen_ckpt: str | os.PathLike,
    nnx_ckpt: str | os.PathLike,
    config: ModelConfig,
    *,
    prompt_ids: Sequence[int] | None = None,
    max_new_tokens: int = 8,
    atol: float = DEFAULT_ATOL,
    mesh: Mesh | None = None,
) -> VerifyResult:
    """Decodes greedily from both checkpoints and compares logits and tokens step by step.

    Args:
        linen_ckpt: The Linen source checkpoint.
        nnx_ckpt: The NNX checkpoint converted from it.
        config: The model config.
        prompt_ids: The prompt (default: :func:`default_prompt`).
        max_new_tokens: Steps to compare.
        atol: Tolerance on the per-step max absolute logit difference.
        mesh: The engine's mesh (default: one device).

    Returns:
        The comparison; ``result.ok`` is the verdict.

    Raises:
        CkptconvError: A bad prompt, an unreadable or mismatched checkpoint, or an
            ``nnx_ckpt`` that is not an NNX checkpoint.

    Example:
        >>> verify("maxtext_ckpt", "nnx_ckpt", config).ok  # doctest: +SKIP
        True
    """
    from ..convert import detect_layout
    from ..io import CheckpointReader

    prompt = list(default_prompt(config) if prompt_ids is None else prompt_ids)
    engine = Engine(config, mesh=mesh, max_concurrent_decodes=1)
    check_request(engine, prompt, max_new_tokens)
    reader = CheckpointReader(nnx_ckpt)
    if detect_layout(reader.leaves(), str(reader.location)).name != "nnx":
        raise PlanError(f"{reader.location}: is not an NNX checkpoint (verify LINEN_CKPT NNX_CKPT)")
    linen_params = read_linen_params(linen_ckpt, config)
    params = engine.load_params(nnx_ckpt)
    linen_ids, linen_logits = linen_greedy(config, linen_params, prompt, max_new_tokens)
    ours = decode(engine, params, prompt, max_new_tokens=max_new_tokens)
    diffs = np.max(np.abs(linen_logits - ours.logits), axis=-1)
    return VerifyResult(
        prompt_ids=prompt,
        linen_ids=linen_ids,
        engine_ids=ours.generated_ids,
        max_abs_diff=[float(d) for d in diffs],
        atol=float(atol),
    )
