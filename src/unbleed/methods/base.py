"""What a method is: the maps it needs, maps → per-sample loss, and its default schedule.

The sampler (:mod:`unbleed.sampler`) owns the loop; a method never runs the UNet. Per guided step the sampler

1. runs the text-conditioned UNet pass on ``z_t`` and asks the attention store for ``map_request(unet)`` (a
   tuple of requests gives a tuple of map tensors, in the same order);
2. calls ``prepare_step(maps.detach(), groups, memory)`` once — state that stays fixed for the step (ELA's masks).
   ``memory`` is one dict per run: the sampler sets ``step`` (the step index), ``num_steps`` (loop length) and
   ``prompt_length`` (tokens of the encoded prompt, start- and end-of-text included, at most 77); a method may
   keep what it needs across steps in it (A-STAR's previous maps);
3. calls ``loss(maps, groups, state)`` → ``[batch]`` and updates ``z_t ← z_t − α_t ∇L``; at refinement steps it
   repeats while ``refine_value(...)`` (the loss unless a method says otherwise) is above the step's threshold,
   up to the step's iteration cap.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..attention import MapRequest
from ..errors import UnbleedError
from ..tokens import Entity


@dataclass
class Schedule:
    """When and how hard to guide. Step indices count denoising steps from 0.

    * ``window``: guide at steps ``start <= i < end``;
    * ``refine``: ``{step: threshold}`` — at these steps repeat the update while the loss is above the threshold,
      at most ``max_refine_iters`` times, then make the step's regular update (Attend-and-Excite's Alg.);
    * ``step_size``/``step_schedule``: ``α_i = step_size · sqrt(linspace(1, 0.5, T)[i])`` for ``sqrt-linear``
      (A&E's schedule), ``α_i = step_size`` for ``constant``.
    """

    window: tuple[int, int]
    refine: dict[int, float] = field(default_factory=dict)
    max_refine_iters: int = 20
    step_size: float = 20.0
    step_schedule: str = "sqrt-linear"
    refine_iters_at: dict[int, int] = field(default_factory=dict)  # per-step caps overriding max_refine_iters

    def refine_cap(self, step: int) -> int:
        return self.refine_iters_at.get(step, self.max_refine_iters)

    def alpha(self, step: int, num_steps: int) -> float:
        if self.step_schedule == "constant":
            return self.step_size
        frac = step / (num_steps - 1) if num_steps > 1 else 0.0
        return self.step_size * math.sqrt(1.0 - 0.5 * frac)

    def guided(self, step: int) -> bool:
        return self.window[0] <= step < self.window[1]

    def validate(self, num_steps: int) -> "Schedule":
        start, end = self.window
        if start < 0 or end < 0:
            raise UnbleedError(f"--window {start}:{end}: step indices must be ≥ 0 (use START:END with "
                               f"0 ≤ START ≤ END ≤ {num_steps})")
        if start > end:
            raise UnbleedError(f"--window {start}:{end}: START must be ≤ END (guided steps are START ≤ i < END)")
        if end > num_steps:
            raise UnbleedError(f"--window {start}:{end}: END {end} is outside the {num_steps} steps: use END ≤ "
                               f"{num_steps}")
        for step, thr in self.refine.items():
            if not self.guided(step):
                raise UnbleedError(f"--refine-steps: step {step} is outside the guidance window {start}:{end}: "
                                   f"refine only at guided steps")
            if not math.isfinite(thr):
                raise UnbleedError(f"--refine-steps: threshold {thr} at step {step} is not a finite number")
        if self.max_refine_iters < 0:
            raise UnbleedError("--refine-iters must be ≥ 0")
        if self.step_schedule not in ("sqrt-linear", "constant"):
            raise UnbleedError(f"--step-schedule {self.step_schedule!r} is unknown: use sqrt-linear or constant")
        if not math.isfinite(self.step_size) or self.step_size < 0:
            raise UnbleedError(f"--step-size {self.step_size} must be a finite number ≥ 0")
        return self

    def as_dict(self) -> dict:
        return {"window": list(self.window), "refine": {str(k): v for k, v in sorted(self.refine.items())},
                "max_refine_iters": self.max_refine_iters,
                "refine_iters_at": {str(k): v for k, v in sorted(self.refine_iters_at.items())},
                "step_size": self.step_size, "step_schedule": self.step_schedule}


def scaled_steps(steps_at_50: dict[int, float], num_steps: int, window: tuple[int, int]) -> dict[int, float]:
    """Papers give schedules for 50 steps; place them at the same fraction of ``num_steps`` (rounded down; the
    first of colliding steps wins) and keep those inside ``window``."""
    out: dict[int, float] = {}
    for step, value in sorted(steps_at_50.items()):
        scaled = step * num_steps // 50
        if window[0] <= scaled < window[1]:
            out.setdefault(scaled, value)
    return out


@dataclass
class Method:
    """Base class. Subclasses are dataclasses whose fields are the method's options (``-o key=value``)."""

    name: ClassVar[str] = "method"
    needs_groups: ClassVar[bool] = True
    guides: ClassVar[bool] = True  # False: no latent updates (StructureDiffusion changes the conditioning instead)

    def value_sets(self, pipe, prompt: str, groups: list[Entity], embeds: torch.Tensor, batch: int,
                   do_cfg: bool) -> list[torch.Tensor] | None:
        """Extra cross-attention value inputs for the denoising passes (see :meth:`AttentionStore.values`)."""
        return None

    def map_request(self, unet) -> MapRequest:
        raise NotImplementedError

    def default_schedule(self, num_steps: int) -> Schedule:
        raise NotImplementedError

    def prepare_step(self, maps: torch.Tensor, groups: list[Entity], memory: dict[str, Any]) -> dict[str, Any]:
        """Per-timestep state computed once from detached maps (kept through refinement)."""
        return {}

    def loss(self, maps: torch.Tensor, groups: list[Entity], state: dict[str, Any]) -> torch.Tensor:
        """``maps`` is ``[batch, tokens, h, w]`` (float32, differentiable); returns the loss per sample."""
        raise NotImplementedError

    def refine_value(self, maps: torch.Tensor, groups: list[Entity], state: dict[str, Any],
                     loss: torch.Tensor) -> torch.Tensor:
        """What refinement compares with the step's threshold (refine while above it); the loss by default."""
        return loss

    def visuals(self, state: dict[str, Any], groups: list[Entity]) -> dict[str, torch.Tensor]:
        """Named ``[batch, h, w]`` pictures of the step state for ``--save-attention`` (ELA: its masks)."""
        return {}

    def options(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_options(cls, options: dict[str, str]) -> "Method":
        """Build from ``-o key=value`` strings, converting each to the field's type."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, raw in options.items():
            k = key.replace("-", "_")
            if k not in fields:
                raise UnbleedError(f"-o {key}: {cls.name} has no such option; its options are "
                                   f"{', '.join(fields) or 'none'}")
            default = fields[k].default
            try:
                if isinstance(default, bool):
                    if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                        raise ValueError(raw)
                    kwargs[k] = raw.lower() in ("true", "1", "yes")
                elif isinstance(default, int):
                    kwargs[k] = int(raw)
                elif isinstance(default, float):
                    kwargs[k] = float(raw)
                elif isinstance(default, tuple):
                    kwargs[k] = tuple(x.strip() for x in raw.split(",") if x.strip())
                else:
                    kwargs[k] = raw
            except ValueError:
                raise UnbleedError(f"-o {key}={raw}: expected a value like {default!r}") from None
        method = cls(**kwargs)
        method.check()
        return method

    def check(self) -> None:
        """Validate options; raise :class:`UnbleedError` naming the bad one."""


def group_map(maps: torch.Tensor, indices: tuple[int, ...]) -> torch.Tensor:
    """A word's map: the mean over its token pieces (the default pooling for multi-piece words)."""
    return maps[:, list(indices)].mean(dim=1)
