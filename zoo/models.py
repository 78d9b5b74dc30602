"""Build any model by name, and find what a model takes and where its classifier is.

A name is looked up in timm first, then torchvision (`timm:NAME`, `torchvision:NAME` or `tv:NAME`
picks one), or `package.module:function` imports your own builder. Nothing is downloaded: models
are built with `pretrained=False` / `weights=None`; base weights come from a local file
(`zoo.load_into`). The presets (`zoo.build`) build through `create` as well.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

import rlrr

from zoo.errors import UnknownModelError

PREFIXES = {"timm": "timm", "torchvision": "torchvision", "tv": "torchvision"}  # name prefix -> library


@dataclass(frozen=True)
class ModelSource:
    """Where a model built by name came from."""

    name: str  # as asked, e.g. "vit_base_patch16_224" or "torchvision:resnet50"
    library: str  # "timm", "torchvision" or "builder" (a user's `package.module:function`)
    kwargs: dict = field(default_factory=dict)  # everything passed to the builder


def create(library: str, name: str, **kwargs) -> nn.Module:
    """A model from timm or torchvision with random weights: `name` is the library's own builder name.

    torchvision: a builder function (`resnet50`), or a model class (`VisionTransformer`) for sizes
    no builder offers.
    """
    if library == "timm":
        import timm

        return timm.create_model(name, pretrained=False, **kwargs)
    import torchvision

    cls = getattr(torchvision.models, name, None)
    if isinstance(cls, type):
        return cls(**kwargs)
    return torchvision.models.get_model(name, weights=None, **kwargs)


def _split(name: str) -> tuple[str | None, str]:
    """("timm" | "torchvision" | "builder" | None, name without its library prefix)."""
    prefix, sep, rest = name.partition(":")
    if not sep:
        return None, name
    if prefix in PREFIXES:
        return PREFIXES[prefix], rest
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


def _with_size(build: Callable[[dict], nn.Module], kwargs: dict, size_key: str, img_size: int | tuple[int, int] | None) -> tuple[nn.Module, dict]:
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
) -> tuple[nn.Module, ModelSource]:
    """Any model by name, with random weights, in eval mode, and where it came from.

    timm first (`timm.create_model(name, pretrained=False, ...)`), then torchvision
    (`torchvision.models.get_model(name, weights=None, ...)`). `img_size` reaches the model as
    `img_size` (timm) or `image_size` (torchvision) when it accepts one. Unknown names and failed
    builds raise UnknownModelError, with close names for the unknown.
    """
    library, plain = _split(name)
    kwargs = dict(model_kwargs or {})
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    try:
        if library == "builder":
            model, used = _call_builder(name, kwargs), kwargs
        else:
            import timm

            if library in (None, "timm") and timm.is_model(plain):
                library = "timm"
                model, used = _with_size(lambda kw: create("timm", plain, **kw), kwargs, "img_size", img_size)
            else:
                import torchvision

                if library == "timm" or plain not in torchvision.models.list_models():
                    raise _unknown(name, " in timm" if library == "timm" else " in timm or torchvision")
                library = "torchvision"
                model, used = _with_size(lambda kw: create("torchvision", plain, **kw), kwargs, "image_size", img_size)
    except UnknownModelError:
        raise
    except (TypeError, ValueError, RuntimeError, KeyError, AssertionError) as e:
        raise UnknownModelError(f"building model {name!r} with {kwargs} failed: {type(e).__name__}: {e}") from e
    return model.eval(), ModelSource(name, library, used)


def input_size(model: nn.Module, img_size: int | tuple[int, int] | None = None, model_kwargs: dict | None = None) -> tuple[int, int, int]:
    """(C, H, W) the model takes: `img_size` if given, else the model kwargs', else its timm config, else 224."""
    kwargs = model_kwargs or {}
    cfg = getattr(model, "pretrained_cfg", None) or {}
    default = tuple(cfg.get("input_size", (3, 224, 224)))
    size = img_size or kwargs.get("img_size") or kwargs.get("image_size") or default[1:]
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    channels = kwargs.get("in_chans", default[0])
    return int(channels), int(height), int(width)


def classifier_name(model: nn.Module) -> str | None:
    """The classifier head's module name: timm's pretrained_cfg says it, else the last nn.Linear.

    None when the model has no head (timm's `num_classes=0` leaves an nn.Identity there).
    """
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if isinstance(cfg.get("classifier"), str):  # timm says which; an nn.Identity there (num_classes=0) is no head
        return rlrr.declared_classifier(model)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n]
    return linears[-1] if linears else None
