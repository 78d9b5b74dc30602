"""When an adapted `nn.Linear` trains through `adapters.RecomputedLinear` (W' recomputed in backward).

`rlrr.inject` installs `linear_forward` as the forward of each adapted `nn.Linear` (on the class
parametrize generates for that one module, so removing the rewrite removes it too). It takes the
recompute path only when it pays and is safe: grad enabled, something requires grad, plain tensors
(no compiler, tracer, fake or functional tensors), and the weight carries exactly one RLRR adapter;
under autocast too (its GEMMs then run in autocast's dtype, adapters/recompute.py). Otherwise it is
`nn.Linear.forward`, reading the parametrized (in eval, cached) weight.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from adapters import EAGER, BiasOf, LinearRescale, RecomputedLinear, compiled_kernels
from rlrr.errors import ConfigError
from rlrr.rewrite import user_class

#: The class attribute that names a module's kernels for the recompute path (absent: eager).
KERNELS = "_rlrr_kernels"


def _recompute_inputs(module: nn.Linear) -> tuple[Tensor, Tensor | None, LinearRescale, bool] | None:
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


def _recompute_now(x: Tensor) -> bool:
    # reason: compilers and tracers get the plain path, which they already handle.
    return torch.is_grad_enabled() and not torch.compiler.is_compiling() and not torch.jit.is_tracing() and _plain(x)


def linear_forward(self: nn.Linear, x: Tensor) -> Tensor:
    """`nn.Linear.forward` for an adapted layer, W' recomputed in backward while training."""
    found = _recompute_inputs(self) if _recompute_now(x) else None
    if found is not None:
        weight, bias, adapter, bias_adapted = found
        params = tuple(p for p in adapter._parameters.values() if p is not None)  # parameters(recurse=False), without its generator chain
        tensors = (x, weight, bias, *params)
        if all(_plain(t) for t in tensors[1:]) and any(t is not None and t.requires_grad for t in tensors):
            adapter.clear_cache()  # grad is on: an eval-mode cache must not outlive it
            return RecomputedLinear.apply(x, weight, bias, adapter, bias_adapted, type(self).__dict__.get(KERNELS), *params)
    return F.linear(x, self.weight, self.bias)


def takes_linear_forward(module: nn.Module) -> bool:
    """Whether `module` is a torch.nn Linear whose class keeps `nn.Linear.forward` (not a LoRA or quantized layer)."""
    return isinstance(module, nn.Linear) and user_class(module).forward is nn.Linear.forward


def set_recompute(model: nn.Module, enabled: bool = True, *, compile: bool | str | Callable = False, native: bool = True) -> nn.Module:
    """Turn the recompute training path of the model's adapted `nn.Linear`s on (the default) or off.

    Off, W' is built by the weight's parametrization and kept alive by `F.linear` until backward:
    the plain path, for ablations and debugging. On, the paper form (Eq. 16) on CPU runs one
    native loop per direction (6 passes over each weight a step, built at the first step;
    adapters/native.py) and everything else op by op (14). `native=False` keeps to op by op.
    `compile=True` evaluates the formula with fused kernels that `torch.compile` generates at the
    first training step (9 passes; adapters/kernels.py); a string names another torch.compile
    backend (tests use "aot_eager": traced, no code generated). Each module's class is its own, so
    other models are not affected.
    """
    for name, value in (("enabled", enabled), ("native", native)):
        if not isinstance(value, bool):
            raise ConfigError(f"set_recompute: {name} must be True or False, got {value!r}")
    if not (isinstance(compile, (bool, str)) or callable(compile)):
        raise ConfigError(f"set_recompute: compile must be a bool, a torch.compile backend name or a backend callable, got {compile!r}")
    kernels = compiled_kernels("inductor" if compile is True else compile) if compile else (None if native else EAGER)
    for m in model.modules():
        cls = type(m)
        if not enabled and cls.__dict__.get("forward") is linear_forward:
            delattr(cls, "forward")
        if KERNELS in cls.__dict__ and (not enabled or kernels is None):
            delattr(cls, KERNELS)
        if enabled and _recompute_inputs(m) is not None and takes_linear_forward(m):
            cls.forward = linear_forward
            if kernels is not None:
                setattr(cls, KERNELS, kernels)
    return model
