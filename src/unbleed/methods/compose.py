"""Composition: ``--method ela+syngen`` runs several methods' losses in one guided pass.

``L = Σ_k w_k L_k`` (``--weights``, default 1 each), each ``L_k`` on the maps its method asks for (the UNet
pass records the union of their layers once). The schedule is the **first** method's (window, refinement steps
and thresholds, step size); refinement compares the weighted sum with those thresholds, so when the first
method's thresholds are on a different scale, set ``--refine-steps`` explicitly (or ``none``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..errors import UnbleedError
from ..guidance.schedule import Schedule
from .base import Maps, Method, StepContext


@dataclass
class CompositeRun:
    """Per run: each part's own run object and how many of the maps belong to each part."""

    runs: list[Any]
    counts: list[int]

    def split(self, maps: Maps) -> list[Maps]:
        parts, i = [], 0
        for n in self.counts:
            parts.append(tuple(maps[i:i + n]))
            i += n
        return parts


@dataclass
class Composite(Method):
    """Not registered: built by :func:`unbleed.methods.make_method` from a ``+``-joined name."""

    name: ClassVar[str] = "composite"

    methods: list[Method] = field(default_factory=list)
    weights: tuple[float, ...] = ()

    def __post_init__(self):
        if not self.weights:
            self.weights = (1.0,) * len(self.methods)
        if len(self.weights) != len(self.methods):
            raise UnbleedError(f"weights: {len(self.weights)} weight(s) for {len(self.methods)} methods: give one "
                               f"per method, e.g. --weights {','.join(['1'] * len(self.methods))}", field="weights")

    @property
    def label(self) -> str:
        return "+".join(m.name for m in self.methods)

    def map_requests(self, unet):
        return tuple(r for m in self.methods for r in m.map_requests(unet))

    def default_schedule(self, num_steps: int) -> Schedule:
        return self.methods[0].default_schedule(num_steps)

    def new_run(self, unet) -> CompositeRun:
        return CompositeRun([m.new_run(unet) for m in self.methods], [len(m.map_requests(unet)) for m in self.methods])

    def prepare_step(self, maps: Maps, ctx: StepContext, run: CompositeRun) -> dict[str, Any]:
        return {"run": run, "states": [m.prepare_step(part, ctx, r)
                                       for m, part, r in zip(self.methods, run.split(maps), run.runs)]}

    def loss(self, maps: Maps, ctx: StepContext, state: dict[str, Any]) -> torch.Tensor:
        parts = state["run"].split(maps)
        return sum(w * m.loss(part, ctx, s)
                   for w, m, part, s in zip(self.weights, self.methods, parts, state["states"]))

    def visuals(self, state: dict[str, Any], ctx: StepContext) -> dict[str, torch.Tensor]:
        out = {}
        for m, s in zip(self.methods, state["states"]):
            out.update({f"{m.name} {k}": v for k, v in m.visuals(s, ctx).items()})
        return out

    def options(self) -> dict[str, Any]:
        return {"weights": list(self.weights), **{m.name: m.options() for m in self.methods}}
