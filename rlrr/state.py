"""Adapter-only state: an `AdapterSet` detached from the model, and its safetensors file.

A file holds every adapter parameter (`adapter.<site>.<param>`), every other trained parameter
such as the head (`trained.<name>`), and metadata: the RLRR config, the sites, the model class and
any caller metadata. `load_adapter` adapts a fresh base model with exactly those sites first.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from rlrr.config import RLRRConfig
from rlrr.errors import AdapterFileError, AdapterMismatchError, ConfigError, NotAdaptedError
from rlrr.inject import attach, build_adapter
from rlrr.rewrite import adapters_of
from rlrr.sites import Site
from rlrr.trace import discover

FORMAT = "rlrr.adapter/1"
ADAPTER_KEY, TRAINED_KEY = "adapter.", "trained."


@dataclass
class AdapterSet:
    """One adapter's state outside the model: what `apply` built, and what training changed."""

    config: RLRRConfig
    sites: list[Site]
    tensors: dict[str, Tensor]  # "<site>.<param>": adapter parameters
    trained: dict[str, Tensor] = field(default_factory=dict)  # "<parameter name>": the head and such
    metadata: dict = field(default_factory=dict)  # the caller's (preset, classes ...)


def _umask() -> int:
    """The process's umask, read without changing it where Linux allows (os.umask is process-wide)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write) -> Path:
    """Call `write(tmp_path)` then rename onto `path`, so a reader never sees half a file."""
    path = Path(path)
    if not path.parent.is_dir():
        raise AdapterFileError(f"cannot write {path}: folder {path.parent} does not exist")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # reason: safetensors creates its files 0600; give the usual mode
        os.replace(tmp, path)
    except OSError as e:
        raise AdapterFileError(f"cannot write {path}: {e}") from e
    finally:
        tmp.unlink(missing_ok=True)
    return path


def adapter_state(model: nn.Module, metadata: dict | None = None) -> AdapterSet:
    """The live adapters of `model` as an AdapterSet (sharing the live tensors, not copies)."""
    adapters = adapters_of(model)
    if not adapters:
        raise NotAdaptedError(f"{type(model).__name__} has no RLRR adapter: call rlrr.apply first")
    tensors = {f"{a.site.name}.{n}": p for a in adapters for n, p in a.named_parameters(recurse=False)}
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad and ".parametrizations." not in f".{n}"}
    return AdapterSet(adapters[0].config, [a.site for a in adapters], tensors, trained, dict(metadata or {}))


def _file_tensors(state: AdapterSet) -> dict[str, Tensor]:
    out = {ADAPTER_KEY + k: v for k, v in state.tensors.items()}
    return out | {TRAINED_KEY + k: v for k, v in state.trained.items()}


def write_adapter_file(path: str | os.PathLike, state: AdapterSet) -> Path:
    """Write an AdapterSet to a safetensors file, atomically."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in _file_tensors(state).items()}
    meta = {
        "format": FORMAT,
        "config": json.dumps(state.config.to_dict()),
        "sites": json.dumps([s.to_dict() for s in state.sites]),
        "user": json.dumps(state.metadata),
    }
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def save_adapter(model: nn.Module, path: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Write the live adapters (and trained head) of `model` to a safetensors file, atomically."""
    return write_adapter_file(path, adapter_state(model, metadata))


def read_adapter_file(path: str | os.PathLike) -> AdapterSet:
    """An adapter file as an AdapterSet; AdapterFileError if unreadable or not an rlrr file."""
    path = Path(path)
    if not path.is_file():
        raise AdapterFileError(f"adapter file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise AdapterFileError(f"{path} is not a readable safetensors file (truncated or corrupted?): {e}") from e
    if meta.get("format") != FORMAT:
        raise AdapterFileError(f"{path} is a safetensors file but not an rlrr adapter (format {meta.get('format')!r}, expected {FORMAT!r})")
    try:
        config = RLRRConfig.from_dict(json.loads(meta["config"]))
        sites = [Site.from_dict(d) for d in json.loads(meta["sites"])]
        user = json.loads(meta.get("user", "{}"))
    except (KeyError, TypeError, ValueError, ConfigError) as e:
        raise AdapterFileError(f"{path} has damaged rlrr metadata: {e}") from e
    adapter = {k[len(ADAPTER_KEY):]: v for k, v in tensors.items() if k.startswith(ADAPTER_KEY)}
    trained = {k[len(TRAINED_KEY):]: v for k, v in tensors.items() if k.startswith(TRAINED_KEY)}
    state = AdapterSet(config, sites, adapter, trained, user)
    check_consistent(state, str(path))
    return state


def check_consistent(state: AdapterSet, source: str) -> None:
    """The tensors must be exactly those its sites and config call for."""
    expected = {}
    for s in state.sites:  # built on the meta device: shapes only, no memory
        adapter = build_adapter(s, torch.empty(s.shape, device="meta"), state.config)
        expected |= {f"{s.name}.{n}": tuple(p.shape) for n, p in adapter.named_parameters(recurse=False)}
    got = {k: tuple(v.shape) for k, v in state.tensors.items()}
    if got != expected:
        diff = sorted(set(got) ^ set(expected)) or [k for k in got if got[k] != expected[k]]
        raise AdapterMismatchError(f"{source}: adapter tensors do not match its own sites and config: {diff[:8]}")


def _mismatches(expected: list[Site], found: dict[str, Site]) -> list[str]:
    out = []
    for s in expected:
        have = found.get(s.name)
        if have is None:
            out.append(f"{s.name}: not in this model")
        elif (have.kind, tuple(have.shape)) != (s.kind, tuple(s.shape)):
            out.append(f"{s.name}: file has {s.kind} {tuple(s.shape)}, model has {have.kind} {tuple(have.shape)}")
    return out


def install(model: nn.Module, state: AdapterSet, source: str = "adapter") -> nn.Module:
    """Make `state` the model's live adapter: adapt a base model with its sites, then copy in.

    Everything is checked before the model changes: state for another architecture raises
    AdapterMismatchError naming the sites that differ.
    """
    existing = adapters_of(model)
    if existing:
        found = {a.site.name: a.site for a in existing}
        extra = sorted(set(found) - {s.name for s in state.sites})
        problems = _mismatches(state.sites, found) + [f"{n}: adapted in the model, not in the file" for n in extra]
        if existing[0].config != state.config:
            problems.insert(0, f"the model was adapted with {existing[0].config}, the file holds {state.config}")
    else:
        found = {s.name: s for s in discover(model).sites}
        problems = _mismatches(state.sites, found)
    if problems:
        raise AdapterMismatchError(f"{source} does not fit {type(model).__name__}: {len(problems)} site(s) differ: " + "; ".join(problems[:8]))
    params = dict(model.named_parameters())
    bad = [f"{n} {tuple(v.shape)} vs {tuple(params[n].shape) if n in params else 'missing'}" for n, v in state.trained.items()
           if ".parametrizations." not in n and (n not in params or params[n].shape != v.shape)]
    if bad:
        raise AdapterMismatchError(f"{source}: trained parameters do not fit {type(model).__name__}: {bad[:8]}")
    if not existing:
        attach(model, [replace(found[s.name], method=s.method) for s in state.sites], state.config)
    _copy_in(model, state)
    return model


def load_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load an adapter file into `model`; a base model is adapted with the stored sites first."""
    return install(model, read_adapter_file(path), str(path))


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
