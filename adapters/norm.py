"""SSF-style scale and shift of a layer's output, as the paper does for norms (Sec. 4.3).

A norm's output y = γ ⊙ x̂ + β is rescaled to s ⊙ y + t, which folds into the affine:
γ' = γ ⊙ s and β' = β ⊙ s + t. It works for any layout (channels-last nn.LayerNorm,
channels-first timm LayerNorm2d) because it only touches the affine parameters.

The same rule on a linear or conv layer (the official code's SSF after the patch embedding)
scales its output channels: W' = s ⊙ W along axis 0, b' = s ⊙ b + t.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from adapters.base import ADAPTER_PREFIX, INITS, Adapter


class NormScaleShift(Adapter):
    """Scale s and shift t of a layer's output, written into its weight and bias.

    For a norm, s and t have γ's shape; for a linear or conv (`per_output_channel=True`) they
    have one entry per output channel, broadcast over the rest of the weight.
    """

    kind = "norm"

    def __init__(self, weight: Tensor, *, init: str = "paper", per_output_channel: bool = False) -> None:
        super().__init__()
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, not {init!r}")
        factory = {"dtype": weight.dtype, "device": weight.device}
        shape = weight.shape[:1] if per_output_channel else weight.shape
        self.rlrr_scale = nn.Parameter(torch.empty(shape, **factory))
        self.rlrr_shift = nn.Parameter(torch.empty(shape, **factory))
        self.reset_parameters(init)

    @torch.no_grad()
    def reset_parameters(self, init: str = "paper") -> None:
        """"paper": s ~ N(1, 0.02), t ~ N(0, 0.02) as the official code; "identity": s = 1, t = 0."""
        if init == "paper":
            nn.init.normal_(self.rlrr_scale, mean=1.0, std=0.02)
            nn.init.normal_(self.rlrr_shift, mean=0.0, std=0.02)
        else:
            self.rlrr_scale.fill_(1.0)
            self.rlrr_shift.zero_()

    @property
    def adapts_bias(self) -> bool:
        return True

    def effective_weight(self, weight: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        w = weight if dtype is None else weight.to(dtype)
        scale = self._param("scale", dtype)
        return w * scale.reshape(scale.shape + (1,) * (w.dim() - scale.dim()))  # broadcast along axis 0

    def effective_bias(self, bias: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        b = bias if dtype is None else bias.to(dtype)
        return b * self._param("scale", dtype) + self._param("shift", dtype)

    def extra_repr(self) -> str:
        return f"shape={tuple(self.rlrr_scale.shape)}"
