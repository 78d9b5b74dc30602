"""Drawing helpers for the generated images: shapes on a supersampled canvas, reduced by area.

Every image is drawn `SUPERSAMPLE` times larger with PIL and reduced with a box filter, so edges
are anti-aliased and sub-pixel positions show in the pixel values (as in a rendered photo).
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

SUPERSAMPLE = 4


def canvas(size: int, background: tuple[int, int, int] = (0, 0, 0)) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    """A blank RGB canvas of `size` * SUPERSAMPLE pixels and its drawing context."""
    img = Image.new("RGB", (size * SUPERSAMPLE, size * SUPERSAMPLE), background)
    return img, ImageDraw.Draw(img)


def reduce(img: Image.Image, size: int) -> np.ndarray:
    """The canvas at `size` x `size` (box filter): uint8 (size, size, 3)."""
    return np.asarray(img.resize((size, size), Image.Resampling.BOX), dtype=np.uint8).copy()


def polygon(points: np.ndarray, scale: float, angle: float, cx: float, cy: float) -> list[tuple[float, float]]:
    """Unit-shape points (k, 2) rotated by `angle`, scaled, and centred at (cx, cy), in canvas pixels.

    `scale`, `cx`, `cy` are in output pixels; the result is in supersampled canvas pixels.
    """
    c, s = np.cos(angle), np.sin(angle)
    rotated = points @ np.array([[c, s], [-s, c]])
    placed = (rotated * scale + np.array([cx, cy])) * SUPERSAMPLE
    return [tuple(p) for p in placed.tolist()]


def circle(draw: ImageDraw.ImageDraw, cx: float, cy: float, r: float, fill) -> None:
    """A filled disc; centre and radius in output pixels."""
    k = SUPERSAMPLE
    draw.ellipse([(cx - r) * k, (cy - r) * k, (cx + r) * k, (cy + r) * k], fill=fill)


def ellipse(draw: ImageDraw.ImageDraw, cx: float, cy: float, rx: float, ry: float, fill) -> None:
    k = SUPERSAMPLE
    draw.ellipse([(cx - rx) * k, (cy - ry) * k, (cx + rx) * k, (cy + ry) * k], fill=fill)


def rectangle(draw: ImageDraw.ImageDraw, x0: float, y0: float, x1: float, y1: float, fill) -> None:
    k = SUPERSAMPLE
    draw.rectangle([x0 * k, y0 * k, x1 * k, y1 * k], fill=fill)


def shade(colour: tuple[int, int, int], factor: float) -> tuple[int, int, int]:
    """`colour` darkened (factor < 1) or lightened towards white (factor > 1)."""
    c = np.asarray(colour, dtype=np.float64)
    out = c * factor if factor <= 1 else c + (255 - c) * (factor - 1)
    return tuple(int(v) for v in np.clip(np.round(out), 0, 255))
