"""Build a preset: the base model (random or from a local weight file), then the paper's RLRR placement.

`build` returns the adapted model with exactly the paper's trainable set (adapters plus head) and
records how it was built (`model.zoo_build`), so `adapter_metadata` can write the preset, model,
num_classes and img_size into an adapter file and `from_adapter` can rebuild the base model from it.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

from torch import nn

import rlrr
from zoo.errors import AdapterMetadataError, RandomWeightsWarning, WeightsFileError, user_stacklevel
from zoo.models import create
from zoo.presets import Preset, get_preset
from zoo.weights import load_into, load_via_timm, read_state_dict

RECORD = "zoo_build"  # attribute of a built model holding its BuildRecord
LOADERS = ("auto", "zoo", "timm")


@dataclass(frozen=True)
class BuildRecord:
    """How a model was built: enough to build the same base model again."""

    preset: str  # preset name
    library: str  # "timm" or "torchvision"
    model: str  # the builder actually called (the twin's where it differs)
    num_classes: int  # head size
    img_size: int  # input resolution
    tiny: bool = False  # the preset's test-size twin
    model_kwargs: dict = field(default_factory=dict)  # extra builder arguments the caller gave
    weights: str | None = None  # file name of the base weights; None: random weights
    rank: int | None = None  # RLRR rank, once adapted

    def metadata(self) -> dict:
        """User metadata for `rlrr.save_adapter` (JSON-serialisable)."""
        meta = asdict(self)
        try:
            json.dumps(meta)
        except TypeError as e:
            raise AdapterMetadataError(f"model_kwargs {self.model_kwargs!r} cannot be stored in an adapter file (JSON): {e}") from e
        return meta


def _builder_name(preset: Preset, tiny: bool) -> str:
    return (preset.tiny.arch or preset.arch) if tiny else preset.arch


def _model_kwargs(preset: Preset, img_size: int | None, tiny: bool, model_kwargs: dict) -> tuple[dict, int]:
    kwargs = {**(preset.tiny.kwargs if tiny else {}), **model_kwargs}
    if preset.size_arg and preset.size_arg in kwargs:
        img = int(kwargs[preset.size_arg])
    else:
        img = img_size or (preset.tiny.img_size if tiny else preset.img_size)
        if preset.size_arg:
            kwargs[preset.size_arg] = img
    return kwargs, img


def _create(preset: Preset, builder: str, num_classes: int, kwargs: dict, overlay: dict | None = None) -> nn.Module:
    if overlay is None:
        return create(preset.library, builder, num_classes=num_classes, **kwargs)
    import timm

    # the pretrained tag (e.g. ".orig_in21k") picks timm's checkpoint filter for that source
    name = preset.weights if builder == preset.arch else builder
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, num_classes=num_classes, **kwargs)


def _choose_loader(preset: Preset, weights: Path, loader: str) -> str:
    if loader == "auto":
        loader = "timm" if weights.suffix.lower() == ".npz" else "zoo"
    if loader == "timm" and preset.library != "timm":
        raise WeightsFileError(f"{weights}: loader='timm' (and .npz files) need a timm preset; {preset.name} is built by {preset.library}")
    return loader


def build_base(
    name: str | Preset,
    num_classes: int | None = None,
    weights: str | os.PathLike | None = None,
    *,
    img_size: int | None = None,
    loader: str = "auto",
    tiny: bool = False,
    **model_kwargs,
) -> nn.Module:
    """The preset's base model, without adapters: random weights, or loaded from a local file.

    `weights`: a `.safetensors`/`.pth`/`.pt` state dict of this model (strict, the head excepted),
    or with `loader="timm"` (automatic for `.npz`) any file timm's checkpoint filter reads.
    `tiny=True` builds the preset's test-size twin. Extra keyword arguments go to the builder.
    """
    preset = get_preset(name)
    if loader not in LOADERS:
        raise rlrr.ConfigError(f"loader must be one of {LOADERS}, got {loader!r}")
    num_classes = preset.num_classes if num_classes is None else num_classes
    builder = _builder_name(preset, tiny)
    kwargs, img = _model_kwargs(preset, img_size, tiny, model_kwargs)
    target = f"preset {preset.name}" + (" (tiny twin)" if tiny else "")
    head = preset.placement.trainable
    if weights is None:
        model = _create(preset, builder, num_classes, kwargs)
        if not tiny:
            warnings.warn(f"zoo: {preset.name} has random weights: no weight file given. Its pretrained weights are "
                          f"{preset.weights} ({preset.weights_url}); download them elsewhere and pass weights=<file>",
                          RandomWeightsWarning, stacklevel=user_stacklevel())
    else:
        path = Path(weights)
        if _choose_loader(preset, path, loader) == "timm":
            model = load_via_timm(lambda overlay: _create(preset, builder, num_classes, kwargs, overlay), path, num_classes, head, target)
        else:
            state = read_state_dict(path)
            model = _create(preset, builder, num_classes, kwargs)
            hint = ("Original-format checkpoints (Google .npz, Microsoft Swin, Facebook DeiT/ConvNeXt .pth) load with loader='timm'"
                    if preset.library == "timm" else "")
            load_into(model, state, head=head, source=str(path), target=target, hint=hint)
    _record(model, BuildRecord(preset.name, preset.library, builder, num_classes, img, tiny, dict(model_kwargs),
                               None if weights is None else Path(weights).name))
    return model


def build(
    name: str | Preset,
    num_classes: int | None = None,
    rank: int | None = None,
    weights: str | os.PathLike | None = None,
    *,
    img_size: int | None = None,
    loader: str = "auto",
    tiny: bool = False,
    **model_kwargs,
) -> nn.Module:
    """The preset's model with RLRR at the paper's placement: only adapters and the head train.

    `rank` defaults to the preset's (1, Eq. 16). See `build_base` for the other arguments.
    """
    preset = get_preset(name)
    rank = preset.rank if rank is None else rank
    model = build_base(preset, num_classes, weights, img_size=img_size, loader=loader, tiny=tiny, **model_kwargs)
    rlrr.apply(model, **preset.placement.arguments(preset.placement.config_for(rank)))
    _record(model, BuildRecord(**{**asdict(getattr(model, RECORD)), "rank": rank}))
    return model


def _record(model: nn.Module, record: BuildRecord) -> None:
    setattr(model, RECORD, record)  # a plain attribute: nn.Module keeps it out of parameters and state dict


def build_record(model: nn.Module) -> BuildRecord:
    """How `model` was built by the zoo; AdapterMetadataError if it was not."""
    record = getattr(model, RECORD, None)
    if not isinstance(record, BuildRecord):
        raise AdapterMetadataError(f"{type(model).__name__} was not built by zoo.build: pass the preset name to "
                                   f"zoo.adapter_metadata(name, num_classes=..., img_size=...) instead")
    return record


def adapter_metadata(model_or_preset: nn.Module | str, *, num_classes: int | None = None, img_size: int | None = None,
                     tiny: bool = False, **model_kwargs) -> dict:
    """User metadata for `rlrr.save_adapter`, so that `from_adapter` can rebuild the base model.

    Keys: preset, library, model, num_classes, img_size, tiny, model_kwargs, weights, rank.
    From a model built by the zoo, or from a preset name and the arguments it was built with.
    """
    if isinstance(model_or_preset, nn.Module):
        return build_record(model_or_preset).metadata()
    preset = get_preset(model_or_preset)
    kwargs, img = _model_kwargs(preset, img_size, tiny, model_kwargs)
    num_classes = preset.num_classes if num_classes is None else num_classes
    return BuildRecord(preset.name, preset.library, _builder_name(preset, tiny), num_classes, img, tiny, dict(model_kwargs)).metadata()


def from_adapter(path: str | os.PathLike, weights: str | os.PathLike | None = None, *, loader: str = "auto") -> nn.Module:
    """Rebuild the base model an adapter file was trained on (its zoo metadata), then load the adapter.

    `weights` is the base model's weight file; without it the base model is random (a warning
    names the file the adapter was trained on, if its metadata records one).
    """
    stored = rlrr.read_adapter_file(path)
    config, user = stored.config, stored.metadata
    missing = [k for k in ("preset", "model", "num_classes", "img_size") if k not in user]
    if missing:
        raise AdapterMetadataError(f"{path} has no zoo metadata ({', '.join(missing)} missing; it has {sorted(user) or 'none'}). "
                                   f"Save with rlrr.save_adapter(model, path, metadata=zoo.adapter_metadata(model)), or build "
                                   f"the base model yourself and call rlrr.load_adapter(model, path)")
    preset = get_preset(user["preset"])
    tiny = bool(user.get("tiny", False))
    if user["model"] != _builder_name(preset, tiny):
        raise AdapterMetadataError(f"{path} was trained on {user['model']!r}, but preset {preset.name} now builds "
                                   f"{_builder_name(preset, tiny)!r}: build that model yourself and call rlrr.load_adapter")
    if weights is None and user.get("weights"):
        warnings.warn(f"zoo: {path} was trained on base weights {user['weights']!r}; without weights=<file> the base model is random",
                      RandomWeightsWarning, stacklevel=user_stacklevel())
    with warnings.catch_warnings():
        if weights is None and user.get("weights"):
            warnings.simplefilter("ignore", RandomWeightsWarning)  # said once above
        model = build_base(preset, user["num_classes"], weights, img_size=user["img_size"], loader=loader, tiny=tiny,
                           **user.get("model_kwargs", {}))
    rlrr.load_adapter(model, path, trainable=list(preset.placement.trainable))
    _record(model, BuildRecord(**{**asdict(getattr(model, RECORD)), "rank": config.rank}))
    return model
