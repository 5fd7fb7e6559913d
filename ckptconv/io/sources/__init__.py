"""Readable checkpoint formats: one module per format, chosen by a resolver.

``open_source(location)`` returns a :class:`CheckpointSource` for an Orbax item (OCDBT or
per-array zarr folders, ``_METADATA`` or older Orbax's msgpack tree) or a Flax msgpack
checkpoint (``flax.training.checkpoints`` files, Hugging Face ``flax_model.msgpack``).
"""

from .base import CheckpointSource as CheckpointSource
from .base import can_copy_chunks as can_copy_chunks
from .resolve import SourceFormat as SourceFormat
from .resolve import format_names as format_names
from .resolve import open_source as open_source
from .resolve import register_format as register_format
