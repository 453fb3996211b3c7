"""``unbleed shapes …``: render shapes-world scenes, detect bleeding in an image, validate the detector.

Mounted by the main CLI with ``app.add_typer(shapes_app, name="shapes")``. Errors are one line
``error: …`` on stderr and exit status 2, never a traceback."""

from __future__ import annotations

import json
import sys
from pathlib import Path

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


__all__ = ["app"]
