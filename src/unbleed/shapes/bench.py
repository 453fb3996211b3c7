"""``unbleed shapes bench``: every method on the same shapes-world prompts and seeds, scored by the exact detector.

For each prompt the token groups come from each contender's run spec (:meth:`RunSpec.groups`: the prompt parser's, as
``unbleed generate`` without ``--tokens``), every contender generates one image per seed (the same seeds for all,
one batch) with its own spec's method, schedule, steps and guidance scale, and
:func:`unbleed.shapes.detect.detect` gives the verdicts. Figures per contender are fractions of images:

* ``success`` — every requested object present once, in its colour, separate (no leak, no fused blob);
* ``neglected`` — some requested object left no trace (neither its shape nor its colour on a shape of its own);
* ``malformed`` — some requested object's colour is drawn in no shape of the world;
* ``wrong_shape`` — some requested object's colour is drawn as a shape no object requests (a fall-back);
* ``recoloured`` — some requested shape is drawn in a colour nobody asked for;
* ``duplicated`` — some requested object is drawn more often than requested;
* ``leak`` — a requested shape carries another requested object's colour, or a shape is two-coloured;
* ``fused`` — a blob that is two requested objects merged (no single shape, or two requested colours);
* ``missing`` — the coarse verdict of earlier versions (no blob of the object's shape, not fused), for comparison;

and ``seconds``, the contender's total generation wall time (detection excluded), measured in the same run.

**Statistics** (:mod:`unbleed.stats`). Every rate has a 95 % interval from a bootstrap over prompts (``ci``), and
every contender but the baseline (``sd`` when it runs, else the first) has, per verdict, the paired difference
``contender − baseline`` on the same prompts and seeds with its 95 % paired-bootstrap interval over prompts
(``vs_baseline``), plus the exact McNemar p-value on the image pairs. An interval that contains 0 is no measured
difference.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .. import checks
from ..errors import UnbleedError
from ..eval.verdicts import VERDICTS, summarise, write_plots  # the verdict tables, shared with unbleed report
from .world import COLOURS, SHAPES, parse_caption, split_prompts

_CONNECTORS = {"a", "an", "and", "next", "to", "with", "above", "below"}

if TYPE_CHECKING:
    from ..run.spec import RunSpec


@dataclass
class Contender:
    """One row of the benchmark: a label and its run (:class:`~unbleed.run.spec.RunSpec`: the method, its
    options and schedule fields, steps, guidance scale; the bench's seeds replace the spec's)."""

    label: str
    spec: RunSpec


def read_prompts_file(path: str | Path) -> list[str]:
    """One caption per line in the world's vocabulary (blank lines and ``#`` comments skipped)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UnbleedError(f"--prompts-file {str(path)!r}: cannot read it ({type(e).__name__}): give a UTF-8 text "
                           f"file with one caption per line") from None
    prompts = []
    vocab = set(COLOURS) | set(SHAPES) | _CONNECTORS
    for n, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        words = [w for w in text.lower().replace(",", " ").split()]
        unknown = [w for w in words if w not in vocab and w.rstrip("s") not in vocab and w[:-2] not in vocab]
        if unknown:
            raise UnbleedError(f"--prompts-file {path.name} line {n}: {unknown[0]!r} is not in the shapes world's "
                               f"vocabulary: use colours {', '.join(COLOURS)}, shapes {', '.join(SHAPES)} and "
                               f"'and', 'next to', 'with', 'above', 'below'")
        pairs = parse_caption(text)
        if len(pairs) > 3:
            raise UnbleedError(f"--prompts-file {path.name} line {n}: {len(pairs)} objects; the world holds 1 to 3")
        prompts.append(text)
    if not prompts:
        raise UnbleedError(f"--prompts-file {path.name}: no caption in it; write one caption per line")
    return prompts


def bench_prompts(split: str, n: int, prompts_file: str | Path | None = None, seed: int = 0,
                  objects: int = 2) -> list[str]:
    """The benchmark's prompts: ``n`` captions of ``objects`` objects (default two) from the prompt split ``split``
    (``train`` for tuning | ``test``: trained combinations, object sets disjoint from train's | ``unseen``: each
    names a combination never trained; :mod:`unbleed.shapes.world`), or a file's."""
    if prompts_file is not None:
        n = checks.whole(n, "--prompts", 0, fix=" (0 = all of --prompts-file)")  # -1 must not drop the last line
        prompts = read_prompts_file(prompts_file)
        return prompts[:n] if n else prompts
    if n < 1:
        raise UnbleedError(f"--prompts {n}: use at least 1")
    return split_prompts(split, n, seed, objects)


def run_bench(pipe, contenders: list[Contender], prompts: list[str], seeds: list[int], *,
              out: str | Path | None = None, baseline: str | None = None,
              progress: Callable[[str, str], None] | None = None, model: str | None = None) -> dict:
    """Run every contender on every prompt and seed; returns ``{label: {VERDICT: rate, …, "seconds", "images",
    "ci": {VERDICT: [lo, hi]}, "vs_baseline": {VERDICT: {diff, ci, excludes_zero, p_mcnemar}}}}`` (see the module
    doc; ``vs_baseline`` is absent for the baseline itself) and, with ``out``, writes per-prompt grids, ``bench.png``
    (rates with intervals), ``bench-diff.png`` (differences from the baseline with intervals), ``results.json``
    (with each contender's run spec) and ``records.jsonl`` (per image: :func:`unbleed.io.output.record_for` with the
    verdicts and the objects' states). Every spec is built before the first image. ``model``: the name the records
    give the model (default: the pipeline's ``name_or_path``)."""
    import numpy as np

    from ..io.output import record_for
    from .detect import detect

    if not contenders:
        raise UnbleedError("--methods: name at least one method")
    labels = [c.label for c in contenders]
    if len(set(labels)) != len(labels):
        raise UnbleedError(f"--methods {','.join(labels)}: each method once")
    if baseline is None:
        baseline = "sd" if "sd" in labels else labels[0]
    if baseline not in labels:
        raise UnbleedError(f"--baseline {baseline!r} is not among --methods {','.join(labels)}: name one of them")
    if not seeds or len(set(seeds)) != len(seeds):
        raise UnbleedError(f"--seeds {seeds}: give distinct seeds")
    specs = {c.label: c.spec.replace(seeds=tuple(seeds)) for c in contenders}
    built = {label: spec.build() for label, spec in specs.items()}
    if model is None:
        model = getattr(pipe, "name_or_path", None) or None
    out = Path(out) if out is not None else None
    if out is not None:
        (out / "grids").mkdir(parents=True, exist_ok=True)
    outcomes = {c: {v: np.zeros((len(prompts), len(seeds)), bool) for v in VERDICTS} for c in labels}
    seconds = dict.fromkeys(labels, 0.0)
    records = []
    for p, prompt in enumerate(prompts):
        rows = []
        for label, spec in specs.items():
            if progress:
                progress(prompt, label)
            t0 = time.perf_counter()
            result = spec.run(pipe, prompt, groups=spec.groups(pipe.tokenizer, prompt), built=built[label])
            seconds[label] += time.perf_counter() - t0
            for k, image in enumerate(result.images):
                verdict = detect(image, prompt)
                for v in VERDICTS:
                    outcomes[label][v][p, k] = bool(verdict[v])
                records.append({**record_for(result, k, prompt, label, model),
                                **{v: bool(verdict[v]) for v in VERDICTS},
                                "states": [o["state"] for o in verdict["objects"]]})
            rows.append((label, list(result.images)))
        if out is not None:
            _grid(rows, seeds, prompt).save(out / "grids" / f"{p:04d}.png")
    figures = summarise(outcomes, baseline)
    for c in labels:
        figures[c]["seconds"] = round(seconds[c], 2)
    if out is not None:
        write_plots(figures, baseline, out, f"shapes world: {len(prompts)} prompts × {len(seeds)} seeds")
        (out / "results.json").write_text(json.dumps({
            "figures": figures, "baseline": baseline, "prompts": prompts, "seeds": list(seeds),
            "contenders": {label: spec.as_dict() for label, spec in specs.items()}}, indent=1))
        with open(out / "records.jsonl", "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
    return figures


def _grid(rows, seeds, prompt):
    from PIL import Image

    from ..io.plots import image_grid

    big = [(label, [im.resize((128, 128), Image.NEAREST) for im in images]) for label, images in rows]
    return image_grid(big, col_labels=[f"seed {s}" for s in seeds], title=prompt)


__all__ = ["Contender", "VERDICTS", "bench_prompts", "read_prompts_file", "run_bench", "summarise", "write_plots"]
