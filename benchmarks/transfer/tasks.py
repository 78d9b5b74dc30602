"""The target tasks, VTAB-1k style: 1,000 training images each (800 train + 200 val), a fixed test split.

- `digits` (real images): scikit-learn's handwritten digits, 1,797 8x8 scans from 43 writers
  (the UCI "optdigits" test set, shipped inside scikit-learn), upsampled to 32 px; 10 classes.
- `dsprites_location` (structured, VTAB's dSprites/location): a white square, ellipse or heart at
  a random scale, rotation and position on black; the class is the x position in 16 bins.
- `clevr_count` (structured, VTAB's CLEVR/count): 3-10 objects (spheres, cubes, cylinders in
  CLEVR's 8 colours, 2 sizes, with shadows) on a grey floor; the class is how many (8 classes).

Each task is a pure function of its seed: the same pixels, labels and splits on every machine.
`write_imagefolder(task, root)` writes `root/{train,val,test}/<class>/<index>.png`, the layout the
fine-tuning package reads.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.transfer import draw as D

IMG_SIZE = 32
SPLITS = ("train", "val", "test")
SIZES = {"train": 800, "val": 200, "test": 800}  # VTAB-1k: train800 + val200; a test split of the generated tasks' size
FORMAT = "rlrr.transfer.task/1"  # bump when a generator changes: cached folders are rebuilt


@dataclass
class TaskData:
    """A task's splits: uint8 images (N, H, W, 3) and int64 labels (N,), per split."""

    name: str
    data: str  # where the images come from, in a sentence
    classes: list[str]  # folder names, sorted as ImageFolder sorts them (so folder order is label order)
    flip: bool  # whether a horizontal flip keeps the label (it does not for positions or digits)
    splits: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    source_index: dict[str, np.ndarray] = field(default_factory=dict)  # real data: each split's indices in the source set

    def counts(self) -> dict[str, int]:
        return {s: len(self.splits[s][1]) for s in SPLITS if s in self.splits}

    def digest(self) -> str:
        """sha256 of every split's pixels and labels: the same on every machine."""
        h = hashlib.sha256()
        for s in (s for s in SPLITS if s in self.splits):
            images, labels = self.splits[s]
            h.update(s.encode())
            h.update(np.ascontiguousarray(images).tobytes())
            h.update(np.ascontiguousarray(labels.astype(np.int64)).tobytes())
        return h.hexdigest()


# --- real images ---------------------------------------------------------------------------------------


def digits(seed: int = 0, img_size: int = IMG_SIZE, sizes: dict[str, int] | None = None) -> TaskData:
    """scikit-learn's handwritten digits, split 800 / 200 / 797 (the rest), stratified by class with `seed`.

    Smaller `sizes` (tests) take the first images of each split of a split made the same way.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    raw = load_digits()
    index = np.arange(len(raw.target))
    rest, test = train_test_split(index, test_size=len(index) - SIZES["train"] - SIZES["val"], stratify=raw.target, random_state=seed)
    train, val = train_test_split(rest, test_size=SIZES["val"], stratify=raw.target[rest], random_state=seed)
    if sizes:  # every class in every split: take the first images of each class in turn
        train, val, test = (_round_robin(idx, raw.target)[:sizes[s]] for idx, s in ((train, "train"), (val, "val"), (test, "test")))
    pixels = np.round(raw.images * (255 / 16)).astype(np.uint8)  # 0..16 ink levels -> 0..255, white ink on black

    def upsample(i: int) -> np.ndarray:
        img = Image.fromarray(pixels[i]).resize((img_size, img_size), Image.Resampling.BICUBIC)
        return np.repeat(np.asarray(img, dtype=np.uint8)[:, :, None], 3, axis=2)

    task = TaskData("digits", f"real: scikit-learn handwritten digits (8x8 scans of 43 writers) upsampled to {img_size} px",
                    [str(c) for c in range(10)], flip=False)
    for name, idx in (("train", train), ("val", val), ("test", test)):
        idx = np.sort(idx)
        task.splits[name] = (np.stack([upsample(i) for i in idx]), raw.target[idx].astype(np.int64))
        task.source_index[name] = idx
    return task


def _round_robin(index: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """`index` reordered as class 0's first, class 1's first, ..., class 0's second, ..."""
    index = np.sort(index)
    rank = np.zeros(len(index), dtype=np.int64)
    for c in np.unique(labels[index]):
        members = labels[index] == c
        rank[members] = np.arange(members.sum())
    return index[np.lexsort((labels[index], rank))]


# --- dSprites-like --------------------------------------------------------------------------------------

_T = np.linspace(0, 2 * np.pi, 48, endpoint=False)
SPRITES = {  # unit shapes, about 1 across
    "square": np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=np.float64) * 0.8,
    "ellipse": np.stack([np.cos(_T), 0.5 * np.sin(_T)], 1),
    "heart": np.stack([16 * np.sin(_T) ** 3, -(13 * np.cos(_T) - 5 * np.cos(2 * _T) - 2 * np.cos(3 * _T) - np.cos(4 * _T))], 1) / 17,
}
DSPRITES_BINS = 16  # VTAB's dSprites/location: 32 x positions in 16 bins
SPRITE_SIZE = 5.0  # half-width in pixels at scale 1 (of a 32 px image)


def dsprites_location(seed: int = 1, img_size: int = IMG_SIZE, sizes: dict[str, int] | None = None) -> TaskData:
    """One sprite per image; the label is its x position in DSPRITES_BINS equal bins (balanced)."""
    margin = SPRITE_SIZE + 0.5
    edges = np.linspace(margin, img_size - margin, DSPRITES_BINS + 1)
    shapes = list(SPRITES)

    def render(rng: np.random.Generator, label: int) -> np.ndarray:
        img, d = D.canvas(img_size)
        shape = shapes[rng.integers(len(shapes))]
        scale = SPRITE_SIZE * rng.uniform(0.5, 1.0)
        angle = rng.uniform(0, 2 * np.pi)
        cx, cy = rng.uniform(edges[label], edges[label + 1]), rng.uniform(margin, img_size - margin)
        d.polygon(D.polygon(SPRITES[shape], scale, angle, cx, cy), fill=(255, 255, 255))
        return D.reduce(img, img_size)

    task = TaskData("dsprites_location", f"generated: dSprites-like sprites (square, ellipse, heart; scale, rotation, position) "
                    f"at {img_size} px; class = x position in {DSPRITES_BINS} bins", [f"{b:02d}" for b in range(DSPRITES_BINS)], flip=False)
    task.splits = _generate(seed, DSPRITES_BINS, render, sizes or SIZES)
    return task


# --- CLEVR-like -------------------------------------------------------------------------------------------

CLEVR_COLOURS = [(87, 87, 87), (173, 35, 35), (42, 75, 215), (29, 105, 20), (129, 74, 25), (129, 38, 192), (41, 208, 208), (255, 238, 51)]
CLEVR_COUNTS = range(3, 11)  # VTAB's CLEVR/count: 3 to 10 objects, 8 classes
CLEVR_RADII = (1.7, 2.6)  # small, large (pixels of a 32 px image)


def clevr_count(seed: int = 2, img_size: int = IMG_SIZE, sizes: dict[str, int] | None = None) -> TaskData:
    """3-10 non-overlapping objects on a lit floor; the label is the count minus 3 (balanced)."""
    counts = list(CLEVR_COUNTS)

    def render(rng: np.random.Generator, label: int) -> np.ndarray:
        floor = rng.uniform(0.35, 0.6)
        img, d = D.canvas(img_size)
        def grey(row: float) -> tuple[int, int, int]:  # light from the back: the floor darkens towards the viewer
            g = int(255 * floor * (1.1 - 0.25 * row / img_size))
            return (g, g, g)

        for row in range(img_size):
            D.rectangle(d, 0, row, img_size, row + 1, grey(row))
        objects = _place(rng, counts[label], img_size)
        for x, y, r in sorted(objects, key=lambda o: o[1]):  # back to front
            r_eff = r * (0.8 + 0.3 * y / img_size)  # perspective: nearer is larger
            D.ellipse(d, x + 0.5 * r_eff, y + 0.6 * r_eff, r_eff, 0.55 * r_eff, D.shade(grey(y), 0.55))  # shadow
            colour = CLEVR_COLOURS[rng.integers(len(CLEVR_COLOURS))]
            kind = rng.integers(3)
            if kind == 0:  # sphere: a disc with a highlight
                D.circle(d, x, y, r_eff, colour)
                D.circle(d, x - 0.35 * r_eff, y - 0.35 * r_eff, 0.35 * r_eff, D.shade(colour, 1.45))
            elif kind == 1:  # cube: front face and a lighter top face
                D.rectangle(d, x - 0.85 * r_eff, y - 0.6 * r_eff, x + 0.85 * r_eff, y + 0.9 * r_eff, colour)
                D.rectangle(d, x - 0.85 * r_eff, y - 0.95 * r_eff, x + 0.85 * r_eff, y - 0.6 * r_eff, D.shade(colour, 1.35))
            else:  # cylinder: body and an elliptic lighter top
                D.rectangle(d, x - 0.8 * r_eff, y - 0.5 * r_eff, x + 0.8 * r_eff, y + 0.8 * r_eff, colour)
                D.ellipse(d, x, y + 0.8 * r_eff, 0.8 * r_eff, 0.3 * r_eff, colour)
                D.ellipse(d, x, y - 0.5 * r_eff, 0.8 * r_eff, 0.3 * r_eff, D.shade(colour, 1.35))
        out = D.reduce(img, img_size).astype(np.int16) + rng.integers(-6, 7, size=(img_size, img_size, 1))  # sensor noise
        return np.clip(out, 0, 255).astype(np.uint8)

    task = TaskData("clevr_count", f"generated: CLEVR-like scenes (spheres, cubes, cylinders; 8 colours, 2 sizes, shadows) at "
                    f"{img_size} px; class = number of objects, 3-10", [f"{c:02d}" for c in counts], flip=True)
    task.splits = _generate(seed, len(counts), render, sizes or SIZES)
    return task


def _place(rng: np.random.Generator, n: int, img_size: int) -> list[tuple[float, float, float]]:
    """n non-overlapping (x, y, radius) objects: rejection sampling, restarted if the floor is full."""
    while True:
        placed: list[tuple[float, float, float]] = []
        for _ in range(400):
            r = CLEVR_RADII[rng.integers(2)] * rng.uniform(0.9, 1.1)
            x, y = rng.uniform(r + 1, img_size - r - 1), rng.uniform(r + 4, img_size - r - 2)
            if all((x - a) ** 2 + (y - b) ** 2 > (r + c + 1.0) ** 2 for a, b, c in placed):
                placed.append((x, y, r))
                if len(placed) == n:
                    return placed


# --- shared ----------------------------------------------------------------------------------------------


def _generate(seed: int, classes: int, render: Callable[[np.random.Generator, int], np.ndarray],
              sizes: dict[str, int]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Balanced labels per split, each image drawn from its own child seed (split, index): disjoint splits."""
    out = {}
    for k, split in enumerate(SPLITS):
        n = sizes[split]
        order = np.random.default_rng([seed, k, 0]).permutation(n)
        labels = (order % classes).astype(np.int64)
        images = np.stack([render(np.random.default_rng([seed, k, 1, i]), int(labels[i])) for i in range(n)])
        out[split] = (images, labels)
    return out


TASKS: dict[str, Callable[..., TaskData]] = {"digits": digits, "dsprites_location": dsprites_location, "clevr_count": clevr_count}


def make(name: str, img_size: int = IMG_SIZE, sizes: dict[str, int] | None = None) -> TaskData:
    """Task `name` at its fixed seed; `sizes` ({"train": n, "val": n, "test": n}) shrinks it for tests."""
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    return TASKS[name](img_size=img_size, sizes=sizes)


def write_imagefolder(task: TaskData, root: Path, key: dict | None = None) -> Path:
    """`root/{train,val,test}/<class>/<index>.png` (the splits the task has) and `root/manifest.json` (counts, digest)."""
    root = Path(root)
    for split in (s for s in SPLITS if s in task.splits):
        images, labels = task.splits[split]
        for c in task.classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
        for i, (img, y) in enumerate(zip(images, labels)):
            Image.fromarray(img).save(root / split / task.classes[y] / f"{i:05d}.png")
    manifest = {"format": FORMAT, "key": key, "task": task.name, "data": task.data, "classes": task.classes, "flip": task.flip,
                "counts": task.counts(), "digest": task.digest()}
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return root


def ensure_imagefolder(name: str, root: Path, img_size: int = IMG_SIZE, sizes: dict[str, int] | None = None) -> dict:
    """The task's ImageFolder under `root`, written if missing or made otherwise (generator version, size); its manifest."""
    root = Path(root)
    manifest_file = root / "manifest.json"
    key = {"format": FORMAT, "task": name, "img_size": img_size, "sizes": sizes}
    if manifest_file.is_file():
        manifest = json.loads(manifest_file.read_text())
        if manifest.get("key") == key:
            return manifest
    tmp = root.with_name(root.name + ".partial")
    if tmp.exists():
        _remove_tree(tmp)
    write_imagefolder(make(name, img_size, sizes), tmp, key)
    if root.exists():
        _remove_tree(root)
    tmp.rename(root)
    return json.loads(manifest_file.read_text())


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path)
