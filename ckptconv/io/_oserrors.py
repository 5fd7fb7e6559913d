"""Operating-system failures as one-line domain errors that name the path.

Every filesystem call of the write path (folders, renames, fsyncs, file copies) runs inside
:func:`os_errors`, which turns an :class:`OSError` into a :class:`~ckptconv.errors.StorageError`
saying which path failed, what was being done, what was expected there and what was found
(a full disk, a file where a folder should be, a permission refused, ...).
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator

from ..errors import CkptconvError, StorageError

# What a failure means to the user, by errno: (expected, found).
_EXPLAINED = {
    errno.ENOSPC: ("free space", "the disk is full (no space left on device)"),
    errno.EDQUOT: ("free space", "the disk quota is exceeded"),
    errno.EEXIST: ("nothing or a folder", "a file"),
    errno.ENOTDIR: ("a folder", "a file"),
    errno.EISDIR: ("a file", "a folder"),
    errno.EACCES: ("write permission", "permission denied"),
    errno.EPERM: ("write permission", "operation not permitted"),
    errno.EROFS: ("a writable filesystem", "a read-only filesystem"),
    errno.ENOENT: ("an existing folder", "nothing"),
}


def describe(e: OSError, where: object, doing: str) -> str:
    """Returns the one-line message for ``e``, raised while ``doing`` for ``where``."""
    at = e.filename if e.filename is not None else where
    explained = _EXPLAINED.get(e.errno or 0)
    if explained is not None:
        expected, found = explained
        detail = f"expected {expected} at {at}, found {found}"
    else:
        detail = f"{e.strerror or type(e).__name__} at {at}"
    return f"{where}: {doing} failed: {detail}"


@contextlib.contextmanager
def os_errors(where: object, doing: str) -> Iterator[None]:
    """Raises an :class:`OSError` of the block as a one-line :class:`StorageError`.

    Domain errors that are also OS errors (``DestinationExistsError``) pass through.

    Args:
        where: the checkpoint or path the operation is for (named first in the message).
        doing: what was being done, e.g. ``"creating the temporary folder"``.
    """
    try:
        yield
    except CkptconvError:
        raise
    except OSError as e:
        raise StorageError(describe(e, where, doing)) from e


def describe_os_error(e: OSError) -> str:
    """Returns a one-line message for an OS error that reached the command line."""
    where = e.filename if e.filename is not None else "ckptconv"
    return describe(e, where, "an operating-system call")
