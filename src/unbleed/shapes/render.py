"""Exact, deterministic rendering of shapes-world scenes.

Every shape is a polygon in the unit box ``[0, 1]^2`` (y down) that touches all four sides, so an object of
size ``s`` fills its ``s``-by-``s`` box and a detected blob's bounding box is the box its template is drawn in.
Antialiasing: objects are filled with PIL at ``SUPERSAMPLE`` times the resolution and box-filtered down, which
gives the soft, partially covered edge pixels a generative model produces. No randomness is involved unless a
background texture is requested, and that is seeded.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

from .world import BACKGROUND, COLOURS, SHAPES, Scene

SUPERSAMPLE = 4


def _normalise(points: list[tuple[float, float]]) -> tuple[tuple[float, float], ...]:
    """Scale a polygon so that it spans exactly ``[0, 1]`` along x and y."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    return tuple(((x - x0) / (x1 - x0), (y - y0) / (y1 - y0)) for x, y in points)


@lru_cache(maxsize=None)
def shape_polygon(shape: str) -> tuple[tuple[float, float], ...]:
    """The unit-box polygon of a shape.

    circle: a 64-gon; square: the box; triangle: apex top-centre, base along the bottom; star: five points
    with inner radius 0.45 of the outer (fatter than a pentagram, so it survives a 14 px rendering); heart: the
    classic parametric heart curve; cross: a plus sign with arms 0.36 of the box wide."""
    if shape == "circle":
        pts = [(math.cos(2 * math.pi * k / 64), math.sin(2 * math.pi * k / 64)) for k in range(64)]
    elif shape == "square":
        pts = [(0, 0), (1, 0), (1, 1), (0, 1)]
    elif shape == "triangle":
        pts = [(0.5, 0), (1, 1), (0, 1)]
    elif shape == "star":
        pts = []
        for k in range(10):
            r = 1.0 if k % 2 == 0 else 0.45
            a = -math.pi / 2 + math.pi * k / 5
            pts.append((r * math.cos(a), r * math.sin(a)))
    elif shape == "heart":
        pts = []
        for k in range(96):
            t = 2 * math.pi * k / 96
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            pts.append((x, -y))
    elif shape == "cross":
        a, b = 0.32, 0.68
        pts = [(a, 0), (b, 0), (b, a), (1, a), (1, b), (b, b), (b, 1), (a, 1), (a, b), (0, b), (0, a), (a, a)]
    else:
        raise ValueError(f"unknown shape {shape!r}; use one of {', '.join(SHAPES)}")
    return _normalise(pts)


def polygon_at(shape: str, left: float, top: float, width: float, height: float,
               scale: float = 1.0) -> list[tuple[float, float]]:
    """The shape's polygon stretched into a box, in (optionally scaled) pixel coordinates."""
    return [((left + u * width) * scale, (top + v * height) * scale) for u, v in shape_polygon(shape)]


def render(scene: Scene, texture: float = 0.0, seed: int = 0) -> Image.Image:
    """An RGB image of the scene: objects in list order (later on top) on the ``BACKGROUND`` grey.

    ``texture`` > 0 adds seeded Gaussian noise of that standard deviation (in 0-255 units) to the background
    only, a light texture; the default 0 gives a plain background."""
    n = scene.size * SUPERSAMPLE
    canvas = Image.new("RGB", (n, n), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for o in scene.objects:
        width = o.size * o.aspect
        left, top = o.x - width / 2, o.y - o.size / 2
        draw.polygon(polygon_at(o.shape, left, top, width, o.size, SUPERSAMPLE), fill=COLOURS[o.colour])
    image = canvas.resize((scene.size, scene.size), Image.BOX)
    if texture > 0:
        arr = np.asarray(image, dtype=np.float32)
        bg = np.all(arr == np.asarray(BACKGROUND, np.float32), axis=-1, keepdims=True)
        noise = np.random.default_rng(seed).normal(0.0, texture, arr.shape).astype(np.float32)
        arr = np.where(bg, arr + noise, arr)
        image = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "RGB")
    return image


@lru_cache(maxsize=4096)
def template_mask(shape: str, width: int, height: int) -> np.ndarray:
    """Boolean ``height``-by-``width`` mask of the shape filling the whole array: pixels at least half covered
    (antialiased rendering thresholded at 0.5, like the detector's nearest-colour rule does at an edge)."""
    canvas = Image.new("L", (width * SUPERSAMPLE, height * SUPERSAMPLE), 0)
    ImageDraw.Draw(canvas).polygon(polygon_at(shape, 0, 0, width, height, SUPERSAMPLE), fill=255)
    mask = np.asarray(canvas.resize((width, height), Image.BOX)) >= 128
    mask.setflags(write=False)
    return mask


__all__ = ["SUPERSAMPLE", "shape_polygon", "polygon_at", "render", "template_mask"]
