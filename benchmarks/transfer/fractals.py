"""The source task: formula-driven images in the spirit of FractalDB (Kataoka et al., ACCV 2020,
"Pre-training without Natural Images").

Each class is an iterated function system (IFS) of 2-4 random affine maps, drawn as FractalDB
does (parameters uniform in [-1, 1], map probabilities proportional to |det A|) and kept only if
every map contracts and its attractor fills a reasonable part of the frame (FractalDB's filling
rate). An image renders its class's attractor by the chaos game, with FractalDB's intra-category
variation (one map's parameters scaled by 0.8-1.2, a flip) plus a random scale, position and
colours. Everything is a pure function of the seed.
"""

from __future__ import annotations

import numpy as np

from benchmarks.transfer.tasks import TaskData

FORMAT = "rlrr.transfer.fractals/2"  # bump when the images change: cached source folders are rebuilt
RENDER = 2  # the attractor is binned at RENDER x the image size, then reduced by area
POINTS = 3000  # chaos-game points per image
BURN_IN = 20  # points discarded before the orbit reaches the attractor
FILL = (0.12, 0.55)  # accepted filling rate of a class's attractor (fraction of its bounding square)
CHUNK = 1024  # images rendered at once


def sample_systems(classes: int, rng: np.random.Generator) -> list[np.ndarray]:
    """`classes` accepted IFS, each (maps, 2, 3): [[a, b, e], [c, d, f]]."""
    systems: list[np.ndarray] = []
    while len(systems) < classes:
        n = int(rng.integers(2, 5))
        maps = rng.uniform(-1, 1, size=(n, 2, 3))
        if np.linalg.norm(maps[:, :, :2], ord=2, axis=(1, 2)).max() >= 0.95:  # every map contracts: a bounded attractor
            continue
        if np.abs(np.linalg.det(maps[:, :, :2])).min() < 0.02:  # a map that flattens everything to a line adds nothing
            continue
        fill = _filling_rate(maps, rng)
        if FILL[0] <= fill <= FILL[1]:
            systems.append(maps)
    return systems


def _probabilities(maps: np.ndarray) -> np.ndarray:
    det = np.abs(np.linalg.det(maps[..., :2]))
    return det / det.sum(-1, keepdims=True)


def _chaos(maps: np.ndarray, probs: np.ndarray, points: int, rng: np.random.Generator) -> np.ndarray:
    """Chaos game for B systems at once: maps (B, M, 2, 3), probs (B, M) -> points (B, points, 2)."""
    b = len(maps)
    cum = np.cumsum(probs, -1)
    choice = (rng.random((points + BURN_IN, b, 1)) > cum[None, :, :-1]).sum(-1)  # (T, B) map index per step
    rows = np.arange(b)
    x = np.zeros((b, 2))
    out = np.empty((b, points, 2))
    for t in range(points + BURN_IN):
        a = maps[rows, choice[t]]  # (B, 2, 3)
        x = np.einsum("bij,bj->bi", a[:, :, :2], x) + a[:, :, 2]
        if t >= BURN_IN:
            out[:, t - BURN_IN] = x
    return out


def _normalise(points: np.ndarray) -> np.ndarray:
    """Points centred on their bounding box and scaled so its longer side spans [-1, 1]."""
    low, high = points.min(1, keepdims=True), points.max(1, keepdims=True)
    centre, half = (low + high) / 2, (high - low).max(-1, keepdims=True) / 2
    return (points - centre) / np.maximum(half, 1e-9)


def _filling_rate(maps: np.ndarray, rng: np.random.Generator, bins: int = 32) -> float:
    pts = _normalise(_chaos(maps[None], _probabilities(maps)[None], 2000, rng))[0]
    cells = np.clip(((pts + 1) / 2 * bins).astype(int), 0, bins - 1)
    return len(np.unique(cells[:, 0] * bins + cells[:, 1])) / bins**2


def render(systems: list[np.ndarray], labels: np.ndarray, img_size: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 images (N, H, W, 3) of the given classes, each a new instance of its class."""
    out = np.empty((len(labels), img_size, img_size, 3), dtype=np.uint8)
    width = max(len(s) for s in systems)
    for start in range(0, len(labels), CHUNK):
        ys = labels[start:start + CHUNK]
        b = len(ys)
        maps = np.zeros((b, width, 2, 3))
        probs = np.zeros((b, width))
        for i, y in enumerate(ys):
            m = systems[y].copy()
            k = rng.integers(len(m))
            m[k] *= rng.uniform(0.8, 1.2)  # FractalDB's intra-category variation: one map's parameters weighted
            maps[i, :len(m)], probs[i, :len(m)] = m, _probabilities(m)
        pts = _normalise(_chaos(maps, probs, POINTS, rng))
        pts[..., 0] *= np.where(rng.random((b, 1)) < 0.5, -1.0, 1.0)  # FractalDB's flip
        scale = rng.uniform(0.7, 1.0, (b, 1, 1))
        shift = rng.uniform(-1, 1, (b, 1, 2)) * (1 - scale)
        pts = pts * scale + shift
        grid = img_size * RENDER
        cells = np.clip(((pts + 1) / 2 * grid).astype(int), 0, grid - 1)
        flat = (np.arange(b)[:, None] * grid + cells[..., 1]) * grid + cells[..., 0]
        counts = np.bincount(flat.ravel(), minlength=b * grid * grid).reshape(b, grid, grid)
        ink = np.minimum(counts / 2.0, 1.0).reshape(b, img_size, RENDER, img_size, RENDER).mean((2, 4))  # area reduce
        fg = rng.uniform(0.5, 1.0, (b, 1, 1, 3))
        bg = rng.uniform(0.0, 0.3, (b, 1, 1, 3))
        out[start:start + b] = np.round(255 * (bg + (fg - bg) * ink[..., None])).astype(np.uint8)
    return out


def fractal_task(classes: int = 100, per_class: dict[str, int] | None = None, seed: int = 0, img_size: int = 32) -> TaskData:
    """The source task: `classes` IFS classes, `per_class` images of each in train and val."""
    per_class = per_class or {"train": 150, "val": 20}
    rng = np.random.default_rng([seed, 0])
    systems = sample_systems(classes, rng)
    names = [f"{c:03d}" for c in range(classes)]
    task = TaskData("fractals", f"generated: FractalDB-style IFS fractals, {classes} classes, {img_size} px", names, flip=True)
    for k, split in enumerate(("train", "val", "test")):
        if not per_class.get(split):
            continue
        labels = np.repeat(np.arange(classes), per_class[split]).astype(np.int64)
        images = render(systems, labels, img_size, np.random.default_rng([seed, 1, k]))
        task.splits[split] = (images, labels)
    return task
