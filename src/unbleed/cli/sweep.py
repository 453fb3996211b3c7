"""``unbleed sweep`` (prompt × seed × method into a resumable run folder) and ``unbleed report`` (its tables, plots
and grids)."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer

from .. import checks
from .common import (DEFAULT_MODEL, AllowPickle, BatchSize, Bar, Dtype, GuidanceScale, Height, Layout,
                     MethodOptions, Model, Scheduler, Steps, Width, command, err, methods_help, parse_options,
                     progress, quiet_libraries, split_list, with_layout)


@command(interrupted="interrupted; rerun the same command to resume (finished images are recorded in {out})")
def sweep(
    suite: Annotated[str, typer.Option(
        "--suite", help="attend-excite[:animals|animals_objects|objects], dvmp[:N], cc500, abc6k, geneval[:TAG], "
                        "animal-scene, color-obj-scene, multi-object, t2i-color, t2i-shape, t2i-texture, or "
                        "PATH.txt/.jsonl.")],
    methods: Annotated[str, typer.Option("--methods", help=methods_help("sd,ela,attend-excite"))] = "sd,ela",
    seeds: Annotated[str, typer.Option(
        "--seeds", help="A count (64 → seeds 0…63), a list 0,5,7, or a range 10:20.")] = "64",
    model: Model = DEFAULT_MODEL,
    out: Annotated[str, typer.Option("--out", help="Run folder (created; an existing one is resumed).")] = ...,
    limit: Annotated[Optional[int], typer.Option("--limit", help="Only the first N prompts of the suite.")] = None,
    steps: Steps = 50,
    height: Height = None,
    width: Width = None,
    guidance_scale: GuidanceScale = 7.5,
    scheduler: Scheduler = "default",
    option: MethodOptions = [],
    layout: Layout = [],
    batch_size: BatchSize = 4,
    clip_model: Annotated[str, typer.Option(
        "--clip-model", help="CLIP for the similarities: hub id, local folder, or tiny.")
    ] = "openai/clip-vit-base-patch16",
    caption_model: Annotated[str, typer.Option(
        "--caption-model", help="BLIP captioner for text–text similarity: hub id, folder, tiny, or none.")
    ] = "Salesforce/blip-image-captioning-base",
    metrics: Annotated[str, typer.Option(
        "--metrics", help="Metrics to score each image with as it is made: clip (A&E's CLIP similarities, and "
                          "text–text with --caption-model), verdicts (detector-based object verdicts), blip-vqa "
                          "(T2I-CompBench's BLIP-VQA); comma-separated.")] = "clip",
    no_metrics: Annotated[bool, typer.Option("--no-metrics", help="Score nothing (images and records only).")] = False,
    detector_model: Annotated[str, typer.Option(
        "--detector-model", help="Open-vocabulary detector (OWLv2) for --metrics verdicts: hub id, folder, or tiny.")
    ] = "google/owlv2-base-patch16-ensemble",
    vqa_model: Annotated[str, typer.Option(
        "--vqa-model", help="BLIP VQA model for --metrics blip-vqa: hub id, folder, or tiny.")
    ] = "Salesforce/blip-vqa-base",
    device: Annotated[str, typer.Option(
        "--device", help="auto (Accelerate's device for this process), cpu, cuda:N.")] = "auto",
    dtype: Dtype = "auto",
    allow_pickle: AllowPickle = False,
) -> None:
    """Generate prompt × seed × method into a run folder with one record per image (resumable; run it under
    `accelerate launch -m unbleed sweep …` for one process per GPU)."""
    from ..eval.sweep import SweepConfig, finish, parse_seeds, run_sweep

    # the flags that need no model, checked before torch and diffusers load (unbleed.checks)
    seed_list = parse_seeds(seeds, "--seeds")
    checks.whole(steps, "--steps", 1, checks.MAX_STEPS)
    checks.whole(batch_size, "--batch-size", 1)
    if limit is not None:
        checks.whole(limit, "--limit", 1)
    for flag, value in (("--height", height), ("--width", width)):
        if value is not None:
            checks.whole(value, flag, 1, checks.MAX_SIDE, fix=" (pixels)")
    checks.real(guidance_scale, "--guidance-scale")
    checks.scheduler(scheduler)
    checks.given(model, "--model", "name a model, e.g. --model tiny")
    checks.device(device)
    checks.dtype(dtype)
    checks.out_folder(out)
    from ..eval.scoring import parse_metrics

    metric_names = parse_metrics(metrics)

    from accelerate import PartialState

    quiet_libraries()
    warnings.filterwarnings("ignore", module="diffusers")
    names = split_list(methods)
    cfg = SweepConfig(suite=suite, methods=names, seeds=seed_list, model=model, out=out, limit=limit,
                      steps=steps, height=height, width=width, guidance_scale=guidance_scale, scheduler=scheduler,
                      options=with_layout(parse_options(option), layout, names), batch_size=batch_size,
                      clip_model=clip_model, caption_model=None if caption_model.lower() == "none" else caption_model,
                      metrics=not no_metrics, metric_names=metric_names, detector_model=detector_model,
                      vqa_model=vqa_model, device=device, dtype=dtype, allow_pickle=allow_pickle)
    with progress() as display:
        summary = run_sweep(cfg, progress=Bar(display, "sweep"))
    state = PartialState()
    tag = f"[process {summary['process']}/{summary['processes']}] " if summary["processes"] > 1 else ""
    err.print(f"{tag}{summary['made']} images made, {summary['skipped']} already done, {summary['failed']} failed "
              f"in {summary['seconds']:.1f} s → {summary['records']}", highlight=False, soft_wrap=True, markup=False)
    state.wait_for_everyone()
    if state.is_main_process:
        total = finish(cfg)
        err.print(f"sweep {suite}: {total} records in {out} (expected "
                  f"{len(cfg.methods) * len(cfg.seeds)} per prompt); next: unbleed report {out}",
                  highlight=False, soft_wrap=True, markup=False)


@command()
def report(
    run: Annotated[str, typer.Argument(help="The run folder of an unbleed sweep.")],
    out: Annotated[Optional[str], typer.Option("--out", help="Report folder (default RUN/report).")] = None,
    grid_seeds: Annotated[int, typer.Option("--grid-seeds", help="Seeds (columns) per image grid.")] = 8,
    cell: Annotated[int, typer.Option("--cell", help="Pixel size of a grid cell.")] = 128,
) -> None:
    """A Table-1-shaped table (Markdown + CSV), bar plots and per-prompt image grids of a sweep."""
    from ..eval.report import make_report

    checks.whole(grid_seeds, "--grid-seeds", 1)
    checks.whole(cell, "--cell", 8, 4096, fix=" (pixels)")
    if out is not None or Path(run).is_dir():  # (a missing RUN is the library's one line)
        checks.out_folder(out if out is not None else Path(run) / "report")
    with progress() as display:
        summary = make_report(run, out, max_grid_seeds=grid_seeds, cell=cell, progress=Bar(display, "grids"))
    if "table" in summary:
        sys.stdout.write(summary["table"])
    else:
        err.print("note: no record has metrics (swept with --no-metrics?): grids only", highlight=False)
    err.print(f"report of {summary['records']} records ({summary['scored']} scored, {summary['failed']} failed): "
              f"{'table, ' if 'table' in summary else ''}{len(summary['plots'])} plots, {summary['grids']} grids "
              f"in {summary['out']}", highlight=False, soft_wrap=True)


__all__ = ["sweep", "report"]
