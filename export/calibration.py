"""Images for INT8 calibration and for checking the quantized model, read the way the model reads them.

`--calibration DIR` is one of
- an ImageFolder tree, with splits (`DIR/train/<class>/*`, `DIR/val/...`, `DIR/test/...`) or without
  (`DIR/<class>/*`), or a flat folder of images;
- the fine-tuning layouts (docs/finetune.md): VTAB-1k lists (`train800.txt`, `test.txt` ...,
  "<relative path> <label>" per line) or FGVC json files (`train.json`, `test.json` ...).
Calibration takes training images; the agreement check takes images calibration did not see (the
test split, else val; in a folder without splits, the images left after a seeded draw).

Preprocessing is the model's own: timm's data config (mean, std, interpolation) for timm models,
ImageNet's mean and std (bilinear) otherwise; a resize to the input size, as fine-tuning evaluates
(for FGVC's json layout: resize to 256/224 of it and centre-crop, as the paper's FGVC code does).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

import rlrr

EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SPLIT_FOLDERS = ("train", "val", "test")
LIST_FILES = {"train": ("train800.txt", "train.txt", "train800val200.txt", "trainval.txt"), "val": ("val200.txt", "val.txt"), "test": ("test.txt",)}
JSON_FILES = {"train": ("train.json", "trainval.json"), "val": ("val.json",), "test": ("test.json",)}


@dataclass
class ImageSet:
    """Preprocessed images (N, C, H, W) float32, their labels (-1 where the layout has none), and where they came from."""

    images: Tensor
    labels: Tensor
    description: str
    files: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, size: int) -> list[Tensor]:
        return list(self.images.split(max(1, size)))


@dataclass
class Layout:
    """What was found under a folder: (path, label) pairs for calibration and for the check."""

    form: str
    calibration: list[tuple[Path, int]]
    evaluation: list[tuple[Path, int]]
    calibration_from: str
    evaluation_from: str


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in EXTENSIONS)


def _class_tree(folder: Path, classes: list[str] | None = None) -> list[tuple[Path, int]]:
    classes = classes if classes is not None else sorted(p.name for p in folder.iterdir() if p.is_dir())
    return [(f, label) for label, name in enumerate(classes) for f in _images_in(folder / name)]


def _read_list(path: Path, root: Path) -> list[tuple[Path, int]]:
    items = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.strip().rsplit(None, 1)
        if not parts:
            continue
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise rlrr.ConfigError(f"{path}:{number}: expected '<relative path> <integer label>', got {line.strip()!r}")
        items.append((root / parts[0], int(parts[1])))
    return items


def _read_json(path: Path, root: Path) -> list[tuple[Path, int]]:
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise rlrr.ConfigError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise rlrr.ConfigError(f"{path} must map '<relative image path>' to a label, as the fine-tuning data does")
    images = root / "images" if (root / "images").is_dir() else root
    return [(images / rel, int(label)) for rel, label in data.items()]


def _first(root: Path, names: Sequence[str]) -> Path | None:
    return next((root / n for n in names if (root / n).is_file()), None)


def find_layout(root: str | os.PathLike, *, calibration: int, seed: int) -> Layout:
    """Which images calibrate and which check, under `root` (see the module docstring)."""
    root = Path(root)
    if not root.is_dir():
        raise rlrr.ConfigError(f"--calibration {root}: " + ("not a folder" if root.exists() else "no such folder"))
    lists = {s: _first(root, names) for s, names in LIST_FILES.items()}
    jsons = {s: _first(root, names) for s, names in JSON_FILES.items()}
    if any(lists.values()) or any(jsons.values()):
        form, files, read = ("VTAB-1k lists", lists, _read_list) if any(lists.values()) else ("FGVC json", jsons, _read_json)
        splits = {s: read(f, root) for s, f in files.items() if f is not None}
        held = "test" if "test" in splits else "val" if "val" in splits else None
        calib = "train" if "train" in splits else next(s for s in splits if s != held)
        if held is None or held == calib:
            return _split(form, splits[calib], files[calib].name, calibration, seed)
        return Layout(form, splits[calib], splits[held], files[calib].name, files[held].name)
    present = [s for s in SPLIT_FOLDERS if (root / s).is_dir()]
    if present:
        classes = sorted(p.name for p in (root / present[0]).iterdir() if p.is_dir())
        splits = {s: _class_tree(root / s, classes) if classes else [(f, -1) for f in _images_in(root / s)] for s in present}
        held = "test" if "test" in splits else "val" if "val" in splits else None
        calib = "train" if "train" in splits else present[0]
        if held is None or held == calib:
            return _split("ImageFolder", splits[calib], f"{calib}/", calibration, seed)
        return Layout("ImageFolder", splits[calib], splits[held], f"{calib}/", f"{held}/")
    items = _class_tree(root)
    if items:
        return _split("ImageFolder (no splits)", items, "a seeded draw", calibration, seed)
    return _split("a folder of images", [(f, -1) for f in _images_in(root)], "a seeded draw", calibration, seed)


def _split(form: str, items: list[tuple[Path, int]], source: str, calibration: int, seed: int) -> Layout:
    """No held-out split: `calibration` images drawn with `seed` calibrate, the others check."""
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    take = min(calibration, max(0, len(items) - 1)) if len(items) > 1 else len(items)
    calib, rest = [items[i] for i in order[:take]], [items[i] for i in order[take:]]
    return Layout(form, calib, rest, f"{source} of {len(items)}", f"the other {len(rest)}")


def preprocessing(model: nn.Module, size: tuple[int, int], *, centre_crop: bool = False):
    """The model's own eval transform: its mean, std and interpolation; resize (or resize + crop)."""
    from torchvision import transforms as T
    from torchvision.transforms import InterpolationMode

    mean, std, interpolation = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bilinear"  # ImageNet's (torchvision)
    if getattr(model, "pretrained_cfg", None):
        from timm.data import resolve_data_config

        cfg = resolve_data_config({}, model=model)
        mean, std, interpolation = tuple(cfg["mean"]), tuple(cfg["std"]), cfg.get("interpolation", "bicubic")
    mode = InterpolationMode.BILINEAR if interpolation == "bilinear" else InterpolationMode.BICUBIC
    resize = [T.Resize(tuple(round(s * 256 / 224) for s in size), interpolation=mode), T.CenterCrop(size)] if centre_crop \
        else [T.Resize(size, interpolation=mode)]
    return T.Compose([*resize, T.ToTensor(), T.Normalize(mean=list(mean), std=list(std))])


def load_images(items: Sequence[tuple[Path, int]], transform, description: str) -> ImageSet:
    """Read and preprocess `items` (RGB); an unreadable file is bad input, named."""
    from PIL import Image

    tensors, labels = [], []
    for path, label in items:
        try:
            with Image.open(path) as img:
                tensors.append(transform(img.convert("RGB")))
        except (OSError, ValueError, Image.DecompressionBombError) as e:  # unreadable, truncated, not an image, a pixel bomb
            raise rlrr.ConfigError(f"cannot read calibration image {path}: {type(e).__name__}: {e}") from e
        labels.append(label)
    return ImageSet(torch.stack(tensors), torch.tensor(labels, dtype=torch.long), description, [str(p) for p, _ in items])


def read_image_sets(root: str | os.PathLike, model: nn.Module, shape: Sequence[int], *, calibration: int, evaluation: int,
                    seed: int = 0) -> tuple[ImageSet, ImageSet]:
    """(calibration images, held-out images) under `root`, preprocessed for `model` at `shape` (C, H, W).

    Raises rlrr.ConfigError for a folder with no images, or with too few to hold any out.
    """
    layout = find_layout(root, calibration=calibration, seed=seed)
    if not layout.calibration:
        raise rlrr.ConfigError(f"--calibration {root} holds no images ({layout.form}; looked for {', '.join(EXTENSIONS)})")
    if not layout.evaluation:
        raise rlrr.ConfigError(f"--calibration {root}: {len(layout.calibration)} image(s), none left to check the quantized model on "
                               "images calibration did not see; add images or a test/ split")
    missing = [str(p) for p, _ in layout.calibration + layout.evaluation if not p.is_file()]
    if missing:
        raise rlrr.ConfigError(f"--calibration {root}: {len(missing)} listed image(s) do not exist, e.g. {missing[:3]}")
    transform = preprocessing(model, (int(shape[1]), int(shape[2])), centre_crop=layout.form == "FGVC json")
    calib = _spread(layout.calibration, calibration)
    held = _spread(layout.evaluation, evaluation)
    return (load_images(calib, transform, f"{len(calib)} image(s) from {root} ({layout.form}: {layout.calibration_from})"),
            load_images(held, transform, f"{len(held)} held-out image(s) from {root} ({layout.form}: {layout.evaluation_from})"))


def _spread(items: list, n: int) -> list:
    """`n` items spread evenly over the list (every class of a sorted ImageFolder), in order."""
    if n >= len(items):
        return list(items)
    return [items[(i * len(items)) // n] for i in range(n)]


def read_images(folder: str | os.PathLike, model: nn.Module, shape: Sequence[int]) -> ImageSet:
    """Every image of one ImageFolder split (`folder/<class>/*`, labels in sorted class order), read
    with `model`'s preprocessing at `shape` (C, H, W): what the accuracy benchmark evaluates on."""
    folder = Path(folder)
    items = _class_tree(folder) if folder.is_dir() else []
    if not items:
        raise rlrr.ConfigError(f"{folder} holds no ImageFolder images (<class>/<image> with {', '.join(EXTENSIONS)})")
    return load_images(items, preprocessing(model, (int(shape[1]), int(shape[2]))), f"{len(items)} image(s) from {folder}")
