"""Data for fine-tuning: the folder layouts the paper's benchmarks come in, transforms, and loaders.

`--data DIR` is one of
- an ImageFolder tree: `DIR/train/<class>/*.jpg`, `DIR/val/...`, optionally `DIR/test/...`;
- a VTAB-1k task as VPT and the official code prepare it: `train800.txt`, `val200.txt`,
  `train800val200.txt`, `test.txt`, one "<path relative to DIR> <label>" per line (plain
  `train.txt`/`val.txt`/`trainval.txt`/`test.txt` lists are read the same way);
- an FGVC dataset as VPT prepares it: `train.json`, `val.json`, `test.json` (optionally
  `trainval.json`), each {"<relative path>": label}; images under `DIR/images/` or `DIR/`.
Without `--data`, a small dataset is generated in memory (seeded, the same on every machine).

Augmentation is seeded per sample: the random crop and flip of image i in epoch e depend only on
(seed, e, i), not on the process, the worker or how far a run got, so a resumed run and a
multi-process run see exactly the images a single uninterrupted process would.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset, DistributedSampler, Sampler

from finetune.errors import DataError

LIST_SPLITS = {  # split -> file names tried in order (VTAB-1k's first, then plain lists)
    "train": ("train800.txt", "train.txt"),
    "val": ("val200.txt", "val.txt"),
    "trainval": ("train800val200.txt", "trainval.txt"),
    "test": ("test.txt",),
}
JSON_SPLITS = ("train", "val", "trainval", "test")
FOLDER_SPLITS = ("train", "val", "test")
PROTOCOLS = ("tune", "final")
CROPS = ("resize", "random-resized", "resize-random")
SHOWN = 5  # names listed per problem in an error message


@dataclass(frozen=True)
class Generated:
    """The generated dataset: `classes` colour-coded classes, images per class in each split."""

    classes: int = 4
    train: int = 16  # images per class
    val: int = 8
    test: int = 8
    seed: int = 0  # the data's own seed: the same images whatever the training seed


@dataclass
class DataSource:
    """What `load_data` found: raw (untransformed) splits, their classes, and how to describe them."""

    form: str  # "imagefolder", "list", "json" or "generated"
    classes: list[str]
    train: Dataset
    val: Dataset
    test: Dataset | None
    description: str
    default_crop: str = "resize"  # FGVC's JSON layout: "random-resized" (the paper's Sec. 4.1)
    split_names: dict[str, str] = field(default_factory=dict)  # role -> file/folder it came from

    @property
    def num_classes(self) -> int:
        return len(self.classes)


class FileImages(Dataset):
    """(image path, label) pairs, read as RGB PIL images."""

    def __init__(self, items: Sequence[tuple[Path, int]]) -> None:
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        path, label = self.items[index]
        with Image.open(path) as img:
            return img.convert("RGB"), label


class TensorImages(Dataset):
    """uint8 images (N, 3, H, W) held in memory, returned as PIL images."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return Image.fromarray(self.images[index].permute(1, 2, 0).numpy()), int(self.labels[index])


class Concat(Dataset):
    """Two raw splits as one (train + val when no trainval list exists)."""

    def __init__(self, *parts: Dataset) -> None:
        self.parts = parts

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)

    def __getitem__(self, index: int):
        for part in self.parts:
            if index < len(part):
                return part[index]
            index -= len(part)
        raise IndexError(index)


class Augmented(Dataset):
    """A raw split with its transform; with a seed, each sample's randomness is its own (module doc)."""

    def __init__(self, raw: Dataset, transform, seed: int | None = None) -> None:
        self.raw, self.transform, self.seed, self.epoch = raw, transform, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.raw)

    def __getitem__(self, index: int):
        img, label = self.raw[index]
        if self.seed is None:
            return self.transform(img), label
        seed = hash((self.seed, self.epoch, index)) % 2**62  # ints hash deterministically
        torch_state, py_state = torch.get_rng_state(), random.getstate()
        torch.default_generator.manual_seed(seed)  # the CPU generator only: CUDA's stays as it is
        random.seed(seed)  # timm's RandomResizedCrop draws from Python's random
        try:
            return self.transform(img), label
        finally:
            torch.set_rng_state(torch_state)
            random.setstate(py_state)


# --- finding the data ---------------------------------------------------------------------------


def load_data(path: str | Path | None, *, protocol: str = "tune", img_size: int = 224, generated: Generated = Generated()) -> DataSource:
    """The raw splits of `path` (or generated ones), with every problem reported before training.

    `protocol="tune"` trains on train and validates on val (test, if present, is evaluated once
    at the end); `"final"` trains on train+val (VTAB's train800val200) and validates on test, as
    the official code does to report its numbers.
    """
    if protocol not in PROTOCOLS:
        raise DataError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if path is None:
        return generate(img_size, generated, protocol)
    root = Path(path)
    if not root.exists():
        raise DataError(f"data folder {root} does not exist")
    if not root.is_dir():
        raise DataError(f"--data {root} is a file; give the folder that holds the splits")
    if any((root / n).is_file() for names in LIST_SPLITS.values() for n in names):
        splits, classes = _from_lists(root)
        form, crop = "list", "resize"
    elif any((root / f"{s}.json").is_file() for s in JSON_SPLITS):
        splits, classes = _from_json(root)
        form, crop = "json", "random-resized"
    elif (root / "train").is_dir():
        splits, classes = _from_folders(root)
        form, crop = "imagefolder", "resize"
    else:
        entries = sorted(p.name for p in root.iterdir())[:8]
        raise DataError(f"{root} holds no dataset: expected train/ and val/ class folders (ImageFolder), VTAB-1k lists "
                        f"(train800.txt, val200.txt, train800val200.txt, test.txt) or FGVC json files (train.json, val.json, "
                        f"test.json); found {entries or 'an empty folder'}")
    train, val, test, used = _assign(splits, protocol, root)
    description = f"{root} ({form}; train: {used['train']}, {len(train)} images; val: {used['val']}, {len(val)} images" + (
        f"; test: {used['test']}, {len(test)} images" if test is not None else "") + f"; {len(classes)} classes)"
    return DataSource(form, classes, train, val, test, description, crop, used)


def _assign(splits: dict[str, Dataset], protocol: str, root: Path | str) -> tuple[Dataset, Dataset, Dataset | None, dict]:
    names = {k: getattr(v, "source", k) for k, v in splits.items()}
    if protocol == "tune":
        if "train" not in splits or "val" not in splits:
            have = ", ".join(sorted(splits)) or "none"
            raise DataError(f"{root}: protocol 'tune' needs a train and a val split (found: {have}); "
                            f"use --protocol final to train on train+val and evaluate on test")
        return splits["train"], splits["val"], splits.get("test"), {k: names[k] for k in ("train", "val", "test") if k in splits}
    if "test" not in splits:
        raise DataError(f"{root}: protocol 'final' evaluates on the test split, and there is none (found: {', '.join(sorted(splits))})")
    if "trainval" in splits:
        train, used = splits["trainval"], names["trainval"]
    elif "train" in splits and "val" in splits:
        train, used = Concat(splits["train"], splits["val"]), f"{names['train']} + {names['val']}"
    elif "train" in splits:
        train, used = splits["train"], names["train"]
    else:
        raise DataError(f"{root}: no training split (train or trainval) found")
    return train, splits["test"], None, {"train": used, "val": names["test"]}


def _labelled(items: list[tuple[Path, int]], source: str) -> FileImages:
    ds = FileImages(items)
    ds.source = source
    return ds


def _check_files(items: list[tuple[Path, int]], source: str) -> None:
    if not items:
        raise DataError(f"{source} lists no images")
    missing = [str(p) for p, _ in items if not p.is_file()]
    if missing:
        raise DataError(f"{source}: {len(missing)} of {len(items)} listed images do not exist, e.g. {missing[:SHOWN]}")


def _check_labels(labels: dict[str, set], known: set, reference: str, root: Path) -> None:
    for split, found in labels.items():
        extra = sorted(found - known)
        if extra:
            raise DataError(f"{root}: class mismatch between splits: {split} has labels {extra[:SHOWN]} that {reference} does not have")


def _read_list(path: Path, root: Path) -> list[tuple[Path, int]]:
    items = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.strip().rsplit(None, 1)
        if not parts:
            continue
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise DataError(f"{path}:{number}: expected '<relative path> <integer label>', got {line.strip()!r}")
        items.append((root / parts[0], int(parts[1])))
    return items


def _from_lists(root: Path) -> tuple[dict[str, Dataset], list[str]]:
    splits, labels = {}, {}
    for split, names in LIST_SPLITS.items():
        file = next((root / n for n in names if (root / n).is_file()), None)
        if file is None:
            continue
        items = _read_list(file, root)
        _check_files(items, str(file))
        splits[split], labels[split] = _labelled(items, file.name), {y for _, y in items}
    reference = "trainval" if "trainval" in labels else "train" if "train" in labels else None
    if reference is None:
        raise DataError(f"{root}: no training list ({', '.join(LIST_SPLITS['train'] + LIST_SPLITS['trainval'])})")
    if min(min(v) for v in labels.values()) < 0:
        raise DataError(f"{root}: labels must be >= 0")
    _check_labels(labels, labels[reference], splits[reference].source, root)
    num_classes = max(labels[reference]) + 1
    return splits, [str(i) for i in range(num_classes)]


def _from_json(root: Path) -> tuple[dict[str, Dataset], list[str]]:
    annotations = {}
    for split in JSON_SPLITS:
        file = root / f"{split}.json"
        if file.is_file():
            try:
                anno = json.loads(file.read_text())
            except ValueError as e:
                raise DataError(f"{file} is not valid JSON: {e}") from e
            if not isinstance(anno, dict) or not all(isinstance(v, int) for v in anno.values()):
                raise DataError(f"{file} must map '<relative image path>' to an integer label, as VPT's FGVC files do")
            annotations[split] = anno
    reference = "trainval" if "trainval" in annotations else "train" if "train" in annotations else None
    if reference is None:
        raise DataError(f"{root}: no train.json or trainval.json")
    class_ids = sorted(set(annotations[reference].values()))
    _check_labels({k: set(v.values()) for k, v in annotations.items()}, set(class_ids), f"{reference}.json", root)
    first = next(iter(annotations[reference]))
    image_root = root / "images" if (root / "images" / first).is_file() and not (root / first).is_file() else root
    contiguous = {c: i for i, c in enumerate(class_ids)}  # VPT maps ids to 0..C-1 in sorted order
    splits = {}
    for split, anno in annotations.items():
        items = [(image_root / rel, contiguous[c]) for rel, c in anno.items()]
        _check_files(items, str(root / f"{split}.json"))
        splits[split] = _labelled(items, f"{split}.json")
    return splits, [str(c) for c in class_ids]


def _image_files(folder: Path) -> list[Path]:
    from torchvision.datasets.folder import IMG_EXTENSIONS

    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)


def _from_folders(root: Path) -> tuple[dict[str, Dataset], list[str]]:
    present = [s for s in FOLDER_SPLITS if (root / s).is_dir()]
    class_sets = {s: sorted(p.name for p in (root / s).iterdir() if p.is_dir()) for s in present}
    classes = class_sets["train"]
    if not classes:
        raise DataError(f"{root / 'train'} is empty: expected one folder of images per class (ImageFolder)")
    for split in present[1:]:
        if class_sets[split] != classes:
            missing, extra = sorted(set(classes) - set(class_sets[split])), sorted(set(class_sets[split]) - set(classes))
            raise DataError(f"class mismatch between splits: {root / split} lacks {missing[:SHOWN]} and has {extra[:SHOWN]} "
                            f"compared with {root / 'train'} ({len(classes)} classes)")
    splits = {}
    for split in present:
        items = []
        for label, name in enumerate(classes):
            files = _image_files(root / split / name)
            if not files:
                raise DataError(f"{root / split / name} has no images (looked for common image extensions)")
            items += [(f, label) for f in files]
        splits[split] = _labelled(items, f"{split}/")
    return splits, classes


# --- the generated dataset -------------------------------------------------------------------------


def generate(img_size: int, spec: Generated = Generated(), protocol: str = "tune") -> DataSource:
    """A learnable toy dataset: each class has its own colour and stripe direction, plus noise."""
    if spec.classes < 2 or min(spec.train, spec.val, spec.test) < 1:
        raise DataError(f"the generated dataset needs >= 2 classes and >= 1 image per class in each split, got {spec}")
    g = torch.Generator().manual_seed(spec.seed)
    colours = torch.rand(spec.classes, 3, 1, 1, generator=g) * 0.6 + 0.2
    ramp = torch.arange(img_size, dtype=torch.float32) / max(1, img_size - 1)
    stripes = [torch.sin(2 * torch.pi * 3 * (ramp[None, :] if k % 2 else ramp[:, None])).expand(img_size, img_size) for k in range(spec.classes)]

    def split(per_class: int, name: str) -> TensorImages:
        labels = torch.arange(spec.classes).repeat_interleave(per_class)
        noise = torch.randn(len(labels), 3, img_size, img_size, generator=g) * 0.12
        images = torch.stack([colours[y] + 0.12 * stripes[y] for y in labels.tolist()]) + noise
        ds = TensorImages((images.clamp(0, 1) * 255).round().to(torch.uint8), labels)
        ds.source = name
        return ds

    splits = {"train": split(spec.train, "generated train"), "val": split(spec.val, "generated val"), "test": split(spec.test, "generated test")}
    train, val, test, used = _assign(splits, protocol, "generated data")
    classes = [f"class{k}" for k in range(spec.classes)]
    description = (f"GENERATED data (no --data given): {spec.classes} classes of {img_size}x{img_size} colour/stripe images, "
                   f"{len(train)} train / {len(val)} val" + (f" / {len(test)} test" if test is not None else "") +
                   f", seed {spec.seed}: a smoke test of the pipeline, not a benchmark")
    return DataSource("generated", classes, train, val, test, description, "resize", used)


# --- transforms -------------------------------------------------------------------------------------


def transforms(crop: str, img_size: int, *, flip: bool, mean: Sequence[float], std: Sequence[float], interpolation: str = "bicubic"):
    """(train, eval) transforms: the paper's Sec. 4.1 ("resize": VTAB, "random-resized": FGVC) or
    the official FGVC code's ("resize-random": resize to 256/224 of the size, random crop)."""
    from torchvision import transforms as T
    from torchvision.transforms import InterpolationMode

    if crop not in CROPS:
        raise DataError(f"crop must be one of {CROPS}, got {crop!r}")
    mode = InterpolationMode.BILINEAR if interpolation == "bilinear" else InterpolationMode.BICUBIC
    tail = [T.ToTensor(), T.Normalize(mean=list(mean), std=list(std))]
    flips = [T.RandomHorizontalFlip()] if flip else []
    size = (img_size, img_size)
    if crop == "resize":  # VTAB-1k (VTABDataLoader.py): resize to 224x224, optional flip
        return T.Compose([T.Resize(size, interpolation=mode), *flips, *tail]), T.Compose([T.Resize(size, interpolation=mode), *tail])
    big = (round(img_size * 256 / 224),) * 2  # the official FGVC code: 256 for 224
    evaluate = T.Compose([T.Resize(big, interpolation=mode), T.CenterCrop(size), *tail])
    if crop == "random-resized":
        from timm.data.transforms import RandomResizedCropAndInterpolation

        first = RandomResizedCropAndInterpolation(img_size, interpolation=interpolation)
        return T.Compose([first, *flips, *tail]), evaluate
    return T.Compose([T.Resize(big, interpolation=mode), T.RandomCrop(size), *flips, *tail]), evaluate


# --- samplers ---------------------------------------------------------------------------------------


class ShardSampler(Sampler[int]):
    """Every `world`-th index from `rank`, without padding: evaluation sees each image exactly once."""

    def __init__(self, length: int, rank: int = 0, world: int = 1) -> None:
        self.indices = list(range(rank, length, world))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def train_sampler(dataset: Dataset, *, seed: int, rank: int = 0, world: int = 1, drop_last: bool = False) -> DistributedSampler:
    """DistributedSampler in every run, one process included: the same permutation per epoch
    (seed + epoch), and the k-th batches of all ranks together are the single process's k-th batch
    (rank r takes every world-th index from r)."""
    return DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=drop_last)
