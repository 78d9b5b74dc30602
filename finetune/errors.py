"""The fine-tuning command's error classes: each is an `rlrr.RLRRError` and the builtin a caller expects.

Bad input (`DataError`, `BatchSizeError`, `RecipeError`, `CheckpointError`, `ResumeMismatchError`)
is found before training starts, so a run that fails this way has trained and written nothing.
`ResourceError` is the machine refusing what a correct run needs (disk full, permission denied,
read-only file system); `DivergedError` is a run whose loss stopped being a number. Both can come
after epochs were written: the last complete checkpoint is then intact.
"""

from __future__ import annotations

import errno as _errno

from rlrr import RLRRError

# errno values that mean "the environment refused", not "the input is wrong" (exit status 5)
ENVIRONMENT_ERRNOS = frozenset({_errno.ENOSPC, _errno.EDQUOT, _errno.EACCES, _errno.EPERM, _errno.EROFS, _errno.EIO,
                                _errno.EMFILE, _errno.ENFILE, _errno.ENOMEM, _errno.EFBIG})


class FinetuneError(RLRRError):
    """Base class of every error `finetune` raises on purpose."""


class DataError(FinetuneError, ValueError):
    """A data folder is missing, empty, in no known layout, has one class or undecodable images, or its splits disagree."""


class BatchSizeError(FinetuneError, ValueError):
    """A batch size that cannot be split over processes and accumulation steps, or exceeds the data."""


class RecipeError(FinetuneError, ValueError):
    """An option has a value or type that cannot work (unknown dataset preset, lr <= 0, NaN, a NUL in a path ...)."""


class CheckpointError(FinetuneError, OSError):
    """A checkpoint to resume from is missing, unreadable or corrupted, or the output folder is not usable."""


class ResumeMismatchError(FinetuneError, ValueError):
    """A checkpoint written by another run: another preset, classes, rank, batch size or schedule."""


class ResourceError(FinetuneError, OSError):
    """The environment refused: disk full, permission denied, read-only file system. `errno` says which."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


class DivergedError(FinetuneError, FloatingPointError):
    """The training loss or a trained tensor became NaN or infinite: the learning rate is too high, or the data or weights are bad."""


def environment_errno(error: BaseException) -> int | None:
    """The errno of the first OS error in `error`'s chain that means the environment refused, else None."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        code = getattr(error, "errno", None)
        if isinstance(error, OSError) and code in ENVIRONMENT_ERRNOS:
            return code
        error = error.__cause__ or error.__context__
    return None
