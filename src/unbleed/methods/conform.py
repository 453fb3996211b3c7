"""CONFORM (Meral et al., "CONFORM: Contrast is All You Need For High-Fidelity Text-to-Image Diffusion Models",
CVPR 2024), following the official code (gemlab-vt/CONFORM, ``pipeline_conform.py``, ``ConformPipeline``) as its
``notebook.ipynb`` — the usage the README points to — runs it.

Each attended token's cross-attention map is an embedding; the tokens of one entity — the entity and its
attributes, e.g. ``red`` and ``circle`` — are positives of each other, tokens of different entities negatives,
and the maps are pulled apart or together by a contrastive InfoNCE (NT-Xent) loss (the paper's sec. 3):

* maps: every cross-attention layer at the 16×16 level of SD at 512 px (official ``attn_res=(16, 16)`` over
  ``up``, ``down``, ``mid``; here the level of ``up-1`` at any size), averaged over heads and layers; the raw
  probabilities of the token's column (``softmax_normalize=False`` in the notebook), smoothed by the 3×3 Gaussian,
  σ = 0.5, reflect padding (``do_smoothing``), flattened;
* embeddings ``e_k``: every token of every entity of the prompt (``token_groups``: each entity with its
  attributes), and — from the second guided step — each token's map of the previous step too, with the same label
  (``add_previous_attention_maps=True``, ``previous_attention_map_anchor_step=None``): the maps of the last pass
  of that step, i.e. of the latent its regular update started from, fixed (no gradient);
* loss (``loss_fn="ntxent"``: pytorch-metric-learning's ``NTXentLoss`` with its cosine similarity): over every
  ordered positive pair ``(a, p)``, ``−log(exp(s_ap/τ) / (exp(s_ap/τ) + Σ_{n ∉ class(a)} exp(s_an/τ)))``
  averaged, ``s`` the cosine similarity, τ = 0.5 (``tau``; the official ``temperature``); 0 when there is no positive or no negative
  pair (:func:`ntxent`).
* schedule: α_i = 20·sqrt(linspace(1, 0.5, T)[i]) (``scale_factor=20``) for the first 30 of 50 steps
  (``max_iter_to_alter=30``); at steps 0, 10 and 20 (``iterative_refinement_steps``) exactly 20 refinement updates
  (``refinement_steps=20``: no threshold), then the step's regular update. Steps are scaled to T.

Defaults, and where the official code has two: the pipeline's signature defaults are ``softmax_normalize=True``
(columns ``1:-1`` ×100 — ``map_scale`` —, softmax over them: ``-o softmax=true``) and ``max_iter_to_alter=25`` (``--window 0:25``);
the notebook's, used here, are ``False`` and ``30``; both use τ = 0.5 (the static loss function's own default,
0.07, is never used). Departures:

* The official per-image loop shares one store of "previous" maps across the images of a batch (the last
  image's); here each seed has its own, so every image equals the one its seed gives alone.
* With ``softmax_normalize`` the official code multiplies the stored previous maps by 100 in place at every loss
  evaluation (``attention_for_text_t_plus_one *= 100`` on a view), compounding over a refinement's 20 passes;
  ``-o softmax=true`` applies the ×100 softmax once per evaluation, as intended.
* Refinement always makes 20 updates through the sampler's refinement (``refine_value`` is the loss, the default
  threshold −1 is below any NT-Xent value); ``--refine-steps 0:0.2,…`` makes it stop early on the loss instead.
* A word of several BPE pieces is one embedding (the mean of its pieces' maps); the official code makes each
  listed token index an embedding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ..errors import UnbleedError
from ..guidance.attention import MapRequest, level_of, resolve_block
from ..guidance.schedule import Schedule, first_steps, scaled_steps
from .base import Maps, Method, StepContext, register
from .maps import MapOptions, group_map, token_probs

ALWAYS = -1.0  # a refinement threshold below every NT-Xent value: refine for the whole iteration cap


def ntxent(embeddings: torch.Tensor, labels: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """NT-Xent (InfoNCE) per sample, as pytorch-metric-learning's ``NTXentLoss`` with ``CosineSimilarity`` and its
    mean reducer: ``embeddings`` ``[B, m, d]``, ``labels`` ``[m]`` → ``[B]``.

    For each ordered pair ``(a, p)``, ``a ≠ p`` of equal labels, ``−log(exp(s_ap/τ) / (exp(s_ap/τ) +
    Σ_n exp(s_an/τ)) + tiny)`` over the ``n`` of other labels, averaged over the pairs; 0 without positive or
    negative pairs.
    """
    m = embeddings.shape[1]
    same = labels[:, None] == labels[None, :]
    pos = same & ~torch.eye(m, dtype=torch.bool, device=labels.device)
    neg = ~same
    if not pos.any() or not neg.any():  # nothing to contrast: 0, kept on the graph (a zero gradient)
        return (embeddings * 0).flatten(1).sum(-1)
    e = F.normalize(embeddings, p=2, dim=-1)
    sim = e @ e.transpose(1, 2) / temperature  # [B, m, m]
    neg_lse = sim.masked_fill(~neg, float("-inf")).logsumexp(-1)  # [B, m]: log Σ_n exp(s_an/τ) per anchor
    a, p = pos.nonzero(as_tuple=True)
    s_ap = sim[:, a, p]  # [B, pairs]
    ratio = torch.exp(s_ap - torch.logaddexp(s_ap, neg_lse[:, a]))
    return -torch.log(ratio + torch.finfo(ratio.dtype).tiny).mean(-1)


@dataclass
class ConformRun:
    """Per run: the token maps of the last pass of the previous guided step (the extra positives)."""

    latest: torch.Tensor | None = None
    previous: torch.Tensor | None = None


@register
@dataclass
class Conform(MapOptions, Method):
    """CONFORM: contrastive (NT-Xent) loss on the cross-attention maps. Options (official notebook defaults):
    ``tau`` τ (0.5); :class:`~unbleed.methods.maps.MapOptions`: ``smooth`` (true), ``kernel_size`` (3),
    ``sigma`` (0.5), ``map_scale`` (100, with ``softmax``); ``softmax`` (false: raw
    probabilities; true: columns 1:-1 ×``map_scale`` (100), softmax), ``previous`` (true: add the previous step's
    maps as positives)."""

    name: ClassVar[str] = "conform"
    source: ClassVar[str] = "Meral et al., CVPR 2024"
    renamed: ClassVar[dict[str, str]] = {"temperature": "tau"}

    tau: float = 0.5
    softmax: bool = False
    previous: bool = True

    def check(self) -> None:
        if not (math.isfinite(self.tau) and self.tau > 0):
            raise UnbleedError(f"-o tau={self.tau}: must be a finite number > 0", field="options")
        self.check_maps()

    def map_requests(self, unet) -> tuple[MapRequest, ...]:
        level = level_of(unet, resolve_block(unet, "up-1"))  # the 16×16 level of SD at 512 px
        return (MapRequest(blocks=None, level=level, out_level=level),)

    def default_schedule(self, num_steps: int) -> Schedule:
        """The notebook's ``max_iter_to_alter=30`` of 50, α = 20·sqrt(linspace(1, 0.5, T)), 20 refinement updates
        at steps 0, 10 and 20 (scaled to T)."""
        window = first_steps(num_steps, 30)
        return Schedule(window=window, refine=scaled_steps({0: ALWAYS, 10: ALWAYS, 20: ALWAYS}, num_steps, window),
                        max_refine_iters=20, step_size=20.0, step_schedule="sqrt-linear")

    def new_run(self, unet) -> ConformRun:
        return ConformRun()

    @staticmethod
    def labels(ctx: StepContext) -> tuple[list[tuple[int, ...]], list[int]]:
        """The contrasted words (each entity, then its attributes) and their labels (the entity's number)."""
        words, labels = [], []
        for c, entity in enumerate(ctx.groups):
            for word in (entity, *entity.attributes):
                words.append(word.indices)
                labels.append(c)
        return words, labels

    def token_maps(self, maps: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """``[B, 77, h, w]`` → ``[B, words, h, w]``: each contrasted word's (optionally softmaxed) smoothed map."""
        words, _ = self.labels(ctx)
        if self.softmax:  # columns 1:-1, ×map_scale, softmax; token i is column i − 1
            maps = F.pad(token_probs(maps, maps.shape[1] - 1, self.map_scale), (0, 0, 0, 0, 1, 0))
        out = torch.stack([group_map(maps, w) for w in words], 1)
        return self.smoothed(out)

    def prepare_step(self, maps: Maps, ctx: StepContext, run: Any) -> dict[str, Any]:
        """The previous guided step's last token maps (none at the first), and ``run`` to record this step's."""
        run = run if run is not None else ConformRun()
        run.previous = run.latest if self.previous else None
        _, labels = self.labels(ctx)
        return {"run": run, "previous": run.previous, "labels": torch.tensor(labels)}

    def loss(self, maps: Maps, ctx: StepContext, state: dict[str, Any]) -> torch.Tensor:
        """NT-Xent over the current maps (and the previous step's); records these maps as the step's latest."""
        current = self.token_maps(maps[0], ctx)
        state["run"].latest = current.detach()
        emb, labels = current.flatten(-2), state["labels"]
        prev = state["previous"]
        if prev is not None and prev.shape == current.shape:
            emb = torch.cat([emb, prev.flatten(-2)], 1)
            labels = torch.cat([labels, labels])
        return ntxent(emb, labels.to(emb.device), self.tau)
