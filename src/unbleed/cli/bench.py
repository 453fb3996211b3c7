"""``unbleed bench …``: benchmarks (``bench speed``: seconds and memory of each method)."""

from __future__ import annotations

import json
import sys
import warnings
from typing import Annotated

import typer
from rich.console import Console

from .. import checks
from ..errors import UnbleedError
from ..run.spec import RunSpec
from .common import (DEFAULT_MODEL, Bar, Device, Dtype, Height, Model, RefineSteps, Steps, Width, Window, command,
                     err, methods_help, progress, quiet_libraries, split_list)
from .tables import print_table

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, help="Benchmarks.")


@app.command("speed")
@command(flags={"method": "--methods"})
def speed(
    model: Model = DEFAULT_MODEL,
    methods: Annotated[str, typer.Option("--methods", help=methods_help("sd,ela,attend-excite") + " Timed, "
                                                                "with sd always.")] = "sd,ela,attend-excite",
    prompt: Annotated[str, typer.Option("--prompt", help="The prompt of every run.")] = "a cat and a frog",
    height: Height = None,
    width: Width = None,
    steps: Steps = 4,
    repeats: Annotated[int, typer.Option("--repeats", help="Timed repetitions per method (after one warm-up).")] = 3,
    window: Window = None,
    refine_steps: RefineSteps = None,
    reference: Annotated[bool, typer.Option(
        "--reference/--no-reference", help="Also time diffusers' StableDiffusionAttendAndExcitePipeline.")] = True,
    truncate: Annotated[bool, typer.Option("--truncate/--no-truncate",
                                           help="Stop guided UNet passes after the last layer a method reads.")] = True,
    decode: Annotated[bool, typer.Option("--decode/--no-decode", help="Include the VAE decoding in the timed runs "
                                                                      "(--no-decode times the loop only).")] = True,
    device: Device = "auto",
    dtype: Dtype = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print the figures as JSON.")] = False,
) -> None:
    """Median seconds, ratio to sd and peak memory of each method, interleaved in one process (every step guided and
    none refined unless --window/--refine-steps say otherwise)."""
    from ..guidance.schedule import parse_refine, parse_window

    # the flags that need no model, checked before torch and diffusers load (unbleed.checks)
    checks.whole(repeats, "--repeats", 1)
    for flag, value in (("--height", height), ("--width", width)):
        if value is not None:
            checks.whole(value, flag, 1, checks.MAX_SIDE, fix=" (pixels)")
    checks.given(model, "--model", "name a model, e.g. --model tiny")
    checks.device(device)
    checks.dtype(dtype)
    if not prompt.strip():
        raise UnbleedError("--prompt is empty: give the text every run draws, e.g. --prompt 'a cat and a frog'")
    RunSpec(steps=steps, height=height, width=width).check()
    names = split_list(methods)
    guided, refine = parse_window(window, steps), parse_refine(refine_steps, {})

    from .. import models
    from ..eval.speed import speed as run_speed

    quiet_libraries()
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")
    # what the bench runs, checked before the model loads: every step guided, none refined, unless the flags say
    for name in dict.fromkeys(["sd", *names]):
        RunSpec(method=name, steps=steps, height=height, width=width, window=guided or (0, steps),
                refine={} if refine is None else refine).build()
    with err.status(f"loading model {model}…"):
        pipe = models.load_model(model, device=device, dtype=dtype)
    with progress() as display:
        bar = Bar(display, "bench")
        figures = run_speed(pipe, names, prompt=prompt, steps=steps, height=height, width=width, repeats=repeats,
                            window=guided, refine=refine,
                            reference=reference, truncate=truncate, decode=decode, progress=bar.status)
    if as_json:
        sys.stdout.write(json.dumps(figures) + "\n")
        return
    speed_table(figures, f"{model} · {height or 'default'}×{width or 'default'} px · {steps} steps")


def speed_table(figures: dict, title: str, console: Console | None = None) -> None:
    """``bench speed``'s figures as a table that fits the terminal (:mod:`.tables`: no header or value cut)."""
    print_table(console or Console(), title, ["method", "median s", "× sd", "peak MB"],
                [(name, f"{f['seconds']:.3f}", f"{f['ratio']:.2f}", f"{f['peak_mb']:.0f}")
                 for name, f in figures.items()])


__all__ = ["app", "speed", "speed_table"]
