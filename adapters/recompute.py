"""The training path of an adapted linear layer: W' lives only inside one autograd Function.

Through the parametrization alone, `F.linear(x, W', b')` keeps W' alive from forward to backward
(it needs it for dX): one extra copy of every adapted weight held at the peak of the step. Here
the forward computes W' from the adapter's own formula (`LinearRescale.weight_from`, so
`scale_matrix` and `rescale`, written once in adapters/linear.py), runs the GEMM and frees it;
backward computes it again for dX and gets the adapter parameters' gradients from that same
formula's vector-Jacobian product, given dW' = dYᵀX: the derivatives written beside the formulas
(`scale_matrix_vjp`, `rescale_vjp`), or autograd of the formula itself where the backward must be
differentiable (create_graph=True). b' = b + f gives db' to both. How the formula is evaluated,
op by op or as fused compiled loops, is `kernels` (adapters/kernels.py).

This module is the math only; `rlrr` decides when a layer takes this path (rlrr/linear_forward.py).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor

from adapters.kernels import EagerKernels, weight_gradient
from adapters.linear import LinearRescale
from adapters.native import NATIVE


class RecomputedLinear(torch.autograd.Function):
    """y = F.linear(x, W', b') with W' = adapter.effective_weight(W) recomputed in backward.

    Under autocast the formula runs in W's dtype (float32) and the GEMMs in autocast's dtype, as
    `F.linear` would run them: x, W' and b' are cast for the forward GEMM, dX and dW' come out of
    the backward GEMMs in that dtype, and dW' meets the formula's gradient in float32.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, adapter: LinearRescale, bias_adapted: bool,
                kernels: EagerKernels | None, *params: Tensor) -> Tensor:
        kernels = kernels or NATIVE  # the default: the native loop where it applies, else op by op
        device = x.device.type
        amp = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        ctx.adapter, ctx.bias_adapted, ctx.kernels, ctx.amp, ctx.x_dtype = adapter, bias_adapted, kernels, amp, x.dtype
        with _no_autocast(device, amp is not None):  # the formula in W's dtype; the casts are explicit
            b = adapter.effective_bias(bias) if bias_adapted else bias
            x_in = x if amp is None else x.to(amp)
            ctx.save_for_backward(x_in, weight, bias, *params)  # params too: autograd checks their versions
            return F.linear(x_in, kernels.weight(adapter, weight, amp), b if amp is None or b is None else b.to(amp))

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, weight, bias, *params = ctx.saved_tensors
        device = dy.device.type
        with _no_autocast(device, torch.is_autocast_enabled(device)):
            return _backward(ctx, dy, x, weight, bias, params)


def _no_autocast(device: str, enabled: bool):
    """Autocast off inside the Function; no context at all when it is already off (most calls, a few µs each)."""
    return torch.autocast(device, enabled=False) if enabled else nullcontext()


def _backward(ctx, dy: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None, params: list[Tensor]) -> tuple:
    adapter = ctx.adapter
    create = torch.is_grad_enabled()  # backward(create_graph=True): keep every step differentiable
    shift = adapter.rlrr_shift
    wanted = [t for t in (weight, *params) if t.requires_grad and t is not shift]  # what W' feeds
    if wanted:
        dw = weight_gradient(dy, x, reuse=not create)  # dW' = dYᵀX, (out, in)
        w, found = ctx.kernels.weight_and_grads(adapter, weight, dw, wanted, create, ctx.amp)
        grads = {id(t): g for t, g in zip(wanted, found)}
    else:
        w, grads = ctx.kernels.weight(adapter, weight, ctx.amp), {}
    dx = (dy @ w).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
    if bias is not None:  # (a shift without a bias to put it in is unused)
        shifted = shift is not None and ctx.bias_adapted and shift.requires_grad
        if bias.requires_grad or shifted:
            db = dy.reshape(-1, dy.shape[-1]).sum(0).to(bias.dtype)  # db'; b' = b + f (`effective_bias`): db' is each one's
            if bias.requires_grad:
                grads[id(bias)] = db
            if shifted:
                grads[id(shift)] = db.clone() if bias.requires_grad else db
    return (dx, grads.get(id(weight)), grads.get(id(bias)) if bias is not None else None, None, None, None,
            *(grads.get(id(p)) for p in params))


__all__ = ["RecomputedLinear"]
