"""Streaming, bit-exact Linen <-> NNX checkpoint conversion: layouts, rules, plans, runs."""

from .compare import CompareResult as CompareResult
from .compare import compare as compare
from .layouts import detect_layout as detect_layout
from .layouts import get_layout as get_layout
from .layouts import layout_names as layout_names
from .mapping import Mapping as Mapping
from .mapping import MappingError as MappingError
from .mapping import load_mapping as load_mapping
from .mapping import parse_mapping as parse_mapping
from .plan import ConvertOptions as ConvertOptions
from .plan import Plan as Plan
from .plan import abstract_tree_leaves as abstract_tree_leaves
from .plan import check_against as check_against
from .plan import plan_linen_to_nnx as plan_linen_to_nnx
from .plan import plan_nnx_to_linen as plan_nnx_to_linen
from .proposal import propose_for as propose_for
from .propose import Proposal as Proposal
from .run import ConvertResult as ConvertResult
from .run import convert as convert
from .run import make_plan as make_plan
