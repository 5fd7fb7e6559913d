"""Verify a conversion by decoding, as two separate questions with their own tolerances.

1. **Weights check**: does the NNX checkpoint hold the Linen weights? The adapter's Linen
   forward (the reference Linen ``Transformer`` by default) decodes greedily on the Linen
   params as stored (only the layout parse picks which leaves are params; none of the
   conversion's rules run), with full forward passes: every step reruns the whole sequence,
   padded to one fixed length so that it compiles once (causal attention makes the padding
   invisible). Then one more Linen full forward pass and one NNX full forward pass (the
   adapter's NNX model holding the params restored from the NNX checkpoint) run on the same
   final sequence, the prompt plus the Linen side's greedy tokens (teacher forcing: one step's
   disagreement does not cascade into the next), and the logits of the generated
   positions are compared.

   Both twins run :mod:`ckptconv.models.math` in the same order, so on the same weights their
   logits are bit-identical, measured in float32 and in bfloat16 activations, scanned and
   unscanned. The tolerance :func:`weights_atol` only admits float32 reassociation noise, should
   a backend compile the two programs differently: :data:`WEIGHTS_ULPS` float32 ulps of the
   logit scale. With bfloat16 activations the logits are bfloat16 values, so a difference is at
   least one bfloat16 ulp of the logit: the check is then exact for every logit larger than
   1/8192 of the logit scale. It cannot be looser: one row of one
   kernel scaled by 1.01 moves bfloat16 logits by about one bfloat16 ulp of the logit scale
   (measured: 0.02 at scale 3), as much as the cached decode's own rounding moves them.

2. **Decode check**: does the engine's KV-cached greedy decode agree with the full forward pass?
   The :class:`~ckptconv.engine.Engine` decodes greedily from the NNX checkpoint; the NNX full
   forward runs on the prompt plus the engine's own tokens (teacher forcing again) and its rows
   are the reference. The two compute the same math in a different order (two attention chunks
   against one, other fusions), so they round differently, by an amount set by the activation
   dtype: :func:`decode_atol` allows :data:`DECODE_EPS` machine epsilons of the activation dtype
   times the logit scale (float32: 1.2e-7, bfloat16: 7.8e-3, float16: 9.8e-4). Measured on
   random tiny models of 2 to 24 layers and on fixtures A and B, the worst step stayed below 9
   epsilons (times the logit scale) in float32 and at most 3.1 in bfloat16. Engine bugs (a
   wrong position, a stale cache row) move logits by a sizeable part of the logit scale. A step
   whose token differs from the full forward's argmax fails unless it is a near tie: the full
   forward's logit of the engine's token is within the tolerance of its largest logit (seen in
   bfloat16 on an 8-layer random model). The KL divergence
   ``KL(softmax(full) || softmax(engine))`` per step is reported too (as MaxText's
   ``forward_pass_logit_checker`` does), but the verdict does not use it.

The logit scale is ``max(1, max |logit|)`` over the compared rows of the reference side. The
verdict holds when both checks pass.

The model is a :class:`~ckptconv.models.ModelAdapter` (a ``ModelConfig`` selects the reference
decoder's). The forward passes are small callables (:data:`Forward`), built from the adapter's
``linen_forward`` and ``nnx_forward`` by :func:`linen_forward` and :func:`nnx_forward`, and
injectable into :func:`verify`. An adapter that supports no engine cache protocol gets the
weights check only (the decode check is then reported as skipped and does not vote).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util
from jax.sharding import Mesh

from ..errors import ConfigError, LayoutError, PlanError
from ..models.adapter import as_adapter, describe, engine_kind
from . import params as P
from .decode import check_request, decode
from .engine import Engine
from .params import check_linen_params

WEIGHTS_ULPS = 4
"""Weights-check tolerance, in float32 ulps (machine epsilons) of the logit scale."""

DECODE_EPS = 32
"""Decode-check tolerance, in machine epsilons of the activation dtype times the logit scale."""

Forward = Callable[[Any, np.ndarray, np.ndarray], np.ndarray]
"""``forward(weights, tokens [1, T], positions [1, T]) -> float32 logits [1, T, V]``."""


def logit_scale(logits: np.ndarray) -> float:
    """``max(1, max |logits|)``: what the tolerances are relative to (NaN-safe: 1)."""
    top = float(np.max(np.abs(logits))) if np.size(logits) else 0.0
    return top if top > 1.0 else 1.0


def weights_atol(scale: float) -> float:
    """Tolerance of the weights check: :data:`WEIGHTS_ULPS` float32 ulps of ``scale``."""
    return WEIGHTS_ULPS * float(np.finfo(np.float32).eps) * scale


def decode_atol(dtype: Any, scale: float) -> float:
    """Tolerance of the decode check: :data:`DECODE_EPS` epsilons of ``dtype`` times ``scale``.

    Example:
        >>> decode_atol("bfloat16", 2.0)
        0.5
    """
    return DECODE_EPS * float(jnp.finfo(dtype).eps) * scale


def kl_divergence(reference: np.ndarray, other: np.ndarray) -> np.ndarray:
    """Per row, ``KL(softmax(reference) || softmax(other))``, computed in float64."""

    def log_softmax(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float64)
        shifted = x - np.max(x, axis=-1, keepdims=True)
        return shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))

    p, q = log_softmax(reference), log_softmax(other)
    return np.sum(np.exp(p) * (p - q), axis=-1)


@dataclasses.dataclass(frozen=True)
class WeightsCheck:
    """Linen full forward against NNX full forward on the same tokens.

    Attributes:
        max_abs_diff: Per step, the largest ``|linen logit - nnx logit|``.
        logit_scale: ``max(1, max |linen logit|)`` over the compared rows.
        atol: The tolerance (:func:`weights_atol`).
    """

    max_abs_diff: list[float]
    logit_scale: float
    atol: float

    @property
    def ok(self) -> bool:
        """Every step's logits are within ``atol``."""
        # np.max propagates NaN, and NaN <= atol is False.
        return bool(np.max(self.max_abs_diff) <= self.atol)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary."""
        out = dataclasses.asdict(self)
        out.update(ok=self.ok, worst_abs_diff=float(np.max(self.max_abs_diff)))
        out["rule"] = f"{WEIGHTS_ULPS} float32 eps x logit_scale"
        return out


@dataclasses.dataclass(frozen=True)
class DecodeCheck:
    """The engine's cached decode against the NNX full forward on the engine's tokens.

    Attributes:
        reference_ids: Per step, the full forward's argmax.
        max_abs_diff: Per step, the largest ``|full logit - engine logit|``.
        kl_divergence: Per step, ``KL(softmax(full) || softmax(engine))``.
        logit_scale: ``max(1, max |full logit|)`` over the compared rows.
        atol: The tolerance.
        atol_rule: How ``atol`` was chosen (the dtype rule, or ``"--atol"``).
        ties: Steps whose engine token differs from ``reference_ids`` by a near tie (the full
            forward's logit of the engine's token is within ``atol`` of its largest).
        engine_ids: The engine's tokens.
    """

    reference_ids: list[int]
    max_abs_diff: list[float]
    kl_divergence: list[float]
    logit_scale: float
    atol: float
    atol_rule: str
    ties: list[int]
    engine_ids: list[int] = dataclasses.field(repr=False)

    @property
    def tokens_agree(self) -> bool:
        """The engine picked the full forward's argmax at every step."""
        return self.engine_ids == self.reference_ids

    @property
    def ok(self) -> bool:
        """Logits within ``atol`` at every step, and tokens agree up to near ties."""
        mismatched = [i for i, (a, b) in enumerate(self._pairs()) if a != b]
        return bool(np.max(self.max_abs_diff) <= self.atol) and mismatched == self.ties

    def _pairs(self) -> list[tuple[int, int]]:
        return list(zip(self.engine_ids, self.reference_ids, strict=True))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary."""
        out = dataclasses.asdict(self)
        del out["engine_ids"]
        out.update(
            ok=self.ok,
            tokens_agree=self.tokens_agree,
            worst_abs_diff=float(np.max(self.max_abs_diff)),
            max_kl_divergence=float(np.max(self.kl_divergence)),
        )
        return out


@dataclasses.dataclass(frozen=True)
class VerifyResult:
    """Both checks of a conversion.

    Attributes:
        prompt_ids: The prompt.
        linen_ids: Tokens the Linen model picked (full forward passes, greedy).
        engine_ids: Tokens the engine picked from the NNX checkpoint (greedy, KV cache);
            empty when the decode check is skipped.
        dtype: The activation dtype.
        weights: Linen full forward against NNX full forward.
        decode: The engine's cached decode against the NNX full forward; None (skipped) for a
            model adapter that supports no engine cache protocol.
        mapping: With a mapping file: the NNX checkpoint leaf by leaf against the Linen one
            viewed through it (``compare``'s report, bit-exact expected); else None.
    """

    prompt_ids: list[int]
    linen_ids: list[int]
    engine_ids: list[int]
    dtype: str
    weights: WeightsCheck
    decode: DecodeCheck | None
    mapping: Any = None

    @property
    def tokens_agree(self) -> bool:
        """Whether the Linen model and the engine picked the same tokens at every step."""
        return self.linen_ids == self.engine_ids

    @property
    def ok(self) -> bool:
        """The verdict: both checks pass (the weights check alone when decode is skipped)."""
        mapped = self.mapping is None or self.mapping.bit_exact
        return mapped and self.weights.ok and (self.decode is None or self.decode.ok)

    def _mapping_lines(self) -> list[str]:
        m = self.mapping
        if m is None:
            return []
        bad = [d.path for d in m.leaves if not d.bit_exact] + m.only_in_a + m.only_in_b
        shown = f": first {bad[0]}" if bad else ""
        return [
            f"mapping: {_word(m.bit_exact)}, {len(m.leaves)} NNX leaves against the Linen "
            f"checkpoint through the mapping, {len(bad)} differ or unmatched{shown}"
        ]

    def _weights_lines(self) -> list[str]:
        w = self.weights
        out = [
            f"step {i}: linen {a} weights max|diff|={dw:.3g}"
            for i, (a, dw) in enumerate(zip(self.linen_ids, w.max_abs_diff, strict=True))
        ]
        worst_w = float(np.max(w.max_abs_diff))
        out.append(
            f"weights: {_word(w.ok)}, Linen vs NNX full forward on the Linen tokens: "
            f"max|diff|={worst_w:.3g} {'<=' if w.ok else '>'} atol={w.atol:.3g} "
            f"({WEIGHTS_ULPS} float32 eps x logit scale {w.logit_scale:.3g})"
        )
        out.append("decode: skipped, the model adapter supports no engine cache protocol")
        out += self._mapping_lines()
        out.append(f"{'agree' if self.ok else 'DIFFERENT'}: weights {_word(w.ok)} ({self.dtype})")
        return out

    def lines(self) -> list[str]:
        """The text report: one line per step, one per check with its tolerance, the verdict."""
        if self.decode is None:
            return self._weights_lines()
        w, d = self.weights, self.decode
        out = [
            f"step {i}: linen {a} engine {b} weights max|diff|={dw:.3g} "
            f"decode max|diff|={dd:.3g} kl={k:.3g}"
            for i, (a, b, dw, dd, k) in enumerate(
                zip(
                    self.linen_ids,
                    self.engine_ids,
                    w.max_abs_diff,
                    d.max_abs_diff,
                    d.kl_divergence,
                    strict=True,
                )
            )
        ]
        worst_w, worst_d = float(np.max(w.max_abs_diff)), float(np.max(d.max_abs_diff))
        agree = sum(a == b for a, b in d._pairs())
        out.append(
            f"weights: {_word(w.ok)}, Linen vs NNX full forward on the Linen tokens: "
            f"max|diff|={worst_w:.3g} {'<=' if w.ok else '>'} atol={w.atol:.3g} "
            f"({WEIGHTS_ULPS} float32 eps x logit scale {w.logit_scale:.3g})"
        )
        rule = d.atol_rule.replace("logit_scale", f"logit scale {d.logit_scale:.3g}")
        within = bool(worst_d <= d.atol)
        out.append(
            f"decode: {_word(d.ok)}, engine (KV cache) vs NNX full forward on the engine tokens: "
            f"max|diff|={worst_d:.3g} {'<=' if within else '>'} atol={d.atol:.3g} ({rule}), "
            f"tokens {agree}/{len(d.engine_ids)} agree ({len(d.ties)} near ties), "
            f"max KL={float(np.max(d.kl_divergence)):.3g}"
        )
        out += self._mapping_lines()
        verdict = "agree" if self.ok else "DIFFERENT"
        out.append(f"{verdict}: weights {_word(w.ok)}, decode {_word(d.ok)} ({self.dtype})")
        return out

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary."""
        return {
            "ok": self.ok,
            "prompt_ids": self.prompt_ids,
            "linen_ids": self.linen_ids,
            "engine_ids": self.engine_ids,
            "tokens_agree": self.tokens_agree,
            "steps_agreeing": sum(
                a == b for a, b in zip(self.linen_ids, self.engine_ids, strict=False)
            ),
            "dtype": self.dtype,
            "weights": self.weights.to_dict(),
            "decode": None if self.decode is None else self.decode.to_dict(),
            "mapping": None if self.mapping is None else self.mapping.to_dict(),
        }


def _word(ok: bool) -> str:
    return "ok" if ok else "FAILED"


def compare_weights(linen_logits: np.ndarray, nnx_logits: np.ndarray) -> WeightsCheck:
    """The weights check on ``[steps, vocab]`` logits of both full forward passes."""
    diffs = np.max(np.abs(np.asarray(linen_logits) - np.asarray(nnx_logits)), axis=-1)
    scale = logit_scale(linen_logits)
    return WeightsCheck([float(d) for d in diffs], scale, weights_atol(scale))


def compare_decode(
    engine_logits: np.ndarray,
    engine_ids: Sequence[int],
    full_logits: np.ndarray,
    dtype: Any,
    atol: float | None = None,
) -> DecodeCheck:
    """The decode check on ``[steps, vocab]`` logits.

    Args:
        engine_logits: The engine's logits, row ``i`` the one that picked ``engine_ids[i]``.
        engine_ids: The engine's tokens.
        full_logits: The full forward's logits on the prompt plus ``engine_ids[:-1]``.
        dtype: The activation dtype (for :func:`decode_atol`).
        atol: Overrides the dtype rule.

    Returns:
        The check.
    """
    full = np.asarray(full_logits, np.float32)
    ours = np.asarray(engine_logits, np.float32)
    scale = logit_scale(full)
    if atol is None:
        tol = decode_atol(dtype, scale)
        rule = f"{DECODE_EPS} {jnp.dtype(dtype).name} eps x logit_scale"
    else:
        tol, rule = float(atol), "--atol"
    reference_ids = [int(t) for t in np.argmax(full, axis=-1)]
    ids = [int(t) for t in engine_ids]
    ties = [
        i
        for i, (a, b) in enumerate(zip(ids, reference_ids, strict=True))
        if a != b and bool(full[i, b] - full[i, a] <= tol)
    ]
    return DecodeCheck(
        reference_ids=reference_ids,
        max_abs_diff=[float(d) for d in np.max(np.abs(full - ours), axis=-1)],
        kl_divergence=[float(k) for k in kl_divergence(full, ours)],
        logit_scale=scale,
        atol=tol,
        atol_rule=rule,
        ties=ties,
        engine_ids=ids,
    )


def read_linen_params(path: str | os.PathLike, model: Any) -> dict[str, Any]:
    """Reads the params of a Linen checkpoint as stored, checked against the model.

    Args:
        path: A MaxText or Flax ``TrainState`` checkpoint.
        model: A ``ModelConfig`` or a model adapter; with ``linen_param_shapes`` (as the
            reference adapter has), the params must match the Linen model's tree.

    Returns:
        The Linen ``params`` tree (numpy arrays).

    Raises:
        CheckpointFormatError: The checkpoint cannot be read.
        PlanError: It is an NNX checkpoint, or its params differ from the model's (naming the
            path).
    """
    from ..convert.expr import evaluate
    from ..convert.plan import parse_source
    from ..io.sources import open_source

    adapter = as_adapter(model)
    source = open_source(path)
    where = str(source.location)
    tree = parse_source(source.leaves(), source.custom_metadata, None, where)
    if tree.info.get("source_layout") == "nnx":
        raise PlanError(f"{where}: is an NNX checkpoint; the reference side needs a Linen one")
    exprs = tree.params()
    if callable(getattr(adapter, "linen_param_shapes", None)):
        try:
            check_linen_params(adapter.linen_param_shapes(), exprs, where)
        except LayoutError as e:
            raise PlanError(str(e)) from e
    return traverse_util.unflatten_dict({p: evaluate(e, source.read) for p, e in exprs.items()})


def linen_forward(model: Any) -> Forward:
    """The adapter's Linen full forward pass on a Linen ``params`` tree.

    Raises:
        ConfigError: The adapter has no ``linen_forward``.
    """
    adapter = as_adapter(model)
    if not callable(getattr(adapter, "linen_forward", None)):
        raise ConfigError(
            f"model {describe(adapter)}: lacks linen_forward, which verify needs to run the "
            "Linen side"
        )
    # Params are jit arguments, as in the engine, so XLA does not constant-fold them.
    fn = jax.jit(adapter.linen_forward)
    return lambda params, tokens, positions: np.asarray(fn(params, tokens, positions))


def nnx_forward(model: Any) -> Forward:
    """The adapter's NNX full forward pass on an ``nnx.Param`` state."""
    adapter = as_adapter(model)
    graphdef, _, other = nnx.split(adapter.nnx_model(), nnx.Param, ...)
    other = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), other)
    fn = jax.jit(
        lambda state, t, pos: adapter.nnx_forward(nnx.merge(graphdef, state, other), t, pos)
    )
    return lambda state, tokens, positions: np.asarray(fn(state, tokens, positions))


def linen_greedy(
    forward: Forward, params: Any, prompt_ids: Sequence[int], max_new_tokens: int
) -> list[int]:
    """Greedy decoding with full forward passes, padded to one length (see module)."""
    n = len(prompt_ids)
    sequence, positions = _sequence(prompt_ids, [], max_new_tokens)
    tokens = []
    for step in range(max_new_tokens):
        token = int(np.argmax(forward(params, sequence, positions)[0, n - 1 + step]))
        tokens.append(token)
        if step + 1 < max_new_tokens:
            sequence[0, n + step] = token
    return tokens


def _sequence(
    prompt_ids: Sequence[int], generated: Sequence[int], steps: int
) -> tuple[np.ndarray, np.ndarray]:
    """``prompt + generated[:steps - 1]``, zero-padded to ``len(prompt) + steps - 1``."""
    n = len(prompt_ids)
    sequence = np.zeros((1, n + steps - 1), np.int32)
    sequence[0, :n] = prompt_ids
    fed = list(generated)[: steps - 1]
    sequence[0, n : n + len(fed)] = fed
    return sequence, np.arange(sequence.shape[1], dtype=np.int32)[None]


def _rows(forward: Forward, weights: Any, prompt: Sequence[int], ids: Sequence[int]) -> np.ndarray:
    """Teacher-forced logits of the generated positions: ``[len(ids), vocab]`` float32."""
    sequence, positions = _sequence(prompt, ids, len(ids))
    n = len(prompt)
    return np.asarray(forward(weights, sequence, positions)[0, n - 1 :], np.float32)


def default_prompt(model: Any) -> list[int]:
    """A fixed prompt of up to 8 tokens that fits any vocabulary and prefill length."""
    adapter = as_adapter(model)
    vocab = int(adapter.vocab_size)
    longest = int(getattr(adapter, "max_prefill_length", 8))
    return [(7 * i + 3) % vocab for i in range(min(8, longest))]


def _activation_dtype(adapter: Any, nnx_fwd: Forward, params: Any, prompt: list[int]) -> Any:
    dtype = getattr(adapter, "activation_dtype", None)
    if dtype is not None:
        return dtype
    # Without one, the logits' own dtype sets the tolerance.
    tokens = np.asarray([prompt], np.int32)
    return np.asarray(nnx_fwd(params, tokens, np.arange(len(prompt))[None])).dtype


def _load_nnx(adapter: Any, nnx_ckpt: Any, mesh: Mesh | None) -> Any:
    """The NNX checkpoint restored into ``nnx_model()``'s params, without an engine."""
    from ..sharding import get_preset, make_mesh, param_partition_specs

    model = adapter.nnx_model()
    mesh = mesh if mesh is not None else make_mesh("data=1", jax.devices()[:1])
    abstract = nnx.state(model, nnx.Param)
    specs = param_partition_specs(model, get_preset("maxtext"), mesh, replicate_indivisible=True)
    shardings = P.sharding_state(abstract, specs, mesh)
    return P.load_params(nnx_ckpt, model=adapter, abstract=abstract, shardings=shardings)


def verify(
    linen_ckpt: str | os.PathLike,
    nnx_ckpt: str | os.PathLike,
    model: Any,
    *,
    prompt_ids: Sequence[int] | None = None,
    max_new_tokens: int = 8,
    atol: float | None = None,
    mesh: Mesh | None = None,
    linen_fwd: Forward | None = None,
    nnx_fwd: Forward | None = None,
    mapping: Any = None,
) -> VerifyResult:
    """Runs the weights check and the decode check (see module).

    Args:
        linen_ckpt: The Linen source checkpoint.
        nnx_ckpt: The NNX checkpoint converted from it.
        model: A model adapter, or a ``ModelConfig`` (the reference decoder's adapter).
        prompt_ids: The prompt (default: :func:`default_prompt`).
        max_new_tokens: Steps to compare.
        atol: Overrides the decode check's tolerance (absolute, on logits); None: the
            activation dtype's rule (:func:`decode_atol`). The weights check's tolerance is
            fixed (:func:`weights_atol`).
        mesh: The engine's mesh (default: one device).
        linen_fwd: The Linen full forward on the Linen params (default: :func:`linen_forward`).
        nnx_fwd: The NNX full forward on the restored ``nnx.Param`` state (default:
            :func:`nnx_forward`).
        mapping: A mapping file's rules (``convert.mapping``): also checks the NNX checkpoint
            against the Linen one through them, leaf by leaf, bit-exact.

    Returns:
        Both checks; ``result.ok`` is the verdict.

    Raises:
        CkptconvError: A bad prompt, an unreadable or mismatched checkpoint, an
            ``nnx_ckpt`` that is not an NNX checkpoint, or an adapter without
            ``linen_forward``.

    Example:
        >>> verify("maxtext_ckpt", "nnx_ckpt", config).ok  # doctest: +SKIP
        True
    """
    from ..convert import compare, detect_layout
    from ..io.sources import open_source

    adapter = as_adapter(model)
    prompt = list(default_prompt(adapter) if prompt_ids is None else prompt_ids)
    linen_fwd = linen_forward(adapter) if linen_fwd is None else linen_fwd
    engine = None
    if engine_kind(adapter) is not None:
        engine = Engine(adapter, mesh=mesh, max_concurrent_decodes=1)
        check_request(engine, prompt, max_new_tokens)
    source = open_source(nnx_ckpt)
    if detect_layout(source.leaves(), str(source.location)).name != "nnx":
        raise PlanError(f"{source.location}: is not an NNX checkpoint (verify LINEN_CKPT NNX_CKPT)")
    linen_params = read_linen_params(linen_ckpt, adapter)
    params = engine.load_params(nnx_ckpt) if engine else _load_nnx(adapter, nnx_ckpt, mesh)
    nnx_fwd = nnx_forward(adapter) if nnx_fwd is None else nnx_fwd
    dtype = _activation_dtype(adapter, nnx_fwd, params, prompt)

    linen_ids = linen_greedy(linen_fwd, linen_params, prompt, max_new_tokens)
    nnx_on_linen = _rows(nnx_fwd, params, prompt, linen_ids)
    weights = compare_weights(_rows(linen_fwd, linen_params, prompt, linen_ids), nnx_on_linen)
    dtype_name = getattr(adapter, "dtype_name", None) or jnp.dtype(dtype).name
    mapped = None if mapping is None else compare(nnx_ckpt, linen_ckpt, mapping=mapping)
    if engine is None:
        return VerifyResult(prompt, linen_ids, [], dtype_name, weights, None, mapped)

    ours = decode(engine, params, prompt, max_new_tokens=max_new_tokens)
    same = ours.generated_ids[:-1] == linen_ids[:-1]
    full = nnx_on_linen if same else _rows(nnx_fwd, params, prompt, ours.generated_ids)
    checked = compare_decode(ours.logits, ours.generated_ids, full, dtype, atol)
    return VerifyResult(
        prompt_ids=prompt,
        linen_ids=linen_ids,
        engine_ids=ours.generated_ids,
        dtype=dtype_name,
        weights=weights,
        decode=checked,
        mapping=mapped,
    )
