"""Attend-and-Excite (Chefer et al., "Attend-and-Excite: Attention-Based Semantic Guidance for Text-to-Image
Diffusion Models", SIGGRAPH 2023), faithful to the official code (yuval-alaluf/Attend-and-Excite,
``pipeline_attend_and_excite.py``) and to diffusers' port (``StableDiffusionAttendAndExcitePipeline``).

* Maps: every cross-attention layer at the 16×16 level (SD at 512 px: down, mid and up blocks whose maps are
  16×16), averaged over heads and layers; token columns 1…last−1 (start-of-text, end-of-text and padding dropped),
  ×100, softmax over those tokens (sec. 3.1); each subject token's map smoothed by a 3×3 Gaussian, σ = 0.5, with
  reflect padding — the official kernel, ``exp(−((x − μ)/(2σ))²)`` normalised, reproduced as written. This
  preprocessing is :func:`~unbleed.methods.maps.subject_maps`, shared with Divide & Bind and A-STAR.
* Loss (Eq. 1 and sec. 3.2): ``L = max_s max(0, 1 − max(A_s))`` over the subject tokens.
* Schedule: ``α_i = 20·sqrt(linspace(1, 0.5, T)[i])`` for the first 25 of 50 steps; iterative refinement at steps
  {0, 10, 20} until every subject's max attention reaches {0.05, 0.5, 0.8}, i.e. the loss is ≤ 1 − that, at most
  20 iterations. Steps are scaled to T steps (``⌊s·T/50⌋``).

Choices and differences (all options): ``exclude_padding=True`` is the official code's ``1:last_idx``;
``exclude_padding=False`` is diffusers' ``[:, :, 1:-1]`` over all 77 columns (padding included in the softmax).
A word of several BPE pieces uses the mean of its pieces' (softmaxed, smoothed) maps; subjects are the entity
tokens (``attributes=True`` adds attribute tokens). Refinement stops as soon as the loss is under the threshold;
the official loop makes one more update after crossing it (see tests/test_attend_excite.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..errors import UnbleedError
from ..guidance.attention import MapRequest, level_of, resolve_block
from ..guidance.schedule import Schedule, scaled_steps
from .base import Maps, Method, StepContext, register
from .maps import excite_loss, subject_maps

__all__ = ["AttendExcite", "excite_loss"]  # excite_loss (Eq. 1) lives in maps.py, shared with InitNO


@register
@dataclass
class AttendExcite(Method):
    """Attend-and-Excite. Options: ``temperature`` (×100 before the token softmax), ``smooth``, ``kernel_size``,
    ``sigma``, ``exclude_padding``, ``attributes``."""

    name: ClassVar[str] = "attend-excite"
    source: ClassVar[str] = "Chefer et al., SIGGRAPH 2023"

    temperature: float = 100.0
    smooth: bool = True
    kernel_size: int = 3
    sigma: float = 0.5
    exclude_padding: bool = True
    attributes: bool = False

    def check(self) -> None:
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise UnbleedError(f"-o kernel_size={self.kernel_size}: must be an odd number ≥ 1", field="options")
        if self.sigma <= 0 or self.temperature <= 0:
            raise UnbleedError("-o sigma and -o temperature must be > 0", field="options")

    def map_requests(self, unet) -> tuple[MapRequest, ...]:
        level = level_of(unet, resolve_block(unet, "up-1"))  # the 16×16 level of SD at 512 px
        return (MapRequest(blocks=None, level=level, out_level=level),)

    def default_schedule(self, num_steps: int) -> Schedule:
        window = (0, max(1, num_steps // 2))
        return Schedule(window=window, refine=scaled_steps({0: 1 - 0.05, 10: 1 - 0.5, 20: 1 - 0.8}, num_steps, window),
                        max_refine_iters=20, step_size=20.0, step_schedule="sqrt-linear")

    def prepare_step(self, maps: Maps, ctx: StepContext, run: Any) -> dict[str, Any]:
        """The softmax's last column (``ctx.eot`` with ``exclude_padding``, else the last of the 77) and the
        subjects' token indices (entities, plus their attributes with ``attributes``)."""
        subjects = [e.indices for e in ctx.groups]
        if self.attributes:
            subjects += [a.indices for e in ctx.groups for a in e.attributes]
        return {"last": ctx.eot if self.exclude_padding else maps[0].shape[1] - 1, "subjects": subjects}

    def max_attention(self, maps: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
        """``[B, subjects]``: each subject's maximum (smoothed, token-softmaxed) attention; ``maps`` is one
        ``[B, 77, h, w]`` tensor (the first of the step's maps)."""
        subject = subject_maps(maps, state["subjects"], state["last"], self.temperature,
                               self.kernel_size if self.smooth else 1, self.sigma)
        return subject.flatten(-2).amax(-1)

    def loss(self, maps: Maps, ctx: StepContext, state: dict[str, Any]) -> torch.Tensor:
        return excite_loss(self.max_attention(maps[0], state))
