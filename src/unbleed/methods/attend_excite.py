"""Attend-and-Excite (Chefer et al., "Attend-and-Excite: Attention-Based Semantic Guidance for Text-to-Image
Diffusion Models", SIGGRAPH 2023), faithful to the official code (yuval-alaluf/Attend-and-Excite,
``pipeline_attend_and_excite.py``) and to diffusers' port (``StableDiffusionAttendAndExcitePipeline``).

* Maps: every cross-attention layer at the 16×16 level (SD at 512 px: down, mid and up blocks whose maps are
  16×16), averaged over heads and layers; token columns 1…last−1 (start-of-text, end-of-text and padding dropped),
  ×100, softmax over those tokens (sec. 3.1); each subject token's map smoothed by a 3×3 Gaussian, σ = 0.5, with
  reflect padding — the official kernel, ``exp(−((x − μ)/(2σ))²)`` normalised, reproduced as written.
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
import torch.nn.functional as F

from ..attention import MapRequest, level_of, resolve_block
from ..errors import UnbleedError
from ..tokens import Entity
from .base import Method, Schedule, scaled_steps


def gaussian_kernel(size: int = 3, sigma: float = 0.5) -> torch.Tensor:
    """The official A&E smoothing kernel: a product of ``exp(−((x − μ)/(2σ))²)`` per axis, normalised to sum 1.
    Shared by every method that uses A&E's map preprocessing (Divide & Bind, A-STAR)."""
    grid = torch.arange(size, dtype=torch.float32)
    mean = (size - 1) / 2
    g = torch.exp(-(((grid - mean) / (2 * sigma)) ** 2))
    k = g[:, None] * g[None, :]
    return k / k.sum()


def smooth(x: torch.Tensor, size: int = 3, sigma: float = 0.5) -> torch.Tensor:
    """Smooth every ``[h, w]`` map of ``x`` ``[..., h, w]`` with :func:`gaussian_kernel` and reflect padding (as the
    official code; replicate padding where a side is too short to reflect). ``size=1`` is the identity."""
    if size <= 1:
        return x
    pad = size // 2
    h, w = x.shape[-2:]
    flat = F.pad(x.reshape(-1, 1, h, w), (pad, pad, pad, pad), mode="reflect" if min(h, w) > pad else "replicate")
    return F.conv2d(flat, gaussian_kernel(size, sigma).to(x)[None, None]).reshape(x.shape)


def token_probs(maps: torch.Tensor, last: int, temperature: float = 100.0) -> torch.Tensor:
    """``[B, tokens, h, w]`` → ``[B, last − 1, h, w]``: columns ``1…last−1``, ×temperature, softmax over them.
    Token ``i`` is column ``i − 1`` of the result (A&E sec. 3.1)."""
    return torch.softmax(maps[:, 1:last] * temperature, dim=1)


def subject_maps(maps: torch.Tensor, subjects: list[tuple[int, ...]], last: int, temperature: float = 100.0,
                 kernel_size: int = 3, sigma: float = 0.5) -> torch.Tensor:
    """A&E's map preprocessing, shared by Divide & Bind and A-STAR: ``[B, 77, h, w]`` raw probabilities →
    ``[B, len(subjects), h, w]``: :func:`token_probs`, each subject the mean of its pieces' columns, smoothed
    (``kernel_size=1``: not smoothed)."""
    probs = token_probs(maps, last, temperature)
    out = torch.stack([probs[:, [i - 1 for i in idx]].mean(1) for idx in subjects], 1)
    return smooth(out, kernel_size, sigma)


def excite_loss(max_attention: torch.Tensor) -> torch.Tensor:
    """Eq. 1: ``max_s max(0, 1 − max A_s)`` per sample; ``max_attention`` is ``[B, subjects]``."""
    return (1 - max_attention).clamp_min(0).amax(-1)


@dataclass
class AttendExcite(Method):
    """Attend-and-Excite. Options: ``temperature`` (×100 before the token softmax), ``smooth``, ``kernel_size``,
    ``sigma``, ``exclude_padding``, ``attributes``."""

    name: ClassVar[str] = "attend-excite"

    temperature: float = 100.0
    smooth: bool = True
    kernel_size: int = 3
    sigma: float = 0.5
    exclude_padding: bool = True
    attributes: bool = False

    def check(self) -> None:
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise UnbleedError(f"-o kernel_size={self.kernel_size}: must be an odd number ≥ 1")
        if self.sigma <= 0 or self.temperature <= 0:
            raise UnbleedError("-o sigma and -o temperature must be > 0")

    def map_request(self, unet) -> MapRequest:
        level = level_of(unet, resolve_block(unet, "up-1"))  # the 16×16 level of SD at 512 px
        return MapRequest(blocks=None, level=level, out_level=level)

    def default_schedule(self, num_steps: int) -> Schedule:
        window = (0, max(1, num_steps // 2))
        return Schedule(window=window, refine=scaled_steps({0: 1 - 0.05, 10: 1 - 0.5, 20: 1 - 0.8}, num_steps, window),
                        max_refine_iters=20, step_size=20.0, step_schedule="sqrt-linear")

    def prepare_step(self, maps: torch.Tensor, groups: list[Entity], memory: dict[str, Any]) -> dict[str, Any]:
        subjects = [e.indices for e in groups]
        if self.attributes:
            subjects += [a.indices for e in groups for a in e.attributes]
        return {"last": memory.get("prompt_length", maps.shape[1]) - 1 if self.exclude_padding else maps.shape[1] - 1,
                "subjects": subjects}

    def max_attention(self, maps: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
        """``[B, subjects]``: each subject's maximum (smoothed, token-softmaxed) attention."""
        subject = subject_maps(maps, state["subjects"], state["last"], self.temperature,
                               self.kernel_size if self.smooth else 1, self.sigma)
        return subject.flatten(-2).amax(-1)

    def loss(self, maps: torch.Tensor, groups: list[Entity], state: dict[str, Any]) -> torch.Tensor:
        return excite_loss(self.max_attention(maps, state))
