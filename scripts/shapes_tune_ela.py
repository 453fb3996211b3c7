"""Tune ELA's open choices on the shapes world's *train* split (one factor at a time around the defaults).

    .venv/bin/python scripts/shapes_tune_ela.py --prompts 30 --seeds 4 --out runs/tune

Every configuration runs on the same prompts and seeds in one run (:func:`unbleed.shapes.bench.run_bench`); the
table (Markdown) and the bar plot go to ``--out`` (copy them into docs/). Held-out prompts are never used here.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from unbleed.cli import build_schedule
from unbleed.methods import make_method
from unbleed.models import load_model
from unbleed.shapes.bench import VERDICTS, Contender, bench_prompts, run_bench

# label -> (method options, schedule flags)
CONFIGS: dict[str, tuple[dict[str, str], dict]] = {
    "ela (defaults)": ({}, {}),
    "binarize=mean": ({"binarize": "mean"}, {}),
    "window=first 20%": ({}, {"window": "fraction:0.2"}),
    "lam=0.2": ({"lam": "0.2"}, {}),
    "lam=0.8": ({"lam": "0.8"}, {}),
    "layers=up-2": ({"layers": "up-2"}, {}),
    "step_size=5": ({}, {"step_size": 5.0}),
    "step_size=60": ({}, {"step_size": 60.0}),
    "no refinement": ({}, {"refine_steps": "none"}),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="shapes")
    ap.add_argument("--prompts", type=int, default=30)
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--only", default=None, help="comma-separated labels to run (default: all)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    pipe = load_model(args.model)
    contenders = [Contender("sd", None)]
    for label, (options, flags) in CONFIGS.items():
        if args.only and label not in args.only.split(","):
            continue
        flags = dict(flags)
        if flags.get("window", "").startswith("fraction:"):
            flags["window"] = f"0:{max(1, round(float(flags['window'][9:]) * args.steps))}"
        guide = make_method("ela", options)
        contenders.append(Contender(label, guide, build_schedule(guide, args.steps, **flags)))
    prompts = bench_prompts("train", args.prompts)

    def progress(prompt, label):
        print(f"  {label}: {prompt}", flush=True)

    figures = run_bench(pipe, contenders, prompts, list(range(args.seeds)), steps=args.steps, out=args.out,
                        progress=progress)
    lines = ["| configuration | " + " | ".join(VERDICTS) + " | seconds |", "|---" * (len(VERDICTS) + 2) + "|"]
    for label, f in figures.items():
        lines.append(f"| {label} | " + " | ".join(f"{f[v]:.3f}" for v in VERDICTS) + f" | {f['seconds']:.0f} |")
    table = "\n".join(lines)
    (args.out / "table.md").write_text(table + "\n")
    (args.out / "figures.json").write_text(json.dumps(figures, indent=1))
    print(table)


if __name__ == "__main__":
    main()
