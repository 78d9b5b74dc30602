"""Checkpoints: adapter-only safetensors files for use, training-state files for an exact resume.

An output folder holds
- `last.safetensors`, `best.safetensors`: adapter files (`rlrr.save_adapter` format: adapters,
  head, config, sites) whose metadata also carries the zoo build record (preset, model,
  num_classes, img_size, ...), the classes, the placement and the epoch, so `zoo.from_adapter`
  and `python -m export.onnx --adapter FILE` rebuild the model with no other flag;
- `metrics.csv`, `metrics.json`: one row per epoch;
- `checkpoints/epoch-NNNN.pt`: the training state after epoch NNNN (trainable tensors, AdamW
  state, step, the best so far, every process's RNG states, the history, the resolved config).

Every file is written atomically (`rlrr.atomic_write`: `.NAME.PID.tmp`, then rename). Per epoch
the state file is written last: it is the commit point. An interrupt before it leaves the previous
epoch's state as the newest, and re-training that epoch rewrites the other files identically. The
state file before the newest is kept, so a damaged newest file still leaves a good one to resume
from. A run killed in the middle of a write leaves its temp file; the next run in the folder
removes the temp files whose writer process is gone (`remove_stale_temp`). A write the file system
refuses (disk full, permission denied, read-only) raises `ResourceError` with its errno.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import random
import re
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn

import rlrr
from finetune.errors import ENVIRONMENT_ERRNOS, CheckpointError, ResourceError, environment_errno

FORMAT = "rlrr.finetune/1"  # the training-state format tag, not the module path: unchanged, so earlier runs still resume
STATE_DIR = "checkpoints"
LAST, BEST = "last.safetensors", "best.safetensors"
METRICS_CSV, METRICS_JSON = "metrics.csv", "metrics.json"
_STATE = re.compile(r"epoch-(\d+)\.pt")
_TEMP = re.compile(r"\.(?P<name>.+)\.(?P<pid>\d+)\.tmp")  # rlrr.atomic_write's temp files
_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # how Rust (safetensors) prints an io::Error it does not map to OSError


def state_path(output: Path, epoch: int) -> Path:
    return output / STATE_DIR / f"epoch-{epoch:04d}.pt"


def list_states(folder: Path) -> list[tuple[int, Path]]:
    """(epoch, path) of the state files in a run folder (or its checkpoints/ folder), oldest first."""
    folder = folder / STATE_DIR if (folder / STATE_DIR).is_dir() else folder
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _STATE.fullmatch(p.name))]
    return sorted(found)


def holds_run(output: Path) -> list[str]:
    """The run files already in `output` (empty: the folder is free to use)."""
    names = [n for n in (LAST, BEST, METRICS_CSV, METRICS_JSON) if (output / n).exists()]
    return names + [f"{STATE_DIR}/{p.name}" for _, p in list_states(output)]


# --- RNG states ------------------------------------------------------------------------------------


def rng_state() -> dict:
    """torch (CPU, CUDA), numpy and Python RNG states, in types `torch.load(weights_only=True)` reads."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- writing ---------------------------------------------------------------------------------------


def trainable_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter that trains (adapters and head), by its name in the model, copied to CPU."""
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}


@contextmanager
def storage(action: str):
    """File-system failures inside as `ResourceError` (errno kept), named by `action` ("cannot write PATH")."""
    try:
        yield
    except ResourceError:
        raise
    except Exception as e:
        code = environment_errno(e)
        if code is None and not isinstance(e, OSError):  # safetensors' Rust writer reports ENOSPC as "(os error 28)"
            m = _OS_ERROR.search(str(e))
            code = int(m.group(1)) if m and int(m.group(1)) in ENVIRONMENT_ERRNOS else None
        if code is None:
            raise
        raise ResourceError(f"{action}: {os.strerror(code)} (errno {errno.errorcode.get(code, code)})", code) from e


def save_adapter_file(model: nn.Module, path: Path, metadata: dict) -> Path:
    """The adapter-only file (`rlrr.save_adapter` format) with the run's metadata, atomically.

    A model trained by another method (no RLRR adapter) gets a plain safetensors file of its
    trained tensors by name, with the metadata as JSON under the key "finetune".
    """
    with storage(f"cannot write {path}"):
        if rlrr.adapters_of(model):
            return rlrr.write_adapter_file(path, rlrr.adapter_state(model, metadata))
        from safetensors.torch import save_file

        tensors = {n: t.contiguous() for n, t in trainable_tensors(model).items()}
        return rlrr.atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"finetune": json.dumps(metadata)}))


def save_state(path: Path, state: dict) -> Path:
    """The training state, atomically. Serialised in memory first: torch.save reports a full disk as a
    RuntimeError of its zip writer, a plain file write as OSError(ENOSPC)."""
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, **state}, buffer)
    data = buffer.getvalue()
    with storage(f"cannot write {path}"):
        path.parent.mkdir(parents=True, exist_ok=True)
        return rlrr.atomic_write(path, lambda tmp: tmp.write_bytes(data))


def prune(output: Path, keep: int, newest: int) -> None:
    """Delete state files older than the `keep` newest up to epoch `newest` (never a newer one)."""
    older = [p for e, p in list_states(output) if e <= newest]
    for p in older[:-keep]:
        with storage(f"cannot delete {p}"):
            p.unlink(missing_ok=True)


def _running(pid: int) -> bool:
    """Whether a process with this id runs on this machine (a pid reused since counts as running: kept)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except (OverflowError, ValueError):  # not a pid at all
        return False
    return True


def remove_stale_temp(output: Path, alive: Callable[[int], bool] = _running) -> list[Path]:
    """Delete the temp files of writes that a killed run left in `output` (and its checkpoints), never
    those of a writer that still runs. Only names this package writes are touched."""
    ours = {LAST, BEST, METRICS_CSV, METRICS_JSON}
    removed = []
    for folder in (output, output / STATE_DIR):
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            m = _TEMP.fullmatch(p.name)
            if m and (m["name"] in ours or _STATE.fullmatch(m["name"])) and p.is_file() and not alive(int(m["pid"])):
                with storage(f"cannot delete the stale temp file {p}"):
                    p.unlink(missing_ok=True)
                removed.append(p)
    return removed


def check_output(output: Path, data: str | None) -> None:
    """The output folder can be created and written, before anything is built or read.

    Bad paths are `CheckpointError` (exit status 2): a file where the folder or one of its parents
    should be, a name longer than the file system takes, a folder inside the data folder (the run's
    files would become part of the data: `checkpoints/` a class of an ImageFolder split). A folder
    the file system refuses to write is `ResourceError` (exit status 5). Nothing is left behind.
    """
    if output.exists() and not output.is_dir():
        raise CheckpointError(f"output {output} is a file, not a folder")
    resolved = output.resolve()
    if data is not None and Path(data).is_dir():
        root = Path(data).resolve()
        if resolved == root or root in resolved.parents:
            raise CheckpointError(f"output {output} is inside the data folder {data}: the run's files would be read as data; "
                                  f"choose an --output outside it")
    existing = resolved
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise CheckpointError(f"output {output} cannot be created: {existing} is a file, not a folder")
    for part in resolved.relative_to(existing).parts:
        limit = os.pathconf(existing, "PC_NAME_MAX") if hasattr(os, "pathconf") else 255
        if len(os.fsencode(part)) > limit:
            raise CheckpointError(f"output {output} cannot be created: the name {part[:40]!r}... is longer than {limit} bytes")
    with storage(f"output {output} cannot be written (tried in {existing})"):
        fd, probe = tempfile.mkstemp(prefix=".finetune-write-test.", suffix=".tmp", dir=existing)
        os.close(fd)
        os.unlink(probe)


def write_metrics(output: Path, rows: list[dict], summary: dict) -> None:
    """metrics.csv (one row per epoch) and metrics.json (the rows and a summary), atomically."""
    if rows:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        with storage(f"cannot write {output / METRICS_CSV}"):
            rlrr.atomic_write(output / METRICS_CSV, lambda tmp: tmp.write_text(buffer.getvalue()))
    text = json.dumps({**summary, "epochs": rows}, indent=2)
    with storage(f"cannot write {output / METRICS_JSON}"):
        rlrr.atomic_write(output / METRICS_JSON, lambda tmp: tmp.write_text(text + "\n"))


# --- reading ---------------------------------------------------------------------------------------


def _read(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, bad pickle, not a torch file: all mean "unreadable"
        if environment_errno(e) is not None:
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(f"{path} cannot be read (truncated or corrupted?): {type(e).__name__}: {first[:300]}") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path} is not a finetune training state (format {found!r}, expected {FORMAT!r})")
    missing = [k for k in ("epoch", "global_step", "config", "trainable", "optimizer", "rng") if k not in state]
    if missing:
        raise CheckpointError(f"{path} is an incomplete training state: {missing} missing")
    if not isinstance(state["config"], dict) or not isinstance(state["epoch"], int):
        raise CheckpointError(f"{path} is a damaged training state: its config or epoch has the wrong type")
    return state


def resolve_resume(resume: str, output: Path) -> Path:
    """The state file to resume from: a file, a run folder's newest, or ("auto") the output folder's."""
    target = output if resume == "auto" else Path(resume)
    if target.is_file():
        return target
    if not target.exists():
        raise CheckpointError(f"nothing to resume from: {target} does not exist")
    states = list_states(target)
    if not states:
        raise CheckpointError(f"nothing to resume from: {target} holds no {STATE_DIR}/epoch-NNNN.pt training state")
    return states[-1][1]


def load_state(path: Path) -> dict:
    """A training state; a damaged file raises CheckpointError naming the newest intact one before it."""
    try:
        return _read(path)
    except CheckpointError as e:
        older = [p for epoch, p in list_states(path.parent) if p != path and epoch < _epoch_of(path)]
        for candidate in reversed(older):
            try:
                good = _read(candidate)
            except CheckpointError:
                continue
            raise CheckpointError(f"{e}. The previous checkpoint {candidate} (epoch {good['epoch']}) is intact and kept: "
                                  f"resume from it with --resume {candidate} (the epochs after it are trained again)") from e
        raise CheckpointError(f"{e}. No intact older checkpoint beside it: start over with --force") from e


def _epoch_of(path: Path) -> int:
    m = _STATE.fullmatch(path.name)
    return int(m.group(1)) if m else 1 << 30
