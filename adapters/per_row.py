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
    s_right_n))`. Every product with W is one GEMM call per output chunk (x and its scaled copies stacked), so
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
        y = _scaled_products(x, weight, s_left, s_right, scaling.residual)
    if bias is None and shift is None:
        return y
    row_bias = bias if shift is None else shift if bias is None else bias + shift  # b + f, per row: one pass over y
    return y + (row_bias if shift is None else row_bias[:, None, :])


def _scaled_products(x: Tensor, weight: Tensor, s_left: Tensor, s_right: Tensor | None, residual: bool) -> Tensor:
    """W x_n + (M_n ⊙ W) x_n (or the second term alone, without the residual), (N, T, out): one GEMM call per chunk.

    Per output chunk, the GEMM's input slots are x scaled by [1, S_left[c, 0], ..., S_left[c, r-1]]
    (one broadcast multiply writes them all); its output slots are scaled by [1, S_right[:, 0], ...]
    and summed. Each chunk's rows of W are a 2-D GEMM operand (a runtime prepacks it once).
    """
    n, t, fin = x.shape
    out = weight.shape[0]
    chunks, rank = s_left.shape[1], s_left.shape[2]
    left = torch.cat([torch.ones_like(s_left[:, :, :1]), s_left], 2) if residual else s_left  # (N, c, slots, in)
    right = None if s_right is None else s_right.reshape(n, chunks, out // chunks, rank).transpose(2, 3)  # (N, c, r, out/c)
    rows = out // chunks
    ys = []
    slots = left.shape[2]
    for c in range(chunks):  # chunk c's rows of W, against x scaled by chunk c's S_left: a plain 2-D GEMM each
        # reason: a 2-D operand; onnxruntime runs a 4-D MatMul against a 2-D weight about 1.4x slower than this Gemm
        u = (x[:, None] * left[:, c, :, None, :]).reshape(n * slots * t, fin)  # (N·slots·T, in)
        z = F.linear(u, weight[c * rows:(c + 1) * rows]).reshape(n, slots, t, rows)  # (N, slots, T, out/c)
        ys.append(_combine(z, None if right is None else right[:, c, :, None, :], residual))
    return ys[0] if chunks == 1 else torch.cat(ys, -1)


def _combine(z: Tensor, right: Tensor | None, residual: bool) -> Tensor:
    """Σ over the slots (axis 1) of z, the rank slots scaled by `right` (slot 0 is W x when `residual`)."""
    if residual and z.shape[1] == 2:  # rank 1: W x + s_right ⊙ W (s_left ⊙ x), no reduction
        base, scaled = z.unbind(1)
        return base + scaled if right is None else torch.addcmul(base, scaled, right[:, 0])
    if right is None:  # left only, rank 1, no residual: one slot
        return z[:, 0]
    if residual:
        right = torch.cat([torch.ones_like(right[:, :1]), right], 1)
    return (z * right).sum(1)


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
    slots = cols * torch.cat([torch.ones_like(left[:, :1]), left], 1)  # (N, 1 + r, I, kh, kw, L); slot 0 for W ⋆ x
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
