"""Adapters applied per batch row: one shared weight, each row with its own task's adapter tensors.

Serving many tasks from one base model (`rlrr.TaskRouter`) cannot fold: every task would need
its own W'. Each function here computes what a row's adapted layer adds to the base layer's
output, from the shared W and that row's tensors, without forming W'. Each is the same function
as its adapter's `effective_*`, in the same tensor layout; tests/test_per_sample.py checks them
against `rescale(W, scale_matrix(...))` and `NormScaleShift.effective_*` for every variant.

Linear, rank r, chunked S_left (adapters.linear): row n, in chunk c, gets

    W' x = W x + (M ⊙ W) x,   M[o, j] = Σ_ρ S_right[o, ρ] S_left[c, ρ, j]
         = W x + Σ_ρ S_right[:, ρ] ⊙ (W_c (S_left[c, ρ] ⊙ x))

1 + r GEMMs against the shared W (each chunk of rows against its own S_left), scaled per row on
both sides: at rank 1 the adapted layer costs two GEMMs, `W x` and `W (s_left ⊙ x)`, done as
one call on the stacked inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from adapters.base import Scaling


def linear_rows(x: Tensor, weight: Tensor, bias: Tensor | None, s_left: Tensor | None, s_right: Tensor | None,
                shift: Tensor | None, scaling: Scaling) -> Tensor:
    """Row n's adapted linear layer, `F.linear(x_n, W'_n, b + f_n)`, with W' never formed.

    x: (N, T, in); weight: (out, in); bias: (out,) or None; s_left: (N, chunks, r, in);
    s_right: (N, out, r); shift: (N, out) or None. A side that is None counts as ones
    (one-sided scaling, rank 1), as in `scale_matrix`; W'_n is `rescale(W, scale_matrix(s_left_n,
    s_right_n))`. Every product with W is one GEMM call (x and the scaled copies of x stacked), so
    an exported graph holds W once. Returns (N, T, out).
    """
    if scaling.lowrank:  # W' = W + M: M x = Σ_ρ S_right[:, ρ] (S_left[c, ρ] · x)
        n, t, fin = x.shape
        out = weight.shape[0]
        chunks, rank = s_left.shape[1], s_left.shape[2]
        z = torch.matmul(x, s_left.reshape(n, chunks * rank, fin).transpose(1, 2)).reshape(n, t, chunks, 1, rank)  # (N, T, c, 1, r)
        y = F.linear(x, weight) + (z * s_right.reshape(n, 1, chunks, out // chunks, rank)).sum(-1).reshape(n, t, out)
    elif s_left is None:  # right only: M = s_right broadcast along each row of W
        z = F.linear(x, weight)
        y = torch.addcmul(z, z, s_right[:, None, :, 0]) if scaling.residual else z * s_right[:, None, :, 0]
    else:
        base, prod = _scaled_products(x, weight, s_left, s_right, scaling.residual)
        y = prod if base is None else base + prod  # no residual: W' = M ⊙ W
    if bias is not None:
        y = y + bias
    return y if shift is None else y + shift[:, None, :]


def _scaled_products(x: Tensor, weight: Tensor, s_left: Tensor, s_right: Tensor | None, residual: bool) -> tuple[Tensor | None, Tensor]:
    """(W x_n or None, (M_n ⊙ W) x_n), each (N, T, out), for both-sided or left-only scaling, in one GEMM call."""
    n, t, fin = x.shape
    out = weight.shape[0]
    chunks, rank = s_left.shape[1], s_left.shape[2]
    if chunks == 1:
        scaled = x[:, None] * s_left[:, 0, :, None, :]  # (N, r, T, in)
        z = F.linear(torch.cat([x[:, None], scaled], 1) if residual else scaled, weight)  # (N, 1 + r, T, out)
        base, v = (z[:, 0], z[:, 1:]) if residual else (None, z)
        if s_right is None:
            return base, v[:, 0]
        right = s_right.transpose(1, 2)[:, :, None, :]  # (N, r, 1, out)
        return base, (v[:, 0] * right[:, 0] if rank == 1 else (v * right).sum(1))
    scaled = x[:, None, None] * s_left[:, :, :, None, :]  # (N, c, r, T, in)
    if residual:
        scaled = torch.cat([x[:, None, None].expand(n, chunks, 1, t, fin), scaled], 2)  # slot 0: x itself, for W x
    slots = scaled.shape[2]
    w = weight.reshape(chunks, out // chunks, fin).transpose(1, 2)  # (c, in, out/c): chunk c's rows of W
    z = torch.matmul(scaled.reshape(n, chunks, slots * t, fin), w).reshape(n, chunks, slots, t, out // chunks)
    base, v = (z[:, :, 0], z[:, :, 1:]) if residual else (None, z)
    if s_right is None:
        prod = v[:, :, 0]  # (N, c, T, out/c)
    else:
        right = s_right.reshape(n, chunks, out // chunks, rank).permute(0, 1, 3, 2)[:, :, :, None, :]  # (N, c, r, 1, out/c)
        prod = (v * right).sum(2)

    def rows(y: Tensor) -> Tensor:  # (N, c, T, out/c) -> (N, T, out)
        return y.permute(0, 2, 1, 3).reshape(n, t, out)

    return (None if base is None else rows(base)), rows(prod)


def conv2d_rows(x: Tensor, weight: Tensor, bias: Tensor | None, s_left: Tensor, s_right: Tensor | None, shift: Tensor | None,
                scaling: Scaling, stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int]) -> Tensor:
    """Row n's adapted Conv2d (ungrouped), `F.conv2d(x_n, W'_n, b + f_n)`, through the kernel-flattening layout.

    `flatten_kernel` makes (O, I, kh, kw) the matrix (O·kh, I·kw): S_right's row o·kh + a scales
    output channel o at kernel row a, S_left's column i·kw + b input channel i at kernel column b.
    So, on the unfolded input (im2col), each kernel row a is a GEMM of W[:, :, a, :] against the
    columns (and against the columns scaled by S_left), the scaled results are scaled by S_right's
    rows for a, and the kernel rows are summed: (1 + r) GEMMs of the conv's size, W in one call.
    x: (N, I, H, W); s_left: (N, 1, r, I·kw); s_right: (N, O·kh, r); shift: (N, O) or None.
    The residual rescale with both sides or the left side only. Returns (N, O, H_out, W_out).
    """
    if scaling.lowrank or not scaling.residual or s_left is None:
        raise ValueError("per-row conv supports the residual rescale with s_left (scaling 'both' or 'left')")
    n, cin, h, w = x.shape
    cout, _, kh, kw = weight.shape
    rank = s_left.shape[2]
    hout = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wout = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    cols = F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride).reshape(n, 1, cin, kh, kw, -1)  # index (i, a, b)
    left = s_left.reshape(n, rank, cin, 1, kw, 1)  # column i·kw + b -> (i, b)
    slots = torch.cat([cols, cols * left], 1)  # (N, 1 + r, I, kh, kw, L); slot 0 for W ⋆ x
    u = slots.permute(0, 1, 3, 2, 4, 5).reshape(n, 1 + rank, kh, cin * kw, -1)  # (N, 1 + r, kh, I·kw, L)
    wa = weight.permute(2, 0, 1, 3).reshape(kh, cout, cin * kw)  # kernel row a: (O, I·kw)
    v = torch.matmul(wa, u)  # (N, 1 + r, kh, O, L)
    y = v[:, 0].sum(1)
    if s_right is None:
        y = y + v[:, 1].sum(1)  # left only: M is s_left on every row
    else:
        right = s_right.reshape(n, cout, kh, rank).permute(0, 3, 2, 1)[..., None]  # row o·kh + a -> (N, r, kh, O, 1)
        y = y + (v[:, 1:] * right).sum((1, 2))
    if bias is not None:
        y = y + bias[:, None]
    if shift is not None:
        y = y + shift[:, :, None]
    return y.reshape(n, cout, hout, wout)


def scale_shift_rows(y: Tensor, scale: Tensor, shift: Tensor | None) -> Tensor:
    """A scale-and-shift adapter's output per row: s_n ⊙ y_n + t_n (`NormScaleShift`, `ChannelScaleShift`).

    γ' = γ ⊙ s and β' = β ⊙ s + t (or W' = s ⊙ W, b' = s ⊙ b + t) give exactly s ⊙ y + t on the
    layer's output y. `scale` and `shift` come shaped to broadcast against y row by row.
    """
    return y * scale if shift is None else torch.addcmul(shift, y, scale)


__all__ = ["conv2d_rows", "linear_rows", "scale_shift_rows"]
