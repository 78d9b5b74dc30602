"""The training path of an adapted linear layer: W' lives only inside one autograd Function.

Through the parametrization alone, `F.linear(x, W', b')` keeps W' alive from forward to backward
(it needs it for dX): one extra copy of every adapted weight held at the peak of the step. Here
the forward computes W' with the adapter's own `effective_weight` (so `scale_matrix` and
`rescale`, written once in adapters/linear.py), runs the GEMM and frees it; backward computes it
again for dX and gets the adapter parameters' gradients by differentiating that same call with
autograd, given dW' = dYᵀX. No derivative of the formulas is written out anywhere.

This module is the math only; `rlrr` decides when a layer takes this path (rlrr/linear_forward.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from adapters.base import Adapter


class RecomputedLinear(torch.autograd.Function):
    """y = F.linear(x, W', b') with W' = adapter.effective_weight(W) recomputed in backward."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, adapter: Adapter, bias_adapted: bool, *params: Tensor) -> Tensor:
        ctx.adapter, ctx.bias_adapted = adapter, bias_adapted
        ctx.save_for_backward(x, weight, bias, *params)  # params too: autograd checks their versions
        w = adapter.effective_weight(weight)
        b = adapter.effective_bias(bias) if bias_adapted else bias
        return F.linear(x, w, b)

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, weight, bias, *params = ctx.saved_tensors
        adapter = ctx.adapter
        create = torch.is_grad_enabled()  # backward(create_graph=True): keep every step differentiable
        wanted = [t for t in (weight, bias, *params) if t is not None and t.requires_grad]
        with torch.enable_grad():  # the formula again, with its own small graph
            w = adapter.effective_weight(weight)
            b = adapter.effective_bias(bias) if ctx.bias_adapted else bias
        dx = dy @ (w if create else w.detach()) if ctx.needs_input_grad[0] else None
        grads: dict[int, Tensor] = {}
        if wanted:
            dy2 = dy.reshape(-1, dy.shape[-1])  # (tokens, out)
            outputs, seeds = [w], [dy2.t() @ x.reshape(-1, x.shape[-1])]  # dW' = dYᵀX, (out, in)
            if b is not None and b.requires_grad:
                outputs.append(b)
                seeds.append(dy2.sum(0))  # db'
            found = torch.autograd.grad(outputs, wanted, seeds, allow_unused=True, create_graph=create)
            grads = {id(t): g for t, g in zip(wanted, found)}
        return (dx, grads.get(id(weight)), grads.get(id(bias)) if bias is not None else None, None, None,
                *(grads.get(id(p)) for p in params))


__all__ = ["RecomputedLinear"]
