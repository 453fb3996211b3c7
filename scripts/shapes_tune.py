"""Tune one method's settings on the shapes world's *train* split, one factor at a time, against plain sampling.

    .venv/bin/python scripts/shapes_tune.py --method attend-excite --vary "step_size=80;320" --prompts 20 \
        --seeds 4 --out runs/tune-ae
    .venv/bin/python scripts/shapes_tune.py --method ela --vary "lam=0.2;0.8" --vary binarize=mean \
        --vary refine_steps=none --variant "step_size=1;step_schedule=constant" --out runs/tune-ela

Every configuration runs on the same prompts and seeds in one run (:func:`unbleed.shapes.bench.run_bench`), so
each row's difference from plain sampling is paired and carries its 95 % interval (bootstrap over prompts). A
``--vary`` key is a method option (``-o KEY=VALUE``) or one of the schedule flags ``step_size``,
``step_schedule``, ``window`` (``START:END``, or ``fraction:F`` for the first F of the steps), ``refine_steps``,
``refine_iters``; values are separated by ``;`` (a value may hold commas: ``refine_steps=0:0.2,10:0.2``).
``--base KEY=VALUE`` changes the centre every variant is taken around; ``--variant "KEY=V;KEY=V"`` adds one
contender with several settings changed together. The table (Markdown),
``figures.json`` and the bench plots go to ``--out``. Held-out prompts are never used here: tune on train, then
measure once on the held-out split with ``unbleed shapes bench``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from unbleed.errors import UnbleedError
from unbleed.eval.sweep import parse_seeds
from unbleed.run.spec import RunSpec, split_settings
from unbleed.models import load_model
from unbleed.shapes.bench import Contender, bench_prompts, run_bench

SHOWN = ("success", "neglected", "malformed", "wrong_shape", "duplicated", "leak", "fused")


def split_setting(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise SystemExit(f"error: {item!r}: write KEY=VALUE (e.g. step_size=40)")
    return key.strip(), value.strip()


def contender(method: str, label: str, settings: dict[str, str], steps: int) -> Contender:
    """One row: ``method`` with ``settings`` (method options and schedule fields), checked now (before any model
    loads)."""
    try:
        options, fields = split_settings(settings)
    except UnbleedError as err:
        raise SystemExit(f"error: {err}") from None
    if str(fields.get("window", "")).startswith("fraction:"):
        fields["window"] = f"0:{max(1, round(float(fields['window'][9:]) * steps))}"
    spec = RunSpec(method=method, options=options, steps=steps, **fields)
    spec.build()
    return Contender(label, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", required=True)
    ap.add_argument("--vary", action="append", default=[], help="KEY=V1;V2;… (repeatable)")
    ap.add_argument("--base", action="append", default=[], help="KEY=VALUE: the centre's settings (repeatable)")
    ap.add_argument("--variant", action="append", default=[],
                    help="KEY=V;KEY=V: one more contender with several settings changed together (repeatable)")
    ap.add_argument("--model", default="shapes")
    ap.add_argument("--prompts", type=int, default=30)
    ap.add_argument("--objects", type=int, default=2)
    ap.add_argument("--seeds", default="4", help="K, A:B or a list")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    try:
        base = dict(split_setting(b) for b in args.base)
        centre = args.method if not base else f"{args.method} ({', '.join(f'{k}={v}' for k, v in base.items())})"
        contenders = [Contender("sd", RunSpec(method="sd", steps=args.steps)),
                      contender(args.method, centre, base, args.steps)]
        for item in args.vary:
            key, values = split_setting(item)
            for value in values.split(";"):
                contenders.append(contender(args.method, f"{key}={value}", {**base, key: value}, args.steps))
        for item in args.variant:
            settings = dict(split_setting(kv) for kv in item.split(";"))
            contenders.append(contender(args.method, ", ".join(f"{k}={v}" for k, v in settings.items()),
                                        {**base, **settings}, args.steps))
        prompts = bench_prompts("train", args.prompts, objects=args.objects)
        seeds = parse_seeds(args.seeds)
    except UnbleedError as err:
        raise SystemExit(f"error: {err}") from None

    def progress(prompt, label):
        print(f"  {label}: {prompt}", flush=True)

    pipe = load_model(args.model)
    figures = run_bench(pipe, contenders, prompts, seeds, out=args.out, baseline="sd", progress=progress)
    lines = [f"{len(prompts)} train prompts × {figures['sd']['images'] // len(prompts)} seeds; each cell: rate, "
             f"and for the variants the paired difference from sd with its 95 % CI (* = excludes 0)", "",
             "| configuration | " + " | ".join(SHOWN) + " | seconds |", "|---" * (len(SHOWN) + 2) + "|"]
    for label, f in figures.items():
        cells = []
        for v in SHOWN:
            cell = f"{f[v]:.3f}"
            if "vs_baseline" in f:
                d = f["vs_baseline"][v]
                cell += f" ({d['diff']:+.3f} [{d['ci'][0]:+.2f}, {d['ci'][1]:+.2f}]{'*' if d['excludes_zero'] else ''})"
            cells.append(cell)
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {f['seconds']:.0f} |")
    table = "\n".join(lines)
    (args.out / "table.md").write_text(table + "\n")
    (args.out / "figures.json").write_text(json.dumps(figures, indent=1))
    print(table)


if __name__ == "__main__":
    main()
