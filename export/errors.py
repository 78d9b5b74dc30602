"""Errors of the deployment path. Each also derives from the builtin a caller would expect.

The CLIs map them to exit codes (see `export.cli`): bad input is 2, an export the exporter cannot
do is 3, a missing runtime is 4, a verification past tolerance is 1. Building the base model and
reading its weights raise the zoo's errors (`zoo.UnknownModelError`, `zoo.WeightsFileError`,
`zoo.WeightsMismatchError`): bad input, 2.
"""

from __future__ import annotations

from rlrr import RLRRError


class OutputError(RLRRError, OSError):
    """The output path cannot be written: missing folder, not writable, exists, or an input file."""


class ExportError(RLRRError, RuntimeError):
    """The exporter could not convert the model (an unsupported op, a dynamic batch it cannot keep)."""


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
