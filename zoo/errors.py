"""The zoo's error classes; each derives from `rlrr.errors.RLRRError` and the builtin a caller expects."""

from __future__ import annotations

import inspect
from pathlib import Path

from rlrr import RLRRError


class ZooError(RLRRError):
    """Base class of every error the zoo raises on purpose."""


class UnknownPresetError(ZooError, LookupError):
    """A preset name the zoo does not have."""


class UnknownModelError(ZooError, ValueError):
    """A model name that neither timm nor torchvision (nor an importable builder) knows, or whose build failed."""


class WeightsFileError(ZooError, OSError, ValueError):
    """A weight file is missing, unreadable, or in a format this route cannot read.

    Also a ValueError, so callers that catch a bad weight file as a ValueError keep working.
    """


class WeightsMismatchError(ZooError, ValueError):
    """A weight file holds weights of another model: missing, unexpected or mis-shaped keys."""


class AdapterMetadataError(ZooError, ValueError):
    """An adapter file (or a model) lacks the zoo metadata needed to rebuild its base model."""


class RandomWeightsWarning(UserWarning):
    """A preset was built without a weight file: its weights are random, not pretrained."""


def user_stacklevel() -> int:
    """`warnings.warn` stacklevel, for a call made in the zoo, that points at the first caller outside it."""
    here, frame, level = Path(__file__).parent, inspect.currentframe(), 0
    while frame is not None and Path(frame.f_code.co_filename).parent == here:
        frame, level = frame.f_back, level + 1
    return level
