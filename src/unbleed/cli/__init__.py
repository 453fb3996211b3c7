"""The ``unbleed`` command line (typer): the app, assembled from one module per command group.

* :mod:`.generate` — ``generate``, ``parse``;
* :mod:`.sweep` — ``sweep``, ``report``;
* :mod:`.judge` — ``judge`` (detector verdicts and BLIP-VQA of a folder of images);
* :mod:`.bench` — ``bench speed``;
* :mod:`.shapes` — ``shapes render|detect|detect-check|bench|diagnose|train``;
* :mod:`.info` — ``methods``, ``version``;
* :mod:`.common` — what they share: flag names, the error handling, progress, options, parsers.
* :mod:`.tables` — terminal tables that fit the terminal's width, split into parts rather than cut to "…".

Errors are one line ``error: …`` on stderr and exit status 2 — the argument parser's usage errors too
(:class:`.common.OneLineErrors`); ``unbleed --help`` and every flag error that needs no model import neither torch
nor diffusers (the flags go through :mod:`unbleed.checks` first; the package's names load lazily).
"""

import typer

from . import bench, demo, generate, info, judge, shapes, sweep
from .common import OneLineErrors

app = typer.Typer(cls=OneLineErrors, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Fix concept bleeding in Stable Diffusion without training (ELA and peers).")
app.command("generate")(generate.generate)
app.command("parse")(generate.parse)
app.command("methods")(info.methods)
app.command("sweep")(sweep.sweep)
app.command("report")(sweep.report)
app.command("judge")(judge.judge)
app.add_typer(bench.app, name="bench")
app.add_typer(shapes.app, name="shapes", help="The shapes world: render, detect, detect-check, bench, diagnose, "
                                              "train.")
app.command("version")(info.version)
app.command("demo")(demo.demo)


def main() -> None:
    app()


__all__ = ["app", "main"]
