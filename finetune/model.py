"""The model a run trains: a zoo preset with the paper's placement, and what its files record."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

import rlrr
import zoo
from finetune.errors import RecipeError, ResumeMismatchError


Adapt = Callable[[nn.Module], nn.Module]  # another method: base model in, model to train out (only its parameters require grad)


@dataclass
class Built:
    """The adapted model and how it was made."""

    model: nn.Module
    preset: zoo.Preset
    config: rlrr.RLRRConfig | None  # how RLRR was applied: the placement's config, rank and init; None: another method
    placement: dict  # where: the rlrr.apply targets, trainable and ssf arguments; or {"method": name}
    notes: list[str]  # what the zoo warned about (random weights, a head left fresh ...)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str


def build_for_training(preset_name: str, num_classes: int, *, weights: str | None, rank: int | None, init: str, targets,
                       img_size: int | None, tiny: bool, drop_path: float, model_kwargs: dict | None = None,
                       adapt: Adapt | None = None) -> Built:
    """Build the preset's base (random, or from `weights`), then RLRR at its placement, or `adapt` it.

    `adapt` is another method (LoRA, SSF, linear probing, full fine-tuning: `benchmarks.variants`)
    for comparisons through the same loop. Seed the global RNG first: the random init (base and
    adapters) draws from it.
    """
    preset = zoo.get_preset(preset_name)
    kwargs = dict(model_kwargs or {})
    if drop_path > 0:
        if preset.library != "timm":
            raise RecipeError(f"drop path (stochastic depth) needs a timm model; {preset.name} is built by {preset.library}: use --drop-path 0")
        kwargs["drop_path_rate"] = drop_path
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = zoo.build_base(preset, num_classes, weights, img_size=img_size, tiny=tiny, **kwargs)
    notes = []
    for w in caught:
        if issubclass(w.category, zoo.RandomWeightsWarning) or str(w.message).startswith("zoo: "):  # reported as notes
            notes.append(str(w.message))
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if adapt is not None:
        mean, std, interpolation = _normalisation(model, preset)
        return Built(adapt(model), preset, None, {"method": method_name(adapt)}, notes, mean, std, interpolation)
    config = preset.placement.config_for(preset.rank if rank is None else rank, init=init)
    arguments = preset.placement.arguments(config)
    if targets:
        arguments["targets"] = list(targets)
    rlrr.apply(model, **arguments)
    mean, std, interpolation = _normalisation(model, preset)
    placement = {k: v for k, v in arguments.items() if k != "config"}
    return Built(model, preset, config, placement, notes, mean, std, interpolation)


def method_name(adapt: Adapt | None) -> str:
    return "rlrr" if adapt is None else getattr(adapt, "__name__", type(adapt).__name__)


def _normalisation(model: nn.Module, preset: zoo.Preset) -> tuple[tuple, tuple, str]:
    """Mean, std and interpolation of the pretrained weights (timm's config; ImageNet's for torchvision)."""
    if preset.library == "timm":
        from timm.data import resolve_data_config

        cfg = resolve_data_config({}, model=model)
        return tuple(cfg["mean"]), tuple(cfg["std"]), cfg.get("interpolation", "bicubic")
    from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    return IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, "bilinear"


def freeze_frozen_norms(model: nn.Module) -> None:
    """BatchNorm layers whose parameters are frozen run in eval mode: their statistics stay the
    pretrained ones. That keeps the adapter file complete (it holds no BatchNorm statistics), the
    fold exact, and one process equal to many (train-mode statistics would be per process)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in m.parameters(recurse=False)):
            m.eval()


def counts(model: nn.Module) -> dict[str, int]:
    """Trainable values: adapters, and the rest (the head)."""
    adapter = sum(p.numel() for a in rlrr.adapters_of(model) for p in a.parameters(recurse=False) if p.requires_grad)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"sites": len(rlrr.adapters_of(model)), "adapter": adapter, "head": trainable - adapter, "trainable": trainable,
            "total": sum(p.numel() for p in model.parameters())}


def metadata(model: nn.Module, built: Built, classes: list[str], finetune: dict) -> dict:
    """User metadata of the run's adapter files: the zoo record (what `zoo.from_adapter` and
    `export.onnx --adapter` build from), the classes, the placement and the run's facts."""
    meta = zoo.adapter_metadata(model)
    if built.config is not None:
        meta["rank"] = built.config.rank
    if meta.get("tiny"):  # the twin's builder arguments, so that a builder that does not know the zoo gets the same model
        meta["model_kwargs"] = {**built.preset.tiny.kwargs, **meta.get("model_kwargs", {})}
    meta["classes"] = list(classes)
    meta["placement"] = {**built.placement, **(built.config.to_dict() if built.config is not None else {})}
    meta["finetune"] = finetune
    return meta


@torch.no_grad()
def copy_trainable(model: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Load trainable tensors by name; ResumeMismatchError-style message on any difference."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing, extra = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    shapes = [f"{n}: {tuple(tensors[n].shape)} vs {tuple(p.shape)}" for n, p in params.items() if n in tensors and tensors[n].shape != p.shape]
    if missing or extra or shapes:
        raise ResumeMismatchError(f"{source} does not fit this model: missing {missing[:5]}, unexpected {extra[:5]}, shapes {shapes[:5]}")
    for n, p in params.items():
        p.copy_(tensors[n])
