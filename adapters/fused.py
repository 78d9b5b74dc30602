"""The training path of an adapted `nn.Linear`: W' lives only inside one autograd Function.

Through the parametrization alone, `F.linear(x, W', b')` keeps W' alive from forward to backward
(it needs it for dX): one extra copy of every adapted weight held at the peak of the step. Here
the layer's forward computes W' with the adapter's own `effective_weight` (so `scale_matrix` and
`rescale`, written once in adapters/linear.py), runs the GEMM and frees it; backward computes it
again for dX and gets the adapter parameters' gradients by differentiating that same call with
autograd, given dW' = dYᵀX. No derivative of the formulas is written out anywhere.

`rlrr.inject` installs `linear_forward` as the forward of each adapted `nn.Linear` (on the class
PyTorch's parametrize generates for that one module, so fold's class restore removes it). It takes
the fused path only when it pays and is safe: grad enabled, something requires grad, plain tensors
(no compiler, tracer, fake or functional tensors), no autocast, and the weight carries exactly one
RLRR adapter. Otherwise it is `nn.Linear.forward`, reading the parametrized (in eval, cached) weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from adapters.base import Adapter, BiasOf
from adapters.linear import LinearRescale


class RescaledLinear(torch.autograd.Function):
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


def _fused_inputs(module: nn.Linear) -> tuple[Tensor, Tensor | None, LinearRescale, bool] | None:
    """(W, b, adapter, whether b is adapted) when the weight carries exactly one RLRR linear adapter."""
    if not parametrize.is_parametrized(module, "weight"):
        return None
    plist = module.parametrizations["weight"]
    if len(plist) != 1 or type(plist[0]) is not LinearRescale:
        return None
    adapter = plist[0]
    if parametrize.is_parametrized(module, "bias"):
        blist = module.parametrizations["bias"]
        if len(blist) != 1 or not isinstance(blist[0], BiasOf) or blist[0].adapter is not adapter:
            return None  # a foreign parametrization on the bias: let parametrize compose it
        return plist.original, blist.original, adapter, True
    return plist.original, module.bias, adapter, False


def _plain(t: Tensor | None) -> bool:
    return t is None or type(t) in (Tensor, nn.Parameter)


def _fusable_now(x: Tensor) -> bool:
    # reason: under autocast the GEMM would run in another dtype than the backward's recompute;
    # compilers and tracers get the plain path, which they already handle.
    return (torch.is_grad_enabled() and not torch.compiler.is_compiling() and not torch.jit.is_tracing()
            and _plain(x) and not torch.is_autocast_enabled(x.device.type))


def linear_forward(self: nn.Linear, x: Tensor) -> Tensor:
    """`nn.Linear.forward` for an adapted layer, fused while training (see the module docstring)."""
    found = _fused_inputs(self) if _fusable_now(x) else None
    if found is not None:
        weight, bias, adapter, bias_adapted = found
        params = list(adapter.parameters(recurse=False))
        tensors = (x, weight, bias, *params)
        if all(_plain(t) for t in tensors[1:]) and any(t is not None and t.requires_grad for t in tensors):
            adapter.clear_cache()  # grad is on: an eval-mode cache must not outlive it
            return RescaledLinear.apply(x, weight, bias, adapter, bias_adapted, *params)
    return F.linear(x, self.weight, self.bias)


def fusable(module: nn.Module) -> bool:
    """Whether `module` is a torch.nn Linear whose class keeps `nn.Linear.forward` (not a LoRA or quantized layer)."""
    if not isinstance(module, nn.Linear):
        return False
    cls = type(module)
    if parametrize.is_parametrized(module):
        cls = cls.__bases__[0]  # the user's class under parametrize's generated one
    return cls.forward is nn.Linear.forward


__all__ = ["RescaledLinear", "fusable", "linear_forward"]
