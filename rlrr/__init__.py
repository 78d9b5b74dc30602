"""rlrr: Residual-based Low-Rank Rescaling (CVPR 2024) for any traceable PyTorch vision model.

    import rlrr
    rlrr.apply(model, trainable="head")       # adapt in place, freeze the rest
    ...train...
    rlrr.save_adapter(model, "adapter.safetensors")
    from export import fold; fold(model)      # Eq. 20: a plain model again
"""

from rlrr.api import Removed, apply, apply_plan, plan, remove_rewrite
from rlrr.config import KINDS, RLRRConfig
from rlrr.errors import (
    AdapterFileError,
    AdapterMismatchError,
    AlreadyAdaptedError,
    ConfigError,
    InvalidRankError,
    NoMatchingTargetsError,
    NonFiniteError,
    NotAdaptedError,
    RLRRError,
    RoutingError,
    TraceError,
    UnknownAdapterError,
    UnknownTargetKindError,
)
from rlrr.rewrite import AdaptedTensor, adapted_tensors, adapters_of
from rlrr.linear_forward import set_recompute
from rlrr.multi import (
    active_adapters,
    add_adapter,
    check_name as check_adapter_name,
    combine,
    delete_adapter,
    disable_adapters,
    get_adapter,
    list_adapters,
    load_adapters,
    save_adapters,
    set_active,
)
from rlrr.per_sample import TaskRouter, check_same_placement, per_sample
from rlrr.sites import Plan, Site, Skipped
from rlrr.adapter_file import AdapterSet, atomic_write, read_adapter_file, write_adapter_file
from rlrr.state import adapter_state, load_adapter, save_adapter
from rlrr.targets import declared_classifier

__all__ = [
    "AdaptedTensor",
    "Removed",
    "adapted_tensors",
    "remove_rewrite",
    "KINDS",
    "AdapterSet",
    "UnknownAdapterError",
    "active_adapters",
    "add_adapter",
    "combine",
    "declared_classifier",
    "delete_adapter",
    "disable_adapters",
    "get_adapter",
    "list_adapters",
    "load_adapters",
    "save_adapters",
    "set_active",
    "AdapterFileError",
    "AdapterMismatchError",
    "AlreadyAdaptedError",
    "ConfigError",
    "InvalidRankError",
    "NoMatchingTargetsError",
    "NonFiniteError",
    "NotAdaptedError",
    "Plan",
    "RLRRConfig",
    "RLRRError",
    "Site",
    "Skipped",
    "TraceError",
    "UnknownTargetKindError",
    "adapter_state",
    "adapters_of",
    "atomic_write",
    "read_adapter_file",
    "write_adapter_file",
    "apply",
    "apply_plan",
    "load_adapter",
    "plan",
    "save_adapter",
    "set_recompute",
    "RoutingError",
    "TaskRouter",
    "check_adapter_name",
    "check_same_placement",
    "per_sample",
]
