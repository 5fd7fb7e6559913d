"""Lazy Orbax checkpoint reading and streamed, atomic writing over TensorStore."""

from .leaf import KeyPath as KeyPath
from .leaf import Leaf as Leaf
from .leaf import keystr as keystr
