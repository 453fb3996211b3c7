"""Divide & Bind (Li, Keuper, Zhang, Khoreva, "Divide & Bind Your Attention for Improved Generative Semantic
Nursing", BMVC 2023), faithful to the official code, boschresearch/Divide-and-Bind:
``divide_and_bind/pipeline_divide_and_bind_latest.py`` (commit 961b9ab; ``AttentionStore.aggregate_attention``,
``aggregate_attention_intermediate``, ``_compute_loss_geiven_attn_map``, ``_perform_iterative_refinement_step``,
``__call__``, ``default_param``, ``GaussianSmoothing``), whose loss code is the same as the first release's
``pipeline_divide_and_bind.py`` with ``config.py`` and ``utils/test_utils.py`` (commit 212a28b).

Maps (``_compute_attention_loss``, ``_compute_loss_geiven_attn_map``):

* object maps: every cross-attention layer at the 16×16 level (SD at 512 px; the level of ``up-1``: down and up
  blocks, the 8×8 mid block is not at that level), averaged over heads and layers; token columns ``1:-1`` of
  the 77 (start-of-text and the last padding column dropped, end-of-text and the other padding kept), ×100,
  softmax over those tokens; each map smoothed by a 3×3 Gaussian, σ = 0.5, reflect padding. The kernel is the
  official ``exp(−((x − μ)/(2σ))²)``, normalised (not ``exp(−(x − μ)²/(2σ²))``), reproduced as written;
* attribute maps (``aggregate_attention_intermediate(res=16, from_res=(64, 32))``): the cross-attention layers
  of the *finer* levels (64×64 and 32×32 in SD at 512 px), each level nearest-resized to the object maps' size
  and averaged, then the same ``1:-1``, ×100, softmax and smoothing.

Losses, per sample (``s`` runs over the entities, ``r`` over an entity's attributes):

* attendance (Eq. 2): ``TV(A_s)`` as the official code computes it, ``L1(A[:, :-1], A[:, 1:]) +
  L1(A[-1:, :], A[1:, :])`` (means): a horizontal finite difference plus, through broadcasting, the mean
  distance of rows 1…h−1 to the *last* row — not the vertical finite difference ``L1(A[:-1, :], A[1:, :])`` of
  the paper's TV. The default is the official code's score (``tv="official"``), because the refinement thresholds
  below are the official code's and were set on that score: the two are one pair. ``tv="paper"`` is the paper's
  finite-difference TV (the mean absolute horizontal plus vertical neighbour differences); it is much smaller on
  the same maps (about 0.08–0.12 against 0.14–0.36 on smoothed blobs), so under the official thresholds refinement
  at steps 10 and 20 nearly always ran to its 50-iteration cap (docs/performance.md). Neither the paper nor the
  code gives thresholds for the paper's score: with ``tv=paper`` give them (``-o tv_thresholds=…``, or ``none``);
  they are not inferred;
* binding (Eq. 3): ``Ã_r = A_r / max A_r · max A_s``; ``p = softmax(A_s)``, ``q = softmax(Ã_r)`` over pixels;
  both shifted as ``relu(· − k·max p) + 1e-5`` with ``k = 0.3`` if ``TV(A_s) < 0.1`` else ``0.2``; then
  ``JSD(p, q) = ½ KL(p‖m) + ½ KL(q‖m)``, ``m = ½(p + q)`` (sums; ``p``, ``q`` are not renormalised after the
  shift, as in the official ``jenson_shannon_divergence``);
* total: the official code folds both into one term per entity and takes the worst, ``L = max_s (−TV(A_s) +
  λ_t Σ_r JSD_{r,s})`` (``combine="max"``); without attributes this is ``−min_s TV(A_s)``, Eq. 2.
  ``combine="sum"`` gives ``−min_s TV(A_s) + λ_t Σ_s Σ_r JSD_{r,s}``. The binding weight ``λ_t`` is 1 for steps
  < 10, 5 for steps < 20 and 10 after (official ``coef`` for ``tv_bind``), step boundaries scaled to T steps
  (``⌊s·T/50⌋``).

Schedule (official ``__call__`` and ``default_param("tv_bind")``): ``α_i = 20·sqrt(linspace(1, 0.5, T)[i])`` for
the first 25 of 50 steps; iterative refinement at steps {0, 10, 20} while ``min_s TV(A_s)`` is *below*
{0.05, 0.2, 0.3} (on the official score, ``tv=official``), at most 50 iterations, 100 at step 0
(``_perform_iterative_refinement_step`` defaults of the latest file; the first release used 20 and 50). Each step's
refinement iterations are in the run's per-step record (``--json``: ``guidance[i].refine_iters``). The sampler refines while ``refine_value`` is *above* the
threshold, so ``refine_value`` is ``−min_s TV(A_s)`` and :meth:`DivideBind.default_schedule` stores the
thresholds negated (−0.05, −0.2, −0.3); thresholds given on the command line are on that scale too.

Differences from the official code, all forced by the seams or generalising it (and options where a choice
exists): entities and attributes may span several BPE pieces (a group's map is the mean of its pieces'
softmaxed maps, then smoothed) and an entity may have several attributes (their JSDs add; the official code
takes one attribute token per object); the finer levels are averaged level by level — equal to the official
average over layers when each finer level has as many layers (5 and 5 in SD 1.x/2.x); every sample is its own
problem (the official latest pipeline also loops over samples).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ..errors import UnbleedError
from ..guidance.attention import MapRequest, cross_attention_layers, level_of, resolve_block
from ..guidance.joint_attention import is_joint
from ..guidance.schedule import Schedule, first_steps, scaled_steps
from .base import Maps, Method, StepContext, register
from .maps import MapOptions

REFERENCE_STEPS = 50  # the official schedule's step count; step options are given at 50 steps
OFFICIAL_THRESHOLDS = {0: 0.05, 10: 0.2, 20: 0.3}  # min-TV refinement thresholds, set on the official score


def total_variation(a: torch.Tensor, mode: str = "official") -> torch.Tensor:
    """``TV`` of each map of ``a`` ``[..., h, w]`` → ``[...]`` (Eq. 2, mean-normalised as the official L1Loss).

    ``official``: ``mean|A[i, j] − A[i, j+1]| + mean_{i ≥ 1}|A[h−1, j] − A[i, j]|`` (the official
    ``L1(A[-1:, :], A[1:, :])`` broadcasts the last row); ``paper``: ``mean|A[i, j] − A[i, j+1]| +
    mean|A[i, j] − A[i+1, j]|``.
    """
    horizontal = (a[..., :, :-1] - a[..., :, 1:]).abs().mean((-2, -1))
    if mode == "official":
        vertical = (a[..., -1:, :] - a[..., 1:, :]).abs().mean((-2, -1))
    elif mode == "paper":
        vertical = (a[..., :-1, :] - a[..., 1:, :]).abs().mean((-2, -1))
    else:
        raise UnbleedError(f"-o tv={mode}: unknown; use official or paper", field="options")
    return horizontal + vertical


def jensen_shannon(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``½ Σ p log(p/m) + ½ Σ q log(q/m)``, ``m = ½(p + q)``, over the last dimension (the official
    ``jenson_shannon_divergence``: ``KLDivLoss(reduction="batchmean", log_target=True)`` on one row = a sum)."""
    log_m = (0.5 * (p + q)).log()
    return 0.5 * ((p * (p.log() - log_m)).sum(-1) + (q * (q.log() - log_m)).sum(-1))


def binding_divergence(obj: torch.Tensor, attr: torch.Tensor, obj_tv: torch.Tensor, quantile: float = 0.2,
                       quantile_low_tv: float = 0.3, low_tv: float = 0.1, eps: float = 1e-5) -> torch.Tensor:
    """Binding term (Eq. 3) per sample: ``obj``/``attr`` ``[B, h, w]`` (processed maps), ``obj_tv`` ``[B]`` → ``[B]``.

    ``Ã_r = A_r / max A_r · max A_s``; ``p = softmax(A_s)``, ``q = softmax(Ã_r)`` over pixels; with ``k =
    quantile_low_tv`` where ``TV(A_s) < low_tv`` else ``quantile``, ``p̃ = relu(p − k·max p) + eps`` and
    ``q̃ = relu(q − k·max p) + eps`` (both shifted by the *object's* maximum, as the official code);
    ``JSD(p̃, q̃)``.
    """
    o = obj.flatten(1)
    r = attr.flatten(1)
    r = r / r.amax(1, keepdim=True).clamp_min(1e-12) * o.amax(1, keepdim=True)
    p = torch.softmax(o, dim=1)
    q = torch.softmax(r, dim=1)
    k = torch.where(obj_tv.detach() < low_tv, torch.full_like(obj_tv, quantile_low_tv),
                    torch.full_like(obj_tv, quantile))[:, None]
    thresh = k * p.amax(1, keepdim=True)
    return jensen_shannon(F.relu(p - thresh) + eps, F.relu(q - thresh) + eps)


def divide_bind_loss(tv: torch.Tensor, bind: torch.Tensor, weight: float, combine: str = "max") -> torch.Tensor:
    """Total loss per sample from ``tv`` and ``bind`` ``[B, entities]`` (``bind``: the sum of each entity's
    attribute JSDs, 0 without attributes). ``max``: ``max_s(−TV_s + λ·bind_s)`` (official); ``sum``:
    ``−min_s TV_s + λ·Σ_s bind_s``."""
    if combine == "max":
        return (-tv + weight * bind).amax(-1)
    if combine == "sum":
        return -tv.amin(-1) + weight * bind.sum(-1)
    raise UnbleedError(f"-o combine={combine}: unknown; use max or sum", field="options")


def parse_step_values(items: tuple, option: str) -> dict[int, float]:
    """``("0:1", "10:5")`` → ``{0: 1.0, 10: 5.0}`` (steps at 50 steps), raising an error naming ``option``."""
    out: dict[int, float] = {}
    for item in items:
        text = str(item).strip()
        step, sep, value = text.partition(":")
        try:
            s, v = int(step), float(value)
        except ValueError:
            s, v = -1, float("nan")
        if not sep or not 0 <= s < REFERENCE_STEPS or not math.isfinite(v):
            raise UnbleedError(f"-o {option}: {text!r} is not STEP:VALUE with a step in 0..{REFERENCE_STEPS - 1} "
                               f"(counted at {REFERENCE_STEPS} steps) and a finite value, e.g. 10:0.2",
                               field="options")
        if s in out:
            raise UnbleedError(f"-o {option}: step {s} is given twice", field="options")
        out[s] = v
    return dict(sorted(out.items()))


@register
@dataclass
class DivideBind(MapOptions, Method):
    """Divide & Bind (Li et al., BMVC 2023). Options (``-o key=value``; defaults are the official code's):

    :class:`~unbleed.methods.maps.MapOptions` (``map_scale``, ×100 before the token softmax; ``smooth``,
    ``kernel_size``, ``sigma``); ``exclude_padding`` (False: official columns ``1:-1``;
    True: ``1…prompt_length−2``, Attend-and-Excite's); ``tv``
    (``official`` | ``paper``); ``bind`` (the binding term; False is the official ``tv`` mode);
    ``attribute_maps`` (``finer``: official, from the finer levels | ``same``: the object maps' level);
    ``combine`` (``max`` | ``sum``); ``bind_weights`` (STEP:λ at 50 steps); ``quantile``, ``quantile_low_tv``,
    ``low_tv``, ``eps`` (the binding shift); ``guide_steps`` (of 50),
    ``tv_thresholds`` (STEP:min-TV at 50 steps; ``official``: the official {0: 0.05, 10: 0.2, 20: 0.3}, for the
    official score only; ``none``: no refinement), ``refine_iters``, ``refine_iters_first`` (at step 0). The step
    size and its schedule are the run's (``--step-size``, ``--step-schedule``; official: 20, sqrt-linear).
    """

    name: ClassVar[str] = "divide-bind"
    source: ClassVar[str] = "Li et al., BMVC 2023"
    renamed: ClassVar[dict[str, str]] = {"temperature": "map_scale"}

    exclude_padding: bool = False
    tv: str = "official"
    bind: bool = True
    attribute_maps: str = "finer"
    combine: str = "max"
    bind_weights: tuple[str, ...] = ("0:1", "10:5", "20:10")
    quantile: float = 0.2
    quantile_low_tv: float = 0.3
    low_tv: float = 0.1
    eps: float = 1e-5
    guide_steps: int = 25
    tv_thresholds: tuple[str, ...] = ("official",)  # OFFICIAL_THRESHOLDS, for tv=official only
    refine_iters: int = 50
    refine_iters_first: int = 100

    def check(self) -> None:
        self.check_maps()
        choices = {"tv": ("official", "paper"), "attribute_maps": ("finer", "same"), "combine": ("max", "sum")}
        for option, allowed in choices.items():
            if getattr(self, option) not in allowed:
                raise UnbleedError(f"-o {option}={getattr(self, option)}: unknown; use {' or '.join(allowed)}",
                                   field="options")
        for option in ("quantile", "quantile_low_tv"):
            if not 0.0 <= getattr(self, option) <= 1.0:
                raise UnbleedError(f"-o {option}={getattr(self, option)}: must be in [0, 1]", field="options")
        if not math.isfinite(self.low_tv) or self.low_tv < 0:
            raise UnbleedError(f"-o low_tv={self.low_tv}: must be a finite number ≥ 0", field="options")
        if not math.isfinite(self.eps) or self.eps <= 0:
            raise UnbleedError(f"-o eps={self.eps}: must be a finite number > 0", field="options")
        if not 1 <= self.guide_steps <= REFERENCE_STEPS:
            raise UnbleedError(f"-o guide_steps={self.guide_steps}: must be in 1..{REFERENCE_STEPS} "
                               f"(steps guided out of {REFERENCE_STEPS})", field="options")
        for option in ("refine_iters", "refine_iters_first"):
            if getattr(self, option) < 0:
                raise UnbleedError(f"-o {option}={getattr(self, option)}: must be ≥ 0", field="options")
        weights = parse_step_values(self.bind_weights, "bind_weights")
        if not weights or 0 not in weights:
            raise UnbleedError("-o bind_weights: give the weight from step 0 on, e.g. bind_weights=0:1,10:5,20:10",
                               field="options")
        if any(w < 0 for w in weights.values()):
            raise UnbleedError("-o bind_weights: weights must be ≥ 0", field="options")
        self.thresholds()

    def thresholds(self) -> dict[int, float]:
        """The refinement thresholds on ``min_s TV`` (steps at 50 steps): ``tv_thresholds``, or the official ones
        (``official``, the default) with ``tv=official``, the score they were set on; ``none``: no refinement."""
        if tuple(t.lower() for t in self.tv_thresholds) in ((), ("none",)):
            return {}
        if tuple(t.lower() for t in self.tv_thresholds) == ("official",):
            if self.tv != "official":
                raise UnbleedError(f"-o tv={self.tv}: the official refinement thresholds were set on the official "
                                   f"score; give thresholds on this score's scale (-o tv_thresholds=STEP:MIN_TV,…) "
                                   f"or -o tv_thresholds=none", field="options")
            return dict(OFFICIAL_THRESHOLDS)
        return parse_step_values(self.tv_thresholds, "tv_thresholds")

    # --- schedule ---------------------------------------------------------------------------------------------

    def default_schedule(self, num_steps: int) -> Schedule:
        """Official: guide the first ``guide_steps`` of 50 steps (scaled to T: ``⌊25·T/50⌋``, at least 1), step
        size ``20·sqrt(linspace(1, 0.5, T))``, refine at {0, 10, 20} (scaled) while ``min TV`` is below {0.05,
        0.2, 0.3} — stored negated, since the sampler refines while ``refine_value = −min TV`` is above the
        threshold — at most 50 iterations, 100 at step 0."""
        window = first_steps(num_steps, self.guide_steps)
        negated = {s: -thr for s, thr in self.thresholds().items()}
        return Schedule(window=window, refine=scaled_steps(negated, num_steps, window),
                        max_refine_iters=self.refine_iters, step_size=20.0, step_schedule="sqrt-linear",
                        refine_iters_at={0: self.refine_iters_first})

    def bind_weight(self, step: int, num_steps: int = REFERENCE_STEPS) -> float:
        """``λ_t``: the weight of the last ``bind_weights`` boundary at or before ``step`` (boundaries scaled to
        ``num_steps`` as ``⌊s·T/50⌋``). Official: 1 for steps < 10, 5 for < 20, 10 from 20 on."""
        weight = 0.0
        for s, w in parse_step_values(self.bind_weights, "bind_weights").items():
            if step >= s * num_steps // REFERENCE_STEPS:
                weight = w
        return weight

    # --- maps -------------------------------------------------------------------------------------------------

    def map_requests(self, unet) -> tuple[MapRequest, ...]:
        """Object maps: every layer at ``up-1``'s level (16×16 in SD at 512 px). With binding on finer maps,
        one more request per finer level (64×64 and 32×32), each at its own size."""
        level = level_of(unet, resolve_block(unet, "up-1"))
        objects = MapRequest(blocks=None, level=level, out_level=level)
        if not (self.bind and self.attribute_maps == "finer"):
            return (objects,)
        finer = sorted({layer.level for layer in cross_attention_layers(unet) if layer.level < level})
        if not finer and is_joint(unet):  # an MMDiT's maps have one resolution: attributes read it (docs/mmdit.md)
            return (objects, objects)
        if not finer:
            raise UnbleedError("-o attribute_maps=finer: this UNet has no cross-attention level finer than up-1's; "
                               "use -o attribute_maps=same", field="options")
        return (objects, *(MapRequest(blocks=None, level=lv, out_level=lv) for lv in finer))

    def _processed(self, maps: torch.Tensor, words: list[tuple[int, ...]], last: int) -> torch.Tensor:
        """``[B, len(words), h, w]``: each word's token-softmaxed map (mean over its pieces), smoothed."""
        return self.preprocess(maps, words, last)

    def _attribute_source(self, maps: Maps) -> torch.Tensor:
        """Raw maps for the attribute tokens: the finer levels nearest-resized to the object size and averaged
        (official ``aggregate_attention_intermediate``), or the object maps themselves (``same``)."""
        if self.attribute_maps == "same":
            return maps[0]
        if len(maps) < 2:
            raise UnbleedError("divide-bind: -o attribute_maps=finer needs the finer-level maps its map_requests "
                               "ask for; pass them, or use -o attribute_maps=same", field="options")
        size = tuple(maps[0].shape[-2:])
        return torch.stack([F.interpolate(p, size=size, mode="nearest") for p in maps[1:]]).mean(0)

    def prepare_step(self, maps: Maps, ctx: StepContext, run: Any) -> dict[str, Any]:
        """The softmax's last column (``ctx.eot`` with ``exclude_padding``, else the 77th), ``λ_t`` of
        ``ctx.step`` and the detached object maps (for ``--save-attention``)."""
        groups = ctx.groups
        if not groups:
            raise UnbleedError("divide-bind needs at least one entity: pass --tokens, e.g. --tokens cat,frog")
        base = maps[0]
        last = ctx.eot if self.exclude_padding else base.shape[1] - 1
        for entity in groups:
            for text, idx in [(entity.text, entity.indices)] + [(a.text, a.indices) for a in entity.attributes]:
                if not idx or not all(1 <= i < last for i in idx):
                    raise UnbleedError(f"--tokens: {text!r} has token indices {list(idx)} outside the prompt's "
                                       f"word tokens 1..{last - 1}")
        weight = self.bind_weight(ctx.step, ctx.num_steps)
        objects = self._processed(base, [e.indices for e in groups], last)
        return {"last": last, "bind_weight": weight, "objects": objects.detach()}

    # --- loss -------------------------------------------------------------------------------------------------

    def terms(self, maps: Maps, ctx: StepContext, state: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(TV, bind)``, each ``[B, entities]``: each entity's TV and the sum of its attributes' JSDs."""
        groups = ctx.groups
        last = state["last"]
        objects = self._processed(maps[0], [e.indices for e in groups], last)
        tv = total_variation(objects, self.tv)
        if not (self.bind and any(e.attributes for e in groups)):
            return tv, torch.zeros_like(tv)
        source = self._attribute_source(maps)
        bind = []
        for s, entity in enumerate(groups):
            total = torch.zeros_like(tv[:, s])
            if entity.attributes:
                attrs = self._processed(source, [a.indices for a in entity.attributes], last)
                for k in range(attrs.shape[1]):
                    total = total + binding_divergence(objects[:, s], attrs[:, k], tv[:, s], self.quantile,
                                                       self.quantile_low_tv, self.low_tv, self.eps)
            bind.append(total)
        return tv, torch.stack(bind, 1)

    def loss(self, maps: Maps, ctx: StepContext, state: dict[str, Any]) -> torch.Tensor:
        tv, bind = self.terms(maps, ctx, state)
        return divide_bind_loss(tv, bind, state["bind_weight"], self.combine)

    def refine_value(self, maps: Maps, ctx: StepContext, state: dict[str, Any], loss: torch.Tensor) -> torch.Tensor:
        """``−min_s TV(A_s)`` (the official ``threshold_indicator="tv_loss"``): refinement goes on while the
        smallest TV is below the threshold, i.e. while this is above the (negated) threshold."""
        with torch.no_grad():
            objects = self._processed(maps[0], [e.indices for e in ctx.groups], state["last"])
            return -total_variation(objects, self.tv).amin(-1)

    def visuals(self, state: dict[str, Any], ctx: StepContext) -> dict[str, torch.Tensor]:
        return {f"object map: {e.text}": state["objects"][:, i] for i, e in enumerate(ctx.groups)}
