"""The adapter file: the one writer and the one reader of `.safetensors` adapter files.

Adapter files are shared artifacts, like LoRA files on model hubs: reading one is validated
completely here, before anything is built from it. A file holds adapter tensors
(`adapter.<site>.<param>`), full tensors of modules trained in full such as the head
(`trained.<parameter name>`), and JSON metadata: format, config, sites, the caller's metadata.
The reader accepts exactly the adapter tensors its own sites and config call for, and trained
tensors with plain parameter names; every tensor floating point and finite. Which trained tensors
a model accepts is decided by the caller when loading (`rlrr.state.install`), never by the file.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save_file
from torch import Tensor

from adapters import ADAPTER_PREFIX
from rlrr.config import RLRRConfig
from rlrr.errors import AdapterFileError, AdapterMismatchError, ConfigError
from rlrr.inject import build_adapter
from rlrr.sites import Site

FORMAT = "rlrr.adapter/1"
ADAPTER_KEY, TRAINED_KEY = "adapter.", "trained."
MAX_SITES = 100_000  # more than any model has: a bound on what a crafted file can make us build
_PARAMETER_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*")


@dataclass
class AdapterSet:
    """One adapter's state outside the model: what `apply` built, and what training changed."""

    config: RLRRConfig
    sites: list[Site]
    tensors: dict[str, Tensor]  # "<site>.<param>": adapter parameters
    trained: dict[str, Tensor] = field(default_factory=dict)  # "<parameter name>": the head and such
    metadata: dict = field(default_factory=dict)  # the caller's (preset, classes ...)
    #: modules whose full tensors `trained` may set, as the model's owner decided (captured from a
    #: model, or allowed when loading); always empty when read from a file: files grant nothing
    trainable: tuple[str, ...] = ()


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
    """Call `write(tmp_path)`, flush it to disk, then rename onto `path`: a reader never sees half a file."""
    path = _path(path)
    if not path.parent.is_dir():
        raise AdapterFileError(f"cannot write {path}: folder {path.parent} does not exist")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # reason: safetensors creates its files 0600; give the usual mode
        with open(tmp, "rb+") as f:  # reason: without it a power loss after the rename can leave an empty file
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise AdapterFileError(f"cannot write {path}: {e}") from e
    finally:
        tmp.unlink(missing_ok=True)
    return path


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


def _path(path: str | os.PathLike) -> Path:
    if not isinstance(path, (str, os.PathLike)) or not isinstance(os.fspath(path), str) or "\0" in os.fspath(path) or not os.fspath(path):
        raise AdapterFileError(f"a file path must be a non-empty path without NUL bytes, got {path!r}")
    return Path(path)


def _read(path: Path) -> tuple[dict, dict[str, Tensor]]:
    """Metadata and tensors, read into memory at once.

    reason: not memory-mapped, so the tensors (kept in a model's adapter bank) never depend on the
    file staying as it was: a file truncated under a mapping kills the process with SIGBUS.
    """
    if not path.is_file():
        raise AdapterFileError(f"adapter file {path} does not exist or is not a file")
    try:
        raw = path.read_bytes()
        size = int.from_bytes(raw[:8], "little")
        if len(raw) < 8 or size > len(raw) - 8:
            raise ValueError(f"header of {size} bytes in a file of {len(raw)}")
        meta = json.loads(raw[8:8 + size]).get("__metadata__") or {}
        if not isinstance(meta, dict):
            raise ValueError("__metadata__ is not an object")
        tensors = load(raw)
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError, AttributeError) as e:
        raise AdapterFileError(f"{path} is not a readable safetensors file (truncated or corrupted?): {type(e).__name__}: {e}") from e
    return meta, tensors


def _json(meta: dict, key: str, kind: type, default: str | None = None) -> object:
    value = json.loads(meta[key] if default is None else meta.get(key, default))
    if not isinstance(value, kind):
        raise ConfigError(f"metadata {key!r} must be a JSON {kind.__name__}, got {type(value).__name__}")
    return value


def read_adapter_file(path: str | os.PathLike) -> AdapterSet:
    """An adapter file as an AdapterSet, validated completely; AdapterFileError if it is not a sound one."""
    path = _path(path)
    meta, tensors = _read(path)
    if meta.get("format") != FORMAT:
        raise AdapterFileError(f"{path} is a safetensors file but not an rlrr adapter (format {meta.get('format')!r}, expected {FORMAT!r})")
    try:
        config = RLRRConfig.from_dict(_json(meta, "config", dict))
        site_dicts = _json(meta, "sites", list)
        if len(site_dicts) > MAX_SITES:
            raise ConfigError(f"{len(site_dicts)} sites is more than any model has ({MAX_SITES})")
        sites = [Site.from_dict(d) for d in site_dicts]
        user = _json(meta, "user", dict, "{}")
    except (KeyError, TypeError, ValueError, RecursionError) as e:  # ConfigError is a ValueError
        raise AdapterFileError(f"{path} has damaged rlrr metadata: {type(e).__name__}: {e}") from e
    names = [s.name for s in sites]
    if len(set(names)) != len(names):
        raise AdapterFileError(f"{path} lists a site twice: {sorted(n for n in set(names) if names.count(n) > 1)[:5]}")
    others = sorted(k for k in tensors if not k.startswith((ADAPTER_KEY, TRAINED_KEY)))
    if others:
        raise AdapterFileError(f"{path} holds tensors that are neither adapter nor trained tensors: {others[:8]}")
    state = AdapterSet(config, sites, {k[len(ADAPTER_KEY):]: v for k, v in tensors.items() if k.startswith(ADAPTER_KEY)},
                       {k[len(TRAINED_KEY):]: v for k, v in tensors.items() if k.startswith(TRAINED_KEY)}, user)
    check_consistent(state, str(path))
    _check_trained_names(state, str(path))
    _check_values(tensors, str(path))
    return state


def check_consistent(state: AdapterSet, source: str) -> None:
    """The adapter tensors must be exactly those its sites and config call for."""
    expected = expected_shapes(state.sites, state.config, source)
    got = {k: tuple(v.shape) for k, v in state.tensors.items()}
    if got != expected:
        diff = sorted(set(got) ^ set(expected)) or [f"{k}: {got[k]} instead of {expected[k]}" for k in got if got[k] != expected[k]]
        raise AdapterMismatchError(f"{source}: adapter tensors do not match its own sites and config: {diff[:8]}")


def expected_shapes(sites: list[Site], config: RLRRConfig, source: str) -> dict[str, tuple[int, ...]]:
    """'<site>.<param>' -> shape, for the adapters `sites` and `config` call for (built on the meta device)."""
    expected = {}
    for s in sites:
        try:
            adapter = build_adapter(s, torch.empty(s.shape, device="meta"), config)
        except (ValueError, IndexError) as e:  # a rank or chunk count the shape does not allow
            raise AdapterMismatchError(f"{source}: site {s.name} cannot carry this adapter: {e}") from e
        expected |= {f"{s.name}.{n}": tuple(p.shape) for n, p in adapter.named_parameters(recurse=False)}
    return expected


def _check_trained_names(state: AdapterSet, source: str) -> None:
    bad = [n for n in state.trained if not _PARAMETER_NAME.fullmatch(n) or ".parametrizations." in f".{n}."
           or n.rsplit(".", 1)[-1].startswith(ADAPTER_PREFIX)]
    if bad:
        raise AdapterFileError(f"{source}: trained tensors must be named like a model parameter ('head.weight'), got {bad[:5]}")


def _check_values(tensors: dict[str, Tensor], source: str) -> None:
    not_float = [f"{k} ({v.dtype})" for k, v in tensors.items() if not v.is_floating_point()]
    if not_float:
        raise AdapterFileError(f"{source}: tensors must be floating point: {not_float[:5]}")
    not_finite = [k for k, v in tensors.items() if not bool(torch.isfinite(v).all())]
    if not_finite:
        raise AdapterFileError(f"{source}: tensors hold NaN or Inf: {not_finite[:5]}")
