"""Generic figures for benchmarks: a labelled image grid (PIL) and a grouped bar plot (matplotlib).

Shared by the evaluation report (``unbleed report``: rows = methods, columns = seeds) and other benchmarks.
"""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

_PAD = 4
_LINE = 12  # height of one line of PIL's default bitmap font, with spacing


def _font():
    return ImageFont.load_default()


def _text_width(draw: ImageDraw.ImageDraw, text: str, font) -> int:
    left, _, right, _ = draw.textbbox((0, 0), text, font=font)
    return right - left


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """``text`` cut (with …) so that it is at most ``width`` pixels wide."""
    if _text_width(draw, text, font) <= width:
        return text
    while text and _text_width(draw, text + "…", font) > width:
        text = text[:-1]
    return text + "…"


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    """Greedy word wrap of ``text`` into lines at most ``width`` pixels wide (over-long words are cut)."""
    lines: list[str] = []
    for paragraph in text.splitlines() or [""]:
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if _text_width(draw, candidate, font) <= width or not line:
                line = candidate
            else:
                lines.append(_fit(draw, line, font, width))
                line = word
        lines.append(_fit(draw, line, font, width))
    return lines


def image_grid(rows: list[tuple[str, list[Image.Image]]], col_labels: list[str] | None = None,
               title: str | None = None, cell: int | None = None) -> Image.Image:
    """One picture of labelled rows of images: row labels on the left, column labels on top, a title above.

    ``rows`` is ``[(label, [image, …]), …]``; rows may have different lengths (missing cells are left light grey).
    Every image is resized to a ``cell``×``cell`` square (default: the first image's larger side, at most 256).
    """
    if not rows:
        raise ValueError("image_grid: no rows")
    n_cols = max(max((len(images) for _, images in rows), default=0), len(col_labels or []), 1)
    if cell is None:
        first = next((im for _, images in rows for im in images), None)
        cell = min(max(first.size), 256) if first is not None else 64
    if cell < 1:
        raise ValueError(f"image_grid: cell {cell} must be ≥ 1")
    font = _font()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = min(max((_text_width(probe, label, font) for label, _ in rows), default=0), 200)
    label_w = label_w + 2 * _PAD if label_w else 0
    grid_w = n_cols * (cell + _PAD) + _PAD
    width = label_w + grid_w
    title_lines = _wrap(probe, title, font, width - 2 * _PAD) if title else []
    title_h = len(title_lines) * _LINE + (2 * _PAD if title_lines else 0)
    head_h = _LINE + 2 * _PAD if col_labels else 0
    height = title_h + head_h + len(rows) * (cell + _PAD) + _PAD
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for k, line in enumerate(title_lines):
        draw.text((_PAD, _PAD + k * _LINE), line, fill="black", font=font)
    for c, label in enumerate(col_labels or []):
        x = label_w + _PAD + c * (cell + _PAD)
        draw.text((x, title_h + _PAD), _fit(draw, str(label), font, cell), fill="black", font=font)
    top = title_h + head_h
    for r, (label, images) in enumerate(rows):
        y = top + _PAD + r * (cell + _PAD)
        if label_w:
            lines = _wrap(draw, str(label), font, label_w - 2 * _PAD)[: max(1, cell // _LINE)]
            y0 = y + (cell - len(lines) * _LINE) // 2
            for k, line in enumerate(lines):
                draw.text((_PAD, y0 + k * _LINE), line, fill="black", font=font)
        for c in range(n_cols):
            x = label_w + _PAD + c * (cell + _PAD)
            if c < len(images):
                canvas.paste(images[c].convert("RGB").resize((cell, cell), Image.BICUBIC), (x, y))
            else:
                draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=(235, 235, 235))
    return canvas


def _error_bar(value: float, error) -> tuple[float, float]:
    """Distances below and above ``value`` of an error given as ± a number or as a ``(low, high)`` interval."""
    if error is None:
        return 0.0, 0.0
    if isinstance(error, (tuple, list)):
        lo, hi = error
        return max(0.0, value - lo) if math.isfinite(lo) else 0.0, max(0.0, hi - value) if math.isfinite(hi) else 0.0
    return (error, error) if math.isfinite(error) else (0.0, 0.0)


def wrap_title(title: str, width_inches: float, fontsize: float = 11) -> str:
    """``title`` broken into lines that fit a figure ``width_inches`` wide at ``fontsize`` points (at most 0.6 em
    per character, matplotlib's DejaVu Sans being narrower on average)."""
    import textwrap

    chars = max(20, int(width_inches * 72 / (0.6 * fontsize)) - 2)
    return "\n".join(textwrap.wrap(title, chars)) or title


def bar_plot(values: dict[str, dict[str, float]], path, errors: dict[str, dict[str, float]] | None = None,
             title: str = "", ylabel: str = "") -> Path:
    """Grouped bars written as a PNG at ``path`` (parent folders created); returns the path.

    ``values[group][series]``: the outer key is a group on the x axis (a category, a metric), the inner key a
    series drawn in one colour across groups (a method), in first-seen order. ``errors`` (same shape, optional)
    adds error bars: a number is drawn ± (e.g. a standard deviation), a ``(low, high)`` pair is an interval in
    the values' own units (e.g. a 95 % confidence interval). Missing or non-finite values leave a gap.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(values)
    series = list(dict.fromkeys(s for g in groups for s in values[g]))
    if not groups or not series:
        raise ValueError("bar_plot: no values")
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.0 + len(groups) * (0.4 + 0.25 * len(series))), 3.6), dpi=120)
    try:
        for k, name in enumerate(series):
            xs, ys, lows, highs = [], [], [], []
            for g, group in enumerate(groups):
                v = values[group].get(name)
                if v is None or not math.isfinite(v):
                    continue
                xs.append(g - 0.4 + width * (k + 0.5))
                ys.append(v)
                lo, hi = _error_bar(v, (errors or {}).get(group, {}).get(name))
                lows.append(lo)
                highs.append(hi)
            ax.bar(xs, ys, width=width * 0.95, label=name, yerr=[lows, highs] if errors else None,
                   capsize=2 if errors else 0)
        if any(v < 0 for g in groups for v in values[g].values() if v is not None and math.isfinite(v)):
            ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels(groups, rotation=20 if len(groups) > 4 else 0, ha="right" if len(groups) > 4 else "center")
        ax.set_ylabel(ylabel)
        if title:  # wrapped to the figure's width (a long title is never cut off)
            ax.set_title(wrap_title(title, fig.get_figwidth()), fontsize=11)
        ax.legend(fontsize="small", ncols=min(len(series), 4), loc="best")
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
        fig.tight_layout()
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, format="png")
    finally:
        plt.close(fig)
    return out
