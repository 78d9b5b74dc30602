"""Checkpoints: adapter-only safetensors files for use, training-state files for an exact resume.

An output folder holds
- `last.safetensors`, `best.safetensors`: adapter files (`rlrr.save_adapter` format: adapters,
  head, config, sites) whose metadata also carries the zoo build record (preset, model,
  num_classes, img_size, ...), the classes, the placement and the epoch, so `zoo.from_adapter`
  and `python -m export.onnx --adapter FILE` rebuild the model with no other flag;
- `metrics.csv`, `metrics.json`: one row per epoch;
- `checkpoints/epoch-NNNN.pt`: the training state after epoch NNNN (trainable tensors, AdamW
  state, step, the best so far, every process's RNG states, the history, the resolved config).

Every file is written atomically (temp file, then rename). Per epoch the state file is written
last: it is the commit point. An interrupt before it leaves the previous epoch's state as the
newest, and re-training that epoch rewrites the other files identically. The state file before
the newest is kept, so a damaged newest file still leaves a good one to resume from.
"""

from __future__ import annotations

import csv
import io
import json
import random
import re
from pathlib import Path

import numpy as np
import torch
from torch import nn

import rlrr
from finetune.errors import CheckpointError

FORMAT = "rlrr.finetune/1"  # the training-state format tag, not the module path: unchanged, so earlier runs still resume
STATE_DIR = "checkpoints"
LAST, BEST = "last.safetensors", "best.safetensors"
METRICS_CSV, METRICS_JSON = "metrics.csv", "metrics.json"
_STATE = re.compile(r"epoch-(\d+)\.pt")


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


def save_adapter_file(model: nn.Module, path: Path, metadata: dict) -> Path:
    """The adapter-only file (`rlrr.save_adapter` format) with the run's metadata, atomically.

    A model trained by another method (no RLRR adapter) gets a plain safetensors file of its
    trained tensors by name, with the metadata as JSON under the key "finetune".
    """
    if rlrr.adapters_of(model):
        return rlrr.write_adapter_file(path, rlrr.adapter_state(model, metadata))
    from safetensors.torch import save_file

    tensors = {n: t.contiguous() for n, t in trainable_tensors(model).items()}
    return rlrr.atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"finetune": json.dumps(metadata)}))


def save_state(path: Path, state: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return rlrr.atomic_write(path, lambda tmp: torch.save({"format": FORMAT, **state}, tmp))


def prune(output: Path, keep: int, newest: int) -> None:
    """Delete state files older than the `keep` newest up to epoch `newest` (never a newer one)."""
    older = [p for e, p in list_states(output) if e <= newest]
    for p in older[:-keep]:
        p.unlink(missing_ok=True)


def write_metrics(output: Path, rows: list[dict], summary: dict) -> None:
    """metrics.csv (one row per epoch) and metrics.json (the rows and a summary), atomically."""
    if rows:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        rlrr.atomic_write(output / METRICS_CSV, lambda tmp: tmp.write_text(buffer.getvalue()))
    text = json.dumps({**summary, "epochs": rows}, indent=2)
    rlrr.atomic_write(output / METRICS_JSON, lambda tmp: tmp.write_text(text + "\n"))


# --- reading ---------------------------------------------------------------------------------------


def _read(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, bad pickle, not a torch file: all mean "unreadable"
        raise CheckpointError(f"{path} cannot be read (truncated or corrupted?): {type(e).__name__}: {e}") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path} is not a finetune training state (format {found!r}, expected {FORMAT!r})")
    missing = [k for k in ("epoch", "global_step", "config", "trainable", "optimizer", "rng") if k not in state]
    if missing:
        raise CheckpointError(f"{path} is an incomplete training state: {missing} missing")
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
