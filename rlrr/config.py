"""RLRRConfig: every switch of the method in one dataclass, validated once, here."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from adapters import INITS, Scaling
from rlrr.errors import ConfigError, InvalidRankError

KINDS = ("linear", "conv", "norm")


@dataclass(frozen=True, kw_only=True)
class RLRRConfig:
    """How `apply` adapts each site. Defaults are the paper's method (Eq. 16, Table 10 init)."""

    rank: int = 1  # App. F: rank of S_right @ S_left; 1 is Eq. 16
    scaling: str = "both"  # Table 6: "both" sides, "left" (input) or "right" (output) only
    residual: bool = True  # Table 6: keep W as the residual term; False gives s_l ⊙ W ⊙ s_r
    lowrank: bool = False  # Table 11 "w/o W": W + S_right @ S_left instead of a rescale of W
    init: str | None = None  # "paper" (kaiming-uniform scales), "identity" (ΔW = 0); None: the variant's default
    fused_chunks: bool = True  # one S_left per q/k/v chunk of a fused projection, as separate q, k, v
    shift: bool = True  # the bias shift f (bias-free convs get none, as App. G's Table 12 counts)

    def __post_init__(self) -> None:
        if type(self.rank) is not int or self.rank < 1:
            raise InvalidRankError(f"rank must be an integer >= 1, got {self.rank!r}")
        for name in ("residual", "lowrank", "fused_chunks", "shift"):
            value = getattr(self, name)
            if type(value) is not bool:
                raise ConfigError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
        try:
            scaling = Scaling(sides=self.scaling, residual=self.residual, lowrank=self.lowrank)
            scaling.check_rank(self.rank)
        except ValueError as e:
            raise (InvalidRankError if "rank" in str(e) else ConfigError)(str(e)) from None
        if self.init is None:
            object.__setattr__(self, "init", scaling.default_init())  # the resolved init is what files record
        elif self.init not in INITS:
            raise ConfigError(f"init must be one of {INITS} or None (the variant's default), got {self.init!r}")

    @property
    def weight_scaling(self) -> Scaling:
        return Scaling(sides=self.scaling, residual=self.residual, lowrank=self.lowrank)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> RLRRConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown RLRR options {unknown}; known: {sorted(known)}")
        return cls(**data)

    @classmethod
    def resolve(cls, config: RLRRConfig | None, options: dict) -> RLRRConfig:
        """`config` as given, or one made from keyword options (the shorthand); never both."""
        if config is not None:
            if not isinstance(config, RLRRConfig):
                raise ConfigError(f"config must be an RLRRConfig, got {type(config).__name__}")
            if options:
                raise ConfigError(f"option {sorted(options)[0]!r} given beside config=: set it in the RLRRConfig instead "
                                  f"(dataclasses.replace(config, {sorted(options)[0]}=...))")
            return config
        return cls.from_dict(options)
