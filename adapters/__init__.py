"""The RLRR math, one module per layer kind; each formula is written once (design.md §2).

This package knows tensors and formulas, nothing about models or where adapters are placed.
"""

from adapters.base import ADAPTER_PREFIX, INITS, Adapter, BiasOf, Scaling, adapter_parameters
from adapters.combine import combine_concat, combine_weighted
from adapters.conv import ConvRescale, flatten_kernel, unflatten_kernel
from adapters.kernels import EAGER, compiled as compiled_kernels
from adapters.native import NATIVE
from adapters.linear import LinearRescale, rescale, rescale_vjp, scale_matrix, scale_matrix_vjp
from adapters.norm import ChannelScaleShift, NormScaleShift
from adapters.per_row import conv2d_rows, linear_rows, scale_shift_rows
from adapters.recompute import RecomputedLinear

__all__ = [
    "ADAPTER_PREFIX",
    "INITS",
    "Adapter",
    "BiasOf",
    "ChannelScaleShift",
    "ConvRescale",
    "EAGER",
    "LinearRescale",
    "NATIVE",
    "NormScaleShift",
    "RecomputedLinear",
    "Scaling",
    "adapter_parameters",
    "combine_concat",
    "combine_weighted",
    "compiled_kernels",
    "conv2d_rows",
    "flatten_kernel",
    "linear_rows",
    "rescale",
    "rescale_vjp",
    "scale_matrix",
    "scale_matrix_vjp",
    "scale_shift_rows",
    "unflatten_kernel",
]
