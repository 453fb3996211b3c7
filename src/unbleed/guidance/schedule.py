"""When and how hard a method guides: :class:`Schedule`, and the parsers of its textual forms (``--window``,
``--refine-steps``) that the command lines and the run spec share."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..errors import UnbleedError


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
        """Raise an :class:`UnbleedError` naming the field (``window``, ``refine``, ``refine_iters``,
        ``step_schedule``, ``step_size``) that does not fit ``num_steps`` steps; return ``self``."""
        start, end = self.window
        if start < 0 or end < 0:
            raise UnbleedError(f"window {start}:{end}: step indices must be ≥ 0 (use START:END with "
                               f"0 ≤ START ≤ END ≤ {num_steps})", field="window")
        if start > end:
            raise UnbleedError(f"window {start}:{end}: START must be ≤ END (guided steps are START ≤ i < END)",
                               field="window")
        if end > num_steps:
            raise UnbleedError(f"window {start}:{end}: END {end} is outside the {num_steps} steps: use END ≤ "
                               f"{num_steps}", field="window")
        for step, thr in self.refine.items():
            if not self.guided(step):
                raise UnbleedError(f"refine: step {step} is outside the guidance window {start}:{end}: "
                                   f"refine only at guided steps", field="refine")
            if not math.isfinite(thr):
                raise UnbleedError(f"refine: threshold {thr} at step {step} is not a finite number", field="refine")
        if self.max_refine_iters < 0:
            raise UnbleedError("refine_iters must be ≥ 0", field="refine_iters")
        if self.step_schedule not in ("sqrt-linear", "constant"):
            raise UnbleedError(f"step_schedule {self.step_schedule!r} is unknown: use sqrt-linear or constant",
                               field="step_schedule")
        if not math.isfinite(self.step_size) or self.step_size < 0:
            raise UnbleedError(f"step_size {self.step_size} must be a finite number ≥ 0", field="step_size")
        return self

    def as_dict(self) -> dict:
        return {"window": list(self.window), "refine": {str(k): v for k, v in sorted(self.refine.items())},
                "max_refine_iters": self.max_refine_iters,
                "refine_iters_at": {str(k): v for k, v in sorted(self.refine_iters_at.items())},
                "step_size": self.step_size, "step_schedule": self.step_schedule}


def first_steps(num_steps: int, of_50: int = 25) -> tuple[int, int]:
    """The window of the first ``of_50`` of 50 steps at ``num_steps`` steps: ``(0, ⌊of_50·T/50⌋)``, at least one
    step (Attend-and-Excite's first half, 25 of 50, is the default; ``of_50`` ≤ 50)."""
    return (0, max(1, of_50 * num_steps // 50))


def scaled_steps(steps_at_50: dict[int, float], num_steps: int, window: tuple[int, int]) -> dict[int, float]:
    """Papers give schedules for 50 steps; place them at the same fraction of ``num_steps`` (rounded down; the
    first of colliding steps wins) and keep those inside ``window``."""
    out: dict[int, float] = {}
    for step, value in sorted(steps_at_50.items()):
        scaled = step * num_steps // 50
        if window[0] <= scaled < window[1]:
            out.setdefault(scaled, value)
    return out


def parse_window(text: str | None, num_steps: int) -> tuple[int, int] | None:
    """``START:END`` (either side may be empty) → ``(start, end)``; ``none`` → ``(0, 0)``; ``None`` keeps the
    method's default."""
    if text is None:
        return None
    if text.strip().lower() == "none":
        return (0, 0)
    start, sep, end = text.partition(":")
    if not sep:
        raise UnbleedError(f"window {text!r}: use START:END step indices, e.g. 0:25 (or none)", field="window")
    out = []
    for side, value, default in (("START", start, 0), ("END", end, num_steps)):
        try:
            out.append(int(value) if value.strip() else default)
        except ValueError:
            raise UnbleedError(f"window {text!r}: {side} {value.strip()!r} is not a step number: use START:END "
                               f"step indices, e.g. 0:25 (or none)", field="window") from None
    return tuple(out)


def parse_refine(text: str | None, defaults: dict[int, float] | None) -> dict[int, float] | None:
    """``0:0.2,10:0.1`` → ``{0: 0.2, 10: 0.1}``; ``none`` → ``{}``; a bare step takes ``defaults``' threshold
    (``defaults=None``: only the text's form is checked, a bare step gets 0.0)."""
    if text is None:
        return None
    if text.strip().lower() == "none":
        return {}
    out: dict[int, float] = {}
    for item in text.split(","):
        step, sep, thr = item.partition(":")
        try:
            s, value = int(step), float(thr) if sep else 0.0 if defaults is None else defaults.get(int(step))
        except ValueError:
            s, value = -1, None
        if s < 0 or (sep and not math.isfinite(value)):
            raise UnbleedError(f"refine {text!r}: use STEP:THRESHOLD pairs, e.g. 0:0.2,10:0.1 (or none)",
                               field="refine")
        if value is None:
            raise UnbleedError(f"refine: step {s} has no default threshold: give STEP:THRESHOLD, e.g. {s}:0.1",
                               field="refine")
        out[s] = value
    return out
