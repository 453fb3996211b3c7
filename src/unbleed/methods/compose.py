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
from ..tokens import Entity
from .base import Method, Schedule


@dataclass
class Composite(Method):
    name: ClassVar[str] = "composite"

    methods: list[Method] = field(default_factory=list)
    weights: tuple[float, ...] = ()

    def __post_init__(self):
        if not self.weights:
            self.weights = (1.0,) * len(self.methods)
        if len(self.weights) != len(self.methods):
            raise UnbleedError(f"--weights: {len(self.weights)} weight(s) for {len(self.methods)} methods: give one "
                               f"per method, e.g. --weights {','.join(['1'] * len(self.methods))}")

    @property
    def label(self) -> str:
        return "+".join(m.name for m in self.methods)

    def map_request(self, unet):
        out, self._counts = [], []
        for m in self.methods:
            r = m.map_request(unet)
            r = r if isinstance(r, tuple) else (r,)
            out.extend(r)
            self._counts.append(len(r))
        return tuple(out)

    def _split(self, maps: tuple) -> list:
        """The maps tuple cut back into each method's part (after ``map_request`` recorded the counts)."""
        parts, i = [], 0
        for m, n in zip(self.methods, self._counts):
            parts.append(maps[i:i + n] if n > 1 else maps[i])
            i += n
        return parts

    def default_schedule(self, num_steps: int) -> Schedule:
        return self.methods[0].default_schedule(num_steps)

    def prepare_step(self, maps, groups: list[Entity], memory: dict[str, Any]) -> dict[str, Any]:
        return {"states": [m.prepare_step(part, groups, memory) for m, part in zip(self.methods, self._split(maps))]}

    def loss(self, maps, groups: list[Entity], state: dict[str, Any]) -> torch.Tensor:
        return sum(w * m.loss(part, groups, s)
                   for w, m, part, s in zip(self.weights, self.methods, self._split(maps), state["states"]))

    def visuals(self, state: dict[str, Any], groups: list[Entity]) -> dict[str, torch.Tensor]:
        out = {}
        for m, s in zip(self.methods, state["states"]):
            out.update({f"{m.name} {k}": v for k, v in m.visuals(s, groups).items()})
        return out

    def options(self) -> dict[str, Any]:
        return {"weights": list(self.weights), **{m.name: m.options() for m in self.methods}}
