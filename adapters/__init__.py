"""The RLRR math, one module per layer kind; each formula is written once (design.md §2)."""

from adapters.base import ADAPTER_PREFIX, Adapter, BiasOf, Scaling, adapter_parameters
from adapters.conv import ConvRescale, flatten_kernel, unflatten_kernel
from adapters.linear import LinearRescale, rescale, scale_matrix
from adapters.norm import NormScaleShift

__all__ = [
    "ADAPTER_PREFIX",
    "Adapter",
    "BiasOf",
    "ConvRescale",
    "LinearRescale",
    "NormScaleShift",
    "Scaling",
    "adapter_parameters",
    "flatten_kernel",
    "rescale",
    "scale_matrix",
    "unflatten_kernel",
]
