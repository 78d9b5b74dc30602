"""Several named adapters on one model: add, list, activate, disable, delete, combine (App. H).

The model carries one live adapter at a time (what `apply` builds, what trains and folds); the
others wait, detached, as `AdapterSet`s in a bank on the model. The adapter `apply` made is named
"default". Activating several at once makes the live adapter their sum (App. H, formula 2); train
one adapter at a time. `combine` stores a combination as a new named adapter, a plain RLRR
adapter that folds and exports like any other.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from adapters import combine_concat, combine_weighted
from rlrr.api import apply_plan, make_plan
from rlrr.bank import Bank, find_bank, set_bank
from rlrr.config import RLRRConfig
from rlrr.errors import AdapterMismatchError, ConfigError, UnknownAdapterError
from rlrr.inject import detach
from rlrr.rewrite import adapters_of
from rlrr.adapter_file import AdapterSet, read_adapter_file, write_adapter_file
from rlrr.state import adapter_state, allowed_modules, check_trained, install

DEFAULT = "default"
METHODS = ("linear", "concat")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # a name is never a path: no separators, no leading dot


def check_name(name: object, taken: Iterable[str]) -> str:
    """A new adapter name: a plain string of letters, digits, '.', '_', '-', unique regardless of case."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise ConfigError(f"adapter names are 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit; got {name!r}")
    clash = next((n for n in taken if n.lower() == name.lower()), None)
    if clash is not None:
        raise ConfigError(f"an adapter named {clash!r} already exists (names are unique regardless of case); delete it first or pick another name")
    return name


def _bank(model: nn.Module) -> Bank:
    bank = find_bank(model)
    if bank is None:
        bank = Bank()
        if adapters_of(model):
            bank.sets[DEFAULT], bank.active = adapter_state(model), (DEFAULT,)
        set_bank(model, bank)
    return bank


def _sync(model: nn.Module, bank: Bank) -> None:
    """The single active adapter trains in the model: take its current state into the bank."""
    if len(bank.active) == 1 and adapters_of(model):
        name = bank.active[0]
        state = adapter_state(model, bank.sets[name].metadata)
        state.trained = {k: v.detach().clone() for k, v in state.trained.items()}
        bank.sets[name] = state


def _known(bank: Bank, names: Iterable[str]) -> list[str]:
    names = list(names)
    if not all(isinstance(n, str) for n in names):
        raise ConfigError(f"adapter names are strings, got {names!r}")
    unknown = [n for n in names if n not in bank.sets]
    if unknown:
        raise UnknownAdapterError(f"no adapter named {unknown}; this model has {sorted(bank.sets) or 'none'}")
    return names


def _go_live(model: nn.Module, bank: Bank, state: AdapterSet | None, names: tuple[str, ...]) -> None:
    """Replace the live adapter by `state` (None: no adapter), undoing on failure."""
    _sync(model, bank)
    previous = bank.sets.get(bank.active[0]) if len(bank.active) == 1 else None
    for name in bank.sets[bank.active[0]].trained if len(bank.active) == 1 else ():
        param = dict(model.named_parameters()).get(name)
        if param is not None:
            param.requires_grad_(False)
    detach(model)
    try:
        if state is not None:
            install(model, state, f"adapter {'+'.join(names)}")
    except Exception:
        detach(model)
        if previous is not None:
            install(model, previous)
        raise
    bank.active = names


def list_adapters(model: nn.Module) -> list[str]:
    """Names of the adapters the model holds, live or waiting."""
    return list(_bank(model).sets)


def active_adapters(model: nn.Module) -> tuple[str, ...]:
    return _bank(model).active


def get_adapter(model: nn.Module, name: str) -> AdapterSet:
    """A named adapter's state (current, for the live one)."""
    bank = _bank(model)
    _sync(model, bank)
    return bank.sets[_known(bank, [name])[0]]


def _vetted(model: nn.Module, state: AdapterSet, source: str, trainable) -> AdapterSet:
    """A state from a file, with the modules the caller lets its trained tensors set (checked now)."""
    allowed = allowed_modules(model, state, trainable)
    check_trained(model, state, allowed, source)
    return replace(state, trainable=tuple(allowed))


def add_adapter(model: nn.Module, name: str, targets=None, *, path: str | os.PathLike | None = None,
                config: RLRRConfig | None = None, trainable=(), ssf=None, chunks=None, **options) -> nn.Module:
    """Add a named adapter, not active: fresh (`targets` and `apply`'s arguments) or from a file.

    From a file, `trainable` names the modules whose full tensors the file may set (default: the
    classifier the model declares); a file never widens that itself. A model without a live
    adapter makes the new one active, as `apply` would.
    """
    bank = _bank(model)
    check_name(name, bank.sets)
    if path is not None:
        state = _vetted(model, read_adapter_file(path), str(path), None if trainable == () else trainable)
    else:
        config = RLRRConfig.resolve(config, options)
        active = bank.active
        _go_live(model, bank, None, ())
        try:
            apply_plan(model, make_plan(model, targets, config, trainable, ssf, chunks))
            state = adapter_state(model)
            state.trained = {k: v.detach().clone() for k, v in state.trained.items()}
        finally:
            detach(model)
            bank.active = ()
            if len(active) == 1:
                install(model, bank.sets[active[0]])
                bank.active = active
            elif active:
                set_active(model, active)
    bank.sets[name] = state
    if not bank.active:
        set_active(model, name)
    return model


def set_active(model: nn.Module, names: str | Sequence[str]) -> nn.Module:
    """Make one adapter live, or several (their sum, App. H formula 2)."""
    bank = _bank(model)
    if not isinstance(names, (str, Iterable)):
        raise ConfigError(f"set_active takes an adapter name or a list of names, got {names!r}")
    names = (names,) if isinstance(names, str) else tuple(names)
    _known(bank, names)
    if not names:
        return disable_adapters(model)
    _sync(model, bank)
    state = bank.sets[names[0]] if len(names) == 1 else combine_sets([bank.sets[n] for n in names], None, "concat")
    _go_live(model, bank, state, names)
    return model


def disable_adapters(model: nn.Module) -> nn.Module:
    """No live adapter: the model computes its base function; the adapters wait in the bank."""
    bank = _bank(model)
    _go_live(model, bank, None, ())
    return model


def delete_adapter(model: nn.Module, name: str) -> nn.Module:
    """Forget a named adapter; if it was live, the remaining active ones stay live."""
    bank = _bank(model)
    _known(bank, [name])
    if name in bank.active:
        remaining = tuple(n for n in bank.active if n != name)
        _go_live(model, bank, None, ())
        if remaining:
            set_active(model, remaining)
    del bank.sets[name]
    return model


def combine(model: nn.Module, names: Sequence[str], weights: Sequence[float] | None = None, *, method: str = "linear", name: str = "combined") -> str:
    """Store the combination of named adapters (App. H) as a new named adapter; returns its name.

    method "linear" (formula 1) needs equal ranks; "concat" (formula 2) concatenates ranks.
    Weights default to 1 each; a trained head is averaged with the normalised weights.
    """
    bank = _bank(model)
    _sync(model, bank)
    check_name(name, bank.sets)
    bank.sets[name] = combine_sets([bank.sets[n] for n in _known(bank, names)], weights, method)
    return name


def combine_sets(sets: Sequence[AdapterSet], weights: Sequence[float] | None, method: str) -> AdapterSet:
    """One AdapterSet equal to the combination of `sets` (App. H); checks before computing."""
    if not sets:
        raise ConfigError("combine needs at least one adapter, got none")
    if method not in METHODS:
        raise ConfigError(f"method must be one of {METHODS} (App. H formulas 1 and 2), got {method!r}")
    weights = [1.0] * len(sets) if weights is None else [float(w) for w in weights]
    if len(weights) != len(sets) or not all(math.isfinite(w) for w in weights):
        raise ConfigError(f"need one finite weight per adapter: {len(sets)} adapters, weights {weights}")
    first = sets[0]
    placement = [(s.name, s.kind, tuple(s.shape), s.method) for s in first.sites]
    for other in sets[1:]:
        theirs = [(s.name, s.kind, tuple(s.shape), s.method) for s in other.sites]
        if theirs != placement:
            diff = sorted(set(placement) ^ set(theirs))
            raise AdapterMismatchError(f"adapters with different placements cannot be combined; sites that differ: {[d[0] for d in diff][:8]}")
    fixed = {k: v for k, v in first.config.to_dict().items() if k not in ("rank", "init")}
    for other in sets[1:]:
        theirs = {k: v for k, v in other.config.to_dict().items() if k not in ("rank", "init")}
        if theirs != fixed:
            raise ConfigError(f"adapters with different options cannot be combined: {fixed} vs {theirs}")
    ranks = [s.config.rank for s in sets]
    if method == "linear" and len(set(ranks)) > 1:
        raise ConfigError(f"formula 1 (method='linear') sums S_left and S_right, which needs equal ranks; got {ranks}: use method='concat'")
    if method == "concat" and (first.config.scaling != "both" or not first.config.residual):
        raise ConfigError("formula 2 (method='concat') adds the adapters' changes: it needs scaling='both' and the residual form")
    with torch.no_grad():  # plain leaf tensors: the bank must deep-copy
        combined = _combine_tensors(first, sets, weights, method)
    config = replace(first.config, rank=sum(ranks) if method == "concat" else first.config.rank)
    return AdapterSet(config, list(first.sites), combined, _combine_trained(sets, weights), dict(first.metadata), first.trainable)


def _combine_tensors(first: AdapterSet, sets: Sequence[AdapterSet], weights: list[float], method: str) -> dict[str, torch.Tensor]:
    combined = {}
    for site in first.sites:
        keys = [k for k in first.tensors if k.rpartition(".")[0] == site.name]
        per = [{k.rpartition(".")[2]: s.tensors[k] for k in keys} for s in sets]
        merged = (combine_weighted if method == "linear" else combine_concat)(per, weights)
        combined |= {f"{site.name}.{k}": v for k, v in merged.items()}
    return combined


def _combine_trained(sets: Sequence[AdapterSet], weights: list[float]) -> dict[str, torch.Tensor]:
    shapes = [{k: tuple(v.shape) for k, v in s.trained.items()} for s in sets]
    if any(s != shapes[0] for s in shapes[1:]):
        raise AdapterMismatchError(f"the adapters' trained parameters differ (heads for different tasks?): {[sorted(s) for s in shapes]}")
    total = sum(weights)
    if not shapes[0]:
        return {}
    if total == 0:
        raise ConfigError("the weights sum to zero: cannot average the trained heads")
    return {k: sum((w / total) * s.trained[k].detach() for w, s in zip(weights, sets)) for k in shapes[0]}


def save_adapters(model: nn.Module, folder: str | os.PathLike, names: Sequence[str] | None = None) -> list[Path]:
    """Write named adapters, one `<name>.safetensors` file each, into an existing folder.

    Names are checked where they enter (`check_name`), so a file name never leaves the folder;
    unknown names and a missing folder are refused before any file is written.
    """
    bank = _bank(model)
    chosen = _known(bank, list(bank.sets) if names is None else ([names] if isinstance(names, str) else list(names)))
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"save_adapters writes into an existing folder; {folder} is not one")
    _sync(model, bank)
    return [write_adapter_file(folder / f"{n}.safetensors", bank.sets[n]) for n in chosen]


def load_adapters(model: nn.Module, paths: Iterable[str | os.PathLike], *, trainable=None) -> nn.Module:
    """Add adapter files as named adapters, named after each file's stem; all are read and checked first.

    `trainable`: as for `add_adapter` from a file.
    """
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    bank = _bank(model)
    names = [Path(p).stem for p in paths]
    taken = list(bank.sets)
    for n in names:
        taken.append(check_name(n, taken))
    states = [_vetted(model, read_adapter_file(p), str(p), trainable) for p in paths]
    for n, state in zip(names, states):
        bank.sets[n] = state
    if not bank.active and names:
        set_active(model, names[0])
    return model
