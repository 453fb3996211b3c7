"""What every command of the ``unbleed`` command line shares, once each.

* :data:`FLAGS` — the library's field names (:attr:`UnbleedError.field`) → the flags that set them;
* :func:`command` — the one error handling of a command: an :class:`UnbleedError` is ``error: <message with flag
  names>`` on one line of stderr and exit status 2; Ctrl-C is one line too;
* :func:`progress` and :class:`Bar` — the one progress display (bar, M/N, elapsed, ETA) and the adapter the
  evaluation library reports through (``status(text)``, ``start(total)``, ``step(done)``);
* :func:`quiet_libraries` — diffusers' and transformers' logging down, warnings as one ``warning: …`` line;
* the typer options several commands take (``Model``, ``Device``, ``Steps``, ``Method``, ``Options``, the schedule
  flags, …), and the parsers of their texts (:func:`parse_options`, :func:`with_layout`, :func:`parse_weights`).

Lists of methods in help texts come from the registry (:func:`unbleed.methods.method_names`), never by hand.
"""

from __future__ import annotations

import functools
import inspect
import sys
import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.text import Text
from typer.core import TyperGroup

from ..errors import UnbleedError

err = Console(stderr=True)

# library field → flag (a command may map a field to another flag: generate sets the seeds with --seed)
FLAGS = {
    "method": "--method",
    "options": "-o",
    "weights": "--weights",
    "window": "--window",
    "refine": "--refine-steps",
    "refine_iters": "--refine-iters",
    "step_size": "--step-size",
    "step_schedule": "--step-schedule",
    "steps": "--steps",
    "seeds": "--seeds",
    "height": "--height",
    "width": "--width",
    "guidance_scale": "--guidance-scale",
    "groups": "--tokens",
    "tokens": "--tokens",
    "layout": "--layout",
    "model": "--model",
    "device": "--device",
    "dtype": "--dtype",
    "scheduler": "--scheduler",
    "batch_size": "--batch-size",
    "out": "--out",
}


# --- errors -----------------------------------------------------------------------------------------------------
def fail(message: str) -> None:
    """Print ``error: <message>`` on one line (no markup, no wrapping) and exit with status 2."""
    err.print(Text.assemble(("error: ", "bold red"), message), highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def command(interrupted: str = "interrupted", flags: dict[str, str] | None = None):
    """Decorate a command: an :class:`UnbleedError` becomes ``error: …`` (its field named by its flag, from
    :data:`FLAGS` updated with ``flags``), exit status 2; Ctrl-C prints ``error: <interrupted>``, formatted with the
    command's arguments (``"interrupted; images finished so far are in {out}"``)."""
    names = {**FLAGS, **(flags or {})}

    def decorate(fn):
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def run(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except UnbleedError as e:
                fail(e.for_flags(names))
            except KeyboardInterrupt:
                bound = signature.bind_partial(*args, **kwargs)
                bound.apply_defaults()
                fail(interrupted.format(**bound.arguments))

        return run

    return decorate


class OneLineErrors(TyperGroup):
    """The command line's group: a usage error of the argument parser (``--steps abc``, an unknown flag, an extra
    argument) is one ``error: …`` line naming the flag and where the help is, exit status 2 — not click's box."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode: bool = True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except typer.Abort:
            err.print(Text.assemble(("error: ", "bold red"), "aborted"), highlight=False, soft_wrap=True)
            sys.exit(1)
        except typer.TyperException as e:  # typer's (vendored click's) usage errors derive from it
            where = f"; see {e.ctx.command_path} --help" if getattr(e, "ctx", None) is not None else ""
            text = e.format_message() if hasattr(e, "format_message") else str(e)
            err.print(Text.assemble(("error: ", "bold red"), " ".join(text.split()).rstrip(".") + where), highlight=False,
                      soft_wrap=True)
            sys.exit(getattr(e, "exit_code", 2))
        sys.exit(rv if isinstance(rv, int) else 0)


# --- progress ---------------------------------------------------------------------------------------------------
def progress(*extra) -> Progress:
    """The progress display of every command on stderr: description, bar, M/N, ``extra`` columns, elapsed, ETA."""
    return Progress(TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    *extra, TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=err)


class Bar:
    """One task of a :func:`progress` display, as the library reports to it: ``status(text)`` (a description),
    ``start(total)`` (the amount of work, under ``label``), ``step(done)`` (work done so far); ``begin(text)``
    counts one more unit of work started (those before it done) and describes it."""

    def __init__(self, display: Progress, label: str):
        self.display, self.label, self.task, self.started = display, label, None, 0

    def status(self, text: str) -> None:
        if self.task is None:
            self.task = self.display.add_task(text, total=None)
        self.display.update(self.task, description=text)

    def start(self, total: int) -> None:
        self.status(self.label)
        self.display.update(self.task, total=total, completed=0)

    def step(self, done: float, total: int | None = None) -> None:
        """``done`` so far (of ``total``, when the amount of work is only learnt as it runs)."""
        if self.task is None:
            self.status(self.label)
        self.display.update(self.task, completed=done, **({} if total is None else {"total": total}))

    def begin(self, text: str) -> None:
        self.status(text)
        self.step(self.started)
        self.started += 1


# --- libraries --------------------------------------------------------------------------------------------------
def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one ``warning: …`` line on stderr (no source line, no file path)."""
    err.print(Text.assemble(("warning: ", "yellow"), str(message)), highlight=False, soft_wrap=True)


def quiet_libraries() -> None:
    """diffusers' and transformers' logging and progress bars off; warnings as one line each."""
    import logging

    warnings.showwarning = show_warning
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


# --- parsers ----------------------------------------------------------------------------------------------------
def parse_options(items: list[str]) -> dict[str, str]:
    """``-o KEY=VALUE`` items → ``{KEY: VALUE}``."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UnbleedError(f"-o {item!r}: method options are KEY=VALUE, e.g. -o lam=0.3")
        out[key.strip()] = value.strip()
    return out


def option_owners(option: str) -> list[str]:
    """The registered methods that have ``option``."""
    from ..methods import METHODS

    return [n for n, c in METHODS.items() if c is not None and option in c.option_names()]


def with_layout(options: dict[str, str], layout: list[str], methods: list[str]) -> dict[str, str]:
    """``--layout WORD=x0,y0,x1,y1`` (repeatable): shorthand for ``-o layout=…`` (the boxes joined with ``;``),
    routed like any option; one of ``methods`` (``+``-compositions included) must have a ``layout`` option."""
    if not layout:
        return options
    parts = {p.strip() for m in methods for p in m.split("+")}
    owners = option_owners("layout")
    if not parts & set(owners):
        raise UnbleedError(f"--layout: none of {', '.join(methods)} has a layout option: use it with "
                           f"--method {' or '.join(owners) or '…'}")
    boxes = ([options["layout"]] if options.get("layout") else []) + list(layout)
    return {**options, "layout": ";".join(boxes)}


def parse_weights(text: str | None) -> tuple[float, ...] | None:
    """``1,0.5`` → ``(1.0, 0.5)`` (the library checks that they are finite and fit the composition)."""
    if text is None:
        return None
    try:
        return tuple(float(w) for w in text.split(","))
    except ValueError:
        raise UnbleedError(f"weights {text!r}: use comma-separated numbers, e.g. 1,0.5", field="weights") from None


def split_list(text: str) -> list[str]:
    """``sd, ela,`` → ``["sd", "ela"]``."""
    return [m.strip() for m in text.split(",") if m.strip()]


# --- the options several commands take --------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def registry_names() -> tuple[str, ...]:
    """The registry's method names in its order (``sd``, ``ela``, then the others by module) without importing it —
    importing :mod:`unbleed.methods` imports torch, and help texts must not: read from the sources of the methods
    package, the ``name`` of each ``@register``-decorated class. Methods registered at run time by other code
    (extensions) are listed by ``unbleed methods``."""
    import ast
    import importlib.util

    spec = importlib.util.find_spec("unbleed.methods")
    folder = Path(next(iter(spec.submodule_search_locations)))
    names = ["sd"]
    for path in sorted(folder.glob("*.py"), key=lambda p: (p.stem != "ela", p.stem)):
        if path.stem.startswith("__"):
            continue
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if not isinstance(node, ast.ClassDef) or not any(
                    (d.id if isinstance(d, ast.Name) else getattr(d, "attr", None)) == "register"
                    for d in node.decorator_list):
                continue
            for stmt in node.body:
                target = stmt.target if isinstance(stmt, ast.AnnAssign) else (
                    stmt.targets[0] if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 else None)
                if (isinstance(target, ast.Name) and target.id == "name" and isinstance(stmt.value, ast.Constant)
                        and isinstance(stmt.value.value, str)):
                    names.append(stmt.value.value)
    return tuple(names)


def composition_example() -> str:
    """A ``+``-composition of registered guidance methods, for help texts (``ela+syngen`` while both exist)."""
    names = registry_names()
    pair = ["ela", "syngen"] if {"ela", "syngen"} <= set(names) else names[1:3]
    return "+".join(pair) or "…"


def method_help() -> str:
    """``--method``'s help, from the registry."""
    return (f"{', '.join(registry_names())} (sd: plain sampling), or a +-joined list of guidance methods "
            f"({composition_example()}); `unbleed methods` lists them.")


def methods_help(example: str) -> str:
    """``--methods``' help, from the registry."""
    return f"Comma-separated methods, e.g. {example}; of {', '.join(registry_names())} (and +-compositions)."


DEFAULT_MODEL = "CompVis/stable-diffusion-v1-4"

Model = Annotated[str, typer.Option("--model", help="Hub id (SD 1.x/2.x or SDXL, e.g. stabilityai/stable-diffusion-"
                                                    "xl-base-1.0), local diffusers folder, 'shapes' (the shipped "
                                                    "shapes-world model), 'tiny' or 'tiny-xl' (SD / SDXL in "
                                                    "miniature: offline, random weights).")]
Device = Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N.")]
Dtype = Annotated[str, typer.Option("--dtype", help="auto (fp16 on GPU, fp32 on CPU), fp32, fp16, bf16.")]
AllowPickle = Annotated[bool, typer.Option("--allow-pickle",
                                           help="Allow pickled (.bin) weights; they can run code when loaded.")]
Steps = Annotated[int, typer.Option("--steps", help="Denoising steps.")]
Height = Annotated[Optional[int], typer.Option("--height", help="Image height (default: the model's).")]
Width = Annotated[Optional[int], typer.Option("--width", help="Image width (default: the model's).")]
GuidanceScale = Annotated[float, typer.Option("--guidance-scale", "-g", help="Classifier-free guidance scale.")]
Scheduler = Annotated[str, typer.Option("--scheduler", help="default (the model's), ddim, pndm, euler, euler-a, "
                                                            "dpm++, lms, heun.")]
MethodName = Annotated[str, typer.Option("--method", "-m", help=method_help())]
MethodOptions = Annotated[list[str], typer.Option(
    "--option", "-o", help="Method option KEY=VALUE (e.g. -o lam=0.3; ela.lam=0.3 for one method); repeat.")]
Layout = Annotated[list[str], typer.Option("--layout", help="Layout box WORD=x0,y0,x1,y1 (fractions of the image; "
                                                            "A-STAR's), shorthand for -o layout=…; repeat.")]
Window = Annotated[Optional[str], typer.Option("--window", help="Guided steps START:END, or none "
                                                                "(default: the method's).")]
RefineSteps = Annotated[Optional[str], typer.Option("--refine-steps", help="Refinement STEP:THRESHOLD list "
                                                                           "(0:0.2,10:0.1), or none.")]
RefineIters = Annotated[Optional[int], typer.Option("--refine-iters", help="Cap of refinement iterations.")]
StepSize = Annotated[Optional[float], typer.Option("--step-size", help="Latent step size scale α.")]
StepSchedule = Annotated[Optional[str], typer.Option("--step-schedule", help="sqrt-linear (A&E) or constant.")]
BatchSize = Annotated[int, typer.Option("--batch-size", help="Seeds per UNet batch (results do not depend on it).")]

__all__ = ["FLAGS", "err", "fail", "command", "OneLineErrors", "progress", "Bar", "show_warning", "quiet_libraries", "parse_options",
           "option_owners", "with_layout", "parse_weights", "split_list", "registry_names", "composition_example",
           "method_help",
           "methods_help",
           "DEFAULT_MODEL", "Model", "Device", "Dtype", "AllowPickle", "Steps", "Height", "Width", "GuidanceScale",
           "Scheduler", "MethodName", "MethodOptions", "Layout", "Window", "RefineSteps", "RefineIters", "StepSize",
           "StepSchedule", "BatchSize"]
