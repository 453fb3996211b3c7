"""Compare two shapes models on the same prompts and seeds: paired differences with 95 % intervals.

    .venv/bin/python scripts/shapes_compare_models.py --a runs/cp7-s16-a runs/cp7-s16-b \
        --b runs/shipped-s16-a runs/shipped-s16-b --method sd

Each side is one or more ``unbleed shapes bench --out`` folders of one model (parts of one benchmark, e.g. the two
``--prompts-file`` halves). Images are paired by (prompt, seed); every pair must exist on both sides (else one line
names what is missing). For each verdict it prints both rates and ``a − b`` with the bench's interval (a bootstrap
over prompts, :func:`unbleed.stats.paired_bootstrap`), the exact McNemar p-value and its discordant pairs (``a_only``:
images where the verdict holds for A but not for B; ``b_only``: the reverse), as JSON. ``--b-method`` pairs two
methods instead (the same folders on both sides), e.g. how many images a method rid of neglect and how many it gave
it. This is how a
retrained model is held against the shipped one (calibration), since ``shapes bench`` compares methods on one model.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from unbleed.shapes.bench import VERDICTS
from unbleed.stats import mcnemar_exact, paired_bootstrap


def load(folders: list[Path], method: str) -> dict[tuple[str, int], dict]:
    """``(prompt, seed) → record`` of ``method`` over the folders' ``records.jsonl``."""
    out: dict[tuple[str, int], dict] = {}
    for folder in folders:
        path = folder / "records.jsonl"
        if not path.is_file():
            raise SystemExit(f"{folder}: no records.jsonl; pass `unbleed shapes bench --out` folders")
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if record["method"] == method:
                out[(record["prompt"], int(record["seed"]))] = record
    if not out:
        raise SystemExit(f"{', '.join(map(str, folders))}: no image of method {method!r}")
    return out


def compare(a: dict[tuple[str, int], dict], b: dict[tuple[str, int], dict]) -> dict:
    """Per verdict: ``a``'s and ``b``'s rates and the paired difference ``a − b`` over the shared prompts × seeds."""
    if set(a) != set(b):
        missing = sorted(set(a) ^ set(b))[:3]
        raise SystemExit(f"the two sides differ in prompts or seeds (e.g. {missing}); run both on the same ones")
    prompts = sorted({p for p, _ in a})
    seeds = sorted({s for _, s in a})
    if len(a) != len(prompts) * len(seeds):
        raise SystemExit("every prompt needs every seed on both sides")
    figures = {"prompts": len(prompts), "seeds": len(seeds)}
    for verdict in VERDICTS:
        ma = np.array([[float(a[p, s][verdict]) for s in seeds] for p in prompts])
        mb = np.array([[float(b[p, s][verdict]) for s in seeds] for p in prompts])
        diff = paired_bootstrap(ma, mb)
        figures[verdict] = {"a": float(ma.mean()), "b": float(mb.mean()), "diff": diff["diff"], "ci": diff["ci"],
                            "mcnemar_p": mcnemar_exact(ma, mb)["p"],
                            "a_only": int(((ma > 0) & (mb == 0)).sum()), "b_only": int(((mb > 0) & (ma == 0)).sum())}
    return figures


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", nargs="+", type=Path, required=True, help="bench folders of model A")
    ap.add_argument("--b", nargs="+", type=Path, required=True, help="bench folders of model B")
    ap.add_argument("--method", default="sd")
    ap.add_argument("--b-method", help="side B's method [default: --method]; e.g. --method attend-excite --b-method sd "
                    "on the same folders compares two methods of one bench")
    args = ap.parse_args()
    json.dump(compare(load(args.a, args.method), load(args.b, args.b_method or args.method)), sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
