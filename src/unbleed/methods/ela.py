"""ELA — Entity Localization and Anchoring (Zhang et al., "Easing Concept Bleeding in Diffusion via Entity
Localization and Anchoring", ICML 2024, sec. 4 and Alg. 1). The paper has no public code; this is the reference.

Localization (once per timestep, from detached maps, fixed through the step's refinement iterations):

* background mask ``M_bk = B(A⁰)`` from the start-of-text token's map (sec. 4.1);
* entity masks ``D_i = B(A^{e_i} − max_{j≠i} A^{e_j})`` (Eq. 4, generalised from two entities to n; with one
  entity the max over the empty set is 0) and ``M^{e_i} = B(D_i − M_bk)``. ``D_i`` and ``M_bk`` are binary, so
  ``D_i − M_bk ∈ {−1, 0, 1}`` and any threshold in (0, 1] gives ``M^{e_i} = D_i ∧ ¬M_bk``; we compute exactly that.
* disjoint masks: the paper's entity masks are pairwise disjoint (each pixel belongs to at most one entity). With
  two entities ``B`` on ``A¹ − A²`` and on ``A² − A¹`` splits the pixels in two, but with three or more Otsu's
  threshold on a difference map is usually below 0, so ``D_i`` also takes pixels where entity i is not the most
  attended, and masks overlap (173 of 200 synthetic three-blob scenes, tests/test_ela.py). The paper is silent on the rule; ours: a
  pixel claimed by several masks stays only in the mask of the claimant with the largest ``A^{e_i} − max_{j≠i}
  A^{e_j}`` there, i.e. the most attended claimant (ties: the first entity). Masks that were already disjoint —
  two entities, in practice — are unchanged (:func:`ela_masks`).

Anchoring (Eqs. 5–7), over the set of anchored tokens (entities, plus each attribute with its entity's mask —
sec. 4, "Attribute binding"), n of them:

* ``L_c = 1/n Σ_k (1 − Σ(M_k·A_k) / ΣA_k)²`` (Eq. 5) concentrates each token's attention inside its mask;
* ``L_a = 1/n Σ_k ‖(1 − M_k)·A_k‖²₂`` (Eq. 6) attenuates it outside;
* ``L = (1 − λ) L_c + λ L_a`` (Eq. 7).

Choices the paper leaves open (all options; reasons in docs/ela.md):

* ``B`` — ``binarize="otsu"`` (default): Otsu's threshold per map (256-bin histogram of the min–max normalised
  map). It is parameter-free, adapts to each step's contrast (maps sharpen over the trajectory, so a fixed
  threshold is wrong early or late), and the maps it thresholds — the SOT map and entity-difference maps — are
  bimodal by construction. ``"mean"`` (above the map's mean) and ``"norm:τ"`` (min–max normalise, keep > τ) are
  the alternatives (all in :func:`~unbleed.methods.maps.binarize`, shared with A-STAR).
* Empty masks — a constant map, or an entity dominated everywhere, gives ``D_i`` or ``M^{e_i}`` empty; then L_c's
  term is a constant 1 and L_a would only push the entity's attention down everywhere, erasing it. With
  ``empty_mask="topk"`` (default) the mask becomes the ``topk_frac`` of pixels (at least one) where the entity
  is least dominated (highest ``A^{e_i} − max_j A^{e_j}``), outside the background when any such pixel exists.
  ``empty_mask="skip"`` drops the entity (and its attributes) from the loss at that step instead.
* Maps: 16×16 cross-attention maps (in SD at 512 px), averaged over the heads and layers of ``layers`` (default
  ``up-1``, the paper's best in Table 2), maps of other resolutions resized (bilinear) to that size. A word of
  several BPE pieces uses the mean of its pieces' maps. Maps are the raw softmax probabilities over all 77 text
  tokens, as the paper's A (no ×100 re-softmax as in Attend-and-Excite).
* λ = 0.5 (the two terms equally weighted); schedule in :meth:`ELA.default_schedule`.
* Start step ``T_start`` (Alg. 1: anchoring starts "following several rounds of sampling"; Figure 5: the earliest
  maps carry no layout yet): ``start`` (a step at 50 steps, scaled to T as ``⌊s·T/50⌋``) — masks are built and
  anchoring applied from that step on; before it the steps are plain sampling. The paper gives no value. Our
  default is 10 (a fifth of the steps, then a third of the guided window): on the shapes world's train split
  (``scripts/shapes_tune.py --method ela --vary "start=5;10"``, docs/ela.md) masks from step 0 or 5 raised
  neglect measurably and step 10 did not, at 0.82× the time; step 0 stays available as ``-o start=0``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ..errors import UnbleedError
from ..guidance.attention import MapRequest, level_of, resolve_block
from ..guidance.schedule import Schedule, first_steps, scaled_steps
from ..text.tokens import Entity
from .base import Maps, Method, StepContext, register
from .maps import EPS, binarize, group_map

REFERENCE_STEPS = 50  # schedules and ``start`` are given at 50 steps
REFINE = {0: 0.2, 10: 0.1, 20: 0.05}  # our refinement thresholds at 50 steps (docs/ela.md)


def ela_masks(sot: torch.Tensor, entities: torch.Tensor, how: str = "otsu", empty: str = "topk",
              topk_frac: float = 0.05) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Localization (sec. 4.1, Eq. 4): ``sot`` ``[B, h, w]``, ``entities`` ``[B, n, h, w]`` →
    (``M_bk`` ``[B, h, w]``, ``M^{e_i}`` ``[B, n, h, w]``, ``valid`` ``[B, n]`` bool).

    The entity masks are pairwise disjoint: a pixel claimed by several ``D_i ∧ ¬M_bk`` is kept by the claimant
    with the largest ``A^{e_i} − max_{j≠i} A^{e_j}`` (ties: the lower index); a ``topk`` fallback mask takes no
    pixel of another entity's mask (nor of the background) while a free one exists.
    ``valid`` is False only for an entity whose mask was empty under ``empty="skip"``.
    """
    bk = binarize(sot, how)
    n = entities.shape[1]
    if n > 1:
        others = torch.stack([torch.cat([entities[:, :i], entities[:, i + 1:]], 1).amax(1) for i in range(n)], 1)
        diff = entities - others  # A^{e_i} − max_{j≠i} A^{e_j}
    else:
        diff = entities
    d = binarize(diff, how)  # D_i (Eq. 4)
    masks = (d - bk[:, None]).clamp(0, 1)  # M^{e_i} = B(D_i − M_bk) = D_i ∧ ¬M_bk
    if n > 1:  # disjoint: a pixel claimed by several masks goes to the claimant with the largest difference
        claim = diff.masked_fill(masks == 0, float("-inf")).argmax(1)
        masks = masks * F.one_hot(claim, n).permute(0, 3, 1, 2).to(masks)
    empty_mask = masks.flatten(-2).sum(-1) == 0
    valid = torch.ones_like(empty_mask)
    if empty_mask.any():
        if empty == "skip":
            valid = ~empty_mask
        elif empty == "topk":
            pixels = diff.shape[-1] * diff.shape[-2]
            k = min(max(1, round(topk_frac * pixels)), pixels)
            for i in range(n):  # one entity after the other, each avoiding the pixels taken so far
                if not empty_mask[:, i].any():
                    continue
                taken = (bk + masks.sum(1)).clamp(max=1).flatten(1)  # background or another entity's mask
                has_free = (taken == 0).any(-1, keepdim=True)
                score = diff[:, i].flatten(1).masked_fill((taken > 0) & has_free, float("-inf"))
                top = torch.zeros_like(score).scatter_(-1, score.topk(k, dim=-1).indices, 1.0)
                top = top * torch.isfinite(score).float()  # never pick a taken pixel when free ones exist
                masks[:, i] = torch.where(empty_mask[:, i, None, None], top.view_as(masks[:, i]), masks[:, i])
        else:
            raise UnbleedError(f"-o empty_mask={empty}: unknown; use topk or skip", field="options")
    return bk, masks, valid


def ela_loss(maps: torch.Tensor, masks: torch.Tensor, lam: float, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Anchoring loss (Eqs. 5–7) per sample: ``maps``/``masks`` ``[B, n, h, w]`` → ``[B]``.

    ``L = (1 − λ) · 1/n Σ_k (1 − Σ M_k A_k / Σ A_k)² + λ · 1/n Σ_k ‖(1 − M_k) A_k‖²``; tokens with
    ``valid`` False are left out of both means (a sample with none left has loss 0).
    """
    inside = (masks * maps).flatten(-2).sum(-1) / (maps.flatten(-2).sum(-1) + EPS)
    l_c = (1 - inside) ** 2  # Eq. 5, per token
    l_a = ((1 - masks) * maps).flatten(-2).pow(2).sum(-1)  # Eq. 6, per token
    per_token = (1 - lam) * l_c + lam * l_a  # Eq. 7, per token
    if valid is None:
        return per_token.mean(-1)
    w = valid.float()
    return (per_token * w).sum(-1) / w.sum(-1).clamp_min(1)


@register
@dataclass
class ELA(Method):
    """Entity Localization and Anchoring (Zhang et al., ICML 2024). Options (``-o key=value``):

    ``layers`` blocks whose maps are averaged (Table 2: ``up-1`` default, ``down-2``, ``down-3``, ``up-2``);
    ``lam`` λ of Eq. 7; ``binarize`` B: ``otsu`` | ``mean`` | ``norm:τ``; ``empty_mask`` ``topk`` | ``skip``;
    ``topk_frac`` size of a fallback mask; ``attributes`` anchor attribute tokens with their entity's mask;
    ``start`` T_start, the first anchored step (at 50 steps; default 10, tuned on the shapes train split).
    """

    name: ClassVar[str] = "ela"
    source: ClassVar[str] = "Zhang et al., ICML 2024"

    layers: tuple[str, ...] = ("up-1",)
    lam: float = 0.5
    binarize: str = "otsu"
    empty_mask: str = "topk"
    topk_frac: float = 0.05
    attributes: bool = True
    start: int = 10

    def check(self) -> None:
        if not 0 <= self.start < REFERENCE_STEPS // 2:
            raise UnbleedError(f"-o start={self.start}: T_start must be a step in 0..{REFERENCE_STEPS // 2 - 1} "
                               f"(counted at {REFERENCE_STEPS} steps, inside the guided first half)", field="options")
        if not 0.0 <= self.lam <= 1.0:
            raise UnbleedError(f"-o lam={self.lam}: λ must be in [0, 1]", field="options")
        if not 0.0 < self.topk_frac <= 1.0:
            raise UnbleedError(f"-o topk_frac={self.topk_frac}: must be in (0, 1]", field="options")
        if self.empty_mask not in ("topk", "skip"):
            raise UnbleedError(f"-o empty_mask={self.empty_mask}: unknown; use topk or skip", field="options")
        binarize(torch.zeros(1, 2, 2), self.binarize)  # raises on an unknown B
        if not self.layers:
            raise UnbleedError("-o layers=: name at least one block, e.g. up-1", field="options")

    def map_requests(self, unet) -> tuple[MapRequest, ...]:
        blocks = tuple(dict.fromkeys(resolve_block(unet, b) for b in self.layers))
        up1 = resolve_block(unet, "up-1")  # maps are compared at UP-1's size (16×16 in SD at 512 px)
        return (MapRequest(blocks=blocks, out_level=level_of(unet, up1)),)

    def default_schedule(self, num_steps: int) -> Schedule:
        """Eq. 8's update ``z_t' = z_t − ∇_{z_t} L``: a unit step, no α (``--step-size 20 --step-schedule
        sqrt-linear`` gives Attend-and-Excite's ``20·sqrt(linspace(1, 0.5, T))`` instead). The paper gives no
        window, refinement steps or thresholds (docs/ela.md); ours, for T steps: guide the first half (A&E's 25 of
        50); refine at A&E's steps {0, 10, 20} (scaled to T) until L ≤ {0.2, 0.1, 0.05}, ≤ 20 iterations.

        With ``start`` (T_start) the window begins at the start step (scaled to T); refinement steps before it are
        dropped and the start step refines with the threshold in force there (the last of {0, 10, 20} at or before
        it): ``start=15`` → refine at {15: 0.1, 20: 0.05}."""
        window = (self.start_step(num_steps), first_steps(num_steps)[1])
        at50 = {s: thr for s, thr in REFINE.items() if s >= self.start}
        at50.setdefault(self.start, REFINE[max(s for s in REFINE if s <= self.start)])
        return Schedule(window=window, refine=scaled_steps(at50, num_steps, window),
                        max_refine_iters=20, step_size=1.0, step_schedule="constant")

    def start_step(self, num_steps: int) -> int:
        """T_start at ``num_steps`` steps: ``⌊start·T/50⌋``, at most the last step of the guided first half."""
        return min(self.start * num_steps // REFERENCE_STEPS, first_steps(num_steps)[1] - 1)

    def _anchored(self, maps: torch.Tensor, groups: tuple[Entity, ...]) -> tuple[torch.Tensor, list[int]]:
        """Maps of the anchored tokens and, for each, the index of the entity whose mask it uses."""
        tokens, owner = [], []
        for i, entity in enumerate(groups):
            tokens.append(group_map(maps, entity.indices))
            owner.append(i)
            if self.attributes:
                for attr in entity.attributes:
                    tokens.append(group_map(maps, attr.indices))
                    owner.append(i)
        return torch.stack(tokens, 1), owner

    def prepare_step(self, maps: Maps, ctx: StepContext, run: Any) -> dict[str, Any]:
        """Localization (sec. 4.1): ``M_bk`` and the entity masks ``M^{e_i}`` from the detached maps, fixed
        through the step's refinement iterations."""
        if not ctx.groups:
            raise UnbleedError("ela needs at least one entity: pass --tokens, e.g. --tokens cat,frog")
        if ctx.step < self.start_step(ctx.num_steps):  # before T_start (an explicit --window may reach here)
            return {"anchoring": False}
        a = maps[0]
        entities = torch.stack([group_map(a, e.indices) for e in ctx.groups], 1)
        bk, masks, valid = ela_masks(a[:, 0], entities, self.binarize, self.empty_mask, self.topk_frac)
        if not valid.all():
            warnings.warn("ela: an entity mask was empty; that entity is left out of this step's loss "
                          "(-o empty_mask=skip)", stacklevel=2)
        return {"anchoring": True, "background": bk, "masks": masks, "valid": valid}

    def loss(self, maps: Maps, ctx: StepContext, state: dict[str, Any]) -> torch.Tensor:
        if not state.get("anchoring", True):  # before T_start: no anchoring (a zero loss, no update)
            return maps[0].flatten(1).sum(-1) * 0
        anchored, owner = self._anchored(maps[0], ctx.groups)
        masks = state["masks"][:, owner]
        valid = state["valid"][:, owner]
        return ela_loss(anchored, masks, self.lam, valid)

    def visuals(self, state: dict[str, Any], ctx: StepContext) -> dict[str, torch.Tensor]:
        if not state.get("anchoring", True):
            return {}
        out = {"background mask": state["background"]}
        for i, entity in enumerate(ctx.groups):
            out[f"mask: {entity.text}"] = state["masks"][:, i]
        return out
