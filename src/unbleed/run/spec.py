"""One run, specified: the method and its options, the schedule, the token groups, the seeds and the size.

A :class:`RunSpec` is what every front end builds — ``unbleed generate``, ``sweep``, ``shapes bench``,
``bench speed``, the demo and the scripts — and it is validated in one place: :meth:`RunSpec.build` (no model
needed: the method, its options and the schedule) and :meth:`RunSpec.prepare` (against the model: the token
groups, the size, the method's layers), whose :class:`~unbleed.run.sampler.Plan` :meth:`RunSpec.run` samples. Errors
name the spec's fields (``window 30:10: …``); the command lines turn those names into their flags.

Schedule fields left ``None`` keep the method's defaults; ``window`` and ``refine`` also take their textual
forms (``"0:25"``, ``"0:0.2,10:0.1"``, ``"none"``), where a bare refinement step takes the method's threshold.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

from .. import checks
from ..errors import UnbleedError
from ..guidance.schedule import Schedule, parse_refine, parse_window

if TYPE_CHECKING:
    from ..methods import Options
    from .sampler import Plan

SCHEDULE_FIELDS = ("window", "refine", "refine_iters", "step_size", "step_schedule")
# textual schedule settings (``-o METHOD.KEY=VALUE`` of ``shapes bench``, ``scripts/shapes_tune.py``) → (field, type)
SCHEDULE_SETTINGS = {"step_size": ("step_size", float), "step_schedule": ("step_schedule", str),
                     "window": ("window", str), "refine_steps": ("refine", str), "refine_iters": ("refine_iters", int)}


def split_settings(settings: dict[str, str]) -> tuple[dict[str, str], dict[str, Any]]:
    """``{KEY: VALUE}`` text → (method options, :class:`RunSpec` schedule fields): the keys of
    :data:`SCHEDULE_SETTINGS` (``step_size``, ``step_schedule``, ``window``, ``refine_steps``, ``refine_iters``)
    become fields, converted (``window`` and ``refine_steps`` stay text, parsed by :meth:`RunSpec.build`); every
    other key is a method option."""
    options, fields = {}, {}
    for key, value in settings.items():
        if key not in SCHEDULE_SETTINGS:
            options[key] = value
            continue
        name, kind = SCHEDULE_SETTINGS[key]
        try:
            fields[name] = kind(value)
        except ValueError:
            raise UnbleedError(f"{key} {value!r} must be a{' whole' if kind is int else ''} number",
                               field=name) from None
    return options, fields


class Built(NamedTuple):
    """:meth:`RunSpec.build`'s result: the method object (``None`` for plain sampling) and, for a guidance method,
    its schedule, validated."""

    method: Options | None
    schedule: Schedule | None

    @property
    def guiding(self) -> bool:
        return self.schedule is not None


@dataclass
class RunSpec:
    method: str = "sd"
    options: dict[str, str] = field(default_factory=dict)
    weights: tuple[float, ...] | None = None
    window: tuple[int, int] | str | None = None
    refine: dict[int, float] | str | None = None
    refine_iters: int | None = None
    step_size: float | None = None
    step_schedule: str | None = None
    tokens: str | None = None  # the --tokens text; None: the prompt parser's groups
    seeds: tuple[int, ...] = (0,)
    steps: int = 50
    guidance_scale: float = 7.5
    height: int | None = None
    width: int | None = None
    negative_prompt: str | None = None
    eta: float = 0.0
    truncate: bool = True

    def __post_init__(self):
        self.options = dict(self.options or {})
        self.seeds = tuple(checks.seeds(self.seeds))  # a bare number or a bool is one clear error, not a TypeError
        if self.weights is not None:
            if isinstance(self.weights, (str, bytes)) or not hasattr(self.weights, "__iter__"):
                raise UnbleedError(f"weights {self.weights!r}: give one number per composed method, e.g. (1, 0.5)",
                                   field="weights")
            self.weights = tuple(self.weights)

    # --- validation -------------------------------------------------------------------------------------------
    def check(self) -> "RunSpec":
        """Check every field that needs no method registry and no model — the numbers (finite, in range, whole
        where they count), the seeds, the textual window — with :mod:`unbleed.checks`; this
        imports neither torch nor diffusers, so the command lines call it before anything loads. Returns ``self``;
        :meth:`build` calls it first."""
        self.steps = checks.whole(self.steps, "steps", 1, checks.MAX_STEPS)
        self.seeds = tuple(checks.seeds(self.seeds))
        self.guidance_scale = checks.real(self.guidance_scale, "guidance_scale")
        self.eta = checks.real(self.eta, "eta", 0)
        if self.weights is not None and not all(isinstance(w, (int, float)) and not isinstance(w, bool)
                                                and math.isfinite(w) for w in self.weights):
            raise UnbleedError(f"weights {','.join(map(str, self.weights))}: weights must be finite numbers",
                               field="weights")
        for name in ("height", "width"):
            if getattr(self, name) is not None:
                setattr(self, name, checks.whole(getattr(self, name), name, 1, checks.MAX_SIDE, fix=" (pixels)"))
        if self.refine_iters is not None:
            self.refine_iters = checks.whole(self.refine_iters, "refine_iters", 0)
        if self.step_size is not None:
            self.step_size = checks.real(self.step_size, "step_size", 0)
        if isinstance(self.window, str):
            parse_window(self.window, self.steps)
        if isinstance(self.refine, str):
            parse_refine(self.refine, None)  # its form; a bare step's threshold is the method's (build)
        return self

    def build(self) -> Built:
        """The method object and its schedule (:class:`Built`; no schedule for plain sampling and conditioning
        methods), every field checked: the method's default schedule with this spec's fields over it, validated —
        the one validation of the spec's schedule. Needs no model, so front ends call it before one loads."""
        from ..methods import Method, make_method

        self.check()
        method = make_method(self.method, self.options, self.weights)
        if not isinstance(method, Method):
            return Built(method, None)
        schedule = method.default_schedule(self.steps)
        default_refine = schedule.refine
        window = parse_window(self.window, self.steps) if isinstance(self.window, str) else self.window
        if window is not None:
            schedule.window = tuple(window)
            schedule.refine = {k: v for k, v in schedule.refine.items() if window[0] <= k < window[1]}
        refine = parse_refine(self.refine, default_refine) if isinstance(self.refine, str) else self.refine
        if refine is not None:
            schedule.refine = dict(refine)
        if self.refine_iters is not None:
            schedule.max_refine_iters = self.refine_iters
        if self.step_size is not None:
            schedule.step_size = self.step_size
        if self.step_schedule is not None:
            schedule.step_schedule = self.step_schedule
        return Built(method, schedule.validate(self.steps))

    def prepare(self, pipe, prompt: str, *, pictures: bool = False, groups: list | None = None,
                built: Built | None = None) -> Plan:
        """This spec checked against ``pipe`` for ``prompt``: the :class:`~unbleed.run.sampler.Plan` that
        :meth:`run` samples — the method and schedule (:meth:`build`, or ``built`` when a front end built them
        before the model loaded), the token groups (:meth:`groups`, unless given; ``pictures``: also for plain
        sampling's attention pictures), the size, and the method on this model (:func:`~unbleed.run.sampler.plan`).
        """
        from .sampler import plan

        made = built if built is not None else self.build()
        if groups is None:
            groups = self.groups(pipe.tokenizer, prompt, pictures=pictures)
        return plan(pipe, prompt, method=made.method, groups=groups, steps=self.steps,
                    guidance_scale=self.guidance_scale, height=self.height, width=self.width,
                    negative_prompt=self.negative_prompt, eta=self.eta, schedule=made.schedule,
                    truncate=self.truncate)

    @property
    def sets_schedule(self) -> bool:
        """Whether any schedule field is given (plain sampling and conditioning methods ignore them)."""
        return any(getattr(self, f) is not None for f in SCHEDULE_FIELDS)

    # --- token groups -----------------------------------------------------------------------------------------
    def groups(self, tokenizer, prompt: str, pictures: bool = False) -> list:
        """The token groups of ``prompt``: from ``tokens`` when given, else from the prompt parser — when the
        method needs them, or for attention ``pictures``; plain sampling otherwise has none."""
        from ..methods import METHODS
        from ..text.prompt import parse, token_groups

        parts = [METHODS.get(n.strip()) for n in self.method.split("+")]
        if self.tokens or any(c is not None and c.needs_groups for c in parts):
            return token_groups(tokenizer, prompt, self.tokens)
        if pictures:  # pictures only: whatever entities the parse finds (none: no attention rows, no error)
            return parse(prompt, tokenizer).entities
        return []

    # --- running ----------------------------------------------------------------------------------------------
    def run(self, pipe, prompt: str, prepared: Plan | None = None, *, groups: list | None = None, seeds=None,
            save_attention: bool = False, record=None, callback=None, output_type: str = "pil",
            built: Built | None = None):
        """Sample this spec: :func:`unbleed.run.sampler.sample` of ``prepared`` (by default :meth:`prepare` with
        ``groups`` and ``built``), for ``seeds`` (default the spec's)."""
        from .sampler import sample

        if prepared is None:
            prepared = self.prepare(pipe, prompt, pictures=save_attention, groups=groups, built=built)
        return sample(pipe, prompt, prepared, checks.seeds(self.seeds if seeds is None else seeds),
                      save_attention=save_attention, record=record, output_type=output_type, callback=callback)

    # --- records ----------------------------------------------------------------------------------------------
    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["seeds"] = list(self.seeds)
        if isinstance(self.window, tuple):
            d["window"] = list(self.window)
        if isinstance(self.refine, dict):
            d["refine"] = {str(k): v for k, v in self.refine.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunSpec":
        d = dict(d)
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise UnbleedError(f"run spec: unknown field(s) {', '.join(sorted(unknown))}")
        if isinstance(d.get("window"), list):
            d["window"] = tuple(d["window"])
        if isinstance(d.get("refine"), dict):
            d["refine"] = {int(k): float(v) for k, v in d["refine"].items()}
        return cls(**d)

    def replace(self, **changes) -> "RunSpec":
        return dataclasses.replace(self, **changes)
