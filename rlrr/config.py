"""RLRRConfig: every switch of the method in one dataclass, validated once."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from adapters import Scaling
from rlrr.errors import ConfigError, InvalidRankError

KINDS = ("linear", "conv", "norm")


@dataclass(frozen=True)
class RLRRConfig:
    """How `apply` adapts each site. Defaults are the paper's method (Eq. 16, Table 10 init)."""

    rank: int = 1  # App. F: rank of S_right @ S_left; 1 is Eq. 16
    scaling: str = "both"  # Table 6: "both" sides, "left" (input) or "right" (output) only
    residual: bool = True  # Table 6: keep W as the residual term; False gives s_l ⊙ W ⊙ s_r
    lowrank: bool = False  # Table 11 "w/o W": W + S_right @ S_left instead of a rescale of W
    init: str = "paper"  # "paper": official kaiming-uniform scales; "identity": output = base model
    fused_chunks: bool = True  # one S_left per q/k/v chunk of a fused projection, as separate q, k, v
    shift: bool = True  # the bias shift f (bias-free convs get none, as App. G's Table 12 counts)

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise InvalidRankError(f"rank must be an integer >= 1, got {self.rank!r}")
        if self.scaling not in ("both", "left", "right"):
            raise ConfigError(f"scaling must be 'both', 'left' or 'right', got {self.scaling!r}")
        if self.scaling != "both" and self.rank != 1:
            raise InvalidRankError(f"one-sided scaling ({self.scaling!r}) is a single vector: rank must be 1, got {self.rank}")
        if self.lowrank and (self.scaling != "both" or not self.residual):
            raise ConfigError("lowrank ('w/o W', Table 11) adds S_right @ S_left to W: it needs scaling='both' and residual=True")
        if self.init not in ("paper", "identity"):
            raise ConfigError(f"init must be 'paper' or 'identity', got {self.init!r}")

    @property
    def weight_scaling(self) -> Scaling:
        return Scaling(sides=self.scaling, residual=self.residual, lowrank=self.lowrank)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "RLRRConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown RLRR options {unknown}; known: {sorted(known)}")
        return cls(**data)
