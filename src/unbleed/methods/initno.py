"""InitNO (Guo et al., "InitNO: Boosting Text-to-Image Diffusion Models via Initial Noise Optimization", CVPR 2024),
following the official code (xiefan-guo/initno, ``initno/pipelines/pipeline_sd_initno.py``,
``StableDiffusionInitNOPipeline``; helpers in ``utils/attn_utils.py`` and ``utils/ptp_utils.py``).

InitNO moves the *initial noise* into the region where the prompt's subjects are all attended and do not
compete (sec. 3 of the paper), then samples from it with Attend-and-Excite-style guidance (the official pipeline).

**Scores** (the paper's sec. 3; official ``fn_compute_loss``), from the maps of one text-conditioned UNet pass:

* maps: every layer at the 16×16 level of SD at 512 px (official ``attn_res=(16, 16)`` over ``up``, ``down``,
  ``mid``: here every layer at the level of ``up-1``, any image size), averaged over heads and layers; cross-
  attention columns ``1:-1`` (all 75, padding included, official), ×100, softmax over them; each subject's map
  smoothed by the 3×3 Gaussian, σ = 0.5, reflect padding (``fn_smoothing_func``) — :func:`~.maps.subject_maps`;
* **cross-attention response score** ``S_CA = max_s (1 − A_s(p_s))``, ``p_s`` the subject's peak pixel (top-1,
  ``fn_get_topk`` with ``K=1``) — Attend-and-Excite's loss, :func:`~.maps.excite_loss`;
* **self-attention conflict score** ``S_SA = mean_{i<j} Σ min(S_i, S_j) / (Σ (S_i + S_j) + 1e-6)``, ``S_i`` the
  self-attention map of subject ``i``'s peak pixel (its row of the self-attention ``attn1`` probabilities of the
  same layers), smoothed as above; 0 with fewer than two subjects;
* a "clean" term of the official code (not in the paper): per subject, the Otsu mask of its map, reduced to the
  4-connected component holding the peak (``fn_get_otsu_mask``, ``fn_clean_mask``); the largest attention
  outside it, counted when it exceeds the smallest inside; summed over subjects (:func:`clean_loss`).

**Initial-noise stage** (official ``__call__`` step "8. initno" and ``fn_initno``), per seed: the noise is
``z_T = ε·exp(½ log σ²) + μ`` with ``μ = 0, log σ² = 0`` at first, optimised by Adam (lr 1e-2, eps 1e-3) on the
joint loss ``S_CA + S_SA + clean`` at the first timestep, ``S_SA`` set to 0 while ``S_CA > 0.5``. Each Adam step
is followed by Adam steps on the **distribution alignment** term alone, ``KL(N(μ, σ²) ‖ N(0, I)) = −½ mean(1 +
log σ² − μ² − σ²)`` (``fn_calc_kld_loss_func``), until it is ≤ 0.001. A round stops as soon as ``S_CA < 0.2`` and
``S_SA < 0.3`` (``tau_cross_attn``, ``tau_self_attn``: the noise is valid), else after 10 steps. Rounds, each from
a fresh noise of the seed, go on until one succeeds or 5 have run. Then, as the official ``__call__``
(``optimized_latents_pool.sort()``), *all* rounds run — the successful one included — are ranked by their score
``S_CA + S_SA`` (+1 when ``S_SA ≤ 1e-6``; ties: the earlier round): if the best is the successful round its
optimised noise is used; otherwise (a failed round scored lower, or none succeeded) the best round is optimised
again from its original noise for up to 50 steps, and that result is used either way (:func:`select_round`).

**Sampling** (official ``__call__`` loop with ``run_sd=False``, as ``run_sd_initno.py`` runs it): the first 25 of
50 steps (``max_iter_to_alter``) move the latent by ``α_i ∇S_CA``, ``α_i = 20·sqrt(linspace(1, 0.5, T)[i])``
(``scale_factor=20``); at steps 10 and 20, while ``S_CA > 0.2`` or ``S_SA > 0.3`` (threshold 0.8 and
``target_self_loss``), at most 20 refinement updates on ``fn_augmented_compute_losss``: ``S_CA + S_SA + 0.1·clean
+ 0.1·L1(A_s, Ā_s)``, ``Ā`` an exponential average (0.9) of the maps seen so far. Steps are scaled to ``T``.

Departures (each a choice where the official code cannot be followed as written, or is ambiguous):

* Batch: the official pipeline optimises one image (``token_indices[0]``, one alignment cache). Here every seed
  runs its own rounds, Adam state and cache and draws its fresh noises from its own generator (the UNet passes are
  batched), so every image equals the one its seed gives alone (tests/test_initno.py).
* The KL-only inner loop is capped at 10,000 steps (the official loop has no cap; it ends long before).
* Otsu's threshold is the library's (:func:`~.maps.otsu_threshold`, 256 bins over the map's min–max range, pixels
  above it); the official uses OpenCV's on ``uint16(255·A)`` with pixels ≥ it.
* ``μ, σ`` act on the unit noise, which is then scaled by the scheduler's ``init_noise_sigma``, and the UNet input
  goes through ``scale_model_input`` — both identities for PNDM and DDIM, where this equals the official code.
* At a refinement step where refinement starts, the step's regular update also descends the refinement loss (the
  sampler takes one loss per step); the official regular update is on ``S_CA`` alone. The alignment average is
  updated once per step (from the step's first maps), the official also at every refinement pass. Refinement
  stops as soon as both scores are under their thresholds (the official loop makes one more update).
* A word of several BPE pieces is the mean of its pieces' maps; ``rounds=0`` skips the noise stage and
  ``final_steps=0`` takes the best round's optimised noise instead of optimising it again.
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
from .maps import MapOptions, excite_loss, otsu_threshold, smooth

KL_STEPS_CAP = 10_000


def select_round(pool: list[tuple]) -> tuple:
    """The round to go on from: the official ``optimized_latents_pool.sort()`` then ``[0]`` — the lowest score,
    ties to the earlier round — over every round run, the successful one included. Each entry is ``(score, round,
    optimised noise, original noise, succeeded)``."""
    return min(pool, key=lambda e: (e[0], e[1]))


def peaks(subject: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, n, h, w]`` → (peak values ``[B, n]``, flat peak pixels ``[B, n]``, detached): ``fn_get_topk``, K = 1."""
    flat = subject.flatten(-2)
    index = flat.detach().argmax(-1)
    return flat.gather(-1, index[..., None]).squeeze(-1), index


def conflict_score(self_maps: torch.Tensor, index: torch.Tensor, kernel_size: int = 3,
                   sigma: float = 0.5) -> torch.Tensor:
    """The self-attention conflict score ``S_SA`` per sample: ``self_maps`` ``[B, h·w, h, w]`` (row = query pixel),
    ``index`` ``[B, n]`` each subject's peak pixel → ``mean_{i<j} Σ min(S_i, S_j) / (Σ (S_i + S_j) + 1e-6)`` over
    the smoothed rows ``S_i``; 0 when ``n < 2``."""
    b, n = index.shape
    rows = self_maps.gather(1, index[..., None, None].expand(b, n, *self_maps.shape[-2:]))
    rows = smooth(rows, kernel_size, sigma)
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    if not pairs:
        return self_maps.new_zeros(b)
    i, j = zip(*pairs)
    si, sj = rows[:, list(i)], rows[:, list(j)]
    ratio = torch.minimum(si, sj).flatten(-2).sum(-1) / ((si + sj).flatten(-2).sum(-1) + 1e-6)
    return ratio.mean(-1)


def peak_component(mask: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The 4-connected component of binary ``mask`` ``[..., h, w]`` that holds the pixel ``index`` ``[...]`` (flat)
    — ``fn_clean_mask``'s depth-first search, as a flood fill; empty when that pixel is not in the mask."""
    h, w = mask.shape[-2:]
    comp = torch.zeros_like(mask).flatten(-2).scatter_(-1, index[..., None], 1.0).view_as(mask) * mask
    for _ in range(h * w):
        p = F.pad(comp, (1, 1, 1, 1))
        grown = torch.maximum(comp, torch.stack([p[..., :-2, 1:-1], p[..., 2:, 1:-1], p[..., 1:-1, :-2],
                                                 p[..., 1:-1, 2:]]).amax(0)) * mask
        if torch.equal(grown, comp):
            break
        comp = grown
    return comp


def clean_loss(subject: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The official code's clean term per sample (``fn_compute_loss``): for each subject map ``[B, n, h, w]``, the
    Otsu mask's component ``M`` holding the peak ``index``; with ``fg = A·M + (1 − M)`` and ``bg = A·(1 − M)``, the
    term is ``max(bg)`` when ``max(bg) > min(fg)``, else 0; summed over subjects."""
    thr = otsu_threshold(subject.detach())
    mask = peak_component((subject.detach() > thr[..., None, None]).float(), index)
    fg = (subject * mask + (1 - mask)).flatten(-2).amin(-1)
    bg = (subject * (1 - mask)).flatten(-2).amax(-1)
    return (bg * (bg > fg).to(bg.dtype)).sum(-1)


def kl_alignment(log_var: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """The distribution alignment term per sample: ``KL(N(μ, σ²) ‖ N(0, I))`` averaged over the latent's elements,
    ``−½ mean(1 + log σ² − μ² − σ²)`` (``fn_calc_kld_loss_func``)."""
    return (-0.5 * (1 + log_var - mu ** 2 - log_var.exp())).flatten(1).mean(-1)


class SampleAdam:
    """``torch.optim.Adam`` (no weight decay, no AMSGrad) over per-sample parameter tensors ``[B, …]`` with a step
    count per sample, so that a step can move some samples only: each sample's trajectory is the one a separate
    optimiser of that sample alone gives (a shared ``Adam`` counts steps for the whole tensor)."""

    def __init__(self, params: list[torch.Tensor], lr: float, eps: float = 1e-3, betas=(0.9, 0.999)):
        self.params, self.lr, self.eps, self.betas = params, lr, eps, betas
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.t = torch.zeros(params[0].shape[0], dtype=torch.float64)

    def reset(self, index: int) -> None:
        """Fresh moments and step count for sample ``index`` (its parameters are set by the caller)."""
        for m, v in zip(self.m, self.v):
            m[index] = 0
            v[index] = 0
        self.t[index] = 0

    @torch.no_grad()
    def step(self, grads: list[torch.Tensor], rows: torch.Tensor) -> None:
        """One Adam step for the samples where ``rows`` ``[B]`` is True (the others are left exactly as they are)."""
        b1, b2 = self.betas
        self.t += rows.to(self.t.dtype)
        t = self.t.clamp_min(1)
        shape = (-1,) + (1,) * (self.params[0].dim() - 1)
        bc1 = (1 - b1 ** t).to(self.params[0].dtype).view(shape)
        bc2 = (1 - b2 ** t).to(self.params[0].dtype).sqrt().view(shape)
        r = rows.view(shape)
        for p, g, m, v in zip(self.params, grads, self.m, self.v):
            m.copy_(torch.where(r, b1 * m + (1 - b1) * g, m))
            v.copy_(torch.where(r, b2 * v + (1 - b2) * g * g, v))
            p.copy_(torch.where(r, p - (self.lr / bc1) * m / (v.sqrt() / bc2 + self.eps), p))


@dataclass
class InitNORun:
    """Per run: the exponential average of each sample's subject maps (the refinement's alignment term)."""

    cache: torch.Tensor | None = None


@register
@dataclass
class InitNO(MapOptions, Method):
    """InitNO: initial-noise optimisation, then A&E-style guidance. Options (official defaults):

    noise stage ``rounds`` (5), ``round_steps`` (10), ``final_steps`` (50), ``lr`` (1e-2), ``tau_cross`` (0.2) and
    ``tau_self`` (0.3) — also the refinement thresholds —, ``kl_threshold`` (1e-3); maps:
    :class:`~unbleed.methods.maps.MapOptions` (``map_scale`` 100, ``smooth`` true, ``kernel_size`` 3, ``sigma`` 0.5;
    the smoothing also applies to the self-attention conflict score), ``exclude_padding`` (false: columns 1:-1),
    ``attributes`` (false: the entities only are subjects).
    """

    name: ClassVar[str] = "initno"
    source: ClassVar[str] = "Guo et al., CVPR 2024"
    renamed: ClassVar[dict[str, str]] = {"temperature": "map_scale"}

    rounds: int = 5
    round_steps: int = 10
    final_steps: int = 50
    lr: float = 1e-2
    tau_cross: float = 0.2
    tau_self: float = 0.3
    kl_threshold: float = 1e-3
    exclude_padding: bool = False
    attributes: bool = False

    def check(self) -> None:
        if self.rounds < 0 or self.round_steps < 1 or self.final_steps < 0:
            raise UnbleedError("-o rounds must be ≥ 0, round_steps ≥ 1 and final_steps ≥ 0", field="options")
        if not all(math.isfinite(v) and v > 0 for v in (self.lr, self.kl_threshold)):
            raise UnbleedError(f"-o lr={self.lr}, kl_threshold={self.kl_threshold}: both must be finite numbers > 0",
                               field="options")
        self.check_maps()

    # -- maps and scores -------------------------------------------------------------------------------------

    def map_requests(self, unet) -> tuple[MapRequest, ...]:
        level = level_of(unet, resolve_block(unet, "up-1"))  # the 16×16 level of SD at 512 px
        return (MapRequest(blocks=None, level=level, out_level=level),
                MapRequest(blocks=None, level=level, out_level=level, kind="self"))

    def subjects(self, ctx: StepContext) -> list[tuple[int, ...]]:
        subjects = [e.indices for e in ctx.groups]
        if self.attributes:
            subjects += [a.indices for e in ctx.groups for a in e.attributes]
        return subjects

    def subject_maps(self, maps: Maps, ctx: StepContext) -> torch.Tensor:
        """``[B, subjects, h, w]``: the token-softmaxed, smoothed maps the scores read."""
        last = ctx.eot if self.exclude_padding else maps[0].shape[1] - 1
        return self.preprocess(maps[0], self.subjects(ctx), last)

    def scores(self, maps: Maps, ctx: StepContext) -> dict[str, torch.Tensor]:
        """``subject`` maps, ``index`` of their peaks, and per sample ``cross`` (S_CA), ``self`` (S_SA, not zeroed)
        and ``clean`` — all differentiable w.r.t. the latent but ``index``."""
        subject = self.subject_maps(maps, ctx)
        peak, index = peaks(subject)
        return {"subject": subject, "index": index, "cross": excite_loss(peak),
                "self": conflict_score(maps[1], index, self.smoothing_kernel, self.sigma),
                "clean": clean_loss(subject, index)}

    def noise_loss(self, s: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The noise stage's joint loss ``S_CA + S_SA + clean`` and its ``S_SA`` (0 while ``S_CA > 0.5``)."""
        conflict = s["self"] * (s["cross"] <= 0.5).to(s["self"].dtype)
        return s["cross"] + conflict + s["clean"], conflict

    # -- the initial-noise stage -----------------------------------------------------------------------------

    def initial_noise(self, stage, latents: torch.Tensor) -> torch.Tensor:
        if self.rounds == 0:
            return latents
        ctx, sigma, batch = stage.context, stage.sigma, latents.shape[0]
        noise = (latents / sigma).clone()  # the unit noise of each sample's current round
        result = noise.clone()
        log_var, mu = torch.zeros_like(noise), torch.zeros_like(noise)
        adam = SampleAdam([log_var, mu], self.lr)
        phase = [0] * batch  # round index; self.rounds = the final optimisation; None = done
        steps = [0] * batch
        pools: list[list[tuple]] = [[] for _ in range(batch)]
        rec = {"rounds": [0] * batch, "succeeded": [False] * batch, "score": [None] * batch,
               "best_round": [None] * batch, "noise_steps": [0] * batch}
        while any(p is not None for p in phase):
            active = torch.tensor([p is not None for p in phase])
            with torch.enable_grad():
                lv, m = log_var.clone().requires_grad_(True), mu.clone().requires_grad_(True)
                s = self.scores(stage.maps((noise * torch.exp(0.5 * lv) + m) * sigma), ctx)
                joint, conflict = self.noise_loss(s)
                grads = torch.autograd.grad(joint.sum(), [lv, m])
            cross, conflict = s["cross"].detach(), conflict.detach()
            success = active & (cross < self.tau_cross) & (conflict < self.tau_self)
            score = cross + torch.where(conflict <= 1e-6, conflict + 1, conflict)
            move = active & ~success
            adam.step(list(grads), move)
            for _ in range(KL_STEPS_CAP):
                with torch.enable_grad():
                    lv, m = log_var.clone().requires_grad_(True), mu.clone().requires_grad_(True)
                    kl = kl_alignment(lv, m)
                    over = move & (kl.detach() > self.kl_threshold)
                    if not over.any():
                        break
                    kl_grads = torch.autograd.grad(kl.sum(), [lv, m])
                adam.step(list(kl_grads), over)
            for i in range(batch):
                if phase[i] is None:
                    continue
                rec["noise_steps"][i] += 1
                steps[i] += 1
                budget = self.round_steps if phase[i] < self.rounds else self.final_steps
                if not (success[i] or steps[i] >= budget):
                    continue
                z = noise[i] * torch.exp(0.5 * log_var[i]) + mu[i]
                rec["score"][i] = float(score[i])
                if phase[i] == self.rounds:  # the final optimisation: its result either way
                    result[i], phase[i] = z, None
                    rec["succeeded"][i] = bool(success[i])
                    continue
                pools[i].append((float(score[i]), phase[i], z.clone(), noise[i].clone(), bool(success[i])))
                rec["rounds"][i] = phase[i] + 1
                if not success[i] and phase[i] + 1 < self.rounds:  # a fresh noise from this seed's generator
                    noise[i] = stage.draw(i)[0] / sigma
                    phase[i] += 1
                else:
                    best = select_round(pools[i])
                    rec["score"][i], rec["best_round"][i] = best[0], best[1]
                    if best[4] or self.final_steps == 0:
                        result[i], phase[i] = best[2], None
                        rec["succeeded"][i] = best[4]
                        continue
                    noise[i], phase[i] = best[3], self.rounds
                log_var[i], mu[i], steps[i] = 0, 0, 0
                adam.reset(i)
        stage.record.update(rec)
        return result * sigma

    # -- guidance during sampling ----------------------------------------------------------------------------

    def default_schedule(self, num_steps: int) -> Schedule:
        """``max_iter_to_alter=25`` of 50, α = 20·sqrt(linspace(1, 0.5, T)); refinement at steps 10 and 20 (scaled
        to T) while ``max(S_CA − 0.2, S_SA − 0.3) > 0`` (:meth:`refine_value`), at most 20 iterations."""
        window = first_steps(num_steps)
        return Schedule(window=window, refine=self._refine_steps(num_steps), max_refine_iters=20, step_size=20.0,
                        step_schedule="sqrt-linear")

    def _refine_steps(self, num_steps: int) -> dict[int, float]:
        return scaled_steps({10: 0.0, 20: 0.0}, num_steps, first_steps(num_steps))

    def new_run(self, unet) -> InitNORun:
        return InitNORun()

    def prepare_step(self, maps: Maps, ctx: StepContext, run: Any) -> dict[str, Any]:
        """The alignment average (updated with this step's maps: ``Ā ← 0.9 Ā + 0.1 A``, ``A`` at first) and which
        samples take the refinement loss this step (at the default refinement steps, where refinement starts)."""
        s = self.scores(maps, ctx)
        subject = s["subject"].detach()
        run = run if run is not None else InitNORun()
        run.cache = subject if run.cache is None or run.cache.shape != subject.shape else \
            0.9 * run.cache + 0.1 * subject
        refine = ctx.step in self._refine_steps(ctx.num_steps)
        joint = (self._over(s) > 0) & refine
        return {"cache": run.cache, "joint": joint}

    def _over(self, s: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.maximum(s["cross"] - self.tau_cross, s["self"] - self.tau_self).detach()

    def loss(self, maps: Maps, ctx: StepContext, state: dict[str, Any]) -> torch.Tensor:
        """``S_CA`` (the official regular update); for the samples in ``state["joint"]`` the refinement loss
        ``S_CA + S_SA + 0.1·clean + 0.1·Σ_s mean|A_s − Ā_s|`` (official ``fn_augmented_compute_losss``)."""
        s = self.scores(maps, ctx)
        joint = state["joint"]
        if not joint.any():
            return s["cross"]
        align = (s["subject"] - state["cache"]).abs().flatten(-2).mean(-1).sum(-1)
        extra = s["self"] + 0.1 * s["clean"] + 0.1 * align
        return s["cross"] + joint.to(extra.dtype) * extra

    def refine_value(self, maps: Maps, ctx: StepContext, state: dict[str, Any], loss: torch.Tensor) -> torch.Tensor:
        """``max(S_CA − τ_cross, S_SA − τ_self)``: refine while above 0 (the official ``cross > 0.2 or self > 0.3``)."""
        return self._over(self.scores(tuple(m.detach() for m in maps), ctx))
