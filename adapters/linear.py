"""RLRR for a weight matrix in PyTorch's (out, in) layout: Eq. 16, 19, 20 and App. F.

The paper writes y = x W + b with W of shape (in, out); its s_left scales the input side and
s_right the output side. In PyTorch's (out, in) layout, rank r (App. F) reads

    M  = S_right @ S_left                 # (out, r) @ (r, in) -> (out, in)
    W' = W + M ⊙ W = (1 + M) ⊙ W          # Eq. 16 / Eq. 20
    b' = b + f

Rank 1 is Eq. 16 itself: M[i, j] = s_right[i] * s_left[j], the factor of Eq. 19. A fused
projection (timm's qkv, nn.MultiheadAttention's in_proj_weight) may carry one S_left per output
chunk, so it behaves as the paper's separate q, k and v layers. `scale_matrix` and `rescale` are
the only places these formulas are written; forward and fold both call them.
"""

from __future__ import annotations

import torch
from torch import Size, Tensor, nn

from adapters.base import ADAPTER_PREFIX, Adapter, Scaling, check_init


def scale_matrix(s_left: Tensor | None, s_right: Tensor | None, out_features: int, in_features: int) -> Tensor:
    """M = S_right @ S_left per output chunk, broadcastable to (out, in).

    s_left: (chunks, r, in); s_right: (out, r). A missing side counts as ones (one-sided scaling,
    Table 6), which needs r = 1.
    """
    if s_left is None:
        return s_right  # (out, 1): scales whole rows
    chunks, rank, _ = s_left.shape
    if s_right is None:
        return s_left.expand(chunks, out_features // chunks, in_features).reshape(out_features, in_features)
    right = s_right.reshape(chunks, out_features // chunks, rank)  # (chunks, out/chunks, r)
    # reason: bmm also at r = 1 (an exact outer product): its backward reads dM twice as two
    # matrix-vector products, where a broadcast multiply's allocates two (out, in) temporaries.
    return torch.bmm(right, s_left).reshape(out_features, in_features)  # (chunks, out/chunks, in) -> (out, in)


def rescale(weight: Tensor, m: Tensor, scaling: Scaling) -> Tensor:
    """The adapted weight from W and M, elementwise in any layout (Eq. 16, Tables 6 and 11)."""
    if scaling.lowrank:
        return weight + m  # "w/o W": W + S_right @ S_left
    if scaling.residual:
        return torch.addcmul(weight, m, weight)  # Eq. 16: W + s_left ⊙ W ⊙ s_right, one pass over W
    return m * weight  # no residual: s_left ⊙ W ⊙ s_right


class LinearRescale(Adapter):
    """RLRR adapter for a 2-D weight (out, in): scales, optional per-chunk S_left, and a shift."""

    kind = "linear"

    def __init__(
        self,
        weight: Tensor,
        *,
        rank: int = 1,
        chunks: int = 1,
        scaling: Scaling = Scaling(),
        shift: bool = True,
        init: str = "paper",
    ) -> None:
        super().__init__()
        out_features, in_features = self.matrix_shape(weight.shape)
        if rank < 1 or chunks < 1 or out_features % chunks:
            raise ValueError(f"bad rank {rank} or chunks {chunks} for a weight of matrix shape {(out_features, in_features)}")
        scaling.check_rank(rank)
        check_init(init)
        self.out_features, self.in_features = out_features, in_features
        self.rank, self.chunks, self.scaling = rank, chunks, scaling
        factory = {"dtype": weight.dtype, "device": weight.device}
        left = torch.empty(chunks, rank, in_features, **factory) if scaling.sides != "right" else None
        right = torch.empty(out_features, rank, **factory) if scaling.sides != "left" else None
        bias = torch.zeros(weight.shape[0], **factory) if shift else None
        for name, value in (("s_left", left), ("s_right", right), ("shift", bias)):
            self.register_parameter(ADAPTER_PREFIX + name, None if value is None else nn.Parameter(value))
        self.reset_parameters(init)

    @staticmethod
    def matrix_shape(shape: Size) -> tuple[int, int]:
        """The (out, in) shape of the matrix the formulas see."""
        return shape[0], shape[1]

    @staticmethod
    def unflatten(m: Tensor, shape: Size) -> Tensor:
        """M, shaped like the weight (identity for a linear layer)."""
        return m

    @classmethod
    def max_rank(cls, shape: Size, chunks: int = 1) -> int:
        """The largest rank a (chunked) weight allows: min(out / chunks, in)."""
        out_features, in_features = cls.matrix_shape(shape)
        return min(out_features // chunks, in_features)

    @classmethod
    def count_parameters(cls, shape: Size, *, rank: int, chunks: int, scaling: Scaling, shift: bool) -> int:
        """Adapter parameters for one weight without building it: r·(chunks·in + out) + out."""
        out_features, in_features = cls.matrix_shape(shape)
        left = chunks * rank * in_features if scaling.sides != "right" else 0
        right = out_features * rank if scaling.sides != "left" else 0
        return left + right + (shape[0] if shift else 0)

    @torch.no_grad()
    def reset_parameters(self, init: str = "paper") -> None:
        """"paper": kaiming-uniform scales as the official code (Table 10); "identity": M = 0.

        Without the residual term (and not low-rank) both inits start at M = 1, W' = W.
        """
        left, right = self.rlrr_s_left, self.rlrr_s_right
        if not self.scaling.residual and not self.scaling.lowrank:
            for side in (left, right):
                if side is not None:
                    side.fill_(self.rank**-0.5 if left is not None and right is not None else 1.0)
        else:
            if left is not None:
                for chunk in left:  # (r, in) each: fan_in = in, as the official (1, in) vector
                    nn.init.kaiming_uniform_(chunk)
            if right is not None:
                nn.init.kaiming_uniform_(right)  # (out, r): fan_in = r, as the official (out, 1)
            if init == "identity":
                (right if right is not None else left).zero_()
        if self.rlrr_shift is not None:
            self.rlrr_shift.zero_()

    @property
    def adapts_bias(self) -> bool:
        return self.rlrr_shift is not None

    def scale(self, dtype: torch.dtype | None = None) -> Tensor:
        """M broadcast to (out, in), in `dtype` when given."""
        m = scale_matrix(self._param("s_left", dtype), self._param("s_right", dtype), self.out_features, self.in_features)
        return m.expand(self.out_features, self.in_features)

    def effective_weight(self, weight: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        w = weight if dtype is None else weight.to(dtype)
        return rescale(w, self.unflatten(self.scale(dtype), w.shape), self.scaling)

    def effective_bias(self, bias: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        b = bias if dtype is None else bias.to(dtype)
        shift = self._param("shift", dtype)
        return b if shift is None else b + shift

    def extra_repr(self) -> str:
        sides = self.scaling.sides + ("" if self.scaling.residual else ", no residual") + (", w/o W" if self.scaling.lowrank else "")
        return f"matrix=({self.out_features}, {self.in_features}), rank={self.rank}, chunks={self.chunks}, scaling={sides}, shift={self.adapts_bias}"


__all__ = ["LinearRescale", "rescale", "scale_matrix"]
