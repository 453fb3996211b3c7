"""How hard did a method push? Its own loss at each guided step, and its refinement, from ``shapes bench --out``
records.

    .venv/bin/python scripts/shapes_guidance_loss.py runs/tune-ae-cp11 runs/tune-ae-cp11-scale

Every image that a guided method made has, in ``records.jsonl``, a ``guidance`` list: per guided step the loss the
method computed (``loss``, before that step's update) and the refinement iterations it ran (``refine_iters``). Per
contender (the ``method`` field: a bench's method or a tune's label), this prints the number of images, the mean loss
at step 0, at step 1 and over steps 4 and later of the window, the refinement iterations in all, and the images that
refined at all, as JSON; where the records have it (since session 13), also ``update_rms``: the mean over guided
steps of the root mean square of each step's whole change of the latent (refinement and update) — how far the
method moved the latent, comparable across methods whose losses are on different scales. A loss near 0 from the
first steps on means the method's gradient is about zero: it is idle (e.g. Attend-and-Excite whose token softmax
saturates, docs/shapes.md, session 12).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def summarise(records: list[dict]) -> dict[str, dict]:
    """Per contender (in first-seen order), from records with a non-empty ``guidance`` list."""
    by: dict[str, list[dict]] = {}
    for record in records:
        if record.get("guidance"):
            by.setdefault(record["method"], []).append(record)
    def mean(values: list[float]) -> float | None:
        return sum(values) / len(values) if values else None

    out = {}
    for name, group in by.items():
        steps = [sorted(r["guidance"], key=lambda g: g["step"]) for r in group]
        first = [g[0]["step"] for g in steps]
        out[name] = {"images": len(group),
                     "loss_step0": mean([g[0]["loss"] for g in steps]),
                     "loss_step1": mean([g[1]["loss"] for g in steps if len(g) > 1]),
                     "loss_from_step4": mean([x["loss"] for g, s0 in zip(steps, first) for x in g
                                              if x["step"] >= s0 + 4]),
                     "refine_iters": sum(x.get("refine_iters", 0) for g in steps for x in g),
                     "images_refined": sum(any(x.get("refine_iters", 0) for x in g) for g in steps),
                     "update_rms": mean([x["update_rms"] for g in steps for x in g
                                         if x.get("update_rms") is not None])}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+", type=Path, help="shapes bench --out (or shapes_tune.py --out) folders")
    args = ap.parse_args()
    records = []
    for folder in args.folders:
        path = folder / "records.jsonl"
        if not path.is_file():
            sys.exit(f"error: {folder}: no records.jsonl; pass `unbleed shapes bench --out` folders")
        records += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    json.dump(summarise(records), sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
