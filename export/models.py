"""Build a base model by name, load local base weights, and find its classifier head.

A name is looked up in timm first, then torchvision (`timm:NAME` or `torchvision:NAME` picks one),
or `package.module:function` imports your own builder. Weights are never downloaded: models are
built with `pretrained=False` / `weights=None`, and base weights come from a local file.
"""

from __future__ import annotations

import difflib
import importlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from export.errors import UnknownModelError, WeightsError

SOURCES = ("timm", "torchvision")
WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")


@dataclass
class ModelInfo:
    """Where a base model came from, for the report."""

    name: str  # as asked, e.g. "vit_base_patch16_224" or "torchvision:resnet50"
    source: str = "module"  # "timm", "torchvision", "builder" or "module" (given as an object)
    weights: str = "as given"  # a file path, or how the weights were made
    kwargs: dict = field(default_factory=dict)  # everything passed to the builder
    notes: list[str] = field(default_factory=list)


def _split(name: str) -> tuple[str | None, str]:
    """("timm" | "torchvision" | "builder" | None, name) from a model string."""
    prefix, sep, rest = name.partition(":")
    if not sep:
        return None, name
    if prefix in ("timm", "torchvision", "tv"):
        return ("torchvision" if prefix == "tv" else prefix), rest
    return "builder", name


def _known_names() -> list[str]:
    import timm
    import torchvision

    return list(timm.list_models()) + list(torchvision.models.list_models())


def suggest(name: str, n: int = 5) -> list[str]:
    """Known model names close to `name` (difflib over timm's and torchvision's registries)."""
    plain = _split(name)[1].lower()
    known = _known_names()
    close = difflib.get_close_matches(plain, known, n=n, cutoff=0.6)
    if len(close) < n:  # a family name ("vit_tiny") is a prefix of many real names
        close += [k for k in known if k.startswith(plain) and k not in close][: n - len(close)]
    return close


def _unknown(name: str, why: str = "") -> UnknownModelError:
    close = suggest(name)
    hint = f" Did you mean: {', '.join(close)}?" if close else " See timm.list_models() and torchvision.models.list_models()."
    return UnknownModelError(f"unknown model {name!r}{why}.{hint}")


def _call_builder(spec: str, kwargs: dict) -> nn.Module:
    module_name, _, attr = spec.rpartition(":")
    try:
        builder = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise UnknownModelError(f"model builder {spec!r} cannot be imported: {type(e).__name__}: {e}") from e
    model = builder(**kwargs)
    if not isinstance(model, nn.Module):
        raise UnknownModelError(f"model builder {spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _with_size(build, kwargs: dict, size_key: str, img_size: int | tuple[int, int] | None) -> tuple[nn.Module, dict]:
    """Build with the image size passed on when the model takes one (ViT, Swin); CNNs take any size."""
    if img_size is None or size_key in kwargs:
        return build(kwargs), kwargs
    sized = {**kwargs, size_key: img_size}
    try:
        return build(sized), sized
    except TypeError as e:
        if size_key not in str(e):
            raise
        return build(kwargs), kwargs


def build_model(
    name: str,
    *,
    num_classes: int | None = None,
    img_size: int | tuple[int, int] | None = None,
    model_kwargs: dict | None = None,
) -> tuple[nn.Module, ModelInfo]:
    """A base model with random weights, in eval mode, and where it came from.

    timm first (`timm.create_model(name, pretrained=False, ...)`), then torchvision
    (`torchvision.models.get_model(name, weights=None, ...)`). `img_size` reaches the model as
    `img_size` (timm) or `image_size` (torchvision) when it accepts one. Unknown names raise
    UnknownModelError with close names.
    """
    source, plain = _split(name)
    kwargs = dict(model_kwargs or {})
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    try:
        if source == "builder":
            model, used = _call_builder(name, kwargs), kwargs
        else:
            import timm

            if source in (None, "timm") and timm.is_model(plain):
                model, used = _with_size(lambda kw: timm.create_model(plain, pretrained=False, **kw), kwargs, "img_size", img_size)
                source = "timm"
            else:
                import torchvision

                if source == "timm" or plain not in torchvision.models.list_models():
                    raise _unknown(name, " in timm" if source == "timm" else " in timm or torchvision")
                model, used = _with_size(lambda kw: torchvision.models.get_model(plain, weights=None, **kw), kwargs, "image_size", img_size)
                source = "torchvision"
    except UnknownModelError:
        raise
    except (TypeError, ValueError, RuntimeError, KeyError, AssertionError) as e:
        raise UnknownModelError(f"building model {name!r} with {kwargs} failed: {type(e).__name__}: {e}") from e
    return model.eval(), ModelInfo(name=name, source=source or "timm", weights="random init", kwargs=used)


def input_size(model: nn.Module, img_size: int | tuple[int, int] | None = None, model_kwargs: dict | None = None) -> tuple[int, int, int]:
    """(C, H, W) for export: `img_size` if given, else the model kwargs', else its timm config, else 224."""
    kwargs = model_kwargs or {}
    cfg = getattr(model, "pretrained_cfg", None) or {}
    default = tuple(cfg.get("input_size", (3, 224, 224)))
    size = img_size or kwargs.get("img_size") or kwargs.get("image_size") or default[1:]
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    channels = kwargs.get("in_chans", default[0])
    return int(channels), int(height), int(width)


def classifier_name(model: nn.Module) -> str | None:
    """The classifier head's module name: timm's config says it, else the last nn.Linear (torchvision)."""
    modules = dict(model.named_modules())
    cfg = getattr(model, "pretrained_cfg", None) or {}
    named = cfg.get("classifier")
    if isinstance(named, str):  # timm says which; an nn.Identity there (num_classes=0) is no head
        return named if named in modules and any(True for _ in modules[named].parameters()) else None
    linears = [n for n, m in modules.items() if isinstance(m, nn.Linear) and n]
    return linears[-1] if linears else None


# --- local base weights ------------------------------------------------------------------

_WRAPPERS = ("state_dict", "model", "model_state_dict", "module")


def read_weights(path: str | os.PathLike) -> dict[str, Tensor]:
    """A state dict from a local .pth/.pt/.bin/.safetensors file; WeightsError if unreadable."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many kinds on a bad file
        raise WeightsError(f"cannot read weights file {path} (expected a state dict in {', '.join(WEIGHT_SUFFIXES)}): {type(e).__name__}: {e}") from e
    for key in _WRAPPERS:  # a training checkpoint: {"state_dict": {...}, "epoch": ...}
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise WeightsError(f"weights file {path} does not hold a state dict of tensors (got {type(state).__name__})")
    if state and all(k.startswith("module.") for k in state):  # saved from DataParallel/DDP
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_weights(model: nn.Module, path: str | os.PathLike, state: dict[str, Tensor] | None = None) -> list[str]:
    """Load base weights with strict key checking; returns notes on what was kept as built.

    Every key must match in name and shape, except the classifier head's shape (a head built for
    another class count keeps its fresh init, and the adapter file usually brings the trained one).
    `state`: the file's tensors if already read (`read_weights`).
    """
    state = dict(read_weights(path) if state is None else state)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    head = classifier_name(model)
    shapes, head_kept = [], []
    for k in sorted(set(own) & set(state)):
        if own[k].shape != state[k].shape:
            if head and k.startswith(head + "."):
                head_kept.append(k)
            else:
                shapes.append(f"{k}: file {tuple(state[k].shape)}, model {tuple(own[k].shape)}")
    if missing or unexpected or shapes:
        parts = []
        for label, items in (("missing in the file", missing), ("not in the model", unexpected), ("shape differs", shapes)):
            if items:
                parts.append(f"{label} ({len(items)}): {', '.join(items[:8])}{' ...' if len(items) > 8 else ''}")
        raise WeightsError(f"weights file {path} does not fit {type(model).__name__}: " + "; ".join(parts))
    for k in head_kept:
        state.pop(k)
    model.load_state_dict(state, strict=False)
    return [f"{k} kept as built: the file's head has another class count" for k in head_kept]


# --- a random base that hides nothing ----------------------------------------------------


@torch.no_grad()
def wake(model: nn.Module, seed: int = 0) -> list[str]:
    """Redraw the constant tensors of a randomly initialised model, seeded, so every layer counts.

    timm and torchvision zero-initialise some norms' gammas (ResNet), start layer scales at 1e-6
    (ConvNeXt) and leave biases and BatchNorm statistics at 0 and 1: an adapter behind them barely
    reaches the output and a broken fold could hide (design.md §5). Returns the names redrawn.
    """
    g = torch.Generator().manual_seed(seed)
    changed = []
    stats = [(n, b) for n, b in model.named_buffers() if n.rsplit(".", 1)[-1] in ("running_mean", "running_var")]
    for name, t in [*model.named_parameters(), *stats]:  # other buffers (attention masks ...) are not weights
        if not t.is_floating_point() or t.dim() == 0 or t.numel() < 2:
            continue
        if not bool((t == t.reshape(-1)[0]).all()):
            continue
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "running_mean":
            value = torch.randn(t.shape, generator=g) * 0.1
        elif leaf == "running_var" or (t.dim() == 1 and leaf != "bias"):  # norm gammas, layer scales
            value = torch.rand(t.shape, generator=g) + 0.5
        else:  # zero biases, zero-initialised heads
            value = torch.randn(t.shape, generator=g) * 0.02
        t.copy_(value.to(t.dtype))
        changed.append(name)
    return changed
