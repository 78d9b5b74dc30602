"""The fine-tuning command's error classes: each is an `rlrr.RLRRError` and the builtin a caller expects.

All of them are raised before training starts (bad data, batch size, output folder, resume file),
so a run that fails this way has touched nothing.
"""

from __future__ import annotations

from rlrr import RLRRError


class FinetuneError(RLRRError):
    """Base class of every error `finetune` raises on purpose."""


class DataError(FinetuneError, ValueError):
    """A data folder is missing, empty, in no known layout, or its splits disagree on the classes."""


class BatchSizeError(FinetuneError, ValueError):
    """A batch size that cannot be split over processes and accumulation steps, or exceeds the data."""


class RecipeError(FinetuneError, ValueError):
    """An option of the training recipe has a value that cannot work (unknown dataset preset, lr <= 0 ...)."""


class CheckpointError(FinetuneError, OSError):
    """A checkpoint to resume from is missing, unreadable or corrupted, or the output folder is not usable."""


class ResumeMismatchError(FinetuneError, ValueError):
    """A checkpoint written by another run: another preset, classes, rank, batch size or schedule."""
