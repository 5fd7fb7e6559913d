"""Lazy Orbax checkpoint reading and streamed, atomic writing over TensorStore."""

from .leaf import KeyPath as KeyPath
from .leaf import Leaf as Leaf
from .leaf import keystr as keystr
from .location import Location as Location
from .reader import CheckpointReader as CheckpointReader
from .writer import ArrayHandle as ArrayHandle
from .writer import CheckpointWriter as CheckpointWriter
