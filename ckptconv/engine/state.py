"""The engine's data: prefill results, the decode state and sampled tokens (JetStream's shapes).

All three are pytrees (``flax.struct.dataclass``), so they pass through ``jax.jit`` and can be
donated. :class:`ResultTokens` is laid out as JetStream's: one ``[slots, 3]`` int32 array whose
columns are the token, its validity and the slot's generated length, so a single device-to-host
copy fetches a whole step.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import struct


@struct.dataclass
class SlotData:
    """One slot's part of a :class:`ResultTokens`.

    Attributes:
        tokens: ``[samples, 1]`` token ids.
        valid: ``[samples, 1]`` 1 where the token is real, 0 for a free or exhausted slot.
        lengths: ``[samples]`` tokens generated in this slot so far, this one included.
    """

    tokens: jax.Array | np.ndarray
    valid: jax.Array | np.ndarray
    lengths: jax.Array | np.ndarray


@struct.dataclass
class ResultTokens:
    """Tokens produced by one ``prefill`` or ``generate`` call, as JetStream returns them.

    Attributes:
        data: ``[rows, 3]`` int32: columns ``tokens_idx``, ``valid_idx``, ``length_idx``.
        tokens_idx: Column range of the tokens.
        valid_idx: Column range of the validity flags.
        length_idx: Column range of the generated lengths.
        samples_per_slot: Rows per slot (always 1 here).

    Example:
        >>> r = ResultTokens(np.array([[7, 1, 1], [3, 0, 0]], np.int32))
        >>> r.get_result_at_slot(0).tokens.tolist()
        [[7]]
    """

    data: jax.Array | np.ndarray
    tokens_idx: tuple[int, int] = struct.field(pytree_node=False, default=(0, 1))
    valid_idx: tuple[int, int] = struct.field(pytree_node=False, default=(1, 2))
    length_idx: tuple[int, int] = struct.field(pytree_node=False, default=(2, 3))
    samples_per_slot: int = struct.field(pytree_node=False, default=1)

    def copy_to_host_async(self) -> None:
        """Starts copying ``data`` to the host (no-op for a numpy array)."""
        if isinstance(self.data, jax.Array):
            self.data.copy_to_host_async()

    def convert_to_numpy(self) -> ResultTokens:
        """The same result with ``data`` as a numpy array."""
        return self.replace(data=np.asarray(self.data))

    def get_result_at_slot(self, slot: int) -> SlotData:
        """The tokens, validity and lengths of one slot.

        Args:
            slot: In ``[0, max_concurrent_decodes)`` (0 for a prefill result).

        Returns:
            The slot's rows; ``lengths`` is one-dimensional.
        """
        start, end = slot * self.samples_per_slot, (slot + 1) * self.samples_per_slot
        rows = self.data[start:end]
        return SlotData(
            tokens=rows[:, self.tokens_idx[0] : self.tokens_idx[1]],
            valid=rows[:, self.valid_idx[0] : self.valid_idx[1]],
            lengths=rows[:, self.length_idx[0] : self.length_idx[1]][:, 0],
        )


@struct.dataclass
class Prefix:
    """What ``prefill`` hands to ``insert``: one prompt's KV cache and its first token.

    Attributes:
        cache: The batch-1 prefill-mode cache variables (an ``nnx.State``, or the Linen cache
            dict for a Linen engine), without the AR keys and values (see ``Engine.insert``).
        token: ``[1]`` int32, the token sampled from the last prompt position.
        true_length: ``[]`` int32, the prompt's length without padding.
        logits: ``[1, vocab]`` float32 logits at the last prompt position.
    """

    cache: Any
    token: jax.Array
    true_length: jax.Array
    logits: jax.Array


@struct.dataclass
class DecodeState:
    """Everything ``generate`` transforms, for all slots at once.

    Attributes:
        cache: The autoregressive KV cache (an ``nnx.State`` with ``max_concurrent_decodes``
            rows along each variable's ``cache_batch`` axis).
        tokens: ``[slots]`` int32, the token each slot feeds next (the last one sampled).
        positions: ``[slots]`` int32, that token's position: prompt length plus the generate
            steps this slot has taken.
        generated: ``[slots]`` int32, tokens generated in this slot (the prefill's included).
        active: ``[slots]`` bool, whether the slot holds a request.
        logits: ``[slots, vocab]`` float32 logits of each slot's last step (the prefill's
            right after ``insert``).
    """

    cache: Any
    tokens: jax.Array
    positions: jax.Array
    generated: jax.Array
    active: jax.Array
    logits: jax.Array
