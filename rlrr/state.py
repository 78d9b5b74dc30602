"""Adapter-only files: safetensors tensors plus the configuration and sites as metadata.

A file holds every adapter parameter (`adapter.<site>.<param>`), every other trained parameter
such as the head (`trained.<name>`), and metadata: the RLRR config, the sites, the model class and
any caller metadata. `load_adapter` adapts a fresh base model with exactly those sites first.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from rlrr.config import RLRRConfig
from rlrr.errors import AdapterFileError, AdapterMismatchError, ConfigError, NotAdaptedError
from rlrr.inject import adapters_of, attach, build_adapter
from rlrr.sites import Site
from rlrr.trace import discover

FORMAT = "rlrr.adapter/1"
ADAPTER_KEY, TRAINED_KEY = "adapter.", "trained."


def atomic_write(path: str | os.PathLike, write) -> Path:
    """Call `write(tmp_path)` then rename onto `path`, so a reader never sees half a file."""
    path = Path(path)
    if not path.parent.is_dir():
        raise AdapterFileError(f"cannot write {path}: folder {path.parent} does not exist")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise AdapterFileError(f"cannot write {path}: {e}") from e
    finally:
        tmp.unlink(missing_ok=True)
    return path


def adapter_tensors(model: nn.Module) -> dict[str, Tensor]:
    """Adapter parameters by `adapter.<site>.<param>`, and other trained ones by `trained.<name>`."""
    adapters = adapters_of(model)
    if not adapters:
        raise NotAdaptedError(f"{type(model).__name__} has no RLRR adapter: call rlrr.apply first")
    out = {}
    for a in adapters:
        for name, p in a.named_parameters(recurse=False):
            out[f"{ADAPTER_KEY}{a.site.name}.{name}"] = p
    for name, p in model.named_parameters():
        if p.requires_grad and ".parametrizations." not in f".{name}" and not _is_adapter_param(name):
            out[f"{TRAINED_KEY}{name}"] = p
    return out


def _is_adapter_param(name: str) -> bool:
    return ".parametrizations." in f".{name}" and name.rsplit(".", 1)[-1].startswith("rlrr_")


def save_adapter(model: nn.Module, path: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Write the adapters (and trained head) of `model` to a safetensors file, atomically."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in adapter_tensors(model).items()}
    adapters = adapters_of(model)
    meta = {
        "format": FORMAT,
        "config": json.dumps(adapters[0].config.to_dict()),
        "sites": json.dumps([a.site.to_dict() for a in adapters]),
        "model": type(model).__qualname__,
        "user": json.dumps(metadata or {}),
    }
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def read_adapter_file(path: str | os.PathLike) -> tuple[dict[str, Tensor], RLRRConfig, list[Site], dict]:
    """Tensors, config, sites and caller metadata of an adapter file; AdapterFileError if unreadable."""
    path = Path(path)
    if not path.is_file():
        raise AdapterFileError(f"adapter file {path} does not exist")
    try:
        from safetensors import safe_open

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
    return tensors, config, sites, user


def _mismatches(expected: list[Site], found: dict[str, Site]) -> list[str]:
    out = []
    for s in expected:
        have = found.get(s.name)
        if have is None:
            out.append(f"{s.name}: not in this model")
        elif (have.kind, tuple(have.shape)) != (s.kind, tuple(s.shape)):
            out.append(f"{s.name}: file has {s.kind} {tuple(s.shape)}, model has {have.kind} {tuple(have.shape)}")
    return out


def _expected_shapes(sites: list[Site], config: RLRRConfig) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for s in sites:  # built on the meta device: shapes only, no memory
        adapter = build_adapter(s, torch.empty(s.shape, device="meta"), config)
        for name, p in adapter.named_parameters(recurse=False):
            shapes[f"{ADAPTER_KEY}{s.name}.{name}"] = tuple(p.shape)
    return shapes


def load_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load an adapter file into `model`; a base model is adapted with the stored sites first.

    Everything is checked before the model changes: a file for another architecture raises
    AdapterMismatchError naming the sites that differ.
    """
    tensors, config, sites, _ = read_adapter_file(path)
    existing = adapters_of(model)
    if existing:
        found = {a.site.name: a.site for a in existing}
        extra = sorted(set(found) - {s.name for s in sites})
        problems = _mismatches(sites, found) + [f"{n}: adapted in the model, not in the file" for n in extra]
        if existing[0].config != config:
            problems.insert(0, f"the model was adapted with {existing[0].config}, the file holds {config}")
    else:
        found = {s.name: s for s in discover(model).sites}
        problems = _mismatches(sites, found)
    if problems:
        raise AdapterMismatchError(f"{path} does not fit {type(model).__name__}: {len(problems)} site(s) differ: " + "; ".join(problems[:8]))
    expected = _expected_shapes(sites, config)
    got = {k: tuple(v.shape) for k, v in tensors.items() if k.startswith(ADAPTER_KEY)}
    if got != expected:
        diff = sorted(set(got) ^ set(expected)) or [k for k in got if got[k] != expected[k]]
        raise AdapterMismatchError(f"{path}: adapter tensors do not match its own sites and config: {diff[:8]}")
    params = dict(model.named_parameters())
    trained = {k[len(TRAINED_KEY):]: v for k, v in tensors.items() if k.startswith(TRAINED_KEY)}
    bad = [f"{n} {tuple(v.shape)} vs {tuple(params[n].shape) if n in params else 'missing'}" for n, v in trained.items()
           if ".parametrizations." not in n and (n not in params or params[n].shape != v.shape)]
    if bad:
        raise AdapterMismatchError(f"{path}: trained parameters do not fit {type(model).__name__}: {bad[:8]}")
    if not existing:
        attach(model, [replace(found[s.name], method=s.method) for s in sites], config)
    _copy_in(model, tensors, trained)
    return model


@torch.no_grad()
def _copy_in(model: nn.Module, tensors: dict[str, Tensor], trained: dict[str, Tensor]) -> None:
    by_site = {a.site.name: a for a in adapters_of(model)}
    for key, value in tensors.items():
        if key.startswith(ADAPTER_KEY):
            site, _, name = key[len(ADAPTER_KEY):].rpartition(".")
            getattr(by_site[site], name).copy_(value)
    params = dict(model.named_parameters())
    for name, value in trained.items():
        params[name].copy_(value)
        params[name].requires_grad_(True)
