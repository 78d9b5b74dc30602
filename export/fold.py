"""Fold (Eq. 20): write every adapter into the plain weights it rescales, in place.

Each folded tensor is computed by the same function the forward uses (adapters/), in float32 or
wider, then cast back. Every result is checked finite before anything is written, so a NaN in an
adapter leaves the model untouched.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from adapters import Adapter, BiasOf
from rlrr.errors import NonFiniteError, NotAdaptedError, RLRRError
from rlrr.inject import adapters_of, unregister
from rlrr.multi import BANK


@dataclass
class FoldReport:
    """What `fold` did: sites folded, and tensors it had to create (a shift on a bias-free layer)."""

    sites: int = 0
    tensors: int = 0
    created: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)  # named adapters that were not live


def _adapted_tensors(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, Adapter, bool]]:
    """(module name, module, attribute, adapter, is_bias) for every tensor an adapter rewrites."""
    for name, m in model.named_modules():
        if not parametrize.is_parametrized(m):
            continue
        for attr, plist in m.parametrizations.items():
            first = plist[0]
            if not isinstance(first, (Adapter, BiasOf)):
                continue
            if len(plist) > 1:
                raise RLRRError(f"{name}.{attr} has other parametrizations stacked with RLRR; fold cannot order them")
            yield name, m, attr, (first if isinstance(first, Adapter) else first.adapter), isinstance(first, BiasOf)


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


@torch.no_grad()
def folded_value(module: nn.Module, attr: str, adapter: Adapter, is_bias: bool) -> Tensor:
    """The folded tensor (Eq. 20), computed in float32 or wider and cast to the original dtype."""
    original = module.parametrizations[attr].original
    dtype = _compute_dtype(original)
    value = adapter.effective_bias(original, dtype) if is_bias else adapter.effective_weight(original, dtype)
    return value.to(original.dtype)


def fold_with_report(model: nn.Module) -> tuple[nn.Module, FoldReport]:
    """`fold`, also returning what it did."""
    adapters = adapters_of(model)
    if not adapters:
        raise NotAdaptedError(f"{type(model).__name__} has no RLRR adapter to fold")
    targets = list(_adapted_tensors(model))
    reachable = {id(t[3]) for t in targets}
    hidden = [a.site.name for a in adapters if id(a) not in reachable]
    if hidden:
        raise RLRRError(f"cannot fold: the adapters of {hidden[:5]} sit behind other parametrizations; the model was not changed")
    for name, m, attr, adapter, is_bias in targets:  # check first, write nothing yet
        value = folded_value(m, attr, adapter, is_bias)
        if not torch.isfinite(value).all():
            raise NonFiniteError(f"folding site {adapter.site.name} gives non-finite values in {name}.{attr}: the adapter holds NaN/Inf or overflows {value.dtype}; the model was not changed")
    report = FoldReport(sites=len(adapters))
    written: set[int] = set()
    with torch.no_grad():
        for name, m, attr, adapter, is_bias in targets:
            original = m.parametrizations[attr].original
            value = folded_value(m, attr, adapter, is_bias) if id(original) not in written else None
            unregister(m, attr)
            if value is None:
                continue  # a tied tensor, already written through its other holder
            written.add(id(original))
            report.tensors += 1
            if isinstance(original, nn.Parameter):
                original.copy_(value)
            else:  # a tensor apply created: it becomes a real parameter now
                del m._buffers[attr]
                m.register_parameter(attr, nn.Parameter(value, requires_grad=False))
                if hasattr(m, "elementwise_affine"):
                    m.elementwise_affine = True
                report.created.append(f"{name}.{attr}" if name else attr)
    if adapters_of(model):
        raise RLRRError("fold left adapters behind; this is a bug in rlrr")
    bank = model.__dict__.pop(BANK, None)
    if bank is not None:
        report.dropped = [n for n in bank.sets if n not in bank.active]
        if report.dropped:
            warnings.warn(f"rlrr: folded the live adapter {'+'.join(bank.active)}; dropped the others: {report.dropped}", stacklevel=2)
    return model, report


def fold(model: nn.Module) -> nn.Module:
    """Fold every RLRR adapter into plain weights (Eq. 20), in place; returns the same object.

    The result has the base model's architecture and state-dict keys, plus any bias a shift had
    to create on a bias-free layer (see `fold_with_report`).
    """
    return fold_with_report(model)[0]
