"""``unbleed methods`` (the registry: each method's kind, options with their defaults, source) and ``unbleed
version``."""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from .common import command, composition_example


def kind_of(cls) -> str:
    """``guidance`` (latent updates), ``conditioning`` (what the UNet is conditioned on) or ``none`` (``sd``)."""
    from ..methods import Conditioning, Method

    if cls is None:
        return "none"
    if issubclass(cls, Method):
        return "guidance"
    if issubclass(cls, Conditioning):
        return "conditioning"
    return "other"


def option_defaults(cls) -> dict[str, Any]:
    """The options of a method class and their defaults (as ``-o`` takes them: tuples comma-joined)."""
    if cls is None or not dataclasses.is_dataclass(cls):
        return {}
    out = {}
    for f in dataclasses.fields(cls):
        if f.name not in cls.option_names():
            continue
        if f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            value = None
        out[f.name] = ",".join(map(str, value)) if isinstance(value, (tuple, list)) else value
    return out


def describe_methods() -> list[dict[str, Any]]:
    """One entry per registered method: name, kind, options (name → default), source."""
    from ..methods import METHODS

    return [{"name": name, "kind": kind_of(cls), "options": option_defaults(cls),
             "source": (cls.source if cls is not None else "") or ""} for name, cls in METHODS.items()]


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    return "''" if v == "" else str(v)


@command()
def methods(
    as_json: Annotated[bool, typer.Option("--json", help="Print the list as JSON.")] = False,
) -> None:
    """The methods of --method: kind (guidance: latent updates; conditioning: what the UNet sees), options (-o
    KEY=VALUE) with their defaults, and source."""
    entries = describe_methods()
    if as_json:
        sys.stdout.write(json.dumps(entries, ensure_ascii=False) + "\n")
        return
    table = Table(title=f"methods (compose guidance methods with +, e.g. --method {composition_example()})")
    table.add_column("method (source)")
    table.add_column("kind", no_wrap=True)
    table.add_column("option (-o KEY=VALUE)", no_wrap=True)
    table.add_column("default", overflow="fold")
    for e in entries:
        plain = e["name"] == "sd"
        source = e["source"] or ("plain sampling" if plain else "")
        options = list(e["options"].items()) or [("—", "")]
        for i, (key, default) in enumerate(options):
            first = i == 0
            name = Text.assemble(e["name"], *(("\n", (source, "dim")) if source else ())) if first else ""
            kind = ("—" if plain else e["kind"]) if first else ""
            table.add_row(name, kind, key, "" if key == "—" else _value(default),
                          end_section=i == len(options) - 1)
    Console().print(table)


@command()
def version() -> None:
    """Print the version."""
    from .. import __version__

    typer.echo(__version__)


__all__ = ["methods", "version", "describe_methods", "kind_of", "option_defaults"]
