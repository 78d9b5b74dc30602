"""Errors of the deployment path. Each also derives from the builtin a caller would expect.

The CLIs map them to exit statuses with one table (`export.cli.EXIT_STATUSES`): bad input is 2
(`OutputError`, `ModelError`, and rlrr's and the zoo's errors: `zoo.UnknownModelError`,
`zoo.WeightsFileError`, `zoo.WeightsMismatchError`, `rlrr.AdapterFileError` ...), an export the
exporter cannot do is 3, a missing runtime is 4, the system refusing (disk full, permission
denied mid-export, read-only file system, out of memory) is 5, a verification past tolerance is 1.
"""

from __future__ import annotations

import errno
import os

from rlrr import RLRRError


class OutputError(RLRRError, OSError):
    """The output path cannot be written: missing folder, not writable, exists, or an input file."""


class ModelError(RLRRError, ValueError):
    """The model cannot be built or run as asked: builder arguments, input size, class count."""


class ExportError(RLRRError, RuntimeError):
    """The exporter could not convert the model (an unsupported op, a dynamic batch it cannot keep)."""


class ResourceError(RLRRError, OSError):
    """The system refused while exporting: disk full, quota, permission, read-only file system, memory.

    Not the model's fault and not the exporter's: the same command can pass elsewhere. Checks of
    `--out` made before any work raise OutputError (bad input) instead.
    """


class MissingRuntimeError(RLRRError, ImportError):
    """Verification needs a runtime (onnxruntime, a CUDA provider) that is not installed."""


class VerificationError(RLRRError, RuntimeError):
    """The exported model's outputs differ from the unmerged model's past tolerance.

    `report` holds the numbers (an `export.report.ExportReport`).
    """

    def __init__(self, message: str, report=None) -> None:
        super().__init__(message)
        self.report = report


class VacuousCheckWarning(UserWarning):
    """An output is the same for every input sample, so comparing it says nothing about the weights."""


#: errno -> what to do about it; an OSError with one of these is the system refusing, not a bug
_REFUSALS = {
    errno.ENOSPC: "free some space or choose another --out",
    errno.EDQUOT: "the disk quota is used up: free some space or choose another --out",
    errno.EFBIG: "the file system cannot hold a file this large: choose another --out",
    errno.EACCES: "check the folder's permissions or choose another --out",
    errno.EPERM: "check the folder's permissions or choose another --out",
    errno.EROFS: "the file system is read-only: choose another --out",
    errno.EIO: "the disk reported an I/O error",
    errno.ENOMEM: "out of memory: smaller batch sizes, fewer --inputs or a smaller model",
    errno.EMFILE: "too many open files (ulimit -n)",
    errno.ENFILE: "too many open files on the system",
}
_OOM = "out of memory: smaller batch sizes, fewer --inputs or a smaller model"


def _chain(error: BaseException):
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def refusal(error: BaseException, doing: str) -> ResourceError | None:
    """A ResourceError for `error` when it, or an error it came from, is the system refusing.

    The exporters and the output files raise many kinds of error that wrap an OSError (disk
    full while torch writes the file); this finds it, so a full disk is never "cannot export".
    `doing` says what was being done ("writing model.onnx"). None when nothing refused.
    """
    for e in _chain(error):
        if isinstance(e, ResourceError):
            return e
        if isinstance(e, OSError) and e.errno in _REFUSALS:
            where = f" ({e.filename})" if e.filename else ""
            return _with_errno(ResourceError(f"{doing}: {e.strerror or os.strerror(e.errno)}{where}; {_REFUSALS[e.errno]}"), e.errno)
        if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError" or "can't allocate memory" in str(e)[:200]:
            return _with_errno(ResourceError(f"{doing}: {_OOM}"), errno.ENOMEM)
    return None


def _with_errno(error: ResourceError, number: int) -> ResourceError:
    error.errno = number  # reason: OSError(errno, text) would prefix the message with "[Errno N]"
    return error
