"""Model configuration of the MaxText default (llama2-style) decoder.

:class:`ModelConfig` holds only what changes the math or the parameter layout. It can be
built from ckptconv's own names (:meth:`ModelConfig.from_dict`), from MaxText's override names
and derived names, or from a whole MaxText fixture ``config.json``
(:meth:`ModelConfig.from_maxtext`), and loaded from a JSON or YAML file (:meth:`ModelConfig.load`).

Limits, stated honestly: only MaxText's ``llama2``/``default`` decoder block with a
``("silu", "linear")`` MLP is modelled. A MaxText key that would change the math to something
this module does not implement (QK norm, biases, soft caps, quantization, another RoPE, ...)
raises :class:`~ckptconv.errors.ConfigError` naming the key; a key known to be irrelevant to the
math (run names, optimizer, data pipeline, ...) is ignored; any other key is rejected so a typo
never passes silently.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp

from ..errors import ConfigError

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
_DECODER_BLOCKS = ("llama2", "default")
_MLP_ACTIVATIONS = ("silu", "linear")

# MaxText override name -> ModelConfig field (base.yml names of the sizes).
_BASE_NAMES = {
    "base_emb_dim": "emb_dim",
    "base_num_query_heads": "num_query_heads",
    "base_num_kv_heads": "num_kv_heads",
    "base_mlp_dim": "mlp_dim",
    "base_num_decoder_layers": "num_decoder_layers",
}


def _off(value: Any) -> bool:
    return value is None or value is False or value == "" or value == 0 or value == 0.0


def _equals(expected: Any) -> Callable[[Any], bool]:
    return lambda value: value == expected


def _at_most_zero(value: Any) -> bool:
    return value is None or value <= 0


# MaxText keys whose other values change the math or the parameter tree to something this
# module does not implement, in groups of (kind, predicate on the coerced value, what is
# supported, the keys).
_MATH_KEY_GROUPS: tuple[tuple[str, Callable[[Any], bool], str, str], ...] = (
    (
        "bool",
        _off,
        "false",
        "use_qk_norm logits_via_embedding mlp_bias attention_bias use_bias fused_qkv fused_mlp "
        "quantize_kvcache use_qwix_quantization attention_sink "
        "use_untrainable_positional_embedding use_post_attn_norm use_post_ffw_norm",
    ),
    (
        "float?",
        _off,
        "null or 0",
        "final_logits_soft_cap attn_logits_soft_cap query_pre_attn_scalar",
    ),
    ("str?", _off, "empty", "quantization engram_layers"),
    ("str", _equals("default"), "'default'", "rope_type matmul_precision"),
    ("str", _equals("global"), "'global'", "attention_type"),
    ("float", _equals(1.0), "1.0", "rope_linear_scaling_factor partial_rotary_factor"),
    ("int", _at_most_zero, "<= 0", "trainable_position_size"),
    (
        "int",
        _equals(1),
        "1",
        "mhc_expansion_rate inhomogeneous_layer_cycle_interval num_experts global_parameter_scale",
    ),
    ("int", _equals(0), "0", "mtp_num_layers first_num_dense_layers"),
)
# key -> (kind, predicate, what is supported)
_MATH_KEYS: dict[str, tuple[str, Callable[[Any], bool], str]] = {
    key: (kind, supported, description)
    for kind, supported, description, keys in _MATH_KEY_GROUPS
    for key in keys.split()
}

# Precision knobs that are no-ops when activations are float32 already.
_FLOAT32_ONLY_KEYS = {
    "float32_qk_product": False,
    "float32_logits": False,
    "activations_in_float32": False,
    "logits_dot_in_fp32": False,
    "cast_logits_to_fp32": True,
}

# MaxText keys known not to touch the math or the parameter tree: ignored.
_NON_MATH_KEYS = frozenset(
    """
    run_name hardware per_device_batch_size eval_per_device_batch_size tokenizer_type
    tokenizer_path attention dataset_type dataset_path dataset_name skip_jax_distributed_system
    base_output_directory steps learning_rate enable_checkpointing async_checkpointing
    checkpoint_period checkpoint_step maxtext_version jax_version flax_version
    orbax_checkpoint_version init_weights_seed opt_type checkpoint_storage_use_ocdbt
    checkpoint_storage_use_zarr3 dropout_rate enable_dropout use_iota_embed
    normalize_embedding_logits local_rope_max_timescale rope_use_scale sliding_window_size
    prefill_cache_axis_order ar_cache_axis_order compute_axis_order reshape_q shard_mode
    reference_inputs reference_tokens reference_greedy stored_step_value_in_ckpt
    jax_default_prng_impl_during_training model_name remat_policy scan_pipeline_iterations
    log_period gradient_clipping_threshold gradient_accumulation_steps weight_decay
    load_parameters_path load_full_state_path enable_data_shuffling data_shuffle_seed
    max_num_checkpoints_to_keep save_checkpoint_on_completion packing use_ragged_attention
    logical_axis_rules mesh_axes data_sharding grad_dtype mu_dtype num_slices
    decode_sampling_strategy decode_sampling_temperature decode_sampling_top_k
    decode_sampling_nucleus_p prompt autoregressive_decode_assert enable_tensorboard
    metrics_file gcs_metrics save_config_to_gcs profiler override_model_config
    """.split()
)
_NON_MATH_PREFIXES = tuple(
    "ici_ dcn_ adam_ grain_ hf_ dump_ profile checkpoint_ eval_ dataset_ enable_ jax_ lr_ "
    "learning_rate_ warmup_".split()
)
_NON_MATH_SUFFIXES = ("_note",)


def _is_non_math(key: str) -> bool:
    return (
        key in _NON_MATH_KEYS
        or key.startswith(_NON_MATH_PREFIXES)
        or key.endswith(_NON_MATH_SUFFIXES)
    )


def _coerce(key: str, kind: str, value: Any) -> Any:
    """Coerce a config value (possibly a MaxText command-line string) to ``kind``."""
    optional = kind.endswith("?")
    kind = kind.rstrip("?")
    if isinstance(value, str):
        text = value.strip()
        if optional and text.lower() in ("none", "null", ""):
            return "" if kind == "str" else None
        if kind == "bool":
            lowered = text.lower()
            if lowered in ("true", "1", "yes"):
                return True
            if lowered in ("false", "0", "no"):
                return False
            raise ConfigError(f"config key {key!r}: expected a boolean, got {value!r}")
        if kind in ("int", "float"):
            try:
                number = float(text.replace("_", ""))
            except ValueError:
                raise ConfigError(f"config key {key!r}: expected a number, got {value!r}") from None
            value = number
        elif kind == "str":
            return text
        elif kind == "str_tuple":
            return tuple(part.strip().strip("'\"") for part in text.strip("[]()").split(","))
    if value is None:
        if optional:
            return None
        raise ConfigError(f"config key {key!r}: a value is required, got null")
    if kind == "bool":
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key {key!r}: expected a boolean, got {value!r}")
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"config key {key!r}: expected an integer, got {value!r}")
        if not float(value).is_integer():
            raise ConfigError(f"config key {key!r}: expected an integer, got {value!r}")
        return int(value)
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"config key {key!r}: expected a number, got {value!r}")
        return float(value)
    if kind == "str":
        if not isinstance(value, str):
            raise ConfigError(f"config key {key!r}: expected a string, got {value!r}")
        return value
    if kind == "str_tuple":
        if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise ConfigError(f"config key {key!r}: expected a list of strings, got {value!r}")
    raise AssertionError(kind)  # pragma: no cover - programming error


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Sizes, dtypes and layout of a MaxText default (llama2-style) decoder.

    The defaults are MaxText's ``base.yml`` values. Build one from MaxText names with
    :meth:`from_maxtext`, from these field names with :meth:`from_dict`, or from a file with
    :meth:`load`; invalid values raise :class:`~ckptconv.errors.ConfigError` naming the key.

    Attributes:
        emb_dim: Model width E.
        num_query_heads: Query heads H.
        num_kv_heads: Key/value heads KV (grouped-query attention when KV < H).
        head_dim: Per-head width D (even, for RoPE's split halves).
        mlp_dim: MLP hidden width M.
        num_decoder_layers: Decoder layers L.
        vocab_size: Vocabulary size V.
        scan_layers: Whether layers are stacked into one ``layers`` module (else ``layers_{i}``).
        param_scan_axis: Axis at which Linen stacks layer params (MaxText default 1).
        nnx_scan_axis: Axis at which the NNX twin stacks layer params (default 0).
        dtype: Activation dtype name (``float32``, ``bfloat16`` or ``float16``).
        weight_dtype: Parameter dtype name.
        normalization_layer_epsilon: RMSNorm epsilon.
        rope_min_timescale: RoPE minimum timescale.
        rope_max_timescale: RoPE maximum timescale.
        max_target_length: Longest sequence (prompt plus generated tokens) the KV cache holds.
        max_prefill_predict_length: Longest prompt; size P of the prefill KV cache.
        decoder_block: ``llama2`` or ``default`` (the same block in MaxText).
        mlp_activations: Must be ``("silu", "linear")``.

    Example:
        >>> cfg = ModelConfig.from_maxtext({"base_emb_dim": "64", "scan_layers": "false"})
        >>> cfg.emb_dim, cfg.scan_layers
        (64, False)
    """

    emb_dim: int = 2048
    num_query_heads: int = 16
    num_kv_heads: int = 16
    head_dim: int = 128
    mlp_dim: int = 7168
    num_decoder_layers: int = 16
    vocab_size: int = 32000
    scan_layers: bool = True
    param_scan_axis: int = 1
    nnx_scan_axis: int = 0
    dtype: str = "bfloat16"
    weight_dtype: str = "float32"
    normalization_layer_epsilon: float = 1e-5
    rope_min_timescale: float = 1
    rope_max_timescale: float = 10000
    max_target_length: int = 2048
    max_prefill_predict_length: int = 64
    decoder_block: str = "llama2"
    mlp_activations: tuple[str, ...] = _MLP_ACTIVATIONS

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            object.__setattr__(
                self, field.name, _coerce(field.name, _FIELD_KINDS[field.name], value)
            )
        self._validate()

    # -- validation -------------------------------------------------------------------------
    def _validate(self) -> None:
        for name in _POSITIVE_FIELDS:
            if getattr(self, name) <= 0:
                raise ConfigError(
                    f"config key {name!r} must be positive, got {getattr(self, name)}"
                )
        if self.num_query_heads % self.num_kv_heads:
            raise ConfigError(
                f"config key 'num_query_heads' ({self.num_query_heads}) must be divisible by "
                f"'num_kv_heads' ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"config key 'head_dim' must be even for RoPE, got {self.head_dim}")
        if self.max_prefill_predict_length > self.max_target_length:
            raise ConfigError(
                "config key 'max_prefill_predict_length' "
                f"({self.max_prefill_predict_length}) must not exceed 'max_target_length' "
                f"({self.max_target_length})"
            )
        for name in ("param_scan_axis", "nnx_scan_axis"):
            if getattr(self, name) not in (0, 1):
                raise ConfigError(f"config key {name!r} must be 0 or 1, got {getattr(self, name)}")
        for name in ("dtype", "weight_dtype"):
            if getattr(self, name) not in _DTYPES:
                raise ConfigError(
                    f"config key {name!r} must be one of {sorted(_DTYPES)}, got "
                    f"{getattr(self, name)!r}"
                )
        if self.decoder_block not in _DECODER_BLOCKS:
            raise ConfigError(
                f"config key 'decoder_block' {self.decoder_block!r} is not supported "
                f"(supported: {', '.join(_DECODER_BLOCKS)})"
            )
        if tuple(self.mlp_activations) != _MLP_ACTIVATIONS:
            raise ConfigError(
                f"config key 'mlp_activations' {list(self.mlp_activations)} is not supported "
                f"(supported: {list(_MLP_ACTIVATIONS)})"
            )

    # -- derived ----------------------------------------------------------------------------
    @property
    def activation_dtype(self) -> Any:
        """The JAX dtype activations are computed in."""
        return _DTYPES[self.dtype]

    @property
    def param_dtype(self) -> Any:
        """The JAX dtype parameters are stored in."""
        return _DTYPES[self.weight_dtype]

    @property
    def ar_cache_length(self) -> int:
        """AR KV-cache length: ``max_target_length - max_prefill_predict_length``."""
        return self.max_target_length - self.max_prefill_predict_length

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict (``from_dict(to_dict())`` round-trips)."""
        out = dataclasses.asdict(self)
        out["mlp_activations"] = list(self.mlp_activations)
        return out

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    # -- constructors -----------------------------------------------------------------------
    @classmethod
    def from_dict(cls, mapping: Mapping[str, Any]) -> ModelConfig:
        """Build from ckptconv's own field names; any other key is an error.

        Args:
            mapping: Field names to values (strings such as ``"64"`` or ``"true"`` are coerced).

        Returns:
            The validated config.

        Raises:
            ConfigError: A key is unknown or a value is invalid.
        """
        unknown = sorted(set(mapping) - set(_FIELD_KINDS))
        if unknown:
            raise ConfigError(
                f"unknown config key {unknown[0]!r} (known keys: {', '.join(sorted(_FIELD_KINDS))})"
            )
        return cls(**dict(mapping))

    @classmethod
    def from_maxtext(cls, mapping: Mapping[str, Any]) -> ModelConfig:
        """Build from MaxText names: overrides, derived names, or a whole fixture config.json.

        Override names (``base_emb_dim``, ``base_num_query_heads``, ...) and derived names
        (``emb_dim``, ``num_query_heads``, ...) are both accepted; when a mapping holds a
        ``train_overrides`` dict (as the fixtures' ``config.json`` does), those overrides are
        merged with the top-level keys, which must agree with them. Absent keys take MaxText's
        ``base.yml`` defaults. ckptconv's own ``nnx_scan_axis`` is accepted too.

        Args:
            mapping: The MaxText keys and values (strings are coerced).

        Returns:
            The validated config.

        Raises:
            ConfigError: A key selects math this module does not implement, is unknown, or two
                keys that name the same quantity disagree.

        Example:
            >>> ModelConfig.from_maxtext({"emb_dim": 32, "use_qk_norm": True})
            Traceback (most recent call last):
            ...
            ckptconv.errors.ConfigError: config key 'use_qk_norm' = True is not supported ...
        """
        items: list[tuple[str, Any]] = []
        overrides = mapping.get("train_overrides")
        if overrides is not None:
            if not isinstance(overrides, Mapping):
                raise ConfigError("config key 'train_overrides' must be a mapping")
            items.extend(overrides.items())
        items.extend((k, v) for k, v in mapping.items() if k != "train_overrides")

        fields: dict[str, Any] = {}
        sources: dict[str, str] = {}
        float32_only: dict[str, bool] = {}
        for key, raw in items:
            target = _BASE_NAMES.get(key, key)
            if target in _FIELD_KINDS:
                value = _coerce(key, _FIELD_KINDS[target], raw)
                if target in fields and fields[target] != value:
                    raise ConfigError(
                        f"config keys {sources[target]!r} ({fields[target]!r}) and {key!r} "
                        f"({value!r}) disagree"
                    )
                fields[target], sources[target] = value, key
            elif key in _MATH_KEYS:
                kind, supported, description = _MATH_KEYS[key]
                value = _coerce(key, kind, raw)
                if not supported(value):
                    raise ConfigError(
                        f"config key {key!r} = {value!r} is not supported by ckptconv's "
                        f"decoder (supported: {description})"
                    )
            elif key in _FLOAT32_ONLY_KEYS:
                float32_only[key] = _coerce(key, "bool", raw)
            elif not _is_non_math(key):
                raise ConfigError(
                    f"unknown config key {key!r}: not a ModelConfig field and not a MaxText key "
                    "known to leave the decoder's math unchanged"
                )
        model_name = mapping.get("model_name", (overrides or {}).get("model_name", "default"))
        if model_name not in ("default", None) and not {"emb_dim", "num_decoder_layers"} <= set(
            k for k, _ in items
        ):
            raise ConfigError(
                f"config key 'model_name' = {model_name!r} takes its sizes from a MaxText model "
                "file ckptconv does not read; give the derived sizes (emb_dim, num_query_heads, "
                "num_kv_heads, head_dim, mlp_dim, num_decoder_layers, vocab_size) explicitly"
            )
        config = cls(**fields)
        for key, value in float32_only.items():
            if value != _FLOAT32_ONLY_KEYS[key] and config.dtype != "float32":
                raise ConfigError(
                    f"config key {key!r} = {value!r} is only supported with dtype float32 "
                    f"(got dtype {config.dtype!r})"
                )
        return config

    @classmethod
    def load(cls, path: str | pathlib.Path) -> ModelConfig:
        """Load a JSON or YAML file holding either ckptconv field names or MaxText keys.

        A file whose keys are all :class:`ModelConfig` fields (as :meth:`to_dict` writes) is read
        strictly with :meth:`from_dict`; anything else goes through :meth:`from_maxtext`.

        Args:
            path: A ``.json``, ``.yml`` or ``.yaml`` file.

        Returns:
            The validated config.

        Raises:
            ConfigError: The file cannot be parsed, is not a mapping, or holds invalid keys.
        """
        path = pathlib.Path(path)
        try:
            text = path.read_text()
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e}") from e
        try:
            if path.suffix.lower() in (".yml", ".yaml"):
                import yaml

                data = yaml.safe_load(text)
            else:
                data = json.loads(text)
        except Exception as e:  # noqa: BLE001 - any parse error is the user's file
            raise ConfigError(f"cannot parse config file {path}: {e}") from e
        if not isinstance(data, Mapping):
            raise ConfigError(f"config file {path} must hold a mapping, got {type(data).__name__}")
        if set(data) <= set(_FIELD_KINDS):
            return cls.from_dict(data)
        return cls.from_maxtext(data)


_FIELD_KINDS: dict[str, str] = {
    "emb_dim": "int",
    "num_query_heads": "int",
    "num_kv_heads": "int",
    "head_dim": "int",
    "mlp_dim": "int",
    "num_decoder_layers": "int",
    "vocab_size": "int",
    "scan_layers": "bool",
    "param_scan_axis": "int",
    "nnx_scan_axis": "int",
    "dtype": "str",
    "weight_dtype": "str",
    "normalization_layer_epsilon": "float",
    "rope_min_timescale": "float",
    "rope_max_timescale": "float",
    "max_target_length": "int",
    "max_prefill_predict_length": "int",
    "decoder_block": "str",
    "mlp_activations": "str_tuple",
}
_POSITIVE_FIELDS = (
    "emb_dim",
    "num_query_heads",
    "num_kv_heads",
    "head_dim",
    "mlp_dim",
    "num_decoder_layers",
    "vocab_size",
    "max_target_length",
    "max_prefill_predict_length",
    "normalization_layer_epsilon",
    "rope_min_timescale",
    "rope_max_timescale",
)
