"""The methods: one small file each, registered by :func:`register` under their ``name``.

Every module of this package is imported here, so a new method is one file in this folder and nothing else.
``sd`` is plain sampling (no method object). :func:`make_method` builds a method from its name and ``-o`` options;
:func:`route_options` is the one rule that sends ``-o`` options to methods (also for sweeps of several methods).
"""

from __future__ import annotations

import importlib
import pkgutil

from ..errors import UnbleedError
from .base import (METHODS, Conditioning, Maps, Method, Options, StepContext, method_names, refuse_run_setting,
                   register)
from .compose import Composite

# ELA, the headline method, first; then the others alphabetically (the order of every list of methods).
for _module in sorted(pkgutil.iter_modules(__path__), key=lambda m: (m.name != "ela", m.name)):
    importlib.import_module(f"{__name__}.{_module.name}")


def _known(names: list[str]) -> None:
    for n in names:
        if n not in METHODS:
            raise UnbleedError(f"method {n!r} is unknown: use one of {', '.join(METHODS)} (or a +-joined list of "
                               f"guidance methods, e.g. ela+syngen)", field="method")


def route_options(method: str, options: dict[str, str] | None, strict: bool = True) -> dict[str, dict[str, str]]:
    """Which of ``options`` (``-o`` KEY=VALUE) go to which part of ``method`` (``ela`` or ``ela+syngen``).

    ``ela.lam=…`` goes to ela only (ignored when ela is not part of ``method``, unless ``strict``); a plain
    ``lam=…`` goes to every part that has that option. With ``strict`` (one method run) every option must reach a
    part; a sweep of several methods calls it with ``strict=False`` and checks the union itself.
    Returns ``{part name: {option: value}}``, each part present.
    """
    names = [n.strip() for n in method.split("+")]
    _known(names)
    per: dict[str, dict[str, str]] = {n: {} for n in names}
    for key, value in (options or {}).items():
        refuse_run_setting(key, value)
        target, _, option = key.rpartition(".")
        if target:
            if target in per:
                per[target][option] = value
            elif strict:
                raise UnbleedError(f"-o {key}: {target!r} is not one of the methods {', '.join(names)}",
                                   field="options")
            continue
        renamed = [(n, METHODS[n].renamed[option.replace("-", "_")]) for n in names if METHODS[n] is not None
                   and option.replace("-", "_") in METHODS[n].renamed]
        if renamed:
            raise UnbleedError(f"-o {key}: this option is now called "
                               + ", ".join(f"{new} in {n}" for n, new in renamed)
                               + f": use -o {renamed[0][1]}={value}", field="options")
        if strict and len(names) == 1 and METHODS[names[0]] is not None:
            per[names[0]][option] = value  # its own from_options names an unknown option with the list of options
            continue
        owners = [n for n in names if METHODS[n] is not None and option.replace("-", "_") in METHODS[n].option_names()]
        if not owners and strict:
            if names == ["sd"]:
                raise UnbleedError(f"-o {key}: method sd takes no options", field="options")
            raise UnbleedError(f"-o {key}: none of {', '.join(names)} has this option", field="options")
        for n in owners:
            per[n][option] = value
    return per


def make_method(name: str, options: dict[str, str] | None = None,
                weights: tuple[float, ...] | None = None) -> Options | None:
    """``make_method("ela", {"lam": "0.3"})`` → an ELA; ``"sd"`` → ``None`` (no guidance).

    ``"ela+syngen"`` composes guidance methods (:class:`Composite`); options may be namespaced (``ela.lam``) or
    plain (given to every part that has that option).
    """
    names = [n.strip() for n in name.split("+")]
    per = route_options(name, options)
    if len(names) == 1:
        if weights:
            raise UnbleedError("weights are for composed methods (e.g. method ela+syngen)", field="weights")
        cls = METHODS[names[0]]
        return None if cls is None else cls.from_options(per[names[0]])
    if len(set(names)) != len(names) or not all(METHODS[n] is not None and issubclass(METHODS[n], Method)
                                                for n in names):
        guiding = ", ".join(method_names(Method))
        raise UnbleedError(f"method {name}: compose distinct guidance methods ({guiding}), e.g. ela+syngen",
                           field="method")
    staged = [n for n in names if METHODS[n].initial_noise is not Method.initial_noise]
    if staged:  # the composition has one loop of guided steps; an initial-noise stage is not composed (yet)
        raise UnbleedError(f"method {name}: {staged[0]} optimises the initial noise, which a composition does not "
                           f"run: use --method {staged[0]} alone", field="method")
    return Composite(methods=[METHODS[n].from_options(per[n]) for n in names], weights=tuple(weights or ()))


__all__ = ["METHODS", "Method", "Conditioning", "Options", "StepContext", "Maps", "Composite", "make_method",
           "route_options", "method_names", "register"]
