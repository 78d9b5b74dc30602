"""RLRR for a weight matrix in PyTorch's (out, in) layout: Eq. 16, 19, 20 and App. F.

The paper writes y = x W + b with W of shape (in, out); its s_left scales the input side and
s_right the output side. In PyTorch's (out, in) layout, rank r (App. F) reads

    M  = S_right @ S_left                 # (out, r) @ (r, in) -> (out, in)
    W' = W + M ⊙ W = (1 + M) ⊙ W          # Eq. 16 / Eq. 20
    b' = b + f

Rank 1 is Eq. 16 itself: M[i, j] = s_right[i] * s_left[j], the factor of Eq. 19. A fused
projection (timm's qkv, nn.MultiheadAttention's in_proj_weight) may carry one S_left per output
chunk, so it behaves as the paper's separate q, k and v layers. `scale_matrix` and `rescale` are
the only places these formulas are written; forward and fold both call them. Their derivatives,
for the training path's backward, are written beside them (`scale_matrix_vjp`, `rescale_vjp`) and
tested against autograd of the formulas.
"""

from __future__ import annotations

import torch
from torch import Size, Tensor, nn

from adapters.base import ADAPTER_PREFIX, FOLD_BLOCK, Adapter, Scaling, check_init, fold_dtype


def scale_matrix(s_left: Tensor | None, s_right: Tensor | None, out_features: int, in_features: int, *, fused: bool = False,
                 out: Tensor | None = None) -> Tensor:
    """M = S_right @ S_left per output chunk, broadcastable to (out, in).

    s_left: (chunks, r, in); s_right: (out, r). A missing side counts as ones (one-sided scaling,
    Table 6), which needs r = 1. `fused=True` writes the same product as a broadcast multiply
    summed over r, which a code generator (torch.compile) fuses into the loop that consumes M, so
    M is never stored; evaluated eagerly that form would store r copies of (out, in). `out`
    ((out, in), contiguous) receives M when it is the product of both sides.
    """
    if s_left is None:
        return s_right  # (out, 1): scales whole rows
    chunks, rank, _ = s_left.shape
    if s_right is None:
        return s_left.expand(chunks, out_features // chunks, in_features).reshape(out_features, in_features)
    if fused:
        left = s_left.unsqueeze(1).expand(chunks, out_features // chunks, rank, in_features).reshape(out_features, rank, in_features)
        return (s_right.unsqueeze(-1) * left).sum(1)  # (out, r, in) summed over r: each row with its chunk's S_left
    right = s_right.reshape(chunks, out_features // chunks, rank)  # (chunks, out/chunks, r)
    shaped = None if out is None else out.view(chunks, out_features // chunks, in_features)
    # reason: with a graph, bmm also at r = 1 (an exact outer product): its backward reads dM twice
    # as two matrix-vector products, where a broadcast multiply's allocates two (out, in)
    # temporaries. Without one, r = 1 is a broadcast multiply: the same products, 3× faster than bmm.
    if rank == 1 and not (torch.is_grad_enabled() and (s_left.requires_grad or s_right.requires_grad)):
        return torch.mul(right, s_left, out=shaped).view(out_features, in_features)
    return torch.bmm(right, s_left, out=shaped).reshape(out_features, in_features)  # (chunks, out/chunks, in) -> (out, in)


def scale_matrix_vjp(dm: Tensor, s_left: Tensor | None, s_right: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    """The gradients of `scale_matrix`'s S_left and S_right given dL/dM, shaped (out, in): one read of dM each."""
    out_features, in_features = dm.shape
    if s_left is None:
        return None, dm.sum(1, keepdim=True)  # M = s_right, broadcast along rows
    chunks, rank, _ = s_left.shape
    dm_chunks = dm.reshape(chunks, out_features // chunks, in_features)
    if s_right is None:
        return dm_chunks.sum(1, keepdim=True), None  # M = each chunk's s_left, repeated down its rows
    right = s_right.reshape(chunks, out_features // chunks, rank)
    d_left = torch.bmm(right.transpose(1, 2), dm_chunks)  # (chunks, r, in)
    d_right = torch.bmm(dm_chunks, s_left.transpose(1, 2)).reshape(out_features, rank)
    return d_left, d_right


def rescale(weight: Tensor, m: Tensor, scaling: Scaling, out: Tensor | None = None) -> Tensor:
    """The adapted weight from W and M, elementwise in any layout (Eq. 16, Tables 6 and 11).

    `out` (W itself for an in-place fold) receives the result.
    """
    if scaling.lowrank:
        return torch.add(weight, m, out=out)  # "w/o W": W + S_right @ S_left
    if scaling.residual:
        return torch.addcmul(weight, m, weight, out=out)  # Eq. 16: W + s_left ⊙ W ⊙ s_right, one pass over W
    return torch.mul(m, weight, out=out)  # no residual: s_left ⊙ W ⊙ s_right


def rescale_vjp(dw: Tensor, weight: Tensor, m: Tensor, scaling: Scaling, *, weight_grad: bool = False) -> tuple[Tensor, Tensor | None]:
    """(dL/dM, dL/dW) of `rescale` given dL/dW'; dL/dW only when `weight_grad`.

    dL/dM is written over `dw` (one pass, no new tensor): the caller must not need dL/dW'
    afterwards. dL/dW is always a tensor of its own.
    """
    if scaling.lowrank:  # W' = W + M
        return dw, dw.clone() if weight_grad else None
    if scaling.residual:  # W' = W + M ⊙ W
        d_weight = torch.addcmul(dw, dw, m) if weight_grad else None
    else:  # W' = M ⊙ W
        d_weight = dw * m if weight_grad else None
    return dw.mul_(weight), d_weight


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

    def effective_weight(self, weight: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        w = weight if dtype is None else weight.to(dtype)
        return self.weight_from(w, self._param("s_left", dtype), self._param("s_right", dtype), self.scaling)

    @classmethod
    def weight_from(cls, weight: Tensor, s_left: Tensor | None, s_right: Tensor | None, scaling: Scaling, *, fused: bool = False,
                    out: Tensor | None = None, m_out: Tensor | None = None) -> Tensor:
        """W' from W and the scales passed in: `effective_weight` as a function of tensors (what a compiler traces).

        `fused`: see `scale_matrix`; `out`: see `rescale`; `m_out`: `scale_matrix`'s `out`.
        """
        return cls.weight_and_m_from(weight, s_left, s_right, scaling, fused=fused, out=out, m_out=m_out)[0]

    @classmethod
    def weight_and_m_from(cls, weight: Tensor, s_left: Tensor | None, s_right: Tensor | None, scaling: Scaling, *, fused: bool = False,
                          out: Tensor | None = None, m_out: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """`weight_from`, and M shaped like the weight (what `rescale_vjp` needs)."""
        out_features, in_features = cls.matrix_shape(weight.shape)
        m = scale_matrix(s_left, s_right, out_features, in_features, fused=fused, out=m_out).expand(out_features, in_features)
        m = cls.unflatten(m, weight.shape)
        return rescale(weight, m, scaling, out=out), m

    def effective_bias(self, bias: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        b = bias if dtype is None else bias.to(dtype)
        shift = self._param("shift", dtype)
        return b if shift is None else b + shift

    def row_blocks(self, original: Tensor, is_bias: bool, rows: int | None = None) -> list[tuple[int, int]]:
        """Blocks of output rows (a conv's whole output channels), none across a chunk boundary."""
        count = original.shape[0]
        per_chunk = self.out_features // self.chunks // (self.out_features // count)  # tensor rows per chunk
        if is_bias or per_chunk * self.chunks != count:
            return super().row_blocks(original, is_bias, rows)
        step = max(1, rows if rows is not None else FOLD_BLOCK // max(1, original[0].numel()))
        return [(s, min(s + step, c + per_chunk)) for c in range(0, count, per_chunk) for s in range(c, c + per_chunk, step)]

    def folded_rows(self, original: Tensor, is_bias: bool, start: int, stop: int) -> Tensor:
        """Eq. 20 for a block of `row_blocks`: the block's rows of S_right with its chunk's S_left."""
        if is_bias or (start, stop) == (0, original.shape[0]):
            return super().folded_rows(original, is_bias, start, stop)
        dtype = fold_dtype(original.dtype)
        scales = self._param("s_left", dtype), self._param("s_right", dtype)
        return self._fold_block(original, start, stop, *scales).to(original.dtype)

    def _fold_block(self, original: Tensor, start: int, stop: int, left: Tensor | None, right: Tensor | None, out: Tensor | None = None) -> Tensor:
        """W' of original[start:stop] from the whole S_left, S_right (in the compute dtype), into `out` if given."""
        if (start, stop) != (0, original.shape[0]):  # a block inside one chunk (`row_blocks`)
            per_row = self.out_features // original.shape[0]  # matrix rows per tensor row (a conv's k1···k(n-1))
            chunk = start * per_row // (self.out_features // self.chunks)
            left = None if left is None else left[chunk : chunk + 1]
            right = None if right is None else right[start * per_row : stop * per_row]
        return self.weight_from(original[start:stop].to(left.dtype if left is not None else right.dtype), left, right, self.scaling, out=out)

    @torch.no_grad()
    def fold_into(self, original: Tensor, is_bias: bool, rows: int | None = None) -> None:
        """`Adapter.fold_into`; a float32 (float64) weight's blocks are computed straight into it.

        Without `rows`, the paper form on CPU goes through the native loop (adapters/native.py),
        one pass over W instead of two ops per block; its multiply-add may round once where
        `addcmul` rounds twice (or the reverse), so it equals `folded` to an ulp, not bit for bit.
        """
        if is_bias or original.dtype != fold_dtype(original.dtype):
            return super().fold_into(original, is_bias, rows)
        from adapters.native import NATIVE  # reason: adapters.native builds on this module

        if rows is None and NATIVE.fold_into(self, original):  # the whole matrix in one pass where the loop applies
            return
        scales = self._param("s_left", original.dtype), self._param("s_right", original.dtype)
        for start, stop in self.row_blocks(original, is_bias, rows):
            self._fold_block(original, start, stop, *scales, out=original[start:stop])

    @torch.no_grad()
    def fold_is_finite(self, original: Tensor, is_bias: bool, rows: int | None = None) -> bool:
        """`Adapter.fold_is_finite`, most often from one read of W: the formula evaluated on magnitudes.

        Each W' entry is a sum of products of entries of W, S_right and S_left with coefficients
        +1, so `weight_from` on max |W| and each rank's max |S| bounds every |W'| and |M|. Below
        half the largest finite value (compute and storage dtype) the fold is finite; otherwise
        (or with NaN/Inf anywhere) the blocks are computed and looked at.
        """
        if not is_bias and original.numel():
            lo, hi = torch.aminmax(original)  # NaN and Inf propagate
            w_max = torch.maximum(-lo, hi).to(torch.float64).reshape(1, 1)
            left, right = self._param("s_left", torch.float64), self._param("s_right", torch.float64)
            left = None if left is None else left.abs().amax(dim=(0, 2)).reshape(1, -1, 1)  # (1, r, 1): each rank's max
            right = None if right is None else right.abs().amax(dim=0).reshape(1, -1)  # (1, r)
            m_max = scale_matrix(left, right, 1, 1).reshape(())
            bound = LinearRescale.weight_from(w_max, left, right, self.scaling).reshape(())
            limit = min(torch.finfo(original.dtype).max, torch.finfo(fold_dtype(original.dtype)).max) / 2
            if bool(torch.isfinite(bound)) and max(bound.item(), m_max.item()) < limit:
                return True
        return super().fold_is_finite(original, is_bias, rows)

    def extra_repr(self) -> str:
        sides = self.scaling.sides + ("" if self.scaling.residual else ", no residual") + (", w/o W" if self.scaling.lowrank else "")
        return f"matrix=({self.out_features}, {self.in_features}), rank={self.rank}, chunks={self.chunks}, scaling={sides}, shift={self.adapts_bias}"


__all__ = ["LinearRescale", "rescale", "rescale_vjp", "scale_matrix", "scale_matrix_vjp"]
