"""The ``unbleed`` command line (typer). Errors are one line on stderr and exit status 2."""

from __future__ import annotations

import json
import math
import sys
import warnings
from typing import Optional

import typer
from rich.console import Console
from rich.text import Text
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .console import err
from .console import fail as _fail
from .errors import UnbleedError
from .shapes.cli import app as shapes_app

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Fix concept bleeding in Stable Diffusion without training (ELA and peers).")


def parse_window(text: str | None, num_steps: int) -> tuple[int, int] | None:
    """``START:END`` (either side may be empty) → ``(start, end)``; ``None`` keeps the method's default."""
    if text is None:
        return None
    if text.strip().lower() == "none":
        return (0, 0)
    start, sep, end = text.partition(":")
    if not sep:
        raise UnbleedError(f"--window {text!r}: use START:END step indices, e.g. 0:25 (or none)")
    out = []
    for side, value, default in (("START", start, 0), ("END", end, num_steps)):
        try:
            out.append(int(value) if value.strip() else default)
        except ValueError:
            raise UnbleedError(f"--window {text!r}: {side} {value.strip()!r} is not a step number: use START:END "
                               f"step indices, e.g. 0:25 (or none)") from None
    return tuple(out)


def parse_refine(text: str | None, defaults: dict[int, float]) -> dict[int, float] | None:
    """``0:0.2,10:0.1`` → ``{0: 0.2, 10: 0.1}``; ``none`` → ``{}``; a bare step takes the method's default."""
    if text is None:
        return None
    if text.strip().lower() == "none":
        return {}
    out: dict[int, float] = {}
    for item in text.split(","):
        step, sep, thr = item.partition(":")
        try:
            s, value = int(step), float(thr) if sep else defaults.get(int(step))
        except ValueError:
            s, value = -1, None
        if s < 0 or (sep and not math.isfinite(value)):
            raise UnbleedError(f"--refine-steps {text!r}: use STEP:THRESHOLD pairs, e.g. 0:0.2,10:0.1 (or none)")
        if value is None:
            raise UnbleedError(f"--refine-steps: step {s} has no default threshold: give STEP:THRESHOLD, "
                               f"e.g. {s}:0.1")
        out[s] = value
    return out


def build_schedule(guide, steps: int, window: str | None = None, refine_steps: str | None = None,
                   refine_iters: int | None = None, step_size: float | None = None,
                   step_schedule: str | None = None):
    """The method's default schedule for ``steps`` with the schedule flags applied (``None`` for plain SD)."""
    if guide is None:
        return None
    schedule = guide.default_schedule(steps)
    win = parse_window(window, steps)
    if win is not None:
        schedule.window = win
        schedule.refine = {k: v for k, v in schedule.refine.items() if win[0] <= k < win[1]}
    refine = parse_refine(refine_steps, guide.default_schedule(steps).refine)
    if refine is not None:
        schedule.refine = refine
    if refine_iters is not None:
        schedule.max_refine_iters = refine_iters
    if step_size is not None:
        schedule.step_size = step_size
    if step_schedule is not None:
        schedule.step_schedule = step_schedule
    return schedule.validate(steps)


def parse_options(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UnbleedError(f"-o {item!r}: method options are KEY=VALUE, e.g. -o lam=0.3")
        out[key.strip()] = value.strip()
    return out


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one ``warning: …`` line on stderr (no source line, no file path)."""
    err.print(Text.assemble(("warning: ", "yellow"), str(message)), highlight=False, soft_wrap=True)


def _quiet_libraries() -> None:
    import logging

    warnings.showwarning = _show_warning
    for name in ("transformers", "diffusers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from diffusers.utils import logging as dlog
        from transformers.utils import logging as tlog

        dlog.set_verbosity_error()
        tlog.set_verbosity_error()
        dlog.disable_progress_bar()
        tlog.disable_progress_bar()
    except ImportError:  # pragma: no cover - both are dependencies
        pass


@app.command()
def generate(
    prompt: str = typer.Argument(..., help="The text prompt."),
    method: str = typer.Option("sd", "--method", "-m",
                               help="sd (plain sampling), ela, attend-excite, divide-bind, astar, syngen, structure, "
                                    "or a +-joined list (ela+syngen)."),
    model: str = typer.Option("CompVis/stable-diffusion-v1-4", "--model",
                              help="Hub id, local diffusers folder, or 'tiny' (offline, random weights)."),
    tokens: Optional[str] = typer.Option(None, "--tokens", "-t",
                                         help="Entities (cat,frog) or attribute:entity pairs (blue:bag,yellow:clock)"
                                              "; words, word#N for the N-th occurrence, or token indices."),
    seed: list[int] = typer.Option([0], "--seed", "-s", help="Seed; repeat for several images."),
    steps: int = typer.Option(50, "--steps", help="Denoising steps."),
    height: Optional[int] = typer.Option(None, "--height", help="Image height (default: the model's)."),
    width: Optional[int] = typer.Option(None, "--width", help="Image width (default: the model's)."),
    guidance_scale: float = typer.Option(7.5, "--guidance-scale", "-g", help="Classifier-free guidance scale."),
    negative_prompt: Optional[str] = typer.Option(None, "--negative-prompt", help="Negative prompt."),
    scheduler: str = typer.Option("default", "--scheduler",
                                  help="default (the model's), ddim, pndm, euler, euler-a, dpm++, lms, heun."),
    window: Optional[str] = typer.Option(None, "--window", help="Guided steps START:END (default: the method's)."),
    refine_steps: Optional[str] = typer.Option(None, "--refine-steps",
                                               help="Refinement STEP:THRESHOLD list, or none."),
    refine_iters: Optional[int] = typer.Option(None, "--refine-iters", help="Cap of refinement iterations."),
    step_size: Optional[float] = typer.Option(None, "--step-size", help="Latent step size scale α."),
    step_schedule: Optional[str] = typer.Option(None, "--step-schedule", help="sqrt-linear (A&E) or constant."),
    option: list[str] = typer.Option([], "--option", "-o", help="Method option KEY=VALUE (e.g. -o lam=0.3)."),
    weights: Optional[str] = typer.Option(None, "--weights",
                                          help="Loss weights of composed methods, e.g. --method ela+syngen "
                                               "--weights 1,0.5."),
    layout: list[str] = typer.Option([], "--layout",
                                     help="A-STAR layout box WORD=x0,y0,x1,y1 (fractions of the image); repeat."),
    out: str = typer.Option("out", "--out", help="Output folder (created; files are never overwritten)."),
    save_attention: bool = typer.Option(False, "--save-attention",
                                        help="Also write a picture of the attention maps and masks per image."),
    as_json: bool = typer.Option(False, "--json", help="Print the records as a JSON list on stdout."),
    batch_size: int = typer.Option(4, "--batch-size", help="Seeds per UNet batch (results do not depend on it)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (fp16 on GPU, fp32 on CPU), fp32, fp16, bf16."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle",
                                      help="Allow pickled (.bin) weights; they can run code when loaded."),
) -> None:
    """Generate one image per seed, guided by a method, with full PNG metadata."""
    try:
        _generate(**locals())
    except UnbleedError as e:
        _fail(str(e))
    except KeyboardInterrupt:
        _fail(f"interrupted; images finished so far are in {out}")


def parse_weights(text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        values = tuple(float(w) for w in text.split(","))
    except ValueError:
        raise UnbleedError(f"--weights {text!r}: use comma-separated numbers, e.g. 1,0.5") from None
    if not all(math.isfinite(v) for v in values):
        raise UnbleedError(f"--weights {text!r}: weights must be finite numbers")
    return values


def _generate(prompt, method, model, tokens, seed, steps, height, width, guidance_scale, negative_prompt, scheduler,
              window, refine_steps, refine_iters, step_size, step_schedule, option, weights, layout, out,
              save_attention, as_json, batch_size, device, dtype, allow_pickle) -> None:
    from .methods import make_method
    from .models import load_model
    from .output import check_out_dir, save_result
    from .sampler import check_seeds, generate as run
    from .tokens import token_groups

    _quiet_libraries()
    warnings.filterwarnings("ignore", module="diffusers")
    if steps < 1:
        raise UnbleedError(f"--steps {steps} must be ≥ 1")
    if batch_size < 1:
        raise UnbleedError(f"--batch-size {batch_size} must be ≥ 1")
    seed = check_seeds(seed, "--seed")
    if not prompt.strip():
        raise UnbleedError("PROMPT is empty: give the text to draw")
    options = parse_options(option)
    if layout:
        if "astar" not in method.split("+"):
            raise UnbleedError("--layout gives A-STAR's boxes: use it with --method astar")
        options["astar.layout" if "+" in method else "layout"] = ";".join(layout)
    guide = make_method(method, options, parse_weights(weights))
    schedule = build_schedule(guide, steps, window, refine_steps, refine_iters, step_size, step_schedule)
    if guide is None and any(v is not None for v in (window, refine_steps, refine_iters, step_size, step_schedule)):
        err.print("note: --method sd does no guidance; the schedule options are ignored")
    check_out_dir(out)  # before the model loads: an unwritable --out must not cost a whole run
    with err.status(f"loading model {model}…"):
        pipe = load_model(model, device=device, dtype=dtype, allow_pickle=allow_pickle, scheduler=scheduler)
    from .sampler import check_size, default_size

    check_size(pipe, height or default_size(pipe), width or default_size(pipe))
    if guide is not None:
        guide.map_request(pipe.unet)  # names a bad -o layers=… before any work starts
    source = "--tokens" if tokens else "parse"
    if guide is not None or tokens:
        groups = token_groups(pipe.tokenizer, prompt, tokens)
    elif save_attention:
        from .prompt import parse

        groups = parse(prompt, pipe.tokenizer).entities
    else:
        groups = []
    if groups:
        err.print(("tokens: " if tokens else "tokens (from the parse; --tokens overrides): ") + describe(groups),
                  highlight=False, soft_wrap=True)
    records = []
    batches = [seed[i:i + batch_size] for i in range(0, len(seed), batch_size)]
    columns = (TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err, transient=False) as progress:
        task = progress.add_task(f"{method} ×{len(seed)}", total=None)
        for b, seeds in enumerate(batches):
            def on_step(i, total, rec, b=b):
                progress.update(task, total=total * len(batches), completed=b * total + i + 1)

            result = run(pipe, prompt, method=guide, groups=groups, seeds=seeds, num_inference_steps=steps,
                         guidance_scale=guidance_scale, height=height, width=width, negative_prompt=negative_prompt,
                         schedule=schedule, save_attention=save_attention, callback=on_step)
            saved = save_result(result, prompt, method, model, out, save_attention=save_attention,
                                extra={"tokens_source": source if groups else None})  # each batch as it is done
            for rec in saved:
                err.print(f"wrote {rec['path']}" + (f" and {rec['attention_path']}" if "attention_path" in rec
                                                    else ""), highlight=False, soft_wrap=True)
            records += saved
    if as_json:
        sys.stdout.write(json.dumps(records, indent=2) + "\n")


def describe(groups) -> str:
    return "; ".join(f"{g.text}={list(g.indices)}" + "".join(f" ← {a.text}={list(a.indices)}" for a in g.attributes)
                     for g in groups)


@app.command()
def parse(
    prompt: str = typer.Argument(..., help="The text prompt."),
    model: str = typer.Option("clip", "--model",
                              help="Whose tokenizer: clip (SD 1.x/2.x, shipped), tiny, a hub id or a local folder."),
    as_json: bool = typer.Option(False, "--json", help="Print the parse as JSON."),
) -> None:
    """Entities, their attributes and their CLIP token indices, from a dependency parse of the prompt."""
    try:
        from .models import load_tokenizer
        from .prompt import parse as parse_prompt

        _quiet_libraries()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = parse_prompt(prompt, load_tokenizer(model))
        for w in caught:
            err.print(f"warning: {w.message}", highlight=False, soft_wrap=True)
    except UnbleedError as e:
        _fail(str(e))
    if as_json:
        sys.stdout.write(json.dumps(result.as_dict(), ensure_ascii=False) + "\n")
        return
    from rich.table import Table

    table = Table("entity", "token indices", "attributes (indices)", title=prompt)
    for e in result.entities:
        table.add_row(e.text, ", ".join(map(str, e.indices)),
                      "; ".join(f"{a.text} ({', '.join(map(str, a.indices))})" for a in e.attributes))
    Console().print(table)
    if result.dropped:
        err.print("dropped: " + ", ".join(d["text"] for d in result.dropped), highlight=False)


bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks.")
app.add_typer(bench_app, name="bench")
app.add_typer(shapes_app, name="shapes", help="The shapes world: render, detect, detect-check.")


@bench_app.command("speed")
def bench_speed(
    model: str = typer.Option("CompVis/stable-diffusion-v1-4", "--model", help="Hub id, local folder, or tiny."),
    methods: str = typer.Option("sd,ela,attend-excite", "--methods", help="Comma-separated methods to time."),
    prompt: str = typer.Option("a cat and a frog", "--prompt"),
    height: Optional[int] = typer.Option(None, "--height"),
    width: Optional[int] = typer.Option(None, "--width"),
    steps: int = typer.Option(4, "--steps"),
    repeats: int = typer.Option(3, "--repeats", help="Timed repetitions per method (after one warm-up)."),
    window: Optional[str] = typer.Option(None, "--window", help="Guided steps START:END (default: all)."),
    refine_steps: Optional[str] = typer.Option(None, "--refine-steps", help="STEP:THRESHOLD list (default: none)."),
    reference: bool = typer.Option(True, "--reference/--no-reference",
                                   help="Also time diffusers' StableDiffusionAttendAndExcitePipeline."),
    truncate: bool = typer.Option(True, "--truncate/--no-truncate",
                                  help="Stop guided UNet passes after the last layer a method reads."),
    decode: bool = typer.Option(True, "--decode/--no-decode",
                                help="Include the VAE decoding in the timed runs (--no-decode times the loop only)."),
    device: str = typer.Option("auto", "--device"),
    dtype: str = typer.Option("auto", "--dtype"),
    as_json: bool = typer.Option(False, "--json", help="Print the figures as JSON."),
) -> None:
    """Median seconds, ratio to sd and peak memory of each method, interleaved in one process."""
    try:
        from .bench import speed
        from .models import load_model

        _quiet_libraries()
        warnings.filterwarnings("ignore", category=UserWarning, module="torch")
        if steps < 1:
            raise UnbleedError(f"--steps {steps} must be ≥ 1")
        names = [m.strip() for m in methods.split(",") if m.strip()]
        with err.status(f"loading model {model}…"):
            pipe = load_model(model, device=device, dtype=dtype)
        with Progress(TextColumn("{task.description}"), TimeElapsedColumn(), console=err) as bar:
            task = bar.add_task("bench", total=None)
            figures = speed(pipe, names, prompt=prompt, steps=steps, height=height, width=width, repeats=repeats,
                            window=parse_window(window, steps), refine=parse_refine(refine_steps, {}),
                            reference=reference, truncate=truncate, decode=decode,
                            progress=lambda text: bar.update(task, description=text))
    except UnbleedError as e:
        _fail(str(e))
    if as_json:
        sys.stdout.write(json.dumps(figures) + "\n")
        return
    from rich.table import Table

    table = Table("method", "median s", "× sd", "peak MB",
                  title=f"{model} · {height or 'default'}×{width or 'default'} px · {steps} steps")
    for name, f in figures.items():
        table.add_row(name, f"{f['seconds']:.3f}", f"{f['ratio']:.2f}", f"{f['peak_mb']:.0f}")
    Console().print(table)


def parse_seeds(text: str) -> list[int]:
    """``64`` → seeds 0…63; ``0,5,7`` → those; ``10:20`` → 10…19."""
    try:
        if "," in text:
            seeds = [int(s) for s in text.split(",") if s.strip()]
        elif ":" in text:
            a, b = text.split(":")
            seeds = list(range(int(a), int(b)))
        else:
            seeds = list(range(int(text)))
    except (ValueError, OverflowError):  # OverflowError: a count or range too long to list
        seeds = []
    if not seeds or len(set(seeds)) != len(seeds):
        raise UnbleedError(f"--seeds {text!r}: give a count (64 → seeds 0…63), distinct seeds 0,5,7, or a range 10:20")
    from .sampler import check_seeds

    return check_seeds(seeds, "--seeds")


class _Bar:
    """Rich progress with ETA for the evaluation commands (``status`` → ``start(total)`` → ``step(done)``)."""

    def __init__(self, progress: Progress, label: str):
        self.progress, self.label, self.task = progress, label, None

    def status(self, text: str) -> None:
        if self.task is None:
            self.task = self.progress.add_task(text, total=None)
        self.progress.update(self.task, description=text)

    def start(self, total: int) -> None:
        self.status(self.label)
        self.progress.update(self.task, total=total, completed=0)

    def step(self, done: float) -> None:
        self.progress.update(self.task, completed=done)


def _bar_columns():
    return (TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())


@app.command()
def sweep(
    suite: str = typer.Option(..., "--suite",
                              help="attend-excite[:animals|animals_objects|objects], dvmp[:N], cc500, abc6k, "
                                   "geneval[:TAG], animal-scene, color-obj-scene, multi-object, or PATH.txt/.jsonl."),
    methods: str = typer.Option("sd,ela", "--methods", help="Comma-separated methods, e.g. sd,ela,attend-excite."),
    seeds: str = typer.Option("64", "--seeds", help="A count (64 → seeds 0…63), a list 0,5,7, or a range 10:20."),
    model: str = typer.Option("CompVis/stable-diffusion-v1-4", "--model", help="Hub id, local folder, or tiny."),
    out: str = typer.Option(..., "--out", help="Run folder (created; an existing one is resumed)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N prompts of the suite."),
    steps: int = typer.Option(50, "--steps", help="Denoising steps."),
    height: Optional[int] = typer.Option(None, "--height", help="Image height (default: the model's)."),
    width: Optional[int] = typer.Option(None, "--width", help="Image width (default: the model's)."),
    guidance_scale: float = typer.Option(7.5, "--guidance-scale", "-g", help="Classifier-free guidance scale."),
    scheduler: str = typer.Option("default", "--scheduler", help="default (the model's), ddim, pndm, euler, …"),
    option: list[str] = typer.Option([], "--option", "-o",
                                     help="Method option KEY=VALUE (ela.lam=0.3 for one method); repeat."),
    batch_size: int = typer.Option(4, "--batch-size", help="Seeds per sampler call (results do not depend on it)."),
    clip_model: str = typer.Option("openai/clip-vit-base-patch16", "--clip-model",
                                   help="CLIP for the similarities: hub id, local folder, or tiny."),
    caption_model: str = typer.Option("Salesforce/blip-image-captioning-base", "--caption-model",
                                      help="BLIP captioner for text–text similarity: hub id, folder, tiny, or none."),
    metrics: bool = typer.Option(True, "--metrics/--no-metrics", help="Score each image as it is made."),
    device: str = typer.Option("auto", "--device", help="auto (Accelerate's device for this process), cpu, cuda:N."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (fp16 on GPU, fp32 on CPU), fp32, fp16, bf16."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle",
                                      help="Allow pickled (.bin) weights; they can run code when loaded."),
) -> None:
    """Generate prompt × seed × method into a run folder with one record per image (resumable; run it under
    `accelerate launch -m unbleed sweep …` for one process per GPU)."""
    try:
        from .eval.sweep import SweepConfig, finish, run_sweep

        _quiet_libraries()
        warnings.filterwarnings("ignore", module="diffusers")
        cfg = SweepConfig(suite=suite, methods=[m.strip() for m in methods.split(",") if m.strip()],
                          seeds=parse_seeds(seeds), model=model, out=out, limit=limit, steps=steps, height=height,
                          width=width, guidance_scale=guidance_scale, scheduler=scheduler, options=list(option),
                          batch_size=batch_size, clip_model=clip_model,
                          caption_model=None if caption_model.lower() == "none" else caption_model,
                          metrics=metrics, device=device, dtype=dtype, allow_pickle=allow_pickle)
        with Progress(*_bar_columns(), console=err) as progress:
            bar = _Bar(progress, "sweep")
            summary = run_sweep(cfg, progress=bar)
    except UnbleedError as e:
        _fail(str(e))
    except KeyboardInterrupt:
        _fail(f"interrupted; rerun the same command to resume (finished images are recorded in {out})")
    from accelerate import PartialState

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


@app.command()
def report(
    run: str = typer.Argument(..., help="The run folder of an unbleed sweep."),
    out: Optional[str] = typer.Option(None, "--out", help="Report folder (default RUN/report)."),
    grid_seeds: int = typer.Option(8, "--grid-seeds", help="Seeds (columns) per image grid."),
    cell: int = typer.Option(128, "--cell", help="Pixel size of a grid cell."),
) -> None:
    """A Table-1-shaped table (Markdown + CSV), bar plots and per-prompt image grids of a sweep."""
    try:
        from .eval.report import make_report

        if grid_seeds < 1 or cell < 8:
            raise UnbleedError("--grid-seeds must be ≥ 1 and --cell ≥ 8")
        with Progress(*_bar_columns(), console=err) as progress:
            summary = make_report(run, out, max_grid_seeds=grid_seeds, cell=cell, progress=_Bar(progress, "grids"))
    except UnbleedError as e:
        _fail(str(e))
    if "table" in summary:
        sys.stdout.write(summary["table"])
    else:
        err.print("note: no record has metrics (swept with --no-metrics?): grids only", highlight=False)
    err.print(f"report of {summary['records']} records ({summary['scored']} scored, {summary['failed']} failed): "
              f"{'table, ' if 'table' in summary else ''}{len(summary['plots'])} plots, {summary['grids']} grids "
              f"in {summary['out']}",
              highlight=False, soft_wrap=True)


@app.command()
def version() -> None:
    """Print the version."""
    from . import __version__

    typer.echo(__version__)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
