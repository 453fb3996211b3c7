"""Attend-and-Excite (Chefer et al., "Attend-and-Excite: Attention-Based Semantic Guidance for Text-to-Image
Diffusion Models", SIGGRAPH 2023), faithful to the official code (yuval-alaluf/Attend-and-Excite,
``pipeline_attend_and_excite.py``) and to diffusers' port (``StableDiffusionAttendAndExcitePipeline``).

* Maps: every cross-attention layer at the 16×16 level (SD at 512 px: down, mid and up blocks whose maps are
  16×16), averaged over heads and layers; token columns from 1 (start-of-text dropped) to the softmax's last
  column (below), ×100 (``map_scale``), softmax over those tokens (sec. 3.1); each subject token's map smoothed by
  a 3×3 Gaussian, σ = 0.5, with reflect padding — the official kernel, ``exp(−((x − μ)/(2σ))²)`` normalised,
  reproduced as written. This preprocessing is :func:`~unbleed.methods.maps.subject_maps`, shared with Divide &
  Bind and A-STAR.
* Loss (Eq. 1 and sec. 3.2): ``L = max_s max(0, 1 − max(A_s))`` over the subject tokens.
* Schedule: ``α_i = 20·sqrt(linspace(1, 0.5, T)[i])`` for the first 25 of 50 steps; iterative refinement at steps
  {0, 10, 20} until every subject's max attention reaches {0.05, 0.5, 0.8}, i.e. the loss is ≤ 1 − that, at most
  20 iterations. Steps are scaled to T steps (``⌊s·T/50⌋``).

Softmax columns, per model family as the official code (``exclude_padding="auto"``, the default). The official
``_compute_max_attention_per_index`` takes ``attention_maps[:, :, 1:last_idx]`` with ``last_idx = −1`` unless
``normalize_eot``, which its ``run.py`` sets only for SD 2.1 (``config.sd_2_1``); diffusers'
``StableDiffusionAttendAndExcitePipeline`` always takes ``[:, :, 1:-1]``. So:

* SD 1.x (a UNet with SD 1.x's convolutional transformer projections, ``use_linear_projection=False``; SD 1.x's
  tokenizer pads with end-of-text): columns ``1:-1`` of the 77, end-of-text and padding included — the official
  SD 1.4 path and diffusers' pipeline, whose latents ours equal (tests/test_attend_excite.py);
* SD 2.x (``use_linear_projection=True``; its tokenizer pads with ``!``): columns ``1 … prompt_length−2``, the
  prompt's own words — the official ``normalize_eot`` path for SD 2.1;
* SDXL (linear projections too): no official code exists; we take the SD 2.x rule (its second tokenizer also pads
  with ``!``) — our choice.

``exclude_padding=true`` / ``false`` forces one rule on any model. Other choices (options): a word of several BPE
pieces uses the mean of its pieces' (softmaxed, smoothed) maps; subjects are the entity tokens (``attributes=True``
adds attribute tokens). Refinement stops as soon as the loss is under the threshold; the official loop makes one
more update after crossing it (see tests/test_attend_excite.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..errors import UnbleedError
from ..guidance.attention import MapRequest, level_of, resolve_block
from ..guidance.schedule import Schedule, first_steps, scaled_steps
from .base import Maps, Method, StepContext, register
from .maps import MapOptions, excite_loss

__all__ = ["AttendExcite", "excite_loss"]  # excite_loss (Eq. 1) lives in maps.py, shared with InitNO


def padding_in_softmax(unet) -> bool:
    """Whether the official code's rule for this UNet's family puts the padding columns in the token softmax (columns
    ``1:-1``): True for SD 1.x (convolutional projections, ``use_linear_projection=False``), False for SD 2.x and
    SDXL (linear projections; the softmax over the prompt's words, ``normalize_eot``)."""
    return not bool(getattr(unet.config, "use_linear_projection", False))


@register
@dataclass
class AttendExcite(MapOptions, Method):
    """Attend-and-Excite. Options: :class:`~unbleed.methods.maps.MapOptions` (``map_scale``, the ×100 before the
    token softmax; ``smooth``, ``kernel_size``, ``sigma``), ``exclude_padding`` (``auto``: per model family as the
    official code; ``true``: the prompt's words only; ``false``: columns 1:-1), ``attributes``."""

    name: ClassVar[str] = "attend-excite"
    source: ClassVar[str] = "Chefer et al., SIGGRAPH 2023"
    renamed: ClassVar[dict[str, str]] = {"temperature": "map_scale"}

    exclude_padding: str = "auto"
    attributes: bool = False

    def check(self) -> None:
        self.check_maps()
        self.exclude_padding = padding_rule(self.exclude_padding)

    def map_requests(self, unet) -> tuple[MapRequest, ...]:
        level = level_of(unet, resolve_block(unet, "up-1"))  # the 16×16 level of SD at 512 px
        return (MapRequest(blocks=None, level=level, out_level=level),)

    def default_schedule(self, num_steps: int) -> Schedule:
        window = first_steps(num_steps)
        return Schedule(window=window, refine=scaled_steps({0: 1 - 0.05, 10: 1 - 0.5, 20: 1 - 0.8}, num_steps, window),
                        max_refine_iters=20, step_size=20.0, step_schedule="sqrt-linear")

    def new_run(self, unet) -> bool:
        """Whether the padding columns enter the softmax in this run: ``exclude_padding`` resolved for ``unet``."""
        return resolve_padding(self.exclude_padding, unet)

    def prepare_step(self, maps: Maps, ctx: StepContext, run: Any) -> dict[str, Any]:
        """The softmax's last column (the last of the 77 when the padding is in the softmax, else ``ctx.eot``) and the
        subjects' token indices (entities, plus their attributes with ``attributes``). ``run`` is :meth:`new_run`'s
        answer; a direct call with ``run=None`` and ``exclude_padding=auto`` takes the SD 1.x rule."""
        subjects = [e.indices for e in ctx.groups]
        if self.attributes:
            subjects += [a.indices for e in ctx.groups for a in e.attributes]
        padded = resolve_padding(self.exclude_padding, None) if run is None else run
        return {"last": maps[0].shape[1] - 1 if padded else ctx.eot, "subjects": subjects}

    def max_attention(self, maps: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
        """``[B, subjects]``: each subject's maximum (smoothed, token-softmaxed) attention; ``maps`` is one
        ``[B, 77, h, w]`` tensor (the first of the step's maps)."""
        subject = self.preprocess(maps, state["subjects"], state["last"])
        return subject.flatten(-2).amax(-1)

    def loss(self, maps: Maps, ctx: StepContext, state: dict[str, Any]) -> torch.Tensor:
        return excite_loss(self.max_attention(maps[0], state))


def padding_rule(value: Any) -> str:
    """``exclude_padding`` as ``auto``, ``true`` or ``false`` (a bool or any spelling of one accepted)."""
    text = str(value).strip().lower()
    if text in ("auto",):
        return "auto"
    if text in ("true", "1", "yes"):
        return "true"
    if text in ("false", "0", "no"):
        return "false"
    raise UnbleedError(f"-o exclude_padding={value}: use auto (per model family), true (the prompt's words only) "
                       f"or false (columns 1:-1, padding included)", field="options")


def resolve_padding(rule: Any, unet) -> bool:
    """True when the padding columns enter the softmax: ``false`` → True, ``true`` → False, ``auto`` → the official
    rule for ``unet``'s family (:func:`padding_in_softmax`; SD 1.x's when ``unet`` is None)."""
    rule = padding_rule(rule)
    if rule == "auto":
        return True if unet is None else padding_in_softmax(unet)
    return rule == "false"
