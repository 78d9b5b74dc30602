"""What every RLRR adapter shares: the parametrization protocol and the bias view.

An adapter is registered with `torch.nn.utils.parametrize` on the weight a layer reads, so the
layer's own forward sees the adapted weight and its class is untouched (design.md §3). The same
adapter also computes the adapted bias; `BiasOf` is the parametrization registered on the bias
that defers to it, so every adapter parameter lives in exactly one module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

#: Every parameter an adapter owns starts with this, so "adapter only" is a one-line filter.
ADAPTER_PREFIX = "rlrr_"

#: How adapters start: "paper" (the official kaiming-uniform scales, Table 10) or "identity" (ΔW = 0).
INITS = ("paper", "identity")
SIDES = ("both", "left", "right")


@dataclass(frozen=True)
class Scaling:
    """How the weight is rescaled (the paper's ablations, Tables 6 and 11); checks itself on creation."""

    sides: str = "both"  # "both", "left" (input side only) or "right" (output side only)
    residual: bool = True  # keep the frozen W as a residual term (Eq. 16) or replace it
    lowrank: bool = False  # "w/o W" (Table 11): W' = W + S_right @ S_left, a LoRA-like baseline

    def __post_init__(self) -> None:
        if self.sides not in SIDES:
            raise ValueError(f"scaling must be 'both', 'left' or 'right', got {self.sides!r}")
        if self.lowrank and (self.sides != "both" or not self.residual):
            raise ValueError("lowrank ('w/o W', Table 11) adds S_right @ S_left to W: it needs scaling='both' and residual=True")

    def check_rank(self, rank: int) -> None:
        """One-sided scaling is a single vector (Table 6): it needs rank 1."""
        if self.sides != "both" and rank != 1:
            raise ValueError(f"one-sided scaling ({self.sides!r}) is a single vector: rank must be 1, got {rank}")

    def default_init(self) -> str:
        """The init a variant starts from when none is given: the paper's for the paper's method.

        The paper does not say how its ablations were initialised; with the paper's kaiming start,
        "w/o W" and right-only scaling begin far from the base model (‖ΔW‖/‖W‖ ≈ 3.7 on a ViT-B fc1
        for "w/o W"), so those two start at ΔW = 0.
        """
        return "identity" if self.lowrank or self.sides == "right" else "paper"


#: Elements in one block of an in-place fold: its temporaries (W, M, W' rows in float32) stay in cache.
FOLD_BLOCK = 1 << 20


def fold_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a fold computes in: float32, or float64 for float64 tensors (design.md §2)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_init(init: str) -> None:
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")


def _tracing() -> bool:
    """Whether a compiler or the TorchScript tracer is running: a cached tensor would become a constant.

    fx's symbolic tracing needs no check: its tensors are proxies, which `_stamp` refuses.
    """
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def _stamp(t: Tensor) -> tuple | None:
    """What identifies a tensor's current value, or None for one that cannot be tracked."""
    if type(t) not in (Tensor, nn.Parameter) or t.is_inference():
        return None  # a fake/functional tensor under export, or an inference tensor without a version
    return (t.data_ptr(), t._version, t.dtype, t.device, t.shape)


class Adapter(nn.Module):
    """Base class: computes a site's adapted weight and bias from the frozen originals.

    In eval mode with grad disabled (nothing trains) the adapted tensors are cached, so an
    unmerged model runs at the base model's cost. An entry is served only while the input, every
    adapter parameter and the cached tensor itself keep their storage and version counter (any
    in-place update bumps it); `train()`, `.to()` and any call with grad enabled drop the cache.
    In-place writes through `.data` bypass version counters, as they do for autograd: don't.
    """

    kind: ClassVar[str] = ""  # "linear", "conv", "norm" or "ssf"
    #: Where this adapter sits and with which options: an `rlrr.Site` and `rlrr.RLRRConfig`, given
    #: by whoever places the adapter (this package knows nothing about models).
    site: Any = None
    config: Any = None

    def __init__(self) -> None:
        super().__init__()
        self._cache: dict[str, tuple[tuple, Tensor, int]] = {}  # slot -> (stamps, value, value's version)

    def effective_weight(self, weight: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        raise NotImplementedError

    def effective_bias(self, bias: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        raise NotImplementedError

    @property
    def adapts_bias(self) -> bool:
        """Whether this adapter changes the bias (a shift, or a norm's scale)."""
        raise NotImplementedError

    @torch.no_grad()
    def folded(self, original: Tensor, is_bias: bool) -> Tensor:
        """Eq. 20 for one tensor: the adapted value computed in float32 (float64 stays) and cast back.

        Forward and fold evaluate the same `effective_*` function, so a fold is exact up to the cast.
        """
        dtype = fold_dtype(original.dtype)
        value = self.effective_bias(original, dtype) if is_bias else self.effective_weight(original, dtype)
        return value.to(original.dtype)

    def row_blocks(self, original: Tensor, is_bias: bool, rows: int | None = None) -> list[tuple[int, int]]:
        """Ranges [start, stop) along dim 0 of `original` whose folds are independent of each other.

        `rows` caps a block's rows (None: about FOLD_BLOCK elements). Here one block, the whole
        tensor: a norm's or a channel scale's tensors are small. Rescaled matrices split.
        """
        return [(0, original.shape[0])] if original.dim() else [(0, 1)]

    def folded_rows(self, original: Tensor, is_bias: bool, start: int, stop: int) -> Tensor:
        """`folded` for the rows [start, stop) of `original` only (one of `row_blocks`)."""
        value = self.folded(original, is_bias)
        return value[start:stop] if value.dim() else value

    @torch.no_grad()
    def fold_is_finite(self, original: Tensor, is_bias: bool, rows: int | None = None) -> bool:
        """Whether `folded` would be finite everywhere, computed block by block (memory: one block)."""
        for start, stop in self.row_blocks(original, is_bias, rows):
            value = self.folded_rows(original, is_bias, start, stop)
            if value.numel() and not torch.isfinite(torch.stack(torch.aminmax(value))).all():  # NaN propagates
                return False
        return True

    @torch.no_grad()
    def fold_into(self, original: Tensor, is_bias: bool, rows: int | None = None) -> None:
        """Write `folded` into `original` in place, block by block: no second full-size tensor.

        A block's value depends only on its own rows of `original`, so writing it cannot change
        a block still to come.
        """
        for start, stop in self.row_blocks(original, is_bias, rows):
            value = self.folded_rows(original, is_bias, start, stop)
            (original[start:stop] if original.dim() else original).copy_(value)

    def forward(self, weight: Tensor) -> Tensor:
        return self.cached("weight", weight, self.effective_weight)

    def cached(self, slot: str, original: Tensor, compute: Callable[[Tensor], Tensor]) -> Tensor:
        """`compute(original)`, served from the cache when nothing trains and nothing changed."""
        if self.training or torch.is_grad_enabled() or _tracing():
            self.clear_cache()
            return compute(original)
        stamps = tuple(_stamp(t) for t in (original, *self.parameters(recurse=False)))
        if None in stamps:
            return compute(original)
        hit = self._cache.get(slot)
        if hit is not None and hit[0] == stamps and hit[1]._version == hit[2]:
            return hit[1]
        with torch.inference_mode(False), torch.no_grad():  # a normal tensor, whose version can be watched
            value = compute(original)
        self._cache[slot] = (stamps, value, value._version)
        return value

    def clear_cache(self) -> None:
        self._cache.clear()

    def train(self, mode: bool = True) -> "Adapter":
        self.clear_cache()
        return super().train(mode)

    def _apply(self, fn, recurse=True):  # .to(), .half(), .cuda(): the cached tensors would be stale
        self.clear_cache()
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict:  # deepcopy and pickling never carry cached tensors
        return {**super().__getstate__(), "_cache": {}}

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
        return self.adapter.cached("bias", bias, self.adapter.effective_bias)


def adapter_parameters(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The (name, parameter) pairs of a module that belong to adapters."""
    return [(n, p) for n, p in module.named_parameters() if n.rsplit(".", 1)[-1].startswith(ADAPTER_PREFIX)]
