"""What a method is, and the registry of methods.

Two kinds, both built from ``-o key=value`` options (their dataclass fields):

* :class:`Method` — latent guidance. The sampler (:mod:`unbleed.run.sampler`) owns the loop and runs the
  UNet; a method never does. Per guided step the sampler

  1. runs the text-conditioned UNet pass on ``z_t`` and records the maps of ``map_requests(unet)``: the hooks
     always get ``maps``, a tuple of ``[batch, 77, h, w]`` float32 tensors in the order of the requests;
  2. calls ``prepare_step(detached maps, ctx, run)`` once — state that stays fixed for the step (ELA's masks).
     ``ctx`` is a :class:`StepContext` (step, number of steps, prompt length, token groups); ``run`` is the
     method's own per-run object from ``new_run(unet)`` (A-STAR's previous maps), the only state that crosses
     steps;
  3. calls ``loss(maps, ctx, state)`` → ``[batch]`` and updates ``z_t ← z_t − α_t ∇L``; at refinement steps it
     repeats while ``refine_value(...)`` (the loss unless a method says otherwise) is above the step's threshold,
     up to the step's iteration cap.

* :class:`Conditioning` — methods that edit attention instead (StructureDiffusion's value sets); the sampler asks
  for ``attention_edit(...)`` once per run — an :class:`~unbleed.guidance.attention.AttentionEdit`, the hook that
  edits the probabilities and outputs of every cross-attention layer — and installs it for every pass.

A class becomes a ``--method`` with the :func:`register` decorator, under its ``name``; every list of methods
(CLI help, ``unbleed methods``, the README check) is read from :data:`METHODS`.
"""

from __future__ import annotations

import abc
import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..errors import UnbleedError
from ..guidance.attention import AttentionEdit, MapRequest
from ..guidance.schedule import Schedule
from ..text.tokens import Entity

Maps = tuple[torch.Tensor, ...]

# name → class; "sd" is plain sampling (no method object). Filled by @register.
METHODS: dict[str, type | None] = {"sd": None}


def register(cls):
    """Class decorator: make ``cls`` available as ``--method cls.name``."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name or "+" in name or "," in name or name == "sd":
        raise TypeError(f"{cls.__name__}.name must be a method name without '+' or ',' (not 'sd'), got {name!r}")
    if name in METHODS and METHODS[name] is not cls:
        raise TypeError(f"method name {name!r} is already registered by {METHODS[name]!r}")
    METHODS[name] = cls
    return cls


@dataclass(frozen=True)
class StepContext:
    """What a method knows of the step: its index, the loop length, the prompt's token count (start- and
    end-of-text included, at most 77) and the token groups."""

    step: int
    num_steps: int
    prompt_length: int
    groups: tuple[Entity, ...]

    @property
    def eot(self) -> int:
        """Column of the end-of-text token."""
        return self.prompt_length - 1

    @property
    def words(self) -> slice:
        """Columns of the prompt's own tokens: ``1 … prompt_length − 2`` (no start-, end-of-text or padding)."""
        return slice(1, self.prompt_length - 1)

    @classmethod
    def of(cls, tokenizer, prompt: str, groups, step: int = 0, num_steps: int = 50) -> "StepContext":
        """The context of ``prompt`` as the sampler builds it."""
        length = min(len(tokenizer(prompt).input_ids), tokenizer.model_max_length)
        return cls(step, num_steps, length, tuple(groups))


# settings of the run, not of a method: one for every method, set on the run spec (its field → the flag that sets it)
RUN_SETTINGS = {"step_size": "--step-size", "step_schedule": "--step-schedule", "window": "--window"}


def refuse_run_setting(key: str, value: str) -> None:
    """One line for ``-o KEY=VALUE`` (or ``-o method.KEY=…``) whose KEY is a run setting (:data:`RUN_SETTINGS`):
    a method has no second knob for it; the flag is the one road."""
    option = key.rpartition(".")[2].replace("-", "_")
    if option in RUN_SETTINGS:
        flag = RUN_SETTINGS[option]
        raise UnbleedError(f"-o {key}: {option} is a setting of the run, not a method option: use {flag} {value} "
                           f"(RunSpec.{option} in Python)", field="options")


class Options:
    """Options from ``-o key=value`` strings: the subclass's dataclass fields, converted to their types."""

    name: ClassVar[str] = "method"
    needs_groups: ClassVar[bool] = True
    source: ClassVar[str] = ""  # the paper (shown by ``unbleed methods``)
    # old option name → its new name: an old name passed with -o is refused in one line naming the new one
    renamed: ClassVar[dict[str, str]] = {}

    def options(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls)) if dataclasses.is_dataclass(cls) else ()

    @classmethod
    def from_options(cls, options: dict[str, str]):
        """Build from ``-o key=value`` strings, converting each to the field's type."""
        fields = {f.name: f for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}
        kwargs: dict[str, Any] = {}
        for key, raw in options.items():
            k = key.replace("-", "_")
            if k not in fields:
                refuse_run_setting(key, raw)
            if k in cls.renamed and k not in fields:
                raise UnbleedError(f"-o {key}: this option is now called {cls.renamed[k]} in {cls.name}: use "
                                   f"-o {cls.renamed[k]}={raw}", field="options")
            if k not in fields:
                raise UnbleedError(f"-o {key}: {cls.name} has no such option; its options are "
                                   f"{', '.join(fields) or 'none'}", field="options")
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
                raise UnbleedError(f"-o {key}={raw}: expected a value like {default!r}", field="options") from None
        method = cls(**kwargs)
        method.check()
        return method

    def check(self) -> None:
        """Validate options; raise :class:`UnbleedError` naming the bad one."""


class Method(Options, abc.ABC):
    """A latent-guidance method. Subclasses are dataclasses whose fields are its options."""

    @abc.abstractmethod
    def map_requests(self, unet) -> tuple[MapRequest, ...]:
        """The maps the hooks get, in this order."""

    @abc.abstractmethod
    def default_schedule(self, num_steps: int) -> Schedule:
        """The paper's window, refinement steps and step size for ``num_steps`` steps."""

    def new_run(self, unet) -> Any:
        """A fresh object for the state this method carries across the steps of one run (None: nothing)."""
        return None

    def prepare_step(self, maps: Maps, ctx: StepContext, run: Any) -> dict[str, Any]:
        """Per-timestep state computed once from detached maps (kept through refinement). ``run`` is this method's
        ``new_run`` object; a direct caller outside a run may pass ``None`` (nothing is carried over)."""
        return {}

    @abc.abstractmethod
    def loss(self, maps: Maps, ctx: StepContext, state: dict[str, Any]) -> torch.Tensor:
        """``maps`` differentiable w.r.t. the latent; returns the loss per sample ``[batch]``."""

    def refine_value(self, maps: Maps, ctx: StepContext, state: dict[str, Any], loss: torch.Tensor) -> torch.Tensor:
        """What refinement compares with the step's threshold (refine while above it); the loss by default."""
        return loss

    def visuals(self, state: dict[str, Any], ctx: StepContext) -> dict[str, torch.Tensor]:
        """Named ``[batch, h, w]`` pictures of the step state for ``--save-attention`` (ELA: its masks)."""
        return {}

    def initial_noise(self, stage: Any, latents: torch.Tensor) -> torch.Tensor:
        """The initial-noise stage, run once before the denoising loop (step 4b of
        :func:`~unbleed.run.sampler.generate`): return the initial latents to sample from, ``[batch, C, h, w]``
        like the seeds' ``latents``. ``stage`` is a :class:`~unbleed.run.sampler.NoiseStage`: this method's
        maps of a latent at the first timestep (``stage.maps(z)``), a fresh draw from one seed's own generator
        (``stage.draw(i)``), the scheduler's noise scale and a ``record`` for the run's JSON. Each sample must depend
        on its own seed only. Default: the latents unchanged (InitNO optimises them)."""
        return latents


class Conditioning(Options, abc.ABC):
    """A method that edits the attention of the denoising passes instead of moving the latent."""

    @abc.abstractmethod
    def attention_edit(self, pipe, prompt: str, groups: list[Entity], embeds: torch.Tensor, batch: int,
                       do_cfg: bool) -> AttentionEdit:
        """The run's :class:`~unbleed.guidance.attention.AttentionEdit`, asked for once per run with the prompt's
        token groups and its encoded ``embeds`` (``[2·batch, 77, d]`` under ``do_cfg``, unconditional half first);
        the sampler installs it for every pass."""


def method_names(kind: type | None = None) -> list[str]:
    """Registered names (``sd`` first), optionally only those whose class is a subclass of ``kind``."""
    return [n for n, c in METHODS.items() if kind is None or (c is not None and issubclass(c, kind))]
