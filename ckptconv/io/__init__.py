"""Lazy Orbax checkpoint reading and streamed, atomic writing over TensorStore."""

from ._oserrors import describe_os_error as describe_os_error
from ._oserrors import os_errors as os_errors
from .handle import ArrayHandle as ArrayHandle
from .leaf import KeyPath as KeyPath
from .leaf import Leaf as Leaf
from .leaf import keystr as keystr
from .location import Location as Location
from .location import configure_s3 as configure_s3
from .reader import CheckpointReader as CheckpointReader
from .writer import CheckpointWriter as CheckpointWriter
