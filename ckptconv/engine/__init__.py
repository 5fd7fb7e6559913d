"""NNX inference engine: JetStream's API, continuous batching, samplers, decode and verify."""

from .decode import DecodeResult as DecodeResult
from .decode import decode as decode
from .decode import decode_checkpoint as decode_checkpoint
from .decode import parse_prompt_ids as parse_prompt_ids
from .engine import MIN_BUCKET as MIN_BUCKET
from .engine import Engine as Engine
from .engine import prefill_buckets as prefill_buckets
from .sampling import GREEDY as GREEDY
from .sampling import Sampler as Sampler
from .sampling import parse_sampler as parse_sampler
from .sampling import sample as sample
from .state import DecodeState as DecodeState
from .state import Prefix as Prefix
from .state import ResultTokens as ResultTokens
from .state import SlotData as SlotData
from .verify import VerifyResult as VerifyResult
from .verify import verify as verify
