"""Sites (the weights RLRR can adapt), skipped ops, and the plan table `apply` reports."""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields

from adapters import ChannelScaleShift, ConvRescale, LinearRescale, NormScaleShift
from rlrr.config import RLRRConfig
from rlrr.errors import ConfigError

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
    chunks_from: str = ""  # how `chunks` was decided: "graph", "module type", "name", "user" ("" for 1, nothing seen)
    bias_note: str = ""  # why a site without a bias cannot get one (BIAS_ABSENT)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: object) -> Site:
        """A site from its stored form, every field type- and value-checked (files are untrusted)."""
        if not isinstance(data, dict):
            raise ConfigError(f"a site must be a JSON object, got {type(data).__name__}")
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(map(str, data)) - set(known))
        missing = sorted(n for n, f in known.items() if f.default is MISSING and n not in data)
        if unknown or missing:
            raise ConfigError(f"site {data.get('name')!r}: unknown fields {unknown}, missing fields {missing}")
        values = {**data, "shape": tuple(data["shape"]) if isinstance(data["shape"], list) else data["shape"]}
        for name, kinds in _FIELD_TYPES.items():
            if name in values and not isinstance(values[name], kinds) or isinstance(values.get(name), bool) and bool not in kinds:
                raise ConfigError(f"site {data.get('name')!r}: {name} has type {type(values[name]).__name__}")
        site = cls(**values)
        problems = [what for what, bad in (
            (f"kind {site.kind!r}", site.kind not in ("linear", "conv", "norm")),
            (f"method {site.method!r}", site.method not in ("rlrr", "ssf") or site.method == "ssf" and site.kind == "norm"),
            (f"bias_state {site.bias_state!r}", site.bias_state not in (BIAS_PRESENT, BIAS_CREATABLE, BIAS_ABSENT)),
            (f"shape {site.shape} for a {site.kind}", any(type(n) is not int or n < 1 for n in site.shape)
             or not {"linear": 2 <= len(site.shape) <= 2, "conv": 3 <= len(site.shape) <= 5}.get(site.kind, 1 <= len(site.shape) <= 5)),
            (f"chunks {site.chunks}", site.chunks < 1 or site.kind != "linear" and site.chunks != 1),
            ("an empty name", not site.name or "\0" in site.name),
        ) if bad]
        if problems:
            raise ConfigError(f"site {site.name!r} is not a valid site: {', '.join(problems)}")
        return site


_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "name": (str,), "kind": (str,), "module": (str,), "weight": (str,), "bias": (str, type(None)), "bias_state": (str,),
    "shape": (tuple,), "op": (str,), "chunks": (int,), "found_by": (str,), "weight_missing": (bool,), "method": (str,),
    "chunks_from": (str,), "bias_note": (str,),
}


@dataclass(frozen=True)
class Skipped:
    """A parameter an op reads that will not be adapted, and why."""

    name: str
    op: str
    reason: str


def effective_chunks(site: Site, config: RLRRConfig) -> int:
    return site.chunks if config.fused_chunks else 1


def shift_rule(site: Site, config: RLRRConfig) -> tuple[bool, str]:
    """Whether a site gets its shift (f of Eq. 16, t of a norm or SSF), and if not, why.

    The rule, written once: a shift goes into the bias the op reads, or into one `apply` creates
    where the op's module has an empty bias slot; bias-free convs get none (the official ResNet
    code, Table 12's counts). The reason is "" when the user turned shifts off (`shift=False`).
    """
    if site.kind != "norm" and site.method == "rlrr" and not config.shift:
        return False, ""
    if site.bias_state == BIAS_PRESENT:
        return True, ""
    if site.kind == "conv" and site.method == "rlrr":
        return False, "bias-free conv (App. G: Table 12's budgets count no shift there)"
    if site.bias_state == BIAS_CREATABLE:
        return True, ""
    return False, site.bias_note or "its op reads no bias and its module has no bias slot"


def shifts(site: Site, config: RLRRConfig) -> bool:
    """Whether a site gets a shift (see `shift_rule`)."""
    return shift_rule(site, config)[0]


def rescale_class(kind: str) -> type[LinearRescale]:
    return ConvRescale if kind == "conv" else LinearRescale


def site_parameters(site: Site, config: RLRRConfig) -> int:
    """How many adapter parameters `apply` gives this site."""
    if site.kind == "norm":
        return NormScaleShift.count_parameters(site.shape, shift=shifts(site, config))
    if site.method == "ssf":
        return ChannelScaleShift.count_parameters(site.shape, shift=shifts(site, config))
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

    @property
    def dropped_shifts(self) -> list[tuple[str, str]]:
        """(site, why) for every selected site that gets no shift although shifts are on."""
        return [(s.name, why) for s in self.sites for gets, why in [shift_rule(s, self.config)] if not gets and why]

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
            chunks = effective_chunks(s, self.config)
            rows.append((s.name, s.kind if s.method == "rlrr" else f"{s.kind} (ssf)", s.op, "x".join(map(str, s.shape)),
                         f"{chunks} ({s.chunks_from})" if s.chunks_from and chunks > 1 else str(chunks), f"{site_parameters(s, self.config):,}"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        dropped = self.dropped_shifts
        if dropped:
            lines += ["", f"no shift ({len(dropped)} sites):"]
            for why in dict.fromkeys(w for _, w in dropped):
                names = [n for n, w in dropped if w == why]
                lines.append(f"  {why}: {', '.join(names[:4])}{f' and {len(names) - 4} more' if len(names) > 4 else ''}")
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
