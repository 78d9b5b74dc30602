"""Which sites `apply` adapts: layer kinds, globs, regexes, predicates, or a list of these.

- `None`: every site found;
- `"linear"`, `"conv"`, `"norm"`: every site of that kind;
- a string starting with `"re:"` or a compiled `re.Pattern`: regex, full match on the site name;
- any other string: an fnmatch glob on the site name (`"blocks.*.attn.qkv"`, `"*fc1"`);
- a callable `(module, name) -> bool`, given the module that owns the weight and the site name;
- a list or tuple of these: their union.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
import warnings
from collections.abc import Callable, Iterable
from typing import Union

from torch import nn

from rlrr.config import KINDS
from rlrr.errors import ConfigError, NoMatchingTargetsError, UnknownTargetKindError
from rlrr.sites import Site

Target = Union[str, "re.Pattern[str]", Callable[[nn.Module, str], bool]]
Trainable = Union[str, Iterable[str]]
Targets = Union[None, Target, Iterable[Target]]
_GLOB_CHARS = set("*?[")


def _matcher(target: Target, model: nn.Module) -> Callable[[Site], bool]:
    if isinstance(target, re.Pattern):
        return lambda s: target.fullmatch(s.name) is not None
    if callable(target):
        return lambda s: _ask(target, model.get_submodule(s.module), s.name)
    if not isinstance(target, str):
        raise UnknownTargetKindError(f"a target must be a kind {KINDS}, a glob, 're:<regex>', a compiled regex or a callable; got {type(target).__name__}")
    if target in KINDS:
        return lambda s: s.kind == target
    if target.startswith("re:"):
        try:
            pattern = re.compile(target[3:])
        except re.error as e:
            raise UnknownTargetKindError(f"target {target!r} is not a valid regex: {e}") from e
        return lambda s: pattern.fullmatch(s.name) is not None
    return lambda s: fnmatch.fnmatchcase(s.name, target)


def _ask(predicate: Callable[[nn.Module, str], bool], module: nn.Module, name: str) -> bool:
    """A user's predicate on one site; whatever it raises becomes our error, naming the site."""
    try:
        return bool(predicate(module, name))
    except Exception as e:
        raise UnknownTargetKindError(f"target predicate {getattr(predicate, '__name__', predicate)!r} raised on site {name!r}: "
                                     f"{type(e).__name__}: {e}") from e


def _looks_like_kind(target: Target) -> bool:
    return isinstance(target, str) and not (_GLOB_CHARS & set(target)) and "." not in target and not target.startswith("re:")


def select(sites: list[Site], targets: Targets, model: nn.Module) -> list[Site]:
    """The sites the targets choose, in discovery order; raises when they choose nothing."""
    if targets is None:
        return list(sites)
    if isinstance(targets, (str, re.Pattern)) or callable(targets):
        items = [targets]
    elif isinstance(targets, Iterable):
        items = list(targets)
    else:
        raise UnknownTargetKindError(f"a target must be None, a kind {KINDS}, a glob, 're:<regex>', a compiled regex, a callable or a list of these; got {type(targets).__name__}")
    if not items:
        raise NoMatchingTargetsError("targets is an empty list: nothing to adapt (use None for every site)")
    chosen: set[str] = set()
    for item in items:
        match = _matcher(item, model)
        hits = {s.name for s in sites if match(s)}
        if not hits:
            _explain_miss(item, sites, len(items) == 1)
        chosen |= hits
    if not chosen:
        raise NoMatchingTargetsError(f"targets {items!r} match no site. {_inventory(sites)}")
    return [s for s in sites if s.name in chosen]


def _explain_miss(item: Target, sites: list[Site], only: bool) -> None:
    if item in KINDS:
        raise NoMatchingTargetsError(f"target {item!r} matches no site: the model has no {item} site left to adapt. {_inventory(sites)}")
    if _looks_like_kind(item) and not any(s.name == item or s.name.endswith("." + item) for s in sites):
        close = difflib.get_close_matches(item, KINDS, n=1)
        if close:
            raise UnknownTargetKindError(f"unknown target kind {item!r}: did you mean {close[0]!r}? Kinds are {KINDS}")
    if only:
        raise NoMatchingTargetsError(f"target {item!r} matches no site. {_inventory(sites)}")
    warnings.warn(f"rlrr: target {item!r} matches no site", stacklevel=4)


def _inventory(sites: list[Site]) -> str:
    if not sites:
        return "The model has no adaptable site."
    kinds = {k: sum(s.kind == k for s in sites) for k in KINDS}
    examples = ", ".join(s.name for s in sites[:6])
    return f"Found {len(sites)} sites ({', '.join(f'{k} {n}' for k, n in kinds.items())}), e.g. {examples}. Globs match the whole name: try '*{sites[0].name.rsplit('.', 1)[-1]}'."


def resolve_trainable(model: nn.Module, trainable: Trainable) -> list[str]:
    """Module names (exact or fnmatch globs) to train in full, e.g. the classifier head."""
    names = [trainable] if isinstance(trainable, str) else list(trainable) if isinstance(trainable, Iterable) else None
    if names is None or not all(isinstance(n, str) and n for n in names):
        raise ConfigError(f"trainable takes module names or globs (a string or a list of strings), got {trainable!r}")
    modules = dict(model.named_modules())
    resolved: list[str] = []
    for name in names:
        hits = [n for n in modules if n and (n == name or fnmatch.fnmatchcase(n, name))]
        if not hits:
            children = ", ".join(n for n, _ in model.named_children())
            raise ConfigError(f"trainable module {name!r} not found; the model's top-level modules are: {children}")
        resolved += [h for h in hits if not any(h == r or h.startswith(r + ".") for r in resolved)]
    return resolved


def declared_classifier(model: nn.Module) -> str | None:
    """The classifier head a model declares itself (timm's `pretrained_cfg["classifier"]`), if it holds parameters."""
    cfg = getattr(model, "pretrained_cfg", None)
    named = cfg.get("classifier") if isinstance(cfg, dict) else None
    if not isinstance(named, str):
        return None
    modules = dict(model.named_modules())
    return named if named in modules and any(True for _ in modules[named].parameters()) else None
