"""The CLIs' stderr console and their one-line error exit (status 2)."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.text import Text

err = Console(stderr=True)


def fail(message: str) -> None:
    """Print ``error: <message>`` on one line (no markup, no wrapping) and exit with status 2."""
    err.print(Text.assemble(("error: ", "bold red"), message), highlight=False, soft_wrap=True)
    raise typer.Exit(2)
