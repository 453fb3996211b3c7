"""SynGen — syntax-guided generation (Rassin et al., "Linguistic Binding in Diffusion Models: Enhancing Attribute
Correspondence through Attention Map Alignment", NeurIPS 2023).

The loss pulls the attention map of each modifier towards its entity's map and pushes both away from every other
word of the prompt. Every detail below follows the official code, read in ``RoyiRa/Linguistic-Binding-in-Diffusion-
Models`` (the authors' repository, formerly ``RoyiRassin/linguistic-binding-in-diffusion-models``):
``compute_loss.py`` (commit 7497ccc) and ``syngen_diffusion_pipeline.py`` (commit 5f40926), plus ``run.py``.

* Maps: every cross-attention layer at 16×16 (SD 1.x at 512 px: ``AttentionStore(attn_res=(16, 16))`` keeps only
  maps of 256 queries, from down, mid and up blocks), averaged over heads and layers (``aggregate_attention``),
  then ×100 (``_get_attention_maps_list``) with *no* softmax over tokens. Here: ``map_requests`` is one
  ``MapRequest(level=L, out_level=L)`` with L the level of ``up-1``; ``map_scale`` = 100.
* Distance: each token map becomes a distribution over pixels (``torch.distributions.Categorical(probs=map)``
  normalises it — so the ×100 cancels and never changes the loss) and ``dist(p, q) = (KL(p‖q) + KL(q‖p)) / 2``
  (``_symmetric_kl``).
* Pairs: an entity with modifiers m_1…m_k (a parse subtree; noun last) gives the pairs (noun, m_j)
  (``split_indices`` + ``itertools.product``). Per pair (``_calculate_losses``):

  - positive ``dist(A_m, A_n)`` (``calculate_positive_loss``);
  - negative ``−½ (1/|U| Σ_{u∈U} dist(A_n, A_u) + 1/|U| Σ_{u∈U} dist(A_m, A_u))`` (``calculate_negative_loss``),
    where U is every token of the prompt between start- and end-of-text (indices 1 … prompt_length−2; never the
    start, end or padding tokens) that is *not in the subtree* — neither the entity nor any of its modifiers
    (``_get_outside_indices``). Each outside token counts alone (a multi-piece outside word is several u's);
    U empty gives 0.

  The loss is the plain sum over all pairs of (positive + negative) (``_attribution_loss``), both with weight 1.
* Multi-piece words: the distance is the **max** over the words' pieces (``calculate_positive_loss`` and
  ``_calculate_outside_loss`` take ``max`` over piece pairs), not the distance of mean-pooled maps (``pieces``).
* No pair (no entity has a modifier): the official code skips the update (``if loss != 0``); here the loss is 0
  with a zero gradient, so the latent does not move.
* Schedule: one update per step, ``z ← z − 20 ∇L`` (``syngen_step_size=20``, constant), at steps ``i < 25`` of 50
  (``if i < 25``, ``max_iter_to_alter=25``); no iterative refinement.

Differences (deliberate): the groups come from unbleed's parser or ``--tokens`` (not the official spaCy rules);
the window is scaled to ``num_steps`` (official: always the first 25 steps); the latent is passed through the
scheduler's ``scale_model_input`` as everywhere in unbleed (an identity for SD's default schedulers); the log is
taken of the distribution clamped at float32's eps (``Categorical`` clamps the same way). The later official option
``include_entities`` (negative-only loss for entities without modifiers, default off) is not implemented.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..errors import UnbleedError
from ..guidance.attention import MapRequest, level_of, resolve_block
from ..guidance.schedule import Schedule
from ..text.tokens import Entity
from .base import Maps, Method, StepContext, register
from .maps import group_map

EPS = torch.finfo(torch.float32).eps  # torch.distributions' clamp_probs uses the dtype's eps


def to_distributions(maps: torch.Tensor, scale: float = 100.0) -> torch.Tensor:
    """``[..., h, w]`` non-negative maps → ``[..., h·w]`` distributions over pixels (``scale`` cancels out)."""
    flat = (maps * scale).flatten(-2)
    return flat / flat.sum(-1, keepdim=True).clamp_min(torch.finfo(flat.dtype).tiny)


def kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``KL(p‖q) = Σ p (log p − log q)`` over the last dim (logs of values clamped at eps; 0·log 0 = 0)."""
    return (p * (p.clamp_min(EPS).log() - q.clamp_min(EPS).log())).sum(-1)


def symmetric_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The paper's distance: ``(KL(p‖q) + KL(q‖p)) / 2`` over the last dim (broadcasting)."""
    return (kl(p, q) + kl(q, p)) / 2


def word_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance of two words given their pieces' distributions ``a`` ``[B, m, N]`` and ``b`` ``[B, n, N]``:
    the max over the m×n piece pairs (official pooling) → ``[B]``."""
    return symmetric_kl(a[:, :, None], b[:, None]).flatten(1).amax(1)


def outside_distance(a: torch.Tensor, outside: torch.Tensor) -> torch.Tensor:
    """Mean over outside tokens ``[B, u, N]`` of the word's (``a`` ``[B, m, N]``, max over pieces) distance."""
    return symmetric_kl(a[:, :, None], outside[:, None]).amax(1).mean(1)


def pair_losses(modifier: torch.Tensor, noun: torch.Tensor, outside: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """One (noun, modifier) pair → (positive ``dist(m, n)``, negative ``−½(mean_u dist(n, u) + mean_u dist(m, u))``)
    per sample; ``outside`` ``None`` (no other word) gives a zero negative term."""
    positive = word_distance(modifier, noun)
    if outside is None or outside.shape[1] == 0:
        return positive, torch.zeros_like(positive)
    negative = -(outside_distance(noun, outside) + outside_distance(modifier, outside)) / 2
    return positive, negative


def syngen_pairs(groups: tuple[Entity, ...] | list[Entity], prompt_length: int
                 ) -> list[tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """``(modifier, noun, outside)`` token indices for every (entity, attribute) pair. ``outside``: the prompt's
    tokens ``1 … prompt_length−2`` not in the entity's subtree (the entity and all its attributes)."""
    pairs = []
    for entity in groups:
        if not entity.attributes:
            continue
        subtree = set(entity.indices).union(*(a.indices for a in entity.attributes))
        outside = tuple(i for i in range(1, prompt_length - 1) if i not in subtree)
        for attr in entity.attributes:
            pairs.append((tuple(attr.indices), tuple(entity.indices), outside))
    return pairs


def syngen_loss(maps: torch.Tensor, pairs: list[tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]],
                scale: float = 100.0, pieces: str = "max", positive_weight: float = 1.0,
                negative_weight: float = 1.0) -> torch.Tensor:
    """``maps`` ``[B, T, h, w]`` → ``[B]``: ``Σ_pairs (w₊·positive + w₋·negative)``; no pair → 0 (zero gradient).

    ``pieces="max"`` uses every piece of a word and the max distance (official); ``"mean"`` pools a word's pieces
    into one mean map first (unbleed's :func:`group_map`).
    """
    total = maps[:, :0].sum((1, 2, 3))  # exact zeros, still part of the graph
    if not pairs:
        return total
    dists = to_distributions(maps, scale)

    def word(indices: tuple[int, ...]) -> torch.Tensor:
        if pieces == "mean" and len(indices) > 1:
            return to_distributions(group_map(maps, indices), scale)[:, None]
        return dists[:, list(indices)]

    for modifier, noun, outside in pairs:
        positive, negative = pair_losses(word(modifier), word(noun), dists[:, list(outside)] if outside else None)
        total = total + positive_weight * positive + negative_weight * negative
    return total


@register
@dataclass
class SynGen(Method):
    """SynGen (Rassin et al., NeurIPS 2023). Options (``-o key=value``), defaults from the official code:

    ``level_block`` maps from every cross-attention layer at this block's resolution (``up-1``: 16×16 in SD at
    512 px); ``map_scale`` the ×100 on the maps; ``pieces`` multi-piece pooling ``max`` | ``mean``;
    ``positive_weight`` / ``negative_weight`` the two terms' weights (1, 1); ``guide_steps`` guided steps out of 50
    (25), scaled to the run's step count. The step size is the run's (``--step-size``; the official constant 20 by
    default).
    """

    name: ClassVar[str] = "syngen"
    source: ClassVar[str] = "Rassin et al., NeurIPS 2023"
    renamed: ClassVar[dict[str, str]] = {"scale": "map_scale"}

    level_block: str = "up-1"
    map_scale: float = 100.0
    pieces: str = "max"
    positive_weight: float = 1.0
    negative_weight: float = 1.0
    guide_steps: int = 25

    def check(self) -> None:
        if not self.level_block.strip():
            raise UnbleedError("-o level_block=: name a block whose resolution to use, e.g. up-1", field="options")
        if not self.map_scale > 0 or self.map_scale == float("inf"):
            raise UnbleedError(f"-o map_scale={self.map_scale}: must be a finite number > 0", field="options")
        if self.pieces not in ("max", "mean"):
            raise UnbleedError(f"-o pieces={self.pieces}: unknown; use max or mean", field="options")
        for key in ("positive_weight", "negative_weight"):
            value = getattr(self, key)
            if not 0.0 <= value < float("inf"):
                raise UnbleedError(f"-o {key}={value}: must be a finite number ≥ 0", field="options")
        if not 0 <= self.guide_steps <= 50:
            raise UnbleedError(f"-o guide_steps={self.guide_steps}: must be in 0..50 (steps out of 50)",
                               field="options")

    def map_requests(self, unet) -> tuple[MapRequest, ...]:
        level = level_of(unet, resolve_block(unet, self.level_block))
        return (MapRequest(blocks=None, level=level, out_level=level),)

    def default_schedule(self, num_steps: int) -> Schedule:
        """Official: ``z ← z − 20 ∇L`` at steps 0…24 of 50, no refinement. For T steps: the first
        ``guide_steps·T // 50`` steps (at least one when ``guide_steps`` > 0), constant step size."""
        end = self.guide_steps * num_steps // 50
        if self.guide_steps > 0:
            end = max(1, end)
        return Schedule(window=(0, min(end, num_steps)), step_size=20.0, step_schedule="constant")

    def prepare_step(self, maps: Maps, ctx: StepContext, run: Any) -> dict[str, Any]:
        """The (modifier, noun, outside) pairs; the prompt's words are the columns ``1 … ctx.prompt_length − 2``."""
        return {"pairs": syngen_pairs(ctx.groups, min(ctx.prompt_length, maps[0].shape[1]))}

    def loss(self, maps: Maps, ctx: StepContext, state: dict[str, Any]) -> torch.Tensor:
        return syngen_loss(maps[0], state["pairs"], self.map_scale, self.pieces, self.positive_weight,
                           self.negative_weight)
