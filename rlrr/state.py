"""An adapter's state outside the model (`AdapterSet`), and putting one into a model.

`install` is the one place a state enters a model: every check first (sites, shapes, which
trained tensors the caller allows), then the rewrite, then the values. A file can set adapter
values and, for the modules the caller allows (by default the classifier the model declares),
their full tensors; nothing else (docs/security.md).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from rlrr.adapter_file import AdapterSet, expected_shapes, read_adapter_file, write_adapter_file
from rlrr.errors import AdapterMismatchError, NotAdaptedError
from rlrr.inject import attach
from rlrr.rewrite import adapters_of
from rlrr.sites import Site
from rlrr.targets import declared_classifier, resolve_trainable
from rlrr.trace import discover


def _owner(name: str) -> str:
    return name.rpartition(".")[0]


def adapter_state(model: nn.Module, metadata: dict | None = None) -> AdapterSet:
    """The live adapters of `model` as an AdapterSet (sharing the live tensors, not copies)."""
    adapters = adapters_of(model)
    if not adapters:
        raise NotAdaptedError(f"{type(model).__name__} has no RLRR adapter: call rlrr.apply first")
    tensors = {f"{a.site.name}.{n}": p for a in adapters for n, p in a.named_parameters(recurse=False)}
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad and ".parametrizations." not in f".{n}"}
    trainable = tuple(sorted({_owner(n) for n in trained}))
    return AdapterSet(adapters[0].config, [a.site for a in adapters], tensors, trained, dict(metadata or {}), trainable)


def save_adapter(model: nn.Module, path: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Write the live adapters (and trained head) of `model` to a safetensors file, atomically."""
    return write_adapter_file(path, adapter_state(model, metadata))


def _mismatches(expected: list[Site], found: dict[str, Site]) -> list[str]:
    out = []
    for s in expected:
        have = found.get(s.name)
        if have is None:
            out.append(f"{s.name}: not in this model")
        elif (have.kind, tuple(have.shape)) != (s.kind, tuple(s.shape)):
            out.append(f"{s.name}: file has {s.kind} {tuple(s.shape)}, model has {have.kind} {tuple(have.shape)}")
    return out


def allowed_modules(model: nn.Module, state: AdapterSet, trainable: str | Iterable[str] | None) -> list[str]:
    """Modules whose full tensors this load may set: the caller's word, else what the state was vetted for,
    else what an adapted model already trains in full, else the classifier a base model declares."""
    if trainable is not None:
        return resolve_trainable(model, trainable)
    if state.trainable:
        return list(state.trainable)
    if adapters_of(model):
        return list(adapter_state(model).trainable)
    head = declared_classifier(model)
    return [head] if head else []


def check_trained(model: nn.Module, state: AdapterSet, allowed: list[str], source: str) -> None:
    params = dict(model.named_parameters())
    under = [n for n in state.trained if any(n.startswith(a + ".") for a in allowed)]
    refused = sorted(set(state.trained) - set(under))
    if refused:
        modules = sorted({_owner(n) for n in refused})
        raise AdapterMismatchError(f"{source} holds full tensors {refused[:5]} of {modules[:5]}, which this load does not allow to change "
                                   f"(allowed: {allowed or 'adapters only'}). Pass trainable=[...] naming those modules if you trust the file")
    bad = [f"{n} {tuple(v.shape)} vs {tuple(params[n].shape) if n in params else 'not a parameter of the model'}"
           for n, v in state.trained.items() if n not in params or params[n].shape != v.shape]
    if bad:
        raise AdapterMismatchError(f"{source}: trained tensors do not fit {type(model).__name__}: {bad[:8]}")


def fit_sites(model: nn.Module, state: AdapterSet, source: str = "adapter") -> list[Site]:
    """The base model's own sites for `state`'s (which tensors, which bias), with its choice of method and chunks.

    AdapterMismatchError names the sites that differ, or the tensors that do not fit them.
    """
    found = {s.name: s for s in discover(model).sites}
    targets = [replace(found[s.name], method=s.method, chunks=s.chunks, chunks_from=s.chunks_from) for s in state.sites if s.name in found]
    _check_fit(model, state, source, _mismatches(state.sites, found), targets)
    return targets


def _check_fit(model: nn.Module, state: AdapterSet, source: str, problems: list[str], targets: list[Site]) -> None:
    if problems:
        raise AdapterMismatchError(f"{source} does not fit {type(model).__name__}: {len(problems)} site(s) differ: " + "; ".join(problems[:8]))
    expected = expected_shapes(targets, state.config, source)
    wrong = [k for k, v in state.tensors.items() if expected.get(k) != tuple(v.shape)]
    if wrong or set(expected) != set(state.tensors):
        raise AdapterMismatchError(f"{source}: adapter tensors do not fit the model's sites: {(wrong or sorted(set(expected) ^ set(state.tensors)))[:8]}")


def install(model: nn.Module, state: AdapterSet, source: str = "adapter", trainable: str | Iterable[str] | None = None) -> nn.Module:
    """Make `state` the model's live adapter: adapt a base model with its sites, then copy in.

    Everything is checked before the model changes: state for another architecture raises
    AdapterMismatchError naming the sites that differ, and trained tensors outside the allowed
    modules (`trainable`; see `allowed_modules`) are refused.
    """
    existing = adapters_of(model)
    if existing:
        found = {a.site.name: a.site for a in existing}
        extra = sorted(set(found) - {s.name for s in state.sites})
        problems = _mismatches(state.sites, found) + [f"{n}: adapted in the model, not in the file" for n in extra]
        if existing[0].config != state.config:
            problems.insert(0, f"the model was adapted with {existing[0].config}, the file holds {state.config}")
        targets = [found[s.name] for s in state.sites if s.name in found]
        _check_fit(model, state, source, problems, targets)
    else:
        targets = fit_sites(model, state, source)
    allowed = allowed_modules(model, state, trainable)
    check_trained(model, state, allowed, source)
    if not existing:
        attach(model, targets, state.config)
    _copy_in(model, state)
    return model


def load_adapter(model: nn.Module, path: str | os.PathLike, *, trainable: str | Iterable[str] | None = None) -> nn.Module:
    """Load an adapter file into `model`; a base model is adapted with the stored sites first.

    The file may set its adapters' values and the full tensors of the modules `trainable` names
    (default: the classifier the model declares, e.g. timm's `pretrained_cfg["classifier"]`).
    """
    return install(model, read_adapter_file(path), str(path), trainable)


@torch.no_grad()
def _copy_in(model: nn.Module, state: AdapterSet) -> None:
    by_site = {a.site.name: a for a in adapters_of(model)}
    for key, value in state.tensors.items():
        site, _, name = key.rpartition(".")
        getattr(by_site[site], name).copy_(value)
    params = dict(model.named_parameters())
    for name, value in state.trained.items():
        params[name].copy_(value)
        params[name].requires_grad_(True)
