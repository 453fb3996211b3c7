"""A-STAR — Test-time Attention Segregation and Retention (Agarwal et al., "A-STAR: Test-time Attention
Segregation and Retention for Text-to-image Synthesis", ICCV 2023, sec. 4–5). The paper has no public code; this
is the reference.

A-STAR builds on Attend-and-Excite (A&E): the same maps, the same latent update ``z_t ← z_t − α_t ∇L`` with A&E's
schedule and iterative refinement, and two losses on the entity ("concept") maps ``A_m``:

* segregation (Eq. 2): ``L_seg = Σ_{m>n} Σ_ij min(A_m, A_n) / Σ_ij (A_m + A_n)`` — the soft overlap of every pair
  of entity maps; 0 for disjoint maps, 1/2 for identical ones (its maximum: ``Σ min ≤ ½ Σ(A_m + A_n)``);
* retention (Eq. 3): ``L_ret = Σ_m [1 − Σ_ij min(A_m^{t−1}, B_m^t) / Σ_ij (A_m^{t−1} + B_m^t)]`` — the current,
  differentiable map against ``B_m^t``, the binarised map of the *previous* guided step (refreshed every step), so
  what an entity occupied at step t is kept at step t−1. Each term lies in [1/2, 1]; 1/2 only when ``A = B``;
* ``L = L_seg + L_ret`` (Eq. 4);
* with user layout masks (sec. 5) the user's boxes, rasterised to the map grid, replace ``B_m`` at every step.

Choices the paper leaves open (all ``-o`` options; defaults and reasons):

* Maps (A&E's preprocessing, which the paper follows): the maps of every cross-attention layer at UP-1's
  level (16×16 in SD at 512 px — A&E's "16×16 layers", down and up) averaged over heads and layers; the text columns
  ``1 … prompt_length−2`` (start- and end-of-text and padding dropped, A&E's ``normalize_eot``; ``-o
  normalize_eot=false`` keeps columns 1…75, A&E's SD 1.4 code path), ×100 and a softmax over those columns; each
  column smoothed by A&E's 3×3 "Gaussian" (reflect padding) — A&E's code uses ``exp(−((d)/(2σ))²)``, not
  ``exp(−d²/(2σ²))``; we reproduce it (σ = 0.5 → 1-D weights ∝ [e⁻¹, 1, e⁻¹]). A word of several BPE pieces uses
  the mean of its pieces' processed maps (:func:`~unbleed.methods.maps.subject_maps`). Attribute tokens are not used:
  A-STAR's losses are over the prompt's concepts, like A&E's token indices.
* ``B`` — ``binarize="otsu"`` (default; ``mean`` and ``norm:τ`` as in ELA: :func:`~unbleed.methods.maps.binarize`).
  After the ×100 softmax a pixel is mostly won or lost by a token, so the maps are close to two-valued, Otsu's
  case; it adapts to the contrast changing along the trajectory and has no parameter. An empty ``B`` (a constant
  previous map) gives no retention term for that entity: its term would be the constant 1 (no gradient) and would
  only block refinement.
* "Previous step's map": the detached maps the sampler hands to ``prepare_step`` at the previous guided step (the
  text-conditioned pass on that step's ``z_t``, before its update) — kept in the run's own :class:`AStarRun`
  (:meth:`AStar.new_run`); no extra UNet pass.
* First guided step (no previous map): ``first_step="none"`` (default) — no retention term, ``L = L_seg`` (the
  literal reading: Eq. 3 needs a previous step). ``first_step="self"`` binarises the current detached map instead
  (retention then sharpens the step's own layout).
* Refinement compares a normalised loss with the thresholds (``refine_on="normalized"``, default): each pair term
  ×2 and each retention term ``2·term − 1``, averaged — ``2(L − ½·n_ret)/(n_pairs + n_ret)`` ∈ [0, 1], 0 for
  disjoint maps that equal their masks. ``L`` itself has a floor of ½ per retention term and a range that grows
  with the number of entities, so a fixed threshold on ``L`` would mean different things for 2 and 3 entities;
  the normalised value is an affine map of ``L`` at each step (same minimisers). ``refine_on="loss"`` uses ``L``.
* Schedule: A&E's — see :meth:`AStar.default_schedule`.

Audit against the paper (issue 23; sec. 4–5, Eqs. 2–4 and the update ``z_t' = z_t − α_t ∇_{z_t} L``). The losses are
the paper's as written (Eq. 2 over every pair ``m > n``, Eq. 3 against the previous step's binarised map, Eq. 4 an
unweighted sum; the layout boxes of sec. 5 replace ``B``). Everything else departs from it or fills a gap, each an
option:

* Iterative refinement: the paper's update is one gradient step per timestep; refinement at {0, 10, 20} until a
  threshold is ours, taken from A&E (``--refine-steps none`` is the paper's single update), with untuned
  thresholds on our normalised loss (``refine_on``).
* Window and step size: the paper states no α_t nor which timesteps are guided (its ablation argues against
  guiding only a few early steps); ours are A&E's — ``20·sqrt(linspace(1, 0.5, T))`` over the first 25 of 50
  steps (``--window``, ``--step-size``, ``--step-schedule``).
* Binarisation: the paper thresholds the "high-response" region without a value; ours is Otsu's (``binarize``).
* First step: Eq. 3 has no previous map at the first guided step; ours drops the retention term there
  (``first_step``).
* Token columns: the paper does not say; A&E's official SD 1.4 path (the model the paper uses) keeps the padding
  columns in the softmax (columns 1:-1), while our default ``normalize_eot=true`` takes the prompt's words only
  (A&E's SD 2.1 path) on every model — ``-o normalize_eot=false`` is the SD 1.4 path.
* Preprocessing (×100 softmax, ``map_scale``; A&E's 3×3 smoothing; the 16×16 layers): A&E's, which the paper
  builds on but does not spell out; a multi-piece word's map is the mean of its pieces'.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..errors import UnbleedError
from ..guidance.attention import MapRequest, level_of, resolve_block
from ..guidance.schedule import Schedule, first_steps, scaled_steps
from ..text.tokens import Entity
from .base import Maps, Method, StepContext, register
from .maps import EPS, MapOptions, binarize, subject_maps

Box = tuple[float, float, float, float]


# ---------------------------------------------------------------- maps (A&E's preprocessing)

def text_columns(prompt_length: int, tokens: int, normalize_eot: bool = True) -> slice:
    """The token columns A&E's softmax runs over: ``1 … prompt_length−2`` (``normalize_eot``) or ``1 … tokens−2``."""
    return slice(1, prompt_length - 1) if normalize_eot else slice(1, tokens - 1)


def entity_maps(maps: torch.Tensor, groups: tuple[Entity, ...] | list[Entity], prompt_length: int, scale: float = 100.0,
                kernel: int = 3, sigma: float = 0.5, normalize_eot: bool = True) -> torch.Tensor:
    """``maps`` ``[B, 77, h, w]`` (raw probabilities) → ``A_m`` ``[B, n, h, w]``: softmax of ``scale ×`` the text
    columns over those columns, smoothed, each entity the mean of its pieces' maps."""
    cols = text_columns(prompt_length, maps.shape[1], normalize_eot)
    return subject_maps(maps, [e.indices for e in groups], cols.stop, scale, kernel, sigma)


# ---------------------------------------------------------------- losses (Eqs. 2–4)

def soft_overlap(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``Σ_ij min(a, b) / Σ_ij (a + b)`` per map of ``[..., h, w]`` → ``[...]`` (A-STAR's IoU; in [0, ½])."""
    return torch.minimum(a, b).flatten(-2).sum(-1) / ((a + b).flatten(-2).sum(-1) + EPS)


def segregation_loss(ent: torch.Tensor) -> torch.Tensor:
    """Eq. 2: ``ent`` ``[B, n, h, w]`` → ``Σ_{m>n} soft_overlap(A_m, A_n)`` ``[B]`` (0 for a single entity)."""
    total = ent.new_zeros(ent.shape[0])
    for m in range(ent.shape[1]):
        for n in range(m):
            total = total + soft_overlap(ent[:, m], ent[:, n])
    return total


def retention_loss(ent: torch.Tensor, masks: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 3: ``Σ_m [1 − soft_overlap(A_m, B_m)]`` ``[B]`` over the entities with ``valid`` ``[B, n]`` True."""
    terms = 1 - soft_overlap(ent, masks)
    if valid is not None:
        terms = terms * valid.to(terms.dtype)
    return terms.sum(-1)


def astar_loss(ent: torch.Tensor, masks: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 4: ``L = L_seg + L_ret`` per sample."""
    return segregation_loss(ent) + retention_loss(ent, masks, valid)


def normalized_loss(loss: torch.Tensor, n_entities: int, n_retained: torch.Tensor) -> torch.Tensor:
    """``2(L − ½·n_ret)/(n_pairs + n_ret)`` ∈ [0, 1] per sample: the mean of the pair terms ×2 and the retention
    terms ``2·term − 1`` (0 when there is no term at all)."""
    n_ret = n_retained.to(loss.dtype)
    terms = n_entities * (n_entities - 1) / 2 + n_ret
    return torch.where(terms > 0, 2 * (loss - 0.5 * n_ret) / terms.clamp_min(1), torch.zeros_like(loss))


# ---------------------------------------------------------------- user layouts (sec. 5)

def parse_layout(text: str) -> dict[str, Box]:
    """``"cat=0,0,0.5,1;frog=0.5,0,1,1"`` → ``{"cat": (0, 0, .5, 1), "frog": (.5, 0, 1, 1)}``.

    Each item is ``ENTITY=x0,y0,x1,y1``: a box in fractions of the image, x to the right and y down, with
    ``0 ≤ x0 < x1 ≤ 1`` and ``0 ≤ y0 < y1 ≤ 1``. ENTITY is an entity's word (``teddy bear``, ``cat#2`` for the second
    entity with that word). Items are separated by ``;``; an empty text is no layout. Raises a one-line
    :class:`UnbleedError` naming the bad item.
    """
    out: dict[str, Box] = {}
    for item in (text or "").split(";"):
        item = item.strip()
        if not item:
            continue
        name, sep, coords = item.partition("=")
        name = " ".join(name.split())
        if not sep or not name:
            raise UnbleedError(f"--layout {item!r}: use ENTITY=x0,y0,x1,y1 (fractions of the image), "
                               f"e.g. cat=0,0,0.5,1")
        parts = [p.strip() for p in coords.split(",")]
        if len(parts) != 4:
            raise UnbleedError(f"--layout {item!r}: give 4 numbers x0,y0,x1,y1, not {len(parts)}")
        try:
            x0, y0, x1, y1 = (float(p) for p in parts)
        except ValueError:
            raise UnbleedError(f"--layout {item!r}: x0,y0,x1,y1 must be numbers, e.g. cat=0,0,0.5,1") from None
        for label, raw, v in zip(("x0", "y0", "x1", "y1"), parts, (x0, y0, x1, y1)):
            if not (math.isfinite(v) and 0.0 <= v <= 1.0):
                raise UnbleedError(f"--layout {item!r}: {label}={raw} is outside [0, 1] (fractions of the image)")
        if x0 >= x1:
            raise UnbleedError(f"--layout {item!r}: x0={parts[0]} must be < x1={parts[2]}")
        if y0 >= y1:
            raise UnbleedError(f"--layout {item!r}: y0={parts[1]} must be < y1={parts[3]}")
        if name.lower() in (k.lower() for k in out):
            raise UnbleedError(f"--layout {item!r}: {name!r} has a box already: give each entity one box")
        out[name] = (x0, y0, x1, y1)
    return out


def box_mask(box: Box, h: int, w: int) -> torch.Tensor:
    """Rasterise a box to an ``[h, w]`` {0, 1} grid: the cells whose centre lies in ``[x0, x1) × [y0, y1)``; a box
    holding no cell centre gets the one cell that holds its own centre (a box is never empty)."""
    x0, y0, x1, y1 = box
    cx = (torch.arange(w, dtype=torch.float32) + 0.5) / w
    cy = (torch.arange(h, dtype=torch.float32) + 0.5) / h
    m = (((cy >= y0) & (cy < y1))[:, None] & ((cx >= x0) & (cx < x1))[None, :]).float()
    if m.sum() == 0:
        m[min(int((y0 + y1) / 2 * h), h - 1), min(int((x0 + x1) / 2 * w), w - 1)] = 1.0
    return m


def match_layout(layout: dict[str, Box], groups: tuple[Entity, ...] | list[Entity]) -> dict[int, Box]:
    """Which entity (index into ``groups``) each layout name means: its word (case-insensitive), or ``word#k``
    for the k-th entity with that word. Unknown or ambiguous names raise :class:`UnbleedError`."""
    words = [" ".join(e.text.lower().split()) for e in groups]
    out: dict[int, Box] = {}
    for name, box in layout.items():
        word, occurrence = name.lower(), None
        base, hash_, k = word.rpartition("#")
        if hash_ and k.isdigit() and int(k) >= 1:
            word, occurrence = base.strip(), int(k)
        hits = [i for i, w in enumerate(words) if w == word]
        known = ", ".join(dict.fromkeys(e.text for e in groups))
        if not hits:
            raise UnbleedError(f"--layout: {name!r} is not an entity of this prompt: use one of {known}")
        if occurrence is None and len(hits) > 1:
            raise UnbleedError(f"--layout: {name!r} names {len(hits)} entities: use {word}#1..{word}#{len(hits)}")
        if occurrence is not None and occurrence > len(hits):
            raise UnbleedError(f"--layout: {name!r}: there are only {len(hits)} entities {word!r}")
        i = hits[(occurrence or 1) - 1]
        if i in out:
            raise UnbleedError(f"--layout: {name!r}: entity {groups[i].text!r} has a box already")
        out[i] = box
    return out


# ---------------------------------------------------------------- the method

@dataclass
class AStarRun:
    """What A-STAR carries across the steps of one run: ``previous``, the detached processed entity maps
    ``[B, n, h, w]`` of the last guided step (None before the first)."""

    previous: torch.Tensor | None = None


@register
@dataclass
class AStar(MapOptions, Method):
    """A-STAR (Agarwal et al., ICCV 2023). Options (``-o key=value``):

    ``binarize`` B: ``otsu`` | ``mean`` | ``norm:τ``; ``first_step`` retention at the first guided step: ``none`` |
    ``self``; ``layout`` user boxes ``cat=x0,y0,x1,y1;frog=…`` (fractions, y down) replacing B; ``refine_on``
    ``normalized`` | ``loss``; ``layers`` blocks whose maps are averaged (empty: every layer at UP-1's level, A&E);
    :class:`~unbleed.methods.maps.MapOptions` (``map_scale`` the ×100; ``smooth``, ``kernel_size``, ``sigma``
    A&E's smoothing; ``kernel_size=1`` or ``smooth=false`` off); ``normalize_eot``
    softmax over the prompt's words only (else columns 1…75).
    """

    name: ClassVar[str] = "astar"
    source: ClassVar[str] = "Agarwal et al., ICCV 2023"
    renamed: ClassVar[dict[str, str]] = {"softmax_scale": "map_scale", "kernel": "kernel_size"}

    binarize: str = "otsu"
    first_step: str = "none"
    layout: str = ""
    refine_on: str = "normalized"
    layers: tuple[str, ...] = ()
    normalize_eot: bool = True

    def check(self) -> None:
        binarize(torch.zeros(1, 2, 2), self.binarize)  # raises on an unknown B
        if self.first_step not in ("none", "self"):
            raise UnbleedError(f"-o first_step={self.first_step}: unknown; use none or self", field="options")
        if self.refine_on not in ("normalized", "loss"):
            raise UnbleedError(f"-o refine_on={self.refine_on}: unknown; use normalized or loss", field="options")
        self.check_maps()
        parse_layout(self.layout)

    def map_requests(self, unet) -> tuple[MapRequest, ...]:
        level = level_of(unet, resolve_block(unet, "up-1"))  # 16×16 in SD at 512 px
        if not self.layers:
            return (MapRequest(blocks=None, level=level, out_level=level),)
        blocks = tuple(dict.fromkeys(resolve_block(unet, b) for b in self.layers))
        return (MapRequest(blocks=blocks, out_level=level),)

    def default_schedule(self, num_steps: int) -> Schedule:
        """A&E's schedule (the paper follows A&E): guide the first half of the steps (25 of 50), refine at A&E's
        steps {0, 10, 20} (scaled to T) while the normalised loss is above {0.5, 0.4, 0.3}, ≤ 20 iterations;
        ``α_i = 20·sqrt(linspace(1, 0.5, T)[i])``. The thresholds are ours and **untuned** (no real model here):
        loose early, tighter later, as A&E's. At step 0 (no retention term by default) 0.5 means a mean soft
        overlap ≤ ¼ per pair. With ``refine_on=loss`` pass ``--refine-steps`` on ``L``'s scale."""
        window = first_steps(num_steps)
        return Schedule(window=window, refine=scaled_steps({0: 0.5, 10: 0.4, 20: 0.3}, num_steps, window),
                        max_refine_iters=20, step_size=20.0, step_schedule="sqrt-linear")

    def new_run(self, unet) -> AStarRun:
        """A run starts with no previous map (the first guided step has no retention term unless
        ``first_step=self``)."""
        return AStarRun()

    def entity_maps(self, maps: torch.Tensor, groups: tuple[Entity, ...] | list[Entity],
                    prompt_length: int) -> torch.Tensor:
        """``A_m`` ``[B, n, h, w]`` of one ``[B, 77, h, w]`` tensor of raw maps."""
        return entity_maps(maps, groups, prompt_length, self.map_scale, self.smoothing_kernel, self.sigma,
                           self.normalize_eot)

    def prepare_step(self, maps: Maps, ctx: StepContext, run: AStarRun | None) -> dict[str, Any]:
        """``B_m`` from ``run.previous`` (the previous guided step's maps), then ``run.previous`` ← this step's
        detached maps. ``run`` None (direct use outside a run): no previous map, nothing kept."""
        groups = ctx.groups
        if not groups:
            raise UnbleedError("astar needs at least one entity: pass --tokens, e.g. --tokens cat,frog")
        a = maps[0]
        length = min(ctx.prompt_length, a.shape[1])
        last = max(i for e in groups for g in [e, *e.attributes] for i in g.indices)
        if self.normalize_eot and not 1 <= min(i for e in groups for i in e.indices) <= last <= length - 2:
            raise UnbleedError(f"astar: a token index lies outside the prompt's word tokens 1..{length - 2}")
        ent = self.entity_maps(a, groups, length)
        batch, n, h, w = ent.shape
        masks = torch.zeros_like(ent)
        valid = torch.zeros(batch, n, dtype=torch.bool, device=ent.device)
        previous = run.previous if run is not None else None
        source = None
        if previous is not None and previous.shape == ent.shape:
            source = previous  # B^t from the previous guided step (Eq. 3)
        elif self.first_step == "self":
            source = ent
        if source is not None:
            masks = binarize(source, self.binarize)
            valid = masks.flatten(-2).sum(-1) > 0  # an empty B gives no term
        for i, box in match_layout(parse_layout(self.layout), groups).items():
            masks[:, i] = box_mask(box, h, w).to(masks)
            valid[:, i] = True
        if run is not None:
            run.previous = ent.detach()
        return {"masks": masks, "valid": valid, "prompt_length": length}

    def loss(self, maps: Maps, ctx: StepContext, state: dict[str, Any]) -> torch.Tensor:
        ent = self.entity_maps(maps[0], ctx.groups, state["prompt_length"])
        return astar_loss(ent, state["masks"], state["valid"])

    def refine_value(self, maps: Maps, ctx: StepContext, state: dict[str, Any],
                     loss: torch.Tensor) -> torch.Tensor:
        if self.refine_on == "loss":
            return loss
        return normalized_loss(loss, len(ctx.groups), state["valid"].sum(-1))

    def visuals(self, state: dict[str, Any], ctx: StepContext) -> dict[str, torch.Tensor]:
        """``B_m`` per entity (the retention target of this step); none for an entity without one."""
        out = {}
        for i, entity in enumerate(ctx.groups):
            if state["valid"][:, i].any():
                out[f"mask: {entity.text}"] = state["masks"][:, i]
        return out
