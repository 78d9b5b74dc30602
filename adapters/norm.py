"""SSF-style scale and shift of a layer's output, as the paper does for norms (Sec. 4.3).

A norm's output y = γ ⊙ x̂ + β is rescaled to s ⊙ y + t, which folds into the affine:
γ' = γ ⊙ s and β' = β ⊙ s + t. It works for any layout (channels-last nn.LayerNorm,
channels-first timm LayerNorm2d) because it only touches the affine parameters. A norm whose
op takes no bias gets the scale alone (`shift=False`): γ' = γ ⊙ s.

The same rule on a linear or conv layer (`ChannelScaleShift`, the official code's SSF after the
patch embedding) scales its output channels: W' = s ⊙ W along axis 0, b' = s ⊙ b + t.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from adapters.base import ADAPTER_PREFIX, Adapter, check_init


class NormScaleShift(Adapter):
    """Scale s and shift t of a norm's output, written into its γ and β (s and t have γ's shape)."""

    kind = "norm"

    def __init__(self, weight: Tensor, *, init: str = "paper", shift: bool = True) -> None:
        super().__init__()
        check_init(init)
        factory = {"dtype": weight.dtype, "device": weight.device}
        shape = self.parameter_shape(weight.shape)
        self.rlrr_scale = nn.Parameter(torch.empty(shape, **factory))
        self.register_parameter(ADAPTER_PREFIX + "shift", nn.Parameter(torch.empty(shape, **factory)) if shift else None)
        self.reset_parameters(init)

    @staticmethod
    def parameter_shape(shape: torch.Size) -> tuple[int, ...]:
        """The shape of s and t for a weight of `shape`."""
        return tuple(shape)

    @classmethod
    def count_parameters(cls, shape: torch.Size, *, shift: bool) -> int:
        numel = 1
        for n in cls.parameter_shape(shape):
            numel *= n
        return numel * (2 if shift else 1)

    @torch.no_grad()
    def reset_parameters(self, init: str = "paper") -> None:
        """"paper": s ~ N(1, 0.02), t ~ N(0, 0.02) as the official code; "identity": s = 1, t = 0."""
        if init == "paper":
            nn.init.normal_(self.rlrr_scale, mean=1.0, std=0.02)
            if self.rlrr_shift is not None:
                nn.init.normal_(self.rlrr_shift, mean=0.0, std=0.02)
        else:
            self.rlrr_scale.fill_(1.0)
            if self.rlrr_shift is not None:
                self.rlrr_shift.zero_()

    @property
    def adapts_bias(self) -> bool:
        return self.rlrr_shift is not None

    def effective_weight(self, weight: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        w = weight if dtype is None else weight.to(dtype)
        scale = self._param("scale", dtype)
        return w * scale.reshape(scale.shape + (1,) * (w.dim() - scale.dim()))  # broadcast along axis 0

    def effective_bias(self, bias: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        b = bias if dtype is None else bias.to(dtype)
        shift = self._param("shift", dtype)
        scaled = b * self._param("scale", dtype)
        return scaled if shift is None else scaled + shift

    def extra_repr(self) -> str:
        return f"shape={tuple(self.rlrr_scale.shape)}, shift={self.adapts_bias}"


class ChannelScaleShift(NormScaleShift):
    """SSF on a linear or conv layer: one scale and shift per output channel, broadcast over the rest."""

    kind = "ssf"

    @staticmethod
    def parameter_shape(shape: torch.Size) -> tuple[int, ...]:
        return tuple(shape[:1])
