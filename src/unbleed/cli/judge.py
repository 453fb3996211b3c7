"""``unbleed judge FOLDER``: score images made elsewhere (or a sweep's again) with the detector-based verdicts and
T2I-CompBench's BLIP-VQA, and print the same tables as ``unbleed report``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from .. import checks
from .common import AllowPickle, Bar, command, err, progress, quiet_libraries


@command()
def judge(
    folder: Annotated[str, typer.Argument(
        help="A sweep run folder, or a folder of images with records.jsonl: one {\"image\", \"prompt\", \"method\", "
             "\"seed\"} per line, image paths relative to the folder.")],
    metrics: Annotated[str, typer.Option(
        "--metrics", help="verdicts, blip-vqa and/or clip, comma-separated.")] = "verdicts,blip-vqa",
    detector_model: Annotated[str, typer.Option(
        "--detector-model", help="OWLv2 detector: hub id, local folder, or tiny.")
    ] = "google/owlv2-base-patch16-ensemble",
    clip_model: Annotated[str, typer.Option(
        "--clip-model", help="CLIP for the colour check (GenEval: openai/clip-vit-large-patch14) and --metrics "
                             "clip: hub id, folder, or tiny.")] = "openai/clip-vit-base-patch16",
    vqa_model: Annotated[str, typer.Option(
        "--vqa-model", help="BLIP VQA model: hub id, folder, or tiny.")] = "Salesforce/blip-vqa-base",
    baseline: Annotated[Optional[str], typer.Option(
        "--baseline", help="The method the others are compared with (default sd when present, else the first).")
    ] = None,
    out: Annotated[Optional[str], typer.Option("--out", help="Output folder (default FOLDER/judge).")] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N.")] = "auto",
    allow_pickle: AllowPickle = False,
) -> None:
    """Detector-based verdicts (and BLIP-VQA) of a folder of images, with rates, paired differences and their
    95 % intervals; writes OUT/judged.jsonl, OUT/verdicts.md and plots."""
    from ..eval.judge import folder_records
    from ..eval.scoring import parse_metrics

    names = parse_metrics(metrics)
    folder_records(folder)  # no records: one line, before any model loads
    checks.device(device)
    # an unwritable (or empty) --out: one line before any model loads (unbleed.checks)
    out_dir = checks.out_folder(out if out is not None else Path(folder) / "judge")

    import torch

    from ..eval.report import aggregate, table_markdown, verdict_report
    from ..eval.judge import judge_folder
    from ..eval.scoring import Metrics

    quiet_libraries()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    scorers = Metrics.load(names, clip_model, None, detector_model, vqa_model, device=device,
                           allow_pickle=allow_pickle)
    with progress() as display:
        records = judge_folder(folder, scorers, out_dir, progress=Bar(display, "judge"))
    methods = list(dict.fromkeys(r["method"] for r in records))
    stats = aggregate(records)
    if stats:
        categories = list(dict.fromkeys(r["category"] for r in records))
        sys.stdout.write(table_markdown(stats, methods, categories))
    verdicts = verdict_report(records, out_dir, Path(folder).name, baseline)
    if verdicts is not None:
        sys.stdout.write(("\n" if stats else "") + verdicts["markdown"])
    err.print(f"judged {len(records)} images of {len(methods)} methods → {out_dir / 'judged.jsonl'}"
              + (f", {out_dir / 'verdicts.md'}" if verdicts is not None else ""), highlight=False, soft_wrap=True)


__all__ = ["judge"]
