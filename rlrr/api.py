"""The public entry points: `plan` (dry run) and `apply` (adapt in place)."""

from __future__ import annotations

import fnmatch
import logging
import warnings
from collections.abc import Iterable
from dataclasses import replace

from torch import nn
from torch.nn.utils import parametrize

from rlrr.config import RLRRConfig
from rlrr.errors import AlreadyAdaptedError, ConfigError, InvalidRankError, NoMatchingTargetsError, TraceError
from rlrr.inject import adapters_of, attach
from rlrr.sites import BIAS_ABSENT, Plan, Site, Skipped, effective_chunks, rescale_class
from rlrr.targets import Targets, select
from rlrr.trace import discover

logger = logging.getLogger("rlrr")


def _count(params: Iterable[nn.Parameter]) -> int:
    return sum(p.numel() for p in {id(p): p for p in params}.values())


def resolve_trainable(model: nn.Module, trainable: str | Iterable[str]) -> list[str]:
    """Module names (exact or fnmatch globs) to train in full, e.g. the classifier head."""
    names = [trainable] if isinstance(trainable, str) else list(trainable)
    modules = dict(model.named_modules())
    resolved: list[str] = []
    for name in names:
        hits = [n for n in modules if n and (n == name or fnmatch.fnmatchcase(n, name))]
        if not hits:
            children = ", ".join(n for n, _ in model.named_children())
            raise ConfigError(f"trainable module {name!r} not found; the model's top-level modules are: {children}")
        resolved += [h for h in hits if not any(h == r or h.startswith(r + ".") for r in resolved)]
    return resolved


def _under(path: str, roots: list[str]) -> bool:
    return any(path == r or path.startswith(r + ".") for r in roots)


def _with_ssf(candidates: list[Site], selected: list[Site], ssf_sites: list[Site]) -> list[Site]:
    """Selected sites plus the SSF ones (which take precedence), in discovery order."""
    no_bias = [s.name for s in ssf_sites if s.bias_state == BIAS_ABSENT]
    if no_bias:
        raise ConfigError(f"SSF shifts the layer's bias, and these sites have none that can be added: {no_bias[:5]}")
    by_name = {s.name: s for s in selected} | {s.name: replace(s, method="ssf") for s in ssf_sites}
    return [by_name[s.name] for s in candidates if s.name in by_name]


def make_plan(model: nn.Module, targets: Targets, config: RLRRConfig, trainable: str | Iterable[str] = (), ssf: Targets = None) -> Plan:
    """Everything `apply` decides, computed without touching the model."""
    if adapters_of(model):
        raise AlreadyAdaptedError(f"{type(model).__name__} already carries RLRR adapters; fold it (export.fold) or build a fresh model first")
    if getattr(model.__dict__.get("_rlrr_adapter_bank"), "sets", None):
        raise AlreadyAdaptedError(f"{type(model).__name__} holds named adapters (all inactive): add more with rlrr.add_adapter")
    found = discover(model)
    if not found.sites:
        why = "; ".join(f"{n or '<model>'}: {w}" for n, w in found.not_analysed) or "it has no linear, conv or LayerNorm layer"
        raise TraceError(f"found nothing to adapt in {type(model).__name__}: {why}")
    trained = resolve_trainable(model, trainable)
    foreign = [s for s in found.sites if parametrize.is_parametrized(model.get_submodule(s.module), s.weight)]
    candidates = [s for s in found.sites if not _under(s.module, trained) and s not in foreign]
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


def plan(
    model: nn.Module,
    targets: Targets = None,
    *,
    rank: int = 1,
    scaling: str = "both",
    residual: bool = True,
    lowrank: bool = False,
    init: str = "paper",
    fused_chunks: bool = True,
    shift: bool = True,
    trainable: str | Iterable[str] = (),
    ssf: Targets = None,
) -> Plan:
    """The dry run of `apply`: the sites it would adapt and the ops it would skip. Changes nothing."""
    config = RLRRConfig(rank, scaling, residual, lowrank, init, fused_chunks, shift)
    return make_plan(model, targets, config, trainable, ssf)


def apply(
    model: nn.Module,
    targets: Targets = None,
    *,
    rank: int = 1,
    scaling: str = "both",
    residual: bool = True,
    lowrank: bool = False,
    init: str = "paper",
    fused_chunks: bool = True,
    shift: bool = True,
    trainable: str | Iterable[str] = (),
    ssf: Targets = None,
) -> nn.Module:
    """Rewrite every selected linear, conv and LayerNorm of `model` into RLRR form, in place.

    Freezes every base parameter; adapter parameters and the `trainable` modules (the paper
    trains the classifier head) require grad. Returns the same model object. The options are
    `RLRRConfig`'s fields; `targets` is described in `rlrr.targets`. Linear/conv sites chosen by
    `ssf` (same forms as `targets`) get an SSF scale and shift of their output channels instead
    of RLRR, as the official code does after the patch embedding. On any error the model is left
    as it was.
    """
    config = RLRRConfig(rank, scaling, residual, lowrank, init, fused_chunks, shift)
    return apply_plan(model, make_plan(model, targets, config, trainable, ssf))


def apply_plan(model: nn.Module, the_plan: Plan) -> nn.Module:
    """Carry out a plan made by `plan`/`make_plan` on the same model."""
    if the_plan.not_analysed:
        parts = ", ".join(n or "<model>" for n, _ in the_plan.not_analysed[:5])
        warnings.warn(f"rlrr: fx could not trace {len(the_plan.not_analysed)} part(s) of {type(model).__name__} ({parts}); their layers were found by type", stacklevel=3)
    attach(model, the_plan.sites, the_plan.config, the_plan.trainable)
    logger.info("RLRR applied to %s:\n%s", type(model).__name__, the_plan.table())
    return model
