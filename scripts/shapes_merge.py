"""Merge ``unbleed shapes bench --out`` folders that ran parts of one benchmark (the same seeds).

    .venv/bin/python scripts/shapes_merge.py runs/control runs/peers-a runs/peers-b --out runs/every-method

A long benchmark can be split across processes or machines by method (each run with the same ``--prompts``,
``--seeds``, ``--split``, ``--steps`` and, for the comparison, the baseline ``sd``) or by prompts (each run the
same methods on its own part of the prompt list, e.g. ``--prompts-file`` halves). The merged benchmark's prompts
are the runs' prompts in order of first appearance; every method must then have an image for every prompt and
seed. Sampling is deterministic, so a method that two runs share must agree image for image across them: this is
checked, and a mismatch stops the merge. A method's seconds are summed over the runs that added its images. The merged figures (the same statistics as the bench: intervals over prompts, paired differences from the
baseline) are printed as JSON and written with the bench's plots to ``--out``.

``--only-prompts FILE`` (one prompt per line; blank lines and ``#`` comments skipped) keeps only those prompts, in the
file's order: a nested sub-benchmark of the merged one, whose figures equal a one-run bench of exactly those prompts
(the bootstrap draws prompts by position, so the order is the file's, as a bench of them would have it). E.g. the
first 100 of a 261-prompt ``test`` run are ``bench_prompts("test", 100)``. Each method's seconds are then its
merged seconds × the share of its images kept (an estimate, flagged ``seconds_scaled``).

``--drop METHOD@RUN`` (repeatable) leaves out one method's images from one run (``RUN`` as given on the command
line): e.g. a run that measured a method at a setting that a later, separate run replaced — the two would otherwise
disagree image for image under one name.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from unbleed.shapes.bench import VERDICTS, summarise, write_plots


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--baseline", help="the method the others are compared with [default: the first run's own "
                    "baseline, as its bench chose it (sd when it ran)]")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--only-prompts", type=Path, help="keep only the prompts in this file (one per line), in its order")
    ap.add_argument("--drop", action="append", default=[], metavar="METHOD@RUN",
                    help="leave out METHOD's images from run RUN (repeatable)")
    args = ap.parse_args()

    dropped: set[tuple[str, str]] = set()
    for item in args.drop:
        method, at, run = item.partition("@")
        if not (method and at and run) or run not in map(str, args.runs):
            sys.exit(f"error: --drop {item}: write METHOD@RUN with RUN one of the runs as given "
                     f"({', '.join(map(str, args.runs))})")
        dropped.add((method, run))
    prompts = seeds = None
    records: dict[str, dict[tuple[str, int], dict]] = {}
    seconds: dict[str, float] = {}
    contenders: dict[str, dict] = {}  # each method's run spec, as its bench recorded it
    for run in args.runs:
        meta = json.loads((run / "results.json").read_text())
        for method, spec in (meta.get("contenders") or {}).items():
            if (method, str(run)) not in dropped:
                contenders.setdefault(method, spec)
        if prompts is None:
            prompts, seeds = list(meta["prompts"]), meta["seeds"]
            baseline = args.baseline or meta.get("baseline") or "sd"
        elif meta["seeds"] != seeds:
            sys.exit(f"error: {run}: other seeds than {args.runs[0]}; merge only runs of one benchmark")
        prompts += [p for p in meta["prompts"] if p not in prompts]
        added: set[str] = set()
        for line in (run / "records.jsonl").read_text().splitlines():
            r = json.loads(line)
            if (r["method"], str(run)) in dropped:
                continue
            mine = {v: r[v] for v in VERDICTS}
            seen = records.setdefault(r["method"], {})
            key = (r["prompt"], r["seed"])
            if key in seen and seen[key] != mine:
                sys.exit(f"error: {run}: {r['method']} on {key} differs from another run's; not the same benchmark")
            if key not in seen:
                added.add(r["method"])
            seen[key] = mine
        for method, f in meta["figures"].items():
            if method in added:
                seconds[method] = seconds.get(method, 0.0) + f["seconds"]
    if baseline not in records:
        sys.exit(f"error: --baseline {baseline!r} is in none of the runs")
    total = len(prompts)
    if args.only_prompts is not None:
        try:
            lines = args.only_prompts.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            sys.exit(f"error: --only-prompts {args.only_prompts}: cannot read it ({type(e).__name__}); give a text "
                     f"file with one prompt per line")
        wanted = [t.strip() for t in lines if t.strip() and not t.strip().startswith("#")]
        missing = [p for p in wanted if p not in prompts]
        if not wanted or missing or len(set(wanted)) != len(wanted):
            why = (f"{len(missing)} of its prompts are in none of the runs, e.g. {missing[0]!r}" if missing else
                   "it names a prompt twice" if wanted else "it names no prompt")
            sys.exit(f"error: --only-prompts {args.only_prompts}: {why}; give distinct prompts of the merged runs")
        prompts = wanted
    outcomes = {}
    for method, seen in records.items():
        seen = {key: v for key, v in seen.items() if key[0] in prompts} if args.only_prompts else seen
        if len(seen) != len(prompts) * len(seeds):
            sys.exit(f"error: {method} has {len(seen)} of {len(prompts) * len(seeds)} images; finish its run first")
        outcomes[method] = {v: np.array([[seen[(p, s)][v] for s in seeds] for p in prompts]) for v in VERDICTS}
    figures = summarise(outcomes, baseline)
    for method in figures:
        figures[method]["seconds"] = seconds[method] * len(prompts) / total
        if len(prompts) < total:
            figures[method]["seconds_scaled"] = True
    args.out.mkdir(parents=True, exist_ok=True)
    write_plots(figures, baseline, args.out, f"shapes world: {len(prompts)} prompts × {len(seeds)} seeds")
    (args.out / "results.json").write_text(json.dumps({"figures": figures, "baseline": baseline,
                                                       "prompts": prompts, "seeds": seeds,
                                                       "contenders": {m: contenders[m] for m in figures
                                                                      if m in contenders},
                                                       "runs": [str(r) for r in args.runs]}, indent=1))
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
