"""The methods: one small file each. ``METHODS`` maps a CLI name to its class; ``sd`` is plain sampling."""

from __future__ import annotations

from ..errors import UnbleedError
from .base import Method, Schedule, group_map, scaled_steps
from .ela import ELA

METHODS: dict[str, type[Method] | None] = {"sd": None, "ela": ELA}


def make_method(name: str, options: dict[str, str] | None = None) -> Method | None:
    """``make_method("ela", {"lam": "0.3"})`` → an :class:`ELA`; ``"sd"`` → ``None`` (no guidance)."""
    if name not in METHODS:
        raise UnbleedError(f"--method {name!r} is unknown: use one of {', '.join(METHODS)}")
    cls = METHODS[name]
    if cls is None:
        if options:
            raise UnbleedError(f"-o {next(iter(options))}: method sd takes no options")
        return None
    return cls.from_options(options or {})


__all__ = ["METHODS", "Method", "Schedule", "ELA", "make_method", "group_map", "scaled_steps"]
