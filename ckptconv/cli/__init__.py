"""The ``ckptconv`` command: option parsing only, one library call per command.

User errors (:class:`~ckptconv.errors.CkptconvError`) print one line on stderr and exit 2;
``compare`` and ``verify`` exit 1 when the checkpoints differ. ``--json`` prints one JSON
document on stdout; progress bars go to stderr. One module per group of commands:
:mod:`.convert` (linen-to-nnx, nnx-to-linen, map, compare), :mod:`.models` (annotate,
decode, verify), :mod:`.tools` (inspect, demo, launch).
"""

from . import convert, models, reshard, tools  # noqa: F401 - registers the commands
from ._app import EXIT_DIFFERENT, EXIT_USER_ERROR, main, user_errors

__all__ = ["EXIT_DIFFERENT", "EXIT_USER_ERROR", "main", "user_errors"]
