"""The public entry points: `plan` (dry run) and `apply` (adapt in place)."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

from torch import nn

from rlrr.bank import forget_bank, holds_named_adapters
from rlrr.chunks import Chunks
from rlrr.config import RLRRConfig
from rlrr.errors import AlreadyAdaptedError, ConfigError, InvalidRankError, NoMatchingTargetsError, TraceError
from rlrr.inject import attach
from rlrr.rewrite import AdaptedTensor, adapters_of, is_rewritten, remove
from rlrr.sites import BIAS_ABSENT, Plan, Site, Skipped, effective_chunks, rescale_class
from rlrr.targets import Targets, resolve_trainable, select
from rlrr.trace import discover

logger = logging.getLogger("rlrr")


def _count(params: Iterable[nn.Parameter]) -> int:
    return sum(p.numel() for p in {id(p): p for p in params}.values())


def _under(path: str, roots: list[str]) -> bool:
    return any(path == r or path.startswith(r + ".") for r in roots)


def _with_ssf(candidates: list[Site], selected: list[Site], ssf_sites: list[Site]) -> list[Site]:
    """Selected sites plus the SSF ones (which take precedence), in discovery order."""
    no_bias = [s.name for s in ssf_sites if s.bias_state == BIAS_ABSENT]
    if no_bias:
        raise ConfigError(f"SSF shifts the layer's bias, and these sites have none that can be added: {no_bias[:5]}")
    by_name = {s.name: s for s in selected} | {s.name: replace(s, method="ssf") for s in ssf_sites}
    return [by_name[s.name] for s in candidates if s.name in by_name]


def make_plan(model: nn.Module, targets: Targets, config: RLRRConfig, trainable: str | Iterable[str] = (), ssf: Targets = None,
              chunks: Chunks = None) -> Plan:
    """Everything `apply` decides, computed without touching the model (named adapters aside)."""
    if adapters_of(model):
        raise AlreadyAdaptedError(f"{type(model).__name__} already carries RLRR adapters; fold it (export.fold) or build a fresh model first")
    found = discover(model, chunks)
    if not found.sites:
        why = "; ".join(f"{n or '<model>'}: {w}" for n, w in found.not_analysed) or "it has no linear, conv or LayerNorm layer"
        raise TraceError(f"found nothing to adapt in {type(model).__name__}: {why}")
    trained = resolve_trainable(model, trainable)
    foreign = [s for s in found.sites if is_rewritten(model.get_submodule(s.module), s.weight)]
    candidates = [s for s in found.sites if not _under(s.module, trained) and s not in foreign]
    if not candidates:
        raise NoMatchingTargetsError(f"nothing left to adapt in {type(model).__name__}: every site is inside a module trained in full "
                                     f"({', '.join(trained) or 'none'}) or already carries another parametrization")
    try:
        selected = select(candidates, targets, model)
    except NoMatchingTargetsError as e:
        if trained:
            raise NoMatchingTargetsError(f"{e} (modules trained in full are never adapted: {', '.join(trained)})") from None
        raise
    if ssf is not None:
        selected = _with_ssf(candidates, selected, select([s for s in candidates if s.kind != "norm"], ssf, model))
    chosen = {s.name for s in selected}
    too_small = [(s, rescale_class(s.kind).max_rank(s.shape, effective_chunks(s, config))) for s in selected if s.kind != "norm" and s.method == "rlrr"]
    too_small = [(s, r) for s, r in too_small if config.rank > r]
    if too_small:
        listed = ", ".join(f"{s.name} (shape {s.shape}, at most {r})" for s, r in too_small[:5])
        raise InvalidRankError(f"rank {config.rank} exceeds what {len(too_small)} site(s) allow: {listed}. Lower the rank or exclude them from targets")
    skipped = list(found.skipped)
    skipped += [Skipped(s.name, s.op, "its weight already has another parametrization") for s in foreign]
    skipped += [Skipped(s.name, s.op, "trained in full (trainable)") for s in found.sites if _under(s.module, trained)]
    skipped += [Skipped(s.name, s.op, "not in targets") for s in candidates if s.name not in chosen]
    trained_params = _count(p for t in trained for p in model.get_submodule(t).parameters())
    return Plan(config, selected, skipped, list(found.not_analysed), trained, _count(model.parameters()), trained_params)


def _refuse_named(model: nn.Module) -> None:
    if holds_named_adapters(model):
        raise AlreadyAdaptedError(f"{type(model).__name__} holds named adapters (all inactive): add more with rlrr.add_adapter")


def plan(model: nn.Module, targets: Targets = None, *, config: RLRRConfig | None = None, trainable: str | Iterable[str] = (),
         ssf: Targets = None, chunks: Chunks = None, **options) -> Plan:
    """The dry run of `apply`: the sites it would adapt and the ops it would skip. Changes nothing."""
    _refuse_named(model)
    return make_plan(model, targets, RLRRConfig.resolve(config, options), trainable, ssf, chunks)


def apply(model: nn.Module, targets: Targets = None, *, config: RLRRConfig | None = None, trainable: str | Iterable[str] = (),
          ssf: Targets = None, chunks: Chunks = None, **options) -> nn.Module:
    """Rewrite every selected linear, conv and LayerNorm of `model` into RLRR form, in place.

    `config` says how (an `RLRRConfig`; its fields may instead be given as keyword options,
    `rlrr.apply(model, rank=4)`, never both). `targets` says where (`rlrr.targets`). Freezes every
    base parameter; adapter parameters and the `trainable` modules (the paper trains the
    classifier head) require grad. Linear/conv sites chosen by `ssf` (same forms as `targets`)
    get an SSF scale and shift of their output channels instead of RLRR, as the official code
    does after the patch embedding. `chunks` ({glob on site name: count}) says how many
    projections a fused layer holds where the graph shows otherwise. Returns the same model
    object; on any error the model is left as it was.
    """
    _refuse_named(model)
    return apply_plan(model, make_plan(model, targets, RLRRConfig.resolve(config, options), trainable, ssf, chunks))


def apply_plan(model: nn.Module, the_plan: Plan) -> nn.Module:
    """Carry out a plan made by `rlrr.plan` on the same, still unchanged model (the dry run, then the run)."""
    if not isinstance(the_plan, Plan):
        raise ConfigError(f"apply_plan takes the Plan that rlrr.plan returned, got {type(the_plan).__name__}")
    if adapters_of(model):
        raise AlreadyAdaptedError(f"{type(model).__name__} already carries RLRR adapters: a plan applies to the unchanged model it was made for")
    if the_plan.not_analysed:
        parts = ", ".join(n or "<model>" for n, _ in the_plan.not_analysed[:5])
        warnings.warn(f"rlrr: fx could not trace {len(the_plan.not_analysed)} part(s) of {type(model).__name__} ({parts}); their layers were found by type", stacklevel=3)
    attach(model, the_plan.sites, the_plan.config, the_plan.trainable)
    logger.info("RLRR applied to %s:\n%s", type(model).__name__, the_plan.table())
    return model


@dataclass
class Removed:
    """What `remove_rewrite` took out of a model."""

    created: list[str] = field(default_factory=list)  # tensors `apply` created, kept as parameters by a fold
    live: tuple[str, ...] = ()  # the named adapters that were live
    dropped: list[str] = field(default_factory=list)  # named adapters that were waiting, now forgotten


def remove_rewrite(model: nn.Module, write: Callable[[AdaptedTensor], None] | None = None) -> Removed:
    """Take RLRR out of `model` for good, in place: the inverse of `apply`; named adapters are forgotten.

    With `write` (what `export.fold` passes), `write(t)` first writes each adapted tensor's new
    value into `t.original` in place (see `adapted_tensors`), and tensors `apply` created stay as
    frozen parameters. Without it the model computes its base function again, as before `apply`.
    """
    created = remove(model, write)
    bank = forget_bank(model)
    if bank is None:
        return Removed(created)
    return Removed(created, bank.active, [n for n in bank.sets if n not in bank.active])
