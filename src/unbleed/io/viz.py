"""Pictures of attention: each token group's map over the denoising steps, and a method's masks (ELA Fig. 2/4/5).

One PNG per image: a title with the final image, then one row per entity/attribute map and one per method
picture (ELA: background mask and entity masks), one column per recorded step (at most ``max_columns``, evenly
spread, always including the first and last). Each map is min–max normalised on its own and drawn with the
``inferno`` colour ramp; masks are black/white.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from ..run.sampler import Result, picture_groups

# inferno at 0, .25, .5, .75, 1 (matplotlib's values), linearly interpolated
_INFERNO = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float32)


def colorize(m: np.ndarray) -> np.ndarray:
    """Map ``[h, w]`` values in [0, 1] to RGB uint8 through the inferno ramp."""
    x = np.clip(m, 0, 1) * (len(_INFERNO) - 1)
    lo = np.floor(x).astype(int).clip(0, len(_INFERNO) - 2)
    frac = (x - lo)[..., None]
    return (_INFERNO[lo] * (1 - frac) + _INFERNO[lo + 1] * frac).astype(np.uint8)


def _cell(m: torch.Tensor, size: int, binary: bool) -> Image.Image:
    m = m.float()
    if binary:
        arr = (m.numpy() > 0.5).astype(np.uint8) * 255
        return Image.fromarray(arr, "L").convert("RGB").resize((size, size), Image.NEAREST)
    up = F.interpolate(m[None, None], size=(size, size), mode="bilinear", align_corners=False)[0, 0]
    lo, hi = float(up.min()), float(up.max())
    norm = (up - lo) / (hi - lo) if hi > lo else torch.zeros_like(up)
    return Image.fromarray(colorize(norm.numpy()))


def _columns(steps: list[int], max_columns: int) -> list[int]:
    if len(steps) <= max_columns:
        return steps
    pick = np.linspace(0, len(steps) - 1, max_columns).round().astype(int)
    return [steps[i] for i in sorted(set(pick))]


def attention_grid(result: Result, sample: int, image: Image.Image, title: str, cell: int = 72,
                   max_columns: int = 10) -> Image.Image:
    """The attention picture of ``result``'s ``sample``-th image (see the module docstring)."""
    recorded = [r for r in result.trace if r.maps is not None]
    by_step = {r.step: r for r in recorded}
    columns = _columns([r.step for r in recorded], max_columns)
    names = picture_groups(result.groups)[0]
    visual_names = list(dict.fromkeys(k for r in recorded for k in r.visuals))
    rows = [(n, "map", i) for i, n in enumerate(names)] + [(n, "visual", n) for n in visual_names]
    font = ImageFont.load_default()
    label_w, head_h, pad = 150, 22, 4
    top = max(cell * 2, 40) + 2 * pad
    width = label_w + max(1, len(columns)) * (cell + pad) + pad
    height = top + head_h + len(rows) * (cell + pad) + pad + 16
    canvas = Image.new("RGB", (max(width, label_w + cell * 2 + 320), height), "white")
    draw = ImageDraw.Draw(canvas)
    canvas.paste(image.convert("RGB").resize((cell * 2, cell * 2)), (pad, pad))
    for k, line in enumerate(title.splitlines()):
        draw.text((cell * 2 + 3 * pad, pad + 14 * k), line, fill="black", font=font)
    for c, step in enumerate(columns):
        x = label_w + c * (cell + pad)
        rec = by_step[step]
        draw.text((x, top + 4), f"step {step}" + (" *" if rec.guided else ""), fill="black", font=font)
    for r, (label, kind, key) in enumerate(rows):
        y = top + head_h + r * (cell + pad)
        draw.text((pad, y + cell // 2 - 6), label[:24], fill="black", font=font)
        for c, step in enumerate(columns):
            x = label_w + c * (cell + pad)
            rec = by_step[step]
            if kind == "map":
                canvas.paste(_cell(rec.maps[sample, key], cell, binary=False), (x, y))
            elif key in rec.visuals:
                canvas.paste(_cell(rec.visuals[key][sample], cell, binary=True), (x, y))
            else:
                draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=(230, 230, 230))
    if columns:
        draw.text((label_w, height - 14), "* guided step (maps before its update)", fill="gray", font=font)
    return canvas
