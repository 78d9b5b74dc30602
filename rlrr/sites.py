"""Sites (the weights RLRR can adapt), skipped ops, and the plan table `apply` reports."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from adapters import ConvRescale, LinearRescale
from rlrr.config import RLRRConfig

# A site's bias: read by its op, absent but addable (a torch.nn layer's None bias), or absent.
BIAS_PRESENT, BIAS_CREATABLE, BIAS_ABSENT = "present", "creatable", "absent"


@dataclass(frozen=True)
class Site:
    """One weight an op reads, with where it lives and what the adapter needs to know."""

    name: str  # qualified name users target, e.g. "blocks.0.attn.qkv"
    kind: str  # "linear", "conv" or "norm"
    module: str  # qualified name of the module that owns the weight ("" for the root)
    weight: str  # attribute of that module: "weight", "in_proj_weight", ...
    bias: str | None  # attribute of the bias the same op reads (or could read), if any
    bias_state: str  # BIAS_PRESENT, BIAS_CREATABLE or BIAS_ABSENT
    shape: tuple[int, ...]  # the weight's shape
    op: str  # what reads it: "nn.Linear", "F.layer_norm", "nn.MultiheadAttention" ...
    chunks: int = 1  # output chunks of a fused projection (3 for qkv)
    found_by: str = "trace"  # "trace", or "type" inside a part fx could not trace
    weight_missing: bool = False  # a norm without affine parameters: γ = 1 is created
    method: str = "rlrr"  # "rlrr", or "ssf": a scale and shift of the layer's output channels

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Site":
        return cls(**{**data, "shape": tuple(data["shape"])})


@dataclass(frozen=True)
class Skipped:
    """A parameter an op reads that will not be adapted, and why."""

    name: str
    op: str
    reason: str


def effective_chunks(site: Site, config: RLRRConfig) -> int:
    return site.chunks if config.fused_chunks else 1


def shifts(site: Site, config: RLRRConfig) -> bool:
    """Whether a linear/conv site gets the bias shift f (Eq. 16).

    Bias-free convs get none (the official ResNet code, Table 12's counts); a bias-free torch.nn
    linear gets one, which becomes its bias at fold time.
    """
    if not config.shift or site.kind == "norm":
        return False
    if site.bias_state == BIAS_PRESENT:
        return True
    return site.bias_state == BIAS_CREATABLE and site.kind == "linear"


def rescale_class(kind: str) -> type[LinearRescale]:
    return ConvRescale if kind == "conv" else LinearRescale


def site_parameters(site: Site, config: RLRRConfig) -> int:
    """How many adapter parameters `apply` gives this site."""
    if site.kind == "norm":
        numel = 1
        for n in site.shape:
            numel *= n
        return 2 * numel
    if site.method == "ssf":
        return 2 * site.shape[0]
    return rescale_class(site.kind).count_parameters(
        site.shape, rank=config.rank, chunks=effective_chunks(site, config), scaling=config.weight_scaling, shift=shifts(site, config)
    )


@dataclass
class Plan:
    """What `apply` does (or did) to a model: the sites it adapts and what it leaves alone."""

    config: RLRRConfig
    sites: list[Site] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    not_analysed: list[tuple[str, str]] = field(default_factory=list)  # (module, why)
    trainable: list[str] = field(default_factory=list)  # modules trained in full (the head)
    base_parameters: int = 0
    trainable_parameters: int = 0  # in the `trainable` modules

    @property
    def adapter_parameters(self) -> int:
        return sum(site_parameters(s, self.config) for s in self.sites)

    def counts(self) -> dict[str, int]:
        """Sites per kind."""
        out = {"linear": 0, "conv": 0, "norm": 0}
        for s in self.sites:
            out[s.kind] += 1
        return out

    def table(self) -> str:
        """A readable table of sites, skipped ops and totals."""
        rows = [("site", "kind", "op", "shape", "chunks", "params")]
        for s in self.sites:
            rows.append((s.name, s.kind if s.method == "rlrr" else f"{s.kind} (ssf)", s.op, "x".join(map(str, s.shape)), str(effective_chunks(s, self.config)), f"{site_parameters(s, self.config):,}"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        if self.skipped:
            lines += ["", f"skipped ({len(self.skipped)}):"]
            lines += [f"  {k.name}  [{k.op}]  {k.reason}" for k in self.skipped]
        if self.not_analysed:
            lines += ["", "not analysed by fx (layers inside found by type only):"]
            lines += [f"  {name or '<model>'}: {why}" for name, why in self.not_analysed]
        c = self.counts()
        adapter = self.adapter_parameters
        lines += [
            "",
            f"sites: {len(self.sites)} (linear {c['linear']}, conv {c['conv']}, norm {c['norm']}); "
            f"rank {self.config.rank}, init {self.config.init}",
            f"adapter parameters: {adapter:,} ({100 * adapter / max(self.base_parameters, 1):.3f} % of {self.base_parameters:,} base)",
        ]
        if self.trainable:
            lines.append(f"trained in full: {', '.join(self.trainable)} ({self.trainable_parameters:,} parameters)")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()
