"""Is a retrained shapes model fit to ship? Its calibration floors and the positive control, in parallel processes.

    .venv/bin/python scripts/shapes_check_organism.py runs/cp10/pipeline --out runs/check-cp10 --jobs 2

The checks of issue 22 (docs/shapes.md), each one ``unbleed shapes bench`` split into ``--jobs`` processes with
``--part I/N`` (each with ``OMP_NUM_THREADS`` = cores / jobs; ``--device cuda:0,cuda:1`` gives part I the I-th
device) and merged with ``scripts/shapes_merge.py``:

* ``singles`` — plain sampling (``sd``) on the 21 ``train`` single objects × 16 seeds, for the model and for
  ``--reference`` (default the shipped model) on the same prompts and seeds, held against each other paired
  (``scripts/shapes_compare_models.py``). Floor: success ≥ 0.90.
* ``control`` — ``sd,attend-excite`` on 100 ``test`` prompts × 4 seeds. Floor: plain success in 0.3–0.7; the
  positive control passes when Attend-and-Excite's ``neglected`` difference has a 95 % interval entirely below 0 and
  its ``success`` difference's interval is not entirely below 0.
  ``--control-prompts`` may be larger (the 100 are a floor; every ``test`` pair is 261): the verdict is then the
  larger run's, decided before it runs, and the first ``--nested`` (100) of its prompts — exactly the 100-prompt
  benchmark, whose prompts are the first 100 of the larger list — are reported beside it as ``control_nested``.
* ``--ae-option KEY=VALUE`` (repeatable) runs the control's Attend-and-Excite at that setting (``shapes bench -o
  attend-excite.KEY=VALUE``: a method option or ``step_size``, ``refine_steps``, …), e.g. one chosen on the
  ``train`` split; the verdict is then that setting's. Attend-and-Excite at its defaults also runs on the same
  prompts and seeds (``control-defaults``), paired against the control's plain images, and is reported beside it
  as ``control_defaults``.
* ``unseen`` (with ``--unseen``) — the same on 50 ``unseen`` prompts × 4 seeds, reported whatever it shows.

Parts are merged in the bench's prompt order (``shapes_merge.py --only-prompts``), so every figure equals a one-run
bench's.

Prints and writes ``OUT/summary.json``. Every part's ``--out`` folder is kept under ``OUT``; a part whose
``results.json`` exists is not run again, so a stopped check resumes (an ``OUT`` folder belongs to one model).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shapes_compare_models import compare, load  # noqa: E402  (a sibling script)

from unbleed import checks  # noqa: E402
from unbleed.errors import UnbleedError  # noqa: E402
from unbleed.shapes.bench import bench_prompts  # noqa: E402

MERGE = Path(__file__).resolve().parent / "shapes_merge.py"
SINGLES_FLOOR = 0.90
PAIRS_BAND = (0.3, 0.7)


def merge(parts: list[Path], out: Path, prompts: list[str]) -> dict:
    """``scripts/shapes_merge.py`` of ``parts`` into ``out``, keeping ``prompts`` in their order (so the merged figures
    equal a one-run bench of them: the bootstrap draws prompts by position); the figures."""
    listing = out.with_name(out.name + "-prompts.txt")
    listing.write_text("\n".join(prompts) + "\n")
    merged = subprocess.run([sys.executable, str(MERGE), *map(str, parts), "--out", str(out),
                             "--only-prompts", str(listing)], capture_output=True, text=True)
    if merged.returncode != 0:
        sys.exit(f"error: merging {out.name}: {merged.stderr.strip()}")
    return json.loads(merged.stdout.strip().splitlines()[-1])


def bench(model: str, name: str, flags: list[str], out: Path, jobs: int, devices: list[str],
          prompts: list[str]) -> tuple[list[Path], dict]:
    """Run one benchmark (whose prompts, in the bench's order, are ``prompts``) as ``jobs`` parts in parallel (those
    not already done), merge them; (part folders, figures)."""
    parts = [out / f"{name}-{i}of{jobs}" for i in range(1, jobs + 1)]
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // jobs))
    running = []
    for i, folder in enumerate(parts, 1):
        if (folder / "results.json").is_file():
            continue
        log = open(out / f"{name}-{i}of{jobs}.log", "w")
        cmd = [sys.executable, "-m", "unbleed", "shapes", "bench", "--model", model, *flags, "--part", f"{i}/{jobs}",
               "--device", devices[(i - 1) % len(devices)], "--json", "--out", str(folder)]
        running.append((folder, log, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                                      env={**os.environ, "OMP_NUM_THREADS": threads})))
    failed = []
    for folder, log, proc in running:
        if proc.wait() != 0:
            failed.append(f"{folder.name} (exit {proc.returncode}; see {log.name})")
        log.close()
    if failed:
        sys.exit(f"error: {name}: {', '.join(failed)}")
    return parts, merge(parts, out / name, prompts)


def conditions(neglected: dict, success: dict) -> dict:
    """The control's two conditions from the paired ``neglected`` and ``success`` differences (``diff``, ``ci``)."""
    return {"neglected": neglected, "success": {"diff": success["diff"], "ci": success["ci"]},
            "passes": neglected["ci"][1] < 0 and not success["ci"][1] < 0}


def control_verdict(figures: dict) -> dict:
    """Issue 22's two conditions on a ``sd,attend-excite`` benchmark, and the pairs' calibration band."""
    sd, vs = figures["sd"], figures["attend-excite"]["vs_baseline"]
    return {"sd_success": sd["success"], "sd_success_ci": sd["ci"]["success"],
            "in_band": PAIRS_BAND[0] <= sd["success"] <= PAIRS_BAND[1],
            **conditions({"sd": sd["neglected"], "diff": vs["neglected"]["diff"], "ci": vs["neglected"]["ci"]},
                         vs["success"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="a pipeline folder from unbleed shapes train (or shapes)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--reference", default="shapes", help="the model the singles are held against (paired)")
    ap.add_argument("--jobs", type=int, default=2, help="processes per benchmark")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda:N, or a comma-separated list cycled over "
                    "the parts (cuda:0,cuda:1: part I on the I-th GPU)")
    ap.add_argument("--singles-prompts", type=int, default=21)
    ap.add_argument("--singles-seeds", type=int, default=16)
    ap.add_argument("--control-prompts", type=int, default=100)
    ap.add_argument("--control-seeds", type=int, default=4)
    ap.add_argument("--nested", type=int, default=100, help="with --control-prompts above it, also report the control "
                    "on the first N of those prompts (the issue's 100 x 4, nested in the larger run; the verdict stays "
                    "the full run's)")
    ap.add_argument("--ae-option", action="append", default=[], metavar="KEY=VALUE",
                    help="Attend-and-Excite's setting in the control (repeatable; its defaults are then reported "
                         "beside it)")
    ap.add_argument("--unseen", action="store_true", help="also the control on 50 unseen prompts × 4 seeds")
    ap.add_argument("--steps", type=int, default=50)
    args = ap.parse_args()
    try:
        for name in ("--jobs", "--singles-prompts", "--singles-seeds", "--control-prompts", "--control-seeds",
                     "--steps", "--nested"):
            checks.whole(getattr(args, name[2:].replace("-", "_")), name, 1)
        order = {"singles": bench_prompts("train", args.singles_prompts, objects=1),
                 "control": bench_prompts("test", args.control_prompts),
                 "unseen": bench_prompts("unseen", 50) if args.unseen else []}
        devices = [checks.device(d.strip()) for d in args.device.split(",")]
        checks.out_folder(args.out)
    except UnbleedError as err:
        sys.exit(f"error: {err}")
    steps = ["--steps", str(args.steps)]
    singles = ["--methods", "sd", "--split", "train", "--objects", "1", "--prompts", str(args.singles_prompts),
               "--seeds", str(args.singles_seeds), *steps]
    mine, figures = bench(args.model, "singles", singles, args.out, args.jobs, devices, order["singles"])
    theirs, _ = bench(args.reference, "reference-singles", singles, args.out, args.jobs, devices, order["singles"])
    paired = compare(load(mine, "sd"), load(theirs, "sd"))
    sd = figures["sd"]
    summary = {"model": args.model, "reference": args.reference,
               "singles": {"success": sd["success"], "ci": sd["ci"]["success"], "duplicated": sd["duplicated"],
                           "floor": SINGLES_FLOOR, "meets_floor": sd["success"] >= SINGLES_FLOOR,
                           "images": sd["images"], "vs_reference": paired["success"],
                           "duplicated_vs_reference": paired["duplicated"]}}
    tuned = [f for item in args.ae_option for f in ("-o", f"attend-excite.{item}")]
    control = ["--methods", "sd,attend-excite", *tuned, "--seeds", str(args.control_seeds), *steps]
    parts, figures = bench(args.model, "control", [*control, "--split", "test", "--prompts",
                                                   str(args.control_prompts)], args.out, args.jobs, devices,
                           order["control"])
    summary["control"] = {"prompts": args.control_prompts, "seeds": args.control_seeds,
                          "ae_options": args.ae_option, **control_verdict(figures)}
    if args.ae_option:
        defaults, _ = bench(args.model, "control-defaults", ["--methods", "attend-excite", "--seeds",
                                                             str(args.control_seeds), *steps, "--split", "test",
                                                             "--prompts", str(args.control_prompts)],
                            args.out, args.jobs, devices, order["control"])
        paired = compare(load(defaults, "attend-excite"), load(parts, "sd"))
        summary["control_defaults"] = conditions({"sd": paired["neglected"]["b"], **{k: paired["neglected"][k] for k
                                                  in ("diff", "ci")}}, paired["success"])
    if args.nested < args.control_prompts:
        nested = merge(parts, args.out / f"control-first{args.nested}", order["control"][:args.nested])
        summary["control_nested"] = {"prompts": args.nested, "seeds": args.control_seeds, **control_verdict(nested)}
    if args.unseen:
        _, figures = bench(args.model, "unseen", [*control, "--split", "unseen", "--prompts", "50"], args.out,
                           args.jobs, devices, order["unseen"])
        summary["unseen"] = control_verdict(figures)
    summary["ships"] = (summary["singles"]["meets_floor"] and summary["control"]["in_band"]
                        and summary["control"]["passes"])
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
