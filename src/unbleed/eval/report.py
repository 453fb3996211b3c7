"""``unbleed report RUN``: the run's records → a Table-1-shaped table (methods × categories × metrics, mean ± std
over images) as Markdown and CSV, one bar plot per metric, and per-prompt image grids (rows = methods, columns =
seeds). Means and standard deviations are over all images of a cell, as A&E's aggregation scripts
(``aggregate_by_full_text``, ``aggregate_by_min_half``, ``aggregate_text_similarities``: ``np.average``/``np.std``
of the flattened per-image scores).
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from pathlib import Path

from ..errors import UnbleedError
from .sweep import read_records

METRICS = (("clip_full", "full prompt"), ("clip_min_entity", "min. entity"), ("text_text", "text–text"),
           ("blip_vqa", "BLIP-VQA"))
PLOT_TITLES = {"clip_full": "full prompt (CLIP)", "clip_min_entity": "min. entity (CLIP)",
               "text_text": "text–text (BLIP caption, CLIP)", "blip_vqa": "BLIP-VQA (T2I-CompBench)"}
ALL = "all"


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and population standard deviation (``np.std``'s ddof=0, as A&E's scripts)."""
    if not values:
        return math.nan, math.nan
    m = sum(values) / len(values)
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / len(values))


def aggregate(records: list[dict]) -> dict[tuple[str, str, str], tuple[float, float, int]]:
    """``{(method, category, metric): (mean, std, n)}`` over scored records; category ``all`` pools every one."""
    cells: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for r in records:
        for key, _ in METRICS:
            v = (r.get("metrics") or {}).get(key)
            if isinstance(v, (int, float)) and math.isfinite(v):
                cells[(r["method"], r["category"], key)].append(float(v))
                cells[(r["method"], ALL, key)].append(float(v))
    return {k: (*mean_std(v), len(v)) for k, v in cells.items()}


def _order(items) -> list[str]:
    return list(dict.fromkeys(items))


def table_markdown(stats, methods: list[str], categories: list[str]) -> str:
    metrics = [(k, name) for k, name in METRICS if any(s[2] for (_, _, m), s in stats.items() if m == k)]
    head = ["method"] + [f"{c} · {name}" for c in categories for _, name in metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in methods:
        row = [m]
        for c in categories:
            for k, _ in metrics:
                mean, std, n = stats.get((m, c, k), (math.nan, math.nan, 0))
                row.append(f"{mean:.4f} ± {std:.4f}" if n else "—")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def write_csv(stats, methods: list[str], categories: list[str], path: Path) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["method", "category", "metric", "mean", "std", "n"])
        for m in methods:
            for c in categories:
                for k, _ in METRICS:
                    if (m, c, k) in stats:
                        mean, std, n = stats[(m, c, k)]
                        w.writerow([m, c, k, f"{mean:.6f}", f"{std:.6f}", n])


def verdict_report(records: list[dict], out: Path, title: str, baseline: str | None = None) -> dict | None:
    """The verdict tables of records scored with ``--metrics verdicts`` (None when none is): each verdict's rate
    with its 95 % interval over prompts and each method minus ``baseline`` (``sd`` when present, else the first
    method) with its paired interval — :func:`unbleed.eval.verdicts.summarise`, the code of ``unbleed shapes
    bench`` — written as ``verdicts.md``, ``verdicts.json``, ``verdicts.png`` and ``verdicts-diff.png``."""
    import json

    from .verdicts import outcomes_from_records, summarise, verdict_markdown, write_plots

    outcomes, grid = outcomes_from_records(records)
    if not outcomes or not grid["prompts"]:
        return None
    methods = list(outcomes)
    if baseline is None:
        baseline = "sd" if "sd" in methods else methods[0]
    if baseline not in methods:
        raise UnbleedError(f"--baseline {baseline}: not among the scored methods {', '.join(methods)}")
    figures = summarise(outcomes, baseline)
    head = (f"verdicts ({grid['prompts']} prompts × {grid['seeds']} seeds, paired over methods"
            + (f"; {grid['dropped']} images without a partner left out" if grid["dropped"] else "") + ")")
    md = f"{head}: rate [95 % CI over prompts]\n\n" + verdict_markdown(figures, baseline)
    out.mkdir(parents=True, exist_ok=True)
    (out / "verdicts.md").write_text(f"# {title}\n\n{md}")
    (out / "verdicts.json").write_text(json.dumps({"baseline": baseline, **grid, "figures": figures}, indent=1))
    plots = write_plots(figures, baseline, out, title, stem="verdicts")
    return {"figures": figures, "markdown": md, "plots": [str(p) for p in plots]}


def make_report(run: str | Path, out: str | Path | None = None, max_grid_seeds: int = 8, cell: int = 128,
                progress=None) -> dict:
    """Write ``table.md``, ``table.csv``, ``bar-METRIC.png`` and ``grids/NNNN.png`` into ``RUN/report`` (or
    ``out``); return a summary with the paths and the Markdown table."""
    from PIL import Image

    from ..io.plots import bar_plot, image_grid

    run = Path(run)
    if not run.is_dir():
        raise UnbleedError(f"RUN {run}: no such folder: give the --out folder of an unbleed sweep")
    records = read_records(run)
    if not records:
        raise UnbleedError(f"RUN {run}: no records (records-*.jsonl) there: run unbleed sweep --out {run} first")
    ok = [r for r in records if "image" in r]
    failed = len(records) - len(ok)
    out = Path(out) if out else run / "report"
    (out / "grids").mkdir(parents=True, exist_ok=True)
    methods = _order(r["method"] for r in records)
    categories = _order(r["category"] for r in records)
    categories = categories + [ALL] if len(categories) > 1 else categories
    stats = aggregate(ok)
    summary = {"records": len(records), "failed": failed, "scored": sum(1 for r in ok if r.get("metrics")),
               "out": str(out), "plots": [], "grids": 0}
    if stats:
        md = table_markdown(stats, methods, categories)
        (out / "table.md").write_text(f"# {run.name}\n\nmean ± std over images ({summary['scored']} scored)\n\n" + md)
        write_csv(stats, methods, categories, out / "table.csv")
        summary["table"] = md
        for key, name in METRICS:
            values = {c: {m: stats[(m, c, key)][0] for m in methods if (m, c, key) in stats} for c in categories}
            errors = {c: {m: stats[(m, c, key)][1] for m in methods if (m, c, key) in stats} for c in categories}
            values = {c: v for c, v in values.items() if v}
            if values:
                summary["plots"].append(str(bar_plot(values, out / f"bar-{key}.png", errors={c: errors[c] for c in values},
                                                     title=PLOT_TITLES[key],
                                                     ylabel="P(yes), product over noun phrases" if key == "blip_vqa"
                                                     else "cosine similarity")))
    verdicts = verdict_report(ok, out, run.name)
    if verdicts is not None:
        summary["verdicts"] = verdicts["figures"]
        summary["plots"] += verdicts["plots"]
        summary["table"] = summary.get("table", "") + ("\n" if "table" in summary else "") + verdicts["markdown"]
    by_prompt: dict[int, list[dict]] = defaultdict(list)
    for r in ok:
        by_prompt[r["prompt_index"]].append(r)
    if progress:
        progress.start(len(by_prompt))
    for n, (index, recs) in enumerate(sorted(by_prompt.items()), 1):
        seeds = sorted({r["seed"] for r in recs})[:max_grid_seeds]
        cells = {(r["method"], r["seed"]): r for r in recs}
        rows = []
        for m in methods:
            images = []
            for s in seeds:
                r = cells.get((m, s))
                path = run / r["image"] if r else None
                images.append(Image.open(path).convert("RGB") if path and path.is_file()
                              else Image.new("RGB", (cell, cell), (235, 235, 235)))
            if any((m, s) in cells for s in seeds):
                rows.append((m, images))
        grid = image_grid(rows, col_labels=[f"seed {s}" for s in seeds], title=f"{index:04d}: {recs[0]['prompt']}",
                          cell=cell)
        grid.save(out / "grids" / f"{index:04d}.png")
        summary["grids"] += 1
        if progress:
            progress.step(n)
    return summary
