"""``unbleed shapes …``: render shapes-world scenes, detect bleeding in an image, validate the detector.

Mounted by the main CLI with ``app.add_typer(shapes_app, name="shapes")``. Errors are one line
``error: …`` on stderr and exit status 2, never a traceback."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from ..console import err
from ..console import fail as _fail
from ..errors import UnbleedError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="The shapes world: a synthetic model organism with an exact bleeding detector.")


def _mark(ok: bool) -> str:
    return "yes" if ok else "no"


@app.command()
def detect(
    image: Path = typer.Argument(..., help="The image to check (any format Pillow reads)."),
    prompt: str = typer.Option(..., "--prompt", "-p", help="The caption it was generated from."),
    as_json: bool = typer.Option(False, "--json", help="Print the verdicts as JSON."),
) -> None:
    """Per requested object: found, right colour, count; and the missing / leak / fused verdicts."""
    from .detect import detect as run_detect

    try:
        result = run_detect(image, prompt)
    except UnbleedError as e:
        _fail(str(e))
    if as_json:
        sys.stdout.write(json.dumps(result) + "\n")
        return
    table = Table("object", "found", "colour correct", "count", title=prompt)
    for o in result["objects"]:
        table.add_row(f"{o['colour']} {o['shape']}", _mark(o["found"]), _mark(o["colour_correct"]), str(o["count"]))
    console = Console()
    console.print(table)
    console.print(f"success: {_mark(result['success'])}   missing: {_mark(result['missing'])}   "
                  f"leak: {_mark(result['leak'])}   fused: {_mark(result['fused'])}", highlight=False)
    if result["extra"]:
        console.print("extra: " + ", ".join(f"{b['colour']} {b['shape'] or 'blob'}" for b in result["extra"]),
                      highlight=False)


@app.command("detect-check")
def detect_check(
    n: int = typer.Option(1000, "--n", help="How many random augmented scenes."),
    seed: int = typer.Option(0, "--seed", help="Random seed."),
    as_json: bool = typer.Option(False, "--json", help="Print the figures as JSON."),
) -> None:
    """Validate the detector on random rendered scenes (with missing / leaked / fused perturbations, mild
    noise and blur): the fraction whose verdicts all match the ground truth."""
    from .detect import detect_check as run_check

    try:
        result = run_check(n, seed)
    except UnbleedError as e:
        _fail(str(e))
    if as_json:
        sys.stdout.write(json.dumps(result) + "\n")
        return
    console = Console()
    console.print(f"accuracy {result['accuracy']:.4f} on {n} scenes (seed {seed})", highlight=False)
    for kind, acc in result["by_kind"].items():
        if acc is not None:
            console.print(f"  {kind}: {acc:.4f}", highlight=False)
    for e in result["errors"]:
        console.print(f"  wrong: #{e['index']} {e['kind']}: {e['prompt']}", highlight=False)


@app.command()
def render(
    prompt: str = typer.Option(..., "--prompt", "-p", help="A caption in the shapes vocabulary."),
    seed: int = typer.Option(0, "--seed", help="Random seed for sizes and positions."),
    out: Path = typer.Option(..., "--out", "-o", help="Output image file (e.g. scene.png)."),
    size: int = typer.Option(64, "--size", help="Image side in pixels."),
) -> None:
    """Render a scene that matches a caption (its objects and any "above"/"below" relation)."""
    from .render import render as run_render
    from .world import scene_from_caption

    try:
        if size < 16:
            raise UnbleedError(f"--size {size}: use at least 16 pixels")
        image = run_render(scene_from_caption(prompt, seed, size))
        try:
            image.save(out)
        except (OSError, ValueError) as e:
            raise UnbleedError(f"--out {str(out)!r}: cannot write it ({e})") from None
    except UnbleedError as e:
        _fail(str(e))
    err.print(f"wrote {out}", highlight=False)


@app.command()
def bench(
    methods: str = typer.Option("sd,ela", "--methods", "-m",
                                help="Comma-separated methods (sd, ela, attend-excite, divide-bind, astar, syngen, "
                                     "structure, or a +-composition)."),
    prompts: int = typer.Option(50, "--prompts", help="How many two-object prompts (with a file: the first N; 0 = all)."),
    seeds: int = typer.Option(4, "--seeds", help="Seeds 0…K−1 per prompt and method."),
    split: str = typer.Option("heldout", "--split", help="heldout (each prompt has a held-out colour–shape pair) "
                              "or train."),
    prompts_file: Optional[Path] = typer.Option(None, "--prompts-file", help="Captions, one per line (world vocabulary)."),
    objects: int = typer.Option(2, "--objects", help="Objects per generated prompt (1-3; 1 measures single objects)."),
    model: str = typer.Option("shapes", "--model", help="shapes (shipped), or a pipeline folder from shapes train."),
    steps: int = typer.Option(50, "--steps", help="Denoising steps."),
    guidance_scale: float = typer.Option(7.5, "--guidance-scale", "-g", help="Classifier-free guidance scale."),
    option: list[str] = typer.Option([], "--option", "-o", help="METHOD.KEY=VALUE, e.g. -o ela.lam=0.3."),
    as_json: bool = typer.Option(False, "--json", help="Print {METHOD: {success, missing, leak, fused, seconds}}."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write per-prompt grids, bench.png, results.json there."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N."),
) -> None:
    """Run methods on the same shapes prompts and seeds; count success / missing / leak / fused with the detector."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from ..cli import _quiet_libraries, build_schedule, parse_options
    from ..methods import make_method
    from ..models import load_model
    from .bench import Contender, bench_prompts, run_bench

    _quiet_libraries()
    try:
        names = [m.strip() for m in methods.split(",") if m.strip()]
        if not names:
            raise UnbleedError("--methods is empty: name methods, e.g. --methods sd,ela")
        if seeds < 1:
            raise UnbleedError(f"--seeds {seeds}: use at least 1")
        options: dict[str, dict[str, str]] = {n: {} for n in names}
        for key, value in parse_options(option).items():
            name, _, sub = key.partition(".")
            if name not in options or not sub:
                raise UnbleedError(f"-o {key}={value}: prefix the option with one of the --methods, e.g. "
                                   f"-o {names[-1]}.lam=0.3")
            options[name][sub] = value
        contenders = []
        for n in names:
            guide = make_method(n, options[n])
            contenders.append(Contender(n, guide, build_schedule(guide, steps)))
        texts = bench_prompts(split, prompts, prompts_file, objects=objects)
        with err.status(f"loading model {model}…"):
            pipe = load_model(model, device=device)
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TimeRemainingColumn())
        with Progress(*columns, console=err) as bar:
            task = bar.add_task("bench", total=len(texts) * len(contenders))

            started = [0]  # (prompt, method) runs started so far

            def progress(prompt, label):
                bar.update(task, completed=started[0], description=f"{label}: {prompt}")
                started[0] += 1

            figures = run_bench(pipe, contenders, texts, list(range(seeds)), steps=steps,
                                guidance_scale=guidance_scale, out=out, progress=progress)
            bar.update(task, completed=len(texts) * len(contenders))
    except UnbleedError as e:
        _fail(str(e))
    if as_json:
        sys.stdout.write(json.dumps({k: {v: f[v] for v in ("success", "missing", "leak", "fused", "seconds")}
                                     for k, f in figures.items()}) + "\n")
    else:
        table = Table("method", "success", "missing", "leak", "fused", "seconds",
                      title=f"shapes bench: {len(texts)} prompts × {seeds} seeds"
                            f"{'' if prompts_file else f' ({split}, {objects} object(s))'}")
        for k, f in figures.items():
            table.add_row(k, *(f"{f[v]:.3f}" for v in ("success", "missing", "leak", "fused")), f"{f['seconds']:.1f}")
        Console().print(table)
    if out is not None:
        err.print(f"wrote {out}/grids/*.png, {out}/bench.png, {out}/results.json", highlight=False)


@app.command()
def train(
    out: Path = typer.Option(..., "--out", "-o", help="Run folder: checkpoint/, pipeline/ (the model), log.jsonl. "
                             "An existing run there is resumed."),
    steps: int = typer.Option(4000, "--steps", help="Diffusion training steps in total (raise it to train on)."),
    vae_steps: int = typer.Option(1500, "--vae-steps", help="VAE training steps (first phase)."),
    batch: int = typer.Option(64, "--batch", help="Diffusion batch size."),
    vae_batch: int = typer.Option(16, "--vae-batch", help="VAE batch size."),
    lr: float = typer.Option(1e-3, "--lr", help="AdamW learning rate after warm-up (text encoder + UNet)."),
    vae_lr: float = typer.Option(2e-3, "--vae-lr", help="AdamW learning rate of the VAE."),
    warmup: int = typer.Option(200, "--warmup", help="Linear learning-rate warm-up steps."),
    lr_decay: str = typer.Option("constant", "--lr-decay", help="After warm-up: constant, or cosine (down to 0 at "
                                 "--steps, from the run's start; for a warm start, from --init-from's step)."),
    ema: float = typer.Option(0.999, "--ema", help="EMA decay of the exported weights."),
    p_objects: str = typer.Option("0.5,0.4,0.1", "--p-objects",
                                  help="Caption distribution: probabilities of 1, 2 and 3 objects."),
    p_uncond: float = typer.Option(0.1, "--p-uncond", help="Fraction of empty captions (classifier-free guidance)."),
    min_snr: float = typer.Option(5.0, "--min-snr", help="Min-SNR-γ loss weighting (γ)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the initial weights, the data and the noise."),
    arch: str = typer.Option("default", "--arch", help="Network sizes: default (the shipped model) or test."),
    checkpoint_every: int = typer.Option(250, "--checkpoint-every", help="Steps between checkpoints."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N."),
    init_from: Optional[Path] = typer.Option(None, "--init-from", help="Start a new run from an exported pipeline's "
                                             "weights (e.g. src/unbleed/data/shapes_model) instead of random ones."),
) -> None:
    """Train the shapes model (VAE, then text encoder + UNet), resumable: run the same command again to continue."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from .train import TrainConfig, train as run_train

    try:
        try:
            probs = tuple(float(v) for v in p_objects.split(","))
        except ValueError:
            raise UnbleedError(f"--p-objects {p_objects!r}: give three comma-separated probabilities") from None
        cfg = TrainConfig(steps=steps, vae_steps=vae_steps, batch=batch, vae_batch=vae_batch, lr=lr, vae_lr=vae_lr,
                          warmup=warmup, lr_decay=lr_decay, ema=ema, p_objects=probs, p_uncond=p_uncond,
                          min_snr=min_snr, seed=seed, arch=arch, checkpoint_every=checkpoint_every).validate()
        columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TextColumn("loss {task.fields[loss]:.4f}"), TimeElapsedColumn(), TimeRemainingColumn())
        with Progress(*columns, console=err) as bar:
            tasks: dict[str, int] = {}

            def progress(phase, done, total, loss):
                if phase not in tasks:
                    tasks[phase] = bar.add_task(phase, total=total, completed=done - 1, loss=loss)
                bar.update(tasks[phase], completed=done, loss=loss)

            result = run_train(out, cfg, device=device, progress=progress, init_from=init_from)
    except UnbleedError as e:
        _fail(str(e))
    err.print(f"{'resumed and ' if result['resumed'] else ''}trained to step {result['step']} (VAE {result['vae_step']}) "
              f"in {result['seconds']:.0f} s; model: {out / 'pipeline'} (use --model {out / 'pipeline'})",
              highlight=False)


__all__ = ["app"]
