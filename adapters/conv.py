"""RLRR for convolutions by kernel flattening (App. G, Fig. 3).

A kernel (O, I, k1, ..., kn) becomes the matrix (O·k1···k(n-1), I·kn), the official code's
layout for Conv2d: `weight.permute(0, 2, 1, 3).reshape(O * kh, I * kw)`. Every spatial axis but
the last goes with the output side, the last with the input side, so Conv1d is (O, I·k) and
Conv3d is (O·kd·kh, I·kw). I is the per-group input channel count (weight.shape[1]), so grouped
and depthwise convs, dilation, stride and padding need nothing special: only the kernel changes.
The linear rule (adapters.linear) then applies unchanged.
"""

from __future__ import annotations

import math

from torch import Size, Tensor

from adapters.linear import LinearRescale


def _forward_perm(ndim: int) -> list[int]:
    # (O, I, k1..kn) -> (O, k1..k(n-1), I, kn)
    return [0, *range(2, ndim - 1), 1, ndim - 1]


def flatten_kernel(weight: Tensor) -> Tensor:
    """(O, I, k1..kn) -> (O·k1···k(n-1), I·kn)."""
    rows, cols = ConvRescale.matrix_shape(weight.shape)
    return weight.permute(_forward_perm(weight.dim())).reshape(rows, cols)


def unflatten_kernel(matrix: Tensor, shape: Size) -> Tensor:
    """Inverse of `flatten_kernel`: a (rows, cols) matrix back to the kernel's shape."""
    out_channels, in_channels, *kernel = shape
    grouped = matrix.reshape(out_channels, *kernel[:-1], in_channels, kernel[-1])
    inverse = sorted(range(len(shape)), key=_forward_perm(len(shape)).__getitem__)
    return grouped.permute(inverse)


class ConvRescale(LinearRescale):
    """RLRR adapter for a Conv1d/2d/3d kernel through its flattened matrix."""

    kind = "conv"

    @staticmethod
    def matrix_shape(shape: Size) -> tuple[int, int]:
        out_channels, in_channels, *kernel = shape
        return out_channels * math.prod(kernel[:-1]), in_channels * kernel[-1]

    @staticmethod
    def unflatten(m: Tensor, shape: Size) -> Tensor:
        return unflatten_kernel(m, shape)
