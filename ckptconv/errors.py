"""Domain exceptions of ckptconv.

Every error a user can cause (bad input, a wrong tree, an impossible sharding) is raised as a
subclass of :class:`CkptconvError`, with a one-line message that names the tree path or the
file, what was expected and what was found. The CLI turns these into a one-line message and a
non-zero exit code; anything else is a bug and keeps its traceback.
"""


class CkptconvError(Exception):
    """Base class of every error ckptconv raises for user input."""


class ConfigError(CkptconvError, ValueError):
    """A model configuration key is unknown, missing or inconsistent."""


class CheckpointFormatError(CkptconvError, ValueError):
    """A checkpoint is missing, truncated, corrupted or not in a format ckptconv reads."""


class IncompleteCheckpointError(CheckpointFormatError):
    """A checkpoint lacks its commit marker: it was interrupted while being written."""


class LayoutError(CkptconvError, ValueError):
    """A checkpoint tree does not match the layout it was read or converted as."""


class PlanError(CkptconvError, ValueError):
    """A conversion plan cannot be built or does not match its target."""


class MappingError(PlanError):
    """A mapping file that cannot be read or applied (names the rule and the path)."""


class DestinationExistsError(CkptconvError, FileExistsError):
    """The destination exists and ``force`` was not given, or it lies inside the source."""


class ShardingError(CkptconvError, ValueError):
    """Logical axis rules, a mesh, or a dimension's divisibility are invalid."""


class EngineError(CkptconvError, ValueError):
    """The inference engine was called with inconsistent inputs."""


class ModelInputError(CkptconvError, ValueError):
    """A model was called with inputs or caches inconsistent with its config or mode."""


class CheckpointWriteError(CkptconvError, ValueError):
    """A checkpoint cannot be written as asked.

    A leaf written twice or only in part, key types that contradict each other, a dtype or shape
    that does not match its declaration, or a destination the writer does not support.
    """


class StorageError(CkptconvError):
    """A storage location cannot be reached or used.

    An unreachable endpoint, a missing bucket, or credentials the object store refuses.
    """
