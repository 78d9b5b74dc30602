"""The project's error classes. Each also derives from the builtin a caller would expect."""

from __future__ import annotations


class RLRRError(Exception):
    """Base class of every error rlrr raises on purpose."""


class ConfigError(RLRRError, ValueError):
    """An option has a value the method does not define (rank, scaling, init ...)."""


class UnknownTargetKindError(ConfigError):
    """A target string names a layer kind that does not exist."""


class TraceError(RLRRError, RuntimeError):
    """The model could not be analysed: nothing traceable and nothing findable by type."""


class NoMatchingTargetsError(RLRRError, ValueError):
    """The targets select no adaptable site."""


class InvalidRankError(ConfigError):
    """The rank is below 1 or above what a selected layer allows."""


class AlreadyAdaptedError(RLRRError, RuntimeError):
    """`apply` on a model that already carries RLRR adapters."""


class NotAdaptedError(RLRRError, ValueError):
    """An operation that needs adapters got a model without any."""


class AdapterFileError(RLRRError, OSError):
    """An adapter file is missing, truncated, corrupted or not an rlrr adapter file."""


class AdapterMismatchError(RLRRError, ValueError):
    """An adapter file or state does not fit the model it is loaded into."""


class NonFiniteError(RLRRError, FloatingPointError):
    """A fold would write NaN or Inf into the model."""


class UnknownAdapterError(RLRRError, LookupError):
    """A named adapter that the model does not hold."""


class RoutingError(RLRRError, ValueError):
    """Per-sample routing cannot serve a request: a task index out of range, a batch that does not
    match the task list, or a site whose per-sample form is not implemented."""
