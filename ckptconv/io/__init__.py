"""Lazy Orbax checkpoint reading and streamed, atomic writing over TensorStore."""

from ._copy import can_copy_verbatim as can_copy_verbatim
from ._format import dtype_itemsize as dtype_itemsize
from ._format import normalize_index as normalize_index
from ._format import numpy_dtype as numpy_dtype
from ._format import one_line as one_line
from ._oserrors import describe_os_error as describe_os_error
from ._oserrors import os_errors as os_errors
from ._zarr import choose_chunk_shape as choose_chunk_shape
from .handle import ArrayHandle as ArrayHandle
from .leaf import KeyPath as KeyPath
from .leaf import Leaf as Leaf
from .leaf import keystr as keystr
from .location import Location as Location
from .location import configure_s3 as configure_s3
from .reader import CheckpointReader as CheckpointReader
from .writer import CheckpointWriter as CheckpointWriter
