"""Fold (Eq. 20): write every adapter into the plain weights it rescales, in place.

Each folded tensor is computed by the adapter's own fold (the function the forward uses, in
float32 or wider, cast back), block of rows by block (`Adapter.fold_into`; the paper form on CPU in
one pass of the native loop the training forward uses), and written into the original tensor in
place: no second copy of the model is ever held. Every result is checked
finite first (`Adapter.fold_is_finite`, also by blocks), before anything is written, so a NaN in an
adapter leaves the model untouched. Removing the rewrite itself is `rlrr.remove_rewrite`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

import rlrr


@dataclass
class FoldReport:
    """What `fold` did: sites folded, and tensors it had to create (a shift on a bias-free layer)."""

    sites: int = 0
    tensors: int = 0
    created: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)  # named adapters that were not live


def _write_folded(t: rlrr.AdaptedTensor) -> None:
    t.adapter.fold_into(t.original, t.is_bias)


@torch.no_grad()
def fold_with_report(model: nn.Module) -> tuple[nn.Module, FoldReport]:
    """`fold`, also returning what it did."""
    adapters = rlrr.adapters_of(model)
    if not adapters:
        raise rlrr.NotAdaptedError(f"{type(model).__name__} has no RLRR adapter to fold")
    targets = rlrr.adapted_tensors(model)
    reachable = {id(t.adapter) for t in targets}
    hidden = [a.site.name for a in adapters if id(a) not in reachable]
    if hidden:
        raise rlrr.RLRRError(f"cannot fold: the adapters of {hidden[:5]} sit behind other parametrizations; the model was not changed")
    for t in targets:  # check first, write nothing yet
        if not t.adapter.fold_is_finite(t.original, t.is_bias):
            raise rlrr.NonFiniteError(f"folding site {t.adapter.site.name} gives non-finite values in {t.name}: the adapter holds "
                                      f"NaN/Inf or overflows {t.original.dtype}; the model was not changed")
    tensors = len({id(t.original) for t in targets})
    removed = rlrr.remove_rewrite(model, write=_write_folded)
    if rlrr.adapters_of(model):
        raise rlrr.RLRRError("fold left adapters behind; this is a bug in rlrr")
    report = FoldReport(sites=len(adapters), tensors=tensors, created=removed.created, dropped=removed.dropped)
    if report.dropped:
        warnings.warn(f"rlrr: folded the live adapter {'+'.join(removed.live)}; dropped the others: {report.dropped}", stacklevel=2)
    return model, report


def fold(model: nn.Module) -> nn.Module:
    """Fold every RLRR adapter into plain weights (Eq. 20), in place; returns the same object.

    The result has the base model's architecture and state-dict keys, plus any bias a shift had
    to create on a bias-free layer (see `fold_with_report`).
    """
    return fold_with_report(model)[0]
