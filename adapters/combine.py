"""Combining several RLRR adapters of one site into one (App. H).

Formula 1 (same rank): Ŝ_left = Σ w_i S_left^i, Ŝ_right = Σ w_i S_right^i, f̂ = Σ w_i f_i.
Formula 2 (any ranks):  Ŝ_right Ŝ_left = Σ_i S_right^i S_left^i, by concatenating along r,
                        f̂ = Σ w_i f_i.
For a scale-and-shift site (norms, SSF) the scale's change s − 1 plays the part of
S_right S_left: formula 1 averages s and t with the weights; formula 2 sums the changes,
ŝ = 1 + Σ (s_i − 1), and weights the shifts. Tensors are keyed by adapter parameter name.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from adapters.base import ADAPTER_PREFIX

LEFT, RIGHT, SCALE = (ADAPTER_PREFIX + n for n in ("s_left", "s_right", "scale"))
_RANK_AXIS = {LEFT: 1, RIGHT: 1}  # S_left (chunks, r, in), S_right (out, r)


def _weighted_sum(values: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    return sum((w * v for w, v in zip(weights, values)), torch.zeros_like(values[0]))


def combine_weighted(adapters: Sequence[dict[str, Tensor]], weights: Sequence[float]) -> dict[str, Tensor]:
    """Formula 1: every parameter is the weighted sum of the adapters' (same shapes, same rank)."""
    return {name: _weighted_sum([a[name] for a in adapters], weights) for name in adapters[0]}


def combine_concat(adapters: Sequence[dict[str, Tensor]], weights: Sequence[float]) -> dict[str, Tensor]:
    """Formula 2: scales concatenated along r (their products add up), shifts weighted."""
    out = {}
    for name in adapters[0]:
        values = [a[name] for a in adapters]
        if name in _RANK_AXIS:
            out[name] = torch.cat(values, dim=_RANK_AXIS[name])
        elif name == SCALE:
            out[name] = 1 + sum((v - 1 for v in values), torch.zeros_like(values[0]))
        else:
            out[name] = _weighted_sum(values, weights)
    return out
