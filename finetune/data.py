"""Data for fine-tuning: the folder layouts the paper's benchmarks come in, transforms, and loaders.

`--data DIR` is one of
- an ImageFolder tree: `DIR/train/<class>/*.jpg`, `DIR/val/...`, optionally `DIR/test/...`;
- a VTAB-1k task as VPT and the official code prepare it: `train800.txt`, `val200.txt`,
  `train800val200.txt`, `test.txt`, one "<path relative to DIR> <label>" per line (plain
  `train.txt`/`val.txt`/`trainval.txt`/`test.txt` lists are read the same way);
- an FGVC dataset as VPT prepares it: `train.json`, `val.json`, `test.json` (optionally
  `trainval.json`), each {"<relative path>": label}; images under `DIR/images/` or `DIR/`.
Without `--data`, a small dataset is generated in memory (seeded, the same on every machine).

Image files are checked before training, without decoding the whole data set twice: every file
is opened (its header parsed: not an image, an unknown format, a decompression bomb); a PNG is
verified to its last chunk (CRCs); a JPEG is decoded only when it does not end with its end
marker (a truncated download); other formats are decoded. A file that fails is an error naming it,
or, with `skip_bad_images`, left out with a warning. An image that still fails to decode during
training (a damaged JPEG body) stops the run with a `DataError` naming it.

Augmentation is seeded per sample: the random crop and flip of image i in epoch e depend only on
(seed, e, i), not on the process, the worker or how far a run got, so a resumed run and a
multi-process run see exactly the images a single uninterrupted process would.
"""

from __future__ import annotations

import json
import random
import re
import warnings
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
MAX_CLASSES = 100_000  # a list label beyond this is a typo (the head would have that many rows), not a dataset
LABEL = re.compile(r"-?[0-9]+")  # ASCII digits: int() would also take '٣', and '²' passes isdigit() but not int()
JPEG_TAIL = 1024  # bytes searched for a JPEG's end marker (some writers append padding or metadata)


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
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, why) left out with skip_bad_images

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
        try:
            with Image.open(path) as img:
                return img.convert("RGB"), label
        except Exception as e:
            if _system_error(e):
                raise
            raise DataError(f"image {path} cannot be decoded ({_reason(e, path)}) although its header passed the check before "
                            f"training (damaged image data): fix or remove it") from e


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


def load_data(path: str | Path | None, *, protocol: str = "tune", img_size: int = 224, generated: Generated = Generated(),
              skip_bad_images: bool = False) -> DataSource:
    """The raw splits of `path` (or generated ones), with every problem reported before training.

    `protocol="tune"` trains on train and validates on val (test, if present, is evaluated once
    at the end); `"final"` trains on train+val (VTAB's train800val200) and validates on test, as
    the official code does to report its numbers. Every image file is checked (module doc);
    `skip_bad_images` leaves the ones that fail out, with a warning, instead of refusing the data.
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
    skipped: list[tuple[str, str]] = []
    if any((root / n).is_file() for names in LIST_SPLITS.values() for n in names):
        splits, classes = _from_lists(root, skip_bad_images, skipped)
        form, crop = "list", "resize"
    elif any((root / f"{s}.json").is_file() for s in JSON_SPLITS):
        splits, classes = _from_json(root, skip_bad_images, skipped)
        form, crop = "json", "random-resized"
    elif (root / "train").is_dir():
        splits, classes = _from_folders(root, skip_bad_images, skipped)
        form, crop = "imagefolder", "resize"
    else:
        entries = sorted(p.name for p in root.iterdir())[:8]
        raise DataError(f"{root} holds no dataset: expected train/ and val/ class folders (ImageFolder), VTAB-1k lists "
                        f"(train800.txt, val200.txt, train800val200.txt, test.txt) or FGVC json files (train.json, val.json, "
                        f"test.json); found {entries or 'an empty folder'}")
    train, val, test, used = _assign(splits, protocol, root)
    description = f"{root} ({form}; train: {used['train']}, {len(train)} images; val: {used['val']}, {len(val)} images" + (
        f"; test: {used['test']}, {len(test)} images" if test is not None else "") + f"; {len(classes)} classes" + (
        f"; {len(skipped)} undecodable image files left out" if skipped else "") + ")"
    return DataSource(form, classes, train, val, test, description, crop, used, skipped)


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
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not a UTF-8 text file ({e.reason} at byte {e.start}): expected '<relative path> <label>' lines") from e
    items = []
    for number, line in enumerate(text.splitlines(), 1):
        parts = line.strip().rsplit(None, 1)
        if not parts:
            continue
        if len(parts) != 2 or not LABEL.fullmatch(parts[1]) or "\0" in parts[0]:
            raise DataError(f"{path}:{number}: expected '<relative path> <integer label>', got {line.strip()[:200]!r}")
        label = int(parts[1])
        if not 0 <= label < MAX_CLASSES:
            raise DataError(f"{path}:{number}: label {label} is outside 0..{MAX_CLASSES - 1}")
        items.append((root / parts[0], label))
    return items


def _from_lists(root: Path, skip: bool, skipped: list) -> tuple[dict[str, Dataset], list[str]]:
    found = {}
    for split, names in LIST_SPLITS.items():
        file = next((root / n for n in names if (root / n).is_file()), None)
        if file is not None:
            items = _read_list(file, root)
            _check_files(items, str(file))
            found[split] = (file, items)
    reference = "trainval" if "trainval" in found else "train" if "train" in found else None
    if reference is None:
        raise DataError(f"{root}: no training list ({', '.join(LIST_SPLITS['train'] + LIST_SPLITS['trainval'])})")
    screened = _screen({split: items for split, (_, items) in found.items()}, root, skip, skipped)
    splits, labels = {}, {}
    for split, (file, _) in found.items():
        if not screened[split]:
            raise DataError(f"{file}: every listed image was left out as undecodable")
        splits[split], labels[split] = _labelled(screened[split], file.name), {y for _, y in screened[split]}
    _check_two_classes(sorted(labels[reference]), str(found[reference][0]))
    _check_labels(labels, labels[reference], splits[reference].source, root)
    num_classes = max(labels[reference]) + 1
    return splits, [str(i) for i in range(num_classes)]


def _from_json(root: Path, skip: bool, skipped: list) -> tuple[dict[str, Dataset], list[str]]:
    annotations = {}
    for split in JSON_SPLITS:
        file = root / f"{split}.json"
        if file.is_file():
            try:
                anno = json.loads(file.read_text())
            except ValueError as e:
                raise DataError(f"{file} is not valid JSON: {e}") from e
            if not isinstance(anno, dict) or not all(type(v) is int for v in anno.values()):
                raise DataError(f"{file} must map '<relative image path>' to an integer label, as VPT's FGVC files do")
            if not anno:
                raise DataError(f"{file} lists no images")
            if any("\0" in rel for rel in anno):
                raise DataError(f"{file} names a path with a NUL byte")
            annotations[split] = anno
    reference = "trainval" if "trainval" in annotations else "train" if "train" in annotations else None
    if reference is None:
        raise DataError(f"{root}: no train.json or trainval.json")
    first = next(iter(annotations[reference]))
    image_root = root / "images" if (root / "images" / first).is_file() and not (root / first).is_file() else root
    found = {}
    for split, anno in annotations.items():
        found[split] = [(image_root / rel, c) for rel, c in anno.items()]  # labels: the file's ids, mapped below
        _check_files(found[split], str(root / f"{split}.json"))
    screened = _screen(found, root, skip, skipped)
    for split, items in screened.items():
        if not items:
            raise DataError(f"{root / f'{split}.json'}: every listed image was left out as undecodable")
    class_ids = sorted({c for _, c in screened[reference]})
    _check_two_classes(class_ids, str(root / f"{reference}.json"))
    _check_labels({k: {c for _, c in v} for k, v in screened.items()}, set(class_ids), f"{reference}.json", root)
    contiguous = {c: i for i, c in enumerate(class_ids)}  # VPT maps ids to 0..C-1 in sorted order
    splits = {split: _labelled([(p, contiguous[c]) for p, c in items], f"{split}.json") for split, items in screened.items()}
    return splits, [str(c) for c in class_ids]


def _image_files(folder: Path) -> list[Path]:
    from torchvision.datasets.folder import IMG_EXTENSIONS

    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)


def _from_folders(root: Path, skip: bool, skipped: list) -> tuple[dict[str, Dataset], list[str]]:
    present = [s for s in FOLDER_SPLITS if (root / s).is_dir()]
    class_sets = {s: sorted(p.name for p in (root / s).iterdir() if p.is_dir()) for s in present}
    classes = class_sets["train"]
    if not classes:
        raise DataError(f"{root / 'train'} is empty: expected one folder of images per class (ImageFolder)")
    if len(classes) == 1:
        raise DataError(f"{root / 'train'} has one class folder ({classes[0]!r}): a classifier needs at least two "
                        f"(one folder of images per class)")
    for split in present[1:]:
        if not class_sets[split]:
            raise DataError(f"{root / split} is empty: expected the class folders of {root / 'train'} ({len(classes)} classes)")
        if class_sets[split] != classes:
            missing, extra = sorted(set(classes) - set(class_sets[split])), sorted(set(class_sets[split]) - set(classes))
            raise DataError(f"class mismatch between splits: {root / split} lacks {missing[:SHOWN]} and has {extra[:SHOWN]} "
                            f"compared with {root / 'train'} ({len(classes)} classes)")
    found = {}
    for split in present:
        found[split] = []
        for label, name in enumerate(classes):
            files = _image_files(root / split / name)
            if not files:
                raise DataError(f"{root / split / name} has no images (looked for common image extensions)")
            found[split] += [(f, label) for f in files]
    screened = _screen(found, root, skip, skipped)
    for split, items in screened.items():
        empty = [classes[k] for k in sorted(set(range(len(classes))) - {y for _, y in items})]
        if empty:
            raise DataError(f"{root / split}: every image of class {empty[:SHOWN]} was left out as undecodable")
    return {split: _labelled(items, f"{split}/") for split, items in screened.items()}, classes


# --- checking image files ------------------------------------------------------------------------


def _check_two_classes(labels: list, source: str) -> None:
    if len(labels) < 2:
        raise DataError(f"{source}: every training image has label {labels[0]!r}: a classifier needs at least two classes")


def _system_error(e: BaseException) -> bool:
    """The OS failed (permission, I/O, a file removed meanwhile) or memory ran out: not the image's fault."""
    return isinstance(e, MemoryError) or (isinstance(e, OSError) and e.errno is not None)


def _reason(e: BaseException, path: Path) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return text.replace(f"'{path}'", "").replace(str(path), "").strip(" :") or type(e).__name__


def _jpeg_complete(path: Path) -> bool:
    """Whether the file ends with JPEG's end-of-image marker (within its last JPEG_TAIL bytes)."""
    with open(path, "rb") as f:
        f.seek(0, 2)
        f.seek(max(0, f.tell() - JPEG_TAIL))
        return b"\xff\xd9" in f.read()


def image_problem(path: Path) -> str | None:
    """Why `path` cannot be used as an image, or None. Decodes only what its header cannot vouch for (module doc)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # a 90+ megapixel "image" in a data set is an attack or an accident
            with Image.open(path) as img:
                if img.format == "PNG":
                    img.verify()
                elif img.format != "JPEG" or not _jpeg_complete(path):
                    img.load()
    except Exception as e:
        if _system_error(e):
            raise
        return _reason(e, path)
    return None


def _screen(splits: dict[str, list[tuple[Path, int]]], root: Path, skip: bool, skipped: list) -> dict[str, list[tuple[Path, int]]]:
    """The splits without undecodable files (each checked once); DataError naming them unless `skip`."""
    verdict: dict[Path, str | None] = {}
    for items in splits.values():
        for path, _ in items:
            if path not in verdict:
                verdict[path] = image_problem(path)
    bad = [(str(p), why) for p, why in verdict.items() if why is not None]
    if not bad:
        return splits
    shown = "; ".join(f"{p} ({why})" for p, why in bad[:SHOWN])
    if not skip:
        raise DataError(f"{root}: {len(bad)} of {len(verdict)} image files cannot be decoded: {shown}"
                        f"{' ...' if len(bad) > SHOWN else ''}. Fix or remove them, or pass --skip-bad-images to leave them out")
    skipped += bad
    warnings.warn(f"{root}: left out {len(bad)} of {len(verdict)} image files that cannot be decoded (--skip-bad-images): {shown}"
                  f"{' ...' if len(bad) > SHOWN else ''}", stacklevel=2)
    return {split: [(p, y) for p, y in items if verdict[p] is None] for split, items in splits.items()}


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
