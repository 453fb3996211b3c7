"""The methods: one small file each. ``METHODS`` maps a CLI name to its class; ``sd`` is plain sampling."""

from __future__ import annotations

from ..errors import UnbleedError
from .astar import AStar
from .attend_excite import AttendExcite
from .base import Method, Schedule, group_map, scaled_steps
from .compose import Composite
from .divide_bind import DivideBind
from .ela import ELA
from .structure import StructureDiffusion
from .syngen import SynGen

METHODS: dict[str, type[Method] | None] = {
    "sd": None, "ela": ELA, "attend-excite": AttendExcite, "divide-bind": DivideBind, "astar": AStar, "syngen": SynGen, "structure": StructureDiffusion,
}


def make_method(name: str, options: dict[str, str] | None = None,
                weights: tuple[float, ...] | None = None) -> Method | None:
    """``make_method("ela", {"lam": "0.3"})`` → an :class:`ELA`; ``"sd"`` → ``None`` (no guidance).

    ``"ela+syngen"`` composes methods (:class:`Composite`); options may be namespaced (``ela.lam``) or plain (given
    to every method that has that option).
    """
    options = dict(options or {})
    names = [n.strip() for n in name.split("+")]
    for n in names:
        if n not in METHODS:
            raise UnbleedError(f"--method {n!r} is unknown: use one of {', '.join(METHODS)} (or a +-joined list)")
    if len(names) == 1:
        if weights:
            raise UnbleedError("--weights is for composed methods (e.g. --method ela+syngen)")
        cls = METHODS[name]
        if cls is None:
            if options:
                raise UnbleedError(f"-o {next(iter(options))}: method sd takes no options")
            return None
        return cls.from_options(options)
    if "sd" in names or "structure" in names or len(set(names)) != len(names):
        raise UnbleedError(f"--method {name}: compose distinct guided methods, e.g. ela+syngen (not sd or structure)")
    per: dict[str, dict[str, str]] = {n: {} for n in names}
    for key, value in options.items():
        target, _, field_name = key.rpartition(".")
        if target:
            if target not in per:
                raise UnbleedError(f"-o {key}: {target!r} is not one of the composed methods {', '.join(names)}")
            per[target][field_name] = value
            continue
        owners = [n for n in names if field_name.replace("-", "_") in METHODS[n].__dataclass_fields__]
        if not owners:
            raise UnbleedError(f"-o {key}: none of {', '.join(names)} has this option")
        for n in owners:
            per[n][field_name] = value
    return Composite(methods=[METHODS[n].from_options(per[n]) for n in names], weights=tuple(weights or ()))


__all__ = ["METHODS", "Method", "Schedule", "ELA", "AttendExcite", "AStar", "DivideBind", "StructureDiffusion", "SynGen", "Composite", "make_method", "group_map",
           "scaled_steps"]
