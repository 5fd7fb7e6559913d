"""Sharding: logical axis rules, presets, meshes, and param / KV-cache partition specs."""

from .annotate import Fallback as Fallback
from .annotate import ShardingFallbackWarning as ShardingFallbackWarning
from .annotate import annotation_rows as annotation_rows
from .annotate import ar_kv_cache_partition_specs as ar_kv_cache_partition_specs
from .annotate import logical_names as logical_names
from .annotate import named_shardings as named_shardings
from .annotate import param_partition_specs as param_partition_specs
from .annotate import prefill_kv_cache_partition_specs as prefill_kv_cache_partition_specs
from .annotate import shard_shape as shard_shape
from .mesh import make_mesh as make_mesh
from .mesh import parse_mesh_spec as parse_mesh_spec
from .presets import FSDP_TP_MESH_AXES as FSDP_TP_MESH_AXES
from .presets import PRESET_NAMES as PRESET_NAMES
from .presets import get_preset as get_preset
from .presets import load_rules as load_rules
from .presets import maxtext_mesh_axes as maxtext_mesh_axes
from .rules import LogicalAxisRules as LogicalAxisRules
