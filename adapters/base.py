"""What every RLRR adapter shares: the parametrization protocol and the bias view.

An adapter is registered with `torch.nn.utils.parametrize` on the weight a layer reads, so the
layer's own forward sees the adapted weight and its class is untouched (design.md §3). The same
adapter also computes the adapted bias; `BiasOf` is the parametrization registered on the bias
that defers to it, so every adapter parameter lives in exactly one module.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

#: Every parameter an adapter owns starts with this, so "adapter only" is a one-line filter.
ADAPTER_PREFIX = "rlrr_"

INITS = ("paper", "identity")


@dataclass(frozen=True)
class Scaling:
    """How the weight is rescaled (the paper's ablations, Tables 6 and 11)."""

    sides: str = "both"  # "both", "left" (input side only) or "right" (output side only)
    residual: bool = True  # keep the frozen W as a residual term (Eq. 16) or replace it
    lowrank: bool = False  # "w/o W" (Table 11): W' = W + S_right @ S_left, a LoRA-like baseline


class Adapter(nn.Module):
    """Base class: computes a site's adapted weight and bias from the frozen originals."""

    kind: str = ""

    def effective_weight(self, weight: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        raise NotImplementedError

    def effective_bias(self, bias: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        raise NotImplementedError

    @property
    def adapts_bias(self) -> bool:
        """Whether this adapter changes the bias (a shift, or a norm's scale)."""
        raise NotImplementedError

    def forward(self, weight: Tensor) -> Tensor:
        return self.effective_weight(weight)

    def _param(self, name: str, dtype: torch.dtype | None) -> Tensor | None:
        value = getattr(self, ADAPTER_PREFIX + name)
        if value is None or dtype is None:
            return value
        return value.to(dtype)


class BiasOf(nn.Module):
    """Parametrization of a bias that asks the site's adapter for the adapted value.

    The adapter is held in a tuple so it is not registered twice in the module tree (its
    parameters stay under the weight's parametrization only).
    """

    def __init__(self, adapter: Adapter) -> None:
        super().__init__()
        self._adapter = (adapter,)

    @property
    def adapter(self) -> Adapter:
        return self._adapter[0]

    def forward(self, bias: Tensor) -> Tensor:
        return self.adapter.effective_bias(bias)


def adapter_parameters(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The (name, parameter) pairs of a module that belong to adapters."""
    return [(n, p) for n, p in module.named_parameters() if n.rsplit(".", 1)[-1].startswith(ADAPTER_PREFIX)]
