"""Local weight files: read them, and load them into a base model with strict key checking.

Two routes, both offline:
- the zoo's own (`.safetensors`, `.pth`/`.pt`/`.bin`): the file must be a state dict of the very
  model being built (common `{"state_dict": ...}`/`{"model": ...}` wrappers and a DDP `module.`
  prefix are unwrapped). Every key must match in name and shape, except the classifier head,
  which keeps its fresh initialisation when the checkpoint's head has another size (or none);
- timm's (`pretrained_cfg_overlay=dict(file=...)`): timm reads the file and applies the model's
  checkpoint filter, so original-format checkpoints load too: Google's `.npz` ViTs, Microsoft's
  Swin `.pth`, Facebook's DeiT/ConvNeXt `.pth`.
Either way a file for another model raises WeightsMismatchError naming the keys.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from zoo.errors import WeightsFileError, WeightsMismatchError, user_stacklevel
from zoo.models import classifier_name

TORCH_SUFFIXES = (".pth", ".pt", ".bin")
WRAPPERS = ("state_dict", "model", "model_state_dict", "module")  # checkpoint dicts that hold the state dict
SHOWN = 8  # keys named per kind of problem in an error message


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """The tensors of a `.safetensors` or `.pth`/`.pt`/`.bin` file, unwrapped to a flat state dict."""
    path = Path(path)
    if not path.is_file():
        raise WeightsFileError(f"weight file {path} is a folder, not a file" if path.is_dir() else f"weight file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        raise WeightsFileError(f"{path}: .npz checkpoints (Google's ViT) are read by timm; build a timm ViT preset with loader='timm'")
    if suffix not in (".safetensors", *TORCH_SUFFIXES):
        raise WeightsFileError(f"{path}: unknown weight file format {suffix!r}; expected .safetensors, {', '.join(TORCH_SUFFIXES)} or .npz (timm)")
    try:
        if suffix == ".safetensors":
            obj = load_file(str(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError) as e:
        raise WeightsFileError(f"cannot read weight file {path} (truncated, corrupted, or not a plain tensor file; torch.load runs with weights_only=True): {e}") from e
    return _unwrap(obj, path)


def _unwrap(obj: object, path: Path) -> dict[str, Tensor]:
    while isinstance(obj, dict) and not all(isinstance(v, Tensor) for v in obj.values()):
        inner = next((obj[k] for k in WRAPPERS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            raise WeightsFileError(f"{path} holds no state dict: top-level keys {sorted(map(str, obj))[:SHOWN]} (looked under {', '.join(WRAPPERS)})")
        obj = inner
    if not isinstance(obj, dict) or not obj:
        raise WeightsFileError(f"{path} holds {type(obj).__name__}, not a state dict of tensors")
    if all(k.startswith("module.") for k in obj):  # saved from DistributedDataParallel
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def _under(key: str, prefixes: Iterable[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


_BUFFERS = ("num_batches_tracked", "running_mean", "running_var")


def _params_first(keys: list[str]) -> list[str]:
    return sorted(keys, key=lambda k: k.endswith(_BUFFERS))  # stable: BatchNorm statistics say least


def mismatch_message(source: str, target: str, missing: list[str], unexpected: list[str], shapes: list[str], hint: str = "") -> str:
    """Which keys differ, by kind, the first few of each named."""
    missing, unexpected = _params_first(missing), _params_first(unexpected)
    hint = hint if missing and unexpected else ""  # renamed keys: perhaps another checkpoint format
    parts = []
    if missing:
        parts.append(f"{len(missing)} key(s) the model needs are missing from the file: {missing[:SHOWN]}")
    if unexpected:
        parts.append(f"{len(unexpected)} key(s) in the file are not in the model: {unexpected[:SHOWN]}")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatch(es): {shapes[:SHOWN]}")
    return f"{source} is not a checkpoint of {target}: " + "; ".join(parts) + (f". {hint}" if hint else "")


def load_into(
    model: nn.Module,
    weights: str | os.PathLike | Mapping[str, Tensor],
    *,
    head: str | Iterable[str] | None = None,
    source: str | None = None,
    target: str | None = None,
    hint: str = "",
) -> list[str]:
    """Load base weights into `model` strictly, except the classifier head; returns the head keys left as built.

    `weights`: a weight file (read by `read_state_dict`) or its tensors, already read. `head`: the
    head's module names (default: `classifier_name(model)`). Head keys are skipped, and the whole
    head keeps its fresh initialisation with a warning, when the file's head has another shape than
    the model's or is absent; any other difference raises WeightsMismatchError naming the keys.
    `source`/`target` name the file and the model in messages; `hint` is added when keys look renamed.
    """
    if isinstance(weights, Mapping):
        state, source = dict(weights), source or "the state dict"
    else:
        state, source = read_state_dict(weights), source or str(weights)
    if head is None:
        head = classifier_name(model) or ()
    head = (head,) if isinstance(head, str) else tuple(head)
    target = target or type(model).__name__
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [k for k in expected if k in state and _shape(state[k]) != _shape(expected[k])]
    skipped = [k for k in missing + unexpected + shapes if _under(k, head)]
    bad_missing, bad_unexpected = [k for k in missing if k not in skipped], [k for k in unexpected if k not in skipped]
    bad_shapes = [f"{k}: file {_shape(state[k])}, model {_shape(expected[k])}" for k in shapes if k not in skipped]
    if bad_missing or bad_unexpected or bad_shapes:
        raise WeightsMismatchError(mismatch_message(source, target, bad_missing, bad_unexpected, bad_shapes, hint))
    reinit = bool(skipped)  # the whole head is reinitialised, never half of it
    if reinit:
        _warn_head(source, head, state, expected)
    model.load_state_dict({k: v for k, v in state.items() if k in expected and not (reinit and _under(k, head))}, strict=False)
    return sorted(k for k in expected if _under(k, head)) if reinit else []


def _warn_head(source: str, head: tuple[str, ...], state: dict[str, Tensor], expected: dict[str, Tensor]) -> None:
    def describe(d: dict[str, Tensor]) -> str:
        shapes = {k: _shape(v) for k, v in d.items() if _under(k, head)}
        return ", ".join(f"{k} {s}" for k, s in shapes.items()) or "none"

    warnings.warn(f"zoo: {source}: the classifier head ({', '.join(head)}) was not loaded and keeps its fresh "
                  f"initialisation: the file has {describe(state)}, the model has {describe(expected)} "
                  f"(num_classes differs from the checkpoint's)", stacklevel=user_stacklevel())


# --- timm's route -------------------------------------------------------------------------------

_QUOTED = re.compile(r'"([^"]+)"')
_SIZE = re.compile(r"size mismatch for ([^:\s]+): copying a param with shape torch\.Size\((\[[^]]*\])\) from checkpoint, "
                   r"the shape in current model is torch\.Size\((\[[^]]*\])\)")


def parse_load_error(message: str) -> tuple[list[str], list[str], list[str]]:
    """(missing, unexpected, shape mismatches) named by torch's `load_state_dict` error message."""
    missing, unexpected, shapes = [], [], []
    for line in message.splitlines():
        line = line.strip()
        if line.startswith("Missing key(s)"):
            missing += _QUOTED.findall(line)
        elif line.startswith("Unexpected key(s)"):
            unexpected += _QUOTED.findall(line)
        else:
            shapes += [f"{k}: file {tuple(_parse_shape(a))}, model {tuple(_parse_shape(b))}" for k, a, b in _SIZE.findall(line)]
    return missing, unexpected, shapes


def _parse_shape(text: str) -> list[int]:
    return [int(n) for n in text.strip("[]").split(",") if n.strip()]


def timm_overlay(path: Path, num_classes: int) -> dict:
    """`pretrained_cfg_overlay` that makes timm read `path` and nothing else (no hub, no URL).

    num_classes is declared to be the file's, so timm loads the head strictly; `load_via_timm`
    retries without the head when only the head differs.
    """
    overlay = {"file": str(path), "source": "file", "url": "", "hf_hub_id": None, "state_dict": None, "num_classes": num_classes}
    if path.suffix.lower() == ".npz":
        overlay["custom_load"] = True  # timm's ViT reads Google's .npz with its own `load_pretrained`
    return overlay


def load_via_timm(create: Callable[[dict], nn.Module], path: str | os.PathLike, num_classes: int, head: Iterable[str], target: str) -> nn.Module:
    """Build a timm model through `create(overlay)` with timm loading `path` itself.

    A strict first attempt; if the only keys torch complains about are the head's, a second one
    declares another class count so that timm drops the head (a warning says so).
    """
    path = Path(path)
    head = tuple(head)
    if not path.is_file():
        raise WeightsFileError(f"weight file {path} is a folder, not a file" if path.is_dir() else f"weight file {path} does not exist")
    try:
        return create(timm_overlay(path, num_classes))
    except RuntimeError as e:
        missing, unexpected, shapes = parse_load_error(str(e))
        keys = missing + unexpected + [s.split(":", 1)[0] for s in shapes]
        if not keys:
            raise WeightsFileError(f"timm could not load {path} into {target}: {e}") from e
        if not all(_under(k, head) for k in keys):
            others = [[k for k in part if not _under(k.split(":", 1)[0], head)] for part in (missing, unexpected, shapes)]
            raise WeightsMismatchError(mismatch_message(f"{path} (read by timm, after its checkpoint filter)", target, *others)) from e
    except (KeyError, ValueError, OSError, pickle.UnpicklingError) as e:  # npz readers raise these
        raise WeightsFileError(f"timm could not read {path} for {target}: {type(e).__name__}: {e}") from e
    model = create(timm_overlay(path, -1))  # reason: a count no file has makes timm discard the head keys
    warnings.warn(f"zoo: {path}: the classifier head ({', '.join(head)}) was not loaded and keeps its fresh initialisation "
                  f"(the checkpoint's head has another size than num_classes={num_classes}, or none)", stacklevel=user_stacklevel())
    return model
