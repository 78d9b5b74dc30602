"""The adapter an export folds: from a file, already in the model, or seeded random.

A random adapter shows that the path works (fold, export, verify), not what a trained model
does; every one of its tensors is non-zero, so a fold that drops or misplaces a term shows up.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import rlrr
import zoo
from adapters import LinearRescale, NormScaleShift
from export.wake import wake

#: Keys `export` reads from (and `save_export_adapter` writes into) an adapter file's metadata, and their JSON types.
META_TYPES = {"model": (str,), "num_classes": (int,), "img_size": (int, list), "model_kwargs": (dict,), "preset": (str,), "tiny": (bool,)}
META_KEYS = tuple(META_TYPES)


@dataclass
class AdapterInfo:
    """What was folded, for the report."""

    origin: str  # "file", "model" (already adapted) or "random"
    description: str
    sites: int = 0
    config: dict | None = None


def read_metadata(path: str | os.PathLike) -> dict:
    """The model-building keys an adapter file carries (model, num_classes, img_size, model_kwargs; zoo: preset, tiny)."""
    user = rlrr.read_adapter_file(path).metadata
    if not isinstance(user, dict):
        raise rlrr.AdapterFileError(f"{path}: its user metadata is {type(user).__name__}, not a JSON object")
    meta = {k: user[k] for k in META_KEYS if user.get(k) is not None}
    for key, value in meta.items():  # values and ranges are checked where they are used (export.ModelSpec)
        if not isinstance(value, META_TYPES[key]) or (isinstance(value, bool) and key != "tiny"):
            raise rlrr.AdapterFileError(f"{path}: metadata {key!r} is {value!r}, not {' or '.join(t.__name__ for t in META_TYPES[key])}")
    return meta


def save_export_adapter(model: nn.Module, path: str | os.PathLike, *, model_name: str, num_classes: int | None = None,
                        img_size: int | None = None, model_kwargs: dict | None = None, metadata: dict | None = None) -> Path:
    """`rlrr.save_adapter` with the keys `python -m export.onnx --adapter FILE` builds the model from."""
    meta = dict(metadata or {})
    meta.update({"model": model_name, "num_classes": num_classes, "img_size": img_size, "model_kwargs": model_kwargs or {}})
    return rlrr.save_adapter(model, path, metadata={k: v for k, v in meta.items() if v is not None})


@torch.no_grad()
def random_adapter(model: nn.Module, *, seed: int = 0, rank: int = 1, targets=None, init: str = "paper") -> nn.Module:
    """Adapt `model` in place (head trained in full, as the paper) with seeded non-zero adapters.

    `init="paper"` draws the scales (kaiming-uniform, design.md §2); the shifts, which the paper
    starts at zero, and the norms' scale and shift are then redrawn so that each adapter tensor
    changes the output. A head that is all zeros is redrawn as well. The global RNG is untouched.
    """
    head = zoo.classifier_name(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        rlrr.apply(model, targets, rank=rank, init=init, trainable=head or ())
    g = torch.Generator().manual_seed(seed + 1)
    for adapter in rlrr.adapters_of(model):
        if isinstance(adapter, NormScaleShift):
            adapter.rlrr_scale.copy_(1 + 0.1 * torch.randn(adapter.rlrr_scale.shape, generator=g))
            if adapter.rlrr_shift is not None:  # a norm whose op reads no bias has no shift
                adapter.rlrr_shift.copy_(0.1 * torch.randn(adapter.rlrr_shift.shape, generator=g))
        elif isinstance(adapter, LinearRescale) and adapter.rlrr_shift is not None:
            adapter.rlrr_shift.copy_(0.05 * torch.randn(adapter.rlrr_shift.shape, generator=g))
    if head:
        wake(model.get_submodule(head), seed)
    return model


def describe_random(seed: int, rank: int) -> str:
    return f"random adapter, seed {seed}, rank {rank}: numbers show the path works, not a trained model"
