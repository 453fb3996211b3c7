"""``unbleed shapes diagnose``: is the shapes world a valid model organism for attention-based methods?

On plain sampling (``--method sd``) of shapes-world prompts, with the detector's masks of the final images as
ground truth, five figures (all steps are given for 50 steps and scaled to ``--steps`` as ``⌊s·T/50⌋``):

**(a) Localisation.** For each requested object that the detector finds *cleanly* — exactly one clean blob
(one significant colour, one matched shape) of the object's colour and shape — the IoU of its entity token's
(the shape noun's) Otsu-binarised cross-attention map with that blob's mask; and for every image the IoU of the
start-of-text token's (index 0) Otsu mask with the background (pixels in no blob). Maps are the raw softmax
probabilities of the conditional half of CFG, averaged over heads and over the layers of one block
(:meth:`unbleed.guidance.attention.AttentionStore.maps`), per block with cross-attention (``down-1`` … ``up-2``) at steps
5, 10 and 25. *Resolution*: each map is upsampled bilinearly to the image (64×64) and then binarised with Otsu
(:func:`unbleed.methods.maps.binarize`), as DAAM does (upsample, then threshold). Otsu at map resolution followed
by nearest upsampling would make every mask a union of 4-, 8- or 16-pixel cells and cap the IoU of the 4×4 and
8×8 blocks by their grid alone, mixing "the map is wrong" with "the map is coarse". Reference: DAAM reports
58.8–64.8 mIoU for noun maps on SD images.

**(b) Predictiveness.** AUC (rank-based, Mann–Whitney, ties count ½: :func:`auc`) of

* an entity's peak attention — Attend-and-Excite's smoothed maximum (:meth:`AttendExcite.max_attention`: ×100
  softmax over the word tokens, 3×3 Gaussian, max over pixels) on A&E's own maps (its ``map_requests``: every
  layer at the 8×8 level here, the analogue of SD's 16×16), averaged over steps 5–15 — as a predictor that the
  object will be *neglected*; the score is the *negated* peak, so **AUC 1.0 means a lower peak always marks the
  neglected object**, 0.5 is chance, below 0.5 the reverse. Label (:func:`neglect_label`): the detector's
  per-object ``state == "neglected"`` (nothing of the object drawn); also, with
  the same scores, of "not cleanly present" (no clean blob of its colour and shape: ``count == 0``);
* the two entities' map overlap — the histogram intersection ``Σ_pixels min(Â₁, Â₂)`` of their raw maps (same
  request) each normalised to sum 1 (0 = disjoint, 1 = identical; the largest pair for three objects), averaged
  over steps 5–15 — as a predictor that the image is *fused* (``detect(...)["fused"]``; higher overlap → fused,
  so again 1.0 = perfectly predictive). The intersection needs no threshold, unlike an IoU of Otsu masks.

AUC is ``null`` when a class is empty; positives and negatives are counted.

**(c) Carry-over.** Does one guided update lower the method's loss at the *next* step, and at step 25, compared
with no update on the same seed? For ``attend-excite`` and ``ela`` (their default options, or the options and
``step_size`` / ``step_schedule`` that ``methods`` gives them: ``shapes diagnose -o attend-excite.map_scale=10``) and
the first ``carry_prompts`` prompts × all seeds: the plain run (recorded above) and a run with exactly one update
at step s = 5 — or at the method's first guided step when its window starts later, as ELA's does at T_start (its
``start``, 10 by default; before it ELA does nothing) — (the method's schedule with window ``(s, s+1)``, no
refinement). The loss is the method's
own (``prepare_step`` on the detached maps, then ``loss``), from maps recorded on the regular pass, i.e. of the
latent the scheduler steps, with the :class:`~unbleed.methods.StepContext` the sampler builds (step, number of
steps, prompt length, groups). Both runs are :class:`~unbleed.run.spec.RunSpec` runs of the sampler.
Reported per method (with its steps): the guided − unguided loss difference at s (the updated latent, with the step's own state
from the pre-update maps — the update's immediate effect), at s+1 and at 25 (state recomputed from that step's
maps, as the method would), each with its mean, a 95 % paired bootstrap CI over the images (2,000 resamples,
seed 0) and the fraction of images where it went down; plus the trace's loss before the update and the size of
the update itself (``update_rms``: the root mean square of the latent's change, the sampler's
:attr:`~unbleed.run.sampler.StepTrace.update_rms`, averaged over the images) — the one figure that compares two
methods' steps, whose losses are on different scales.

**(d) ELA's localisation.** The IoU of each ELA mask ``M^{e_i}`` with its object's clean blob and of ``M_bk`` with
the background, masks computed as ELA's ``prepare_step`` computes them (:func:`ela_localise`: its ``layers``, Otsu,
empty-mask fallback) on the maps it requests, at steps 5, 10, 25. These masks are binary at map resolution (8×8),
so they are upsampled nearest-neighbour (each cell 8×8 pixels): what ELA's loss sees.

**(e) Token knockout** — is a word's attention *causal* for what is drawn? For the first ``knockout_prompts``
prompts × all seeds, plain sampling again with some columns of the text encoding replaced, in the conditional
half of CFG only, by the empty caption's encoding at the same positions (:func:`cleaned_columns`; "clean pads" as
in Toker et al., *Padding Tone*, NAACL 2025): (1) each object's own words (its shape noun and its attribute
tokens), (2) another object's words, (3) the *summary* columns — end-of-text and the padding after it, (4) an
object's own words and the summary together.
Reported: of the objects present (``state == "present"``) in the plain image, the fraction still present under
each knockout (``kept``), with a 95 % bootstrap CI over objects. On a model whose words carry the content, as in
SD, replacing an object's words should remove it (low ``kept`` for own words) and replacing another's should
not. A high ``kept`` for own words says the object reaches the UNet some other way too: a causal text encoder
lets the end-of-text and padding columns see every word, so (3) and (4) tell whether the summary is that way
(low ``kept`` for (4), high for (1): the words *or* the summary suffice) — then a word's attention map is not a
lever on what is drawn, and exciting it changes little.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..guidance.attention import MapRequest, blocks_with_cross_attention, level_of
from ..errors import UnbleedError
from ..stats import rate_interval

if TYPE_CHECKING:
    from ..methods import StepContext

LOCALISATION_STEPS = (5, 10, 25)  # at 50 steps
PREDICT_WINDOW = (5, 15)  # inclusive, at 50 steps
CARRY_STEP, CARRY_LATER = 5, 25  # at 50 steps
CARRY_METHODS = ("attend-excite", "ela")


# ----------------------------------------------------------------------------------------------- statistics

def auc(scores, labels) -> float | None:
    """Area under the ROC curve, rank-based (Mann–Whitney U / (n₊ n₋), tied scores count ½): the probability
    that a random positive scores higher than a random negative. ``None`` when a class is empty."""
    from scipy.stats import rankdata

    s = np.asarray(scores, dtype=float)
    y = np.asarray(labels, dtype=bool)
    if s.shape != y.shape:
        raise ValueError(f"auc: {s.shape[0] if s.ndim else 0} scores for {y.shape[0] if y.ndim else 0} labels")
    pos, neg = int(y.sum()), int((~y).sum())
    if pos == 0 or neg == 0:
        return None
    ranks = rankdata(s)
    return float((ranks[y].sum() - pos * (pos + 1) / 2) / (pos * neg))


def auc_ci(scores, labels, resamples: int = 2000, seed: int = 0) -> list[float] | None:
    """95 % percentile bootstrap interval of :func:`auc`, resampling the scored items (resamples that lose a class
    are skipped); ``None`` when a class is empty."""
    s, y = np.asarray(scores, dtype=float), np.asarray(labels, dtype=bool)
    if auc(s, y) is None:
        return None
    rng = np.random.default_rng(seed)
    values = [a for idx in rng.integers(0, len(s), size=(resamples, len(s))) if (a := auc(s[idx], y[idx])) is not None]
    return [_r(float(np.percentile(values, 2.5))), _r(float(np.percentile(values, 97.5)))]


def iou(a, b) -> float | None:
    """IoU of two boolean masks of the same shape; ``None`` when both are empty."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"iou: masks of shapes {a.shape} and {b.shape}")
    union = int((a | b).sum())
    return None if union == 0 else float((a & b).sum() / union)


def otsu_mask(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``[..., h, w]`` maps → boolean ``[..., H, W]`` masks: bilinear upsampling to ``size``, then Otsu
    (:func:`unbleed.methods.maps.binarize`)."""
    from ..methods.maps import binarize

    lead = maps.shape[:-2]
    flat = maps.reshape(-1, 1, *maps.shape[-2:]).float()
    if tuple(flat.shape[-2:]) != tuple(size):
        flat = F.interpolate(flat, size=size, mode="bilinear", align_corners=False)
    return binarize(flat[:, 0]).bool().reshape(*lead, *size)


def nearest_mask(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Binary ``[..., h, w]`` masks → boolean ``[..., H, W]`` by nearest-neighbour upsampling."""
    lead = masks.shape[:-2]
    flat = masks.reshape(-1, 1, *masks.shape[-2:]).float()
    return (F.interpolate(flat, size=size, mode="nearest")[:, 0] > 0.5).reshape(*lead, *size)


def overlap(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Histogram intersection ``Σ min(â, b̂)`` of maps ``[..., h, w]`` each normalised to sum 1 → ``[...]``."""
    na = a / a.flatten(-2).sum(-1).clamp_min(1e-12)[..., None, None]
    nb = b / b.flatten(-2).sum(-1).clamp_min(1e-12)[..., None, None]
    return torch.minimum(na, nb).flatten(-2).sum(-1)


def mean_ci(values) -> list[float] | None:
    """95 % percentile bootstrap interval of the mean of per-image values (:func:`unbleed.stats.rate_interval`
    with each image its own row); ``None`` if empty."""
    v = np.asarray(values, dtype=float)
    return rate_interval(v[:, None])["ci"] if v.size else None


def _r(x: float | None, nd: int = 4) -> float | None:
    return None if x is None or not np.isfinite(x) else round(float(x), nd)


def _mean_n(values: list[float]) -> dict[str, Any]:
    return {"miou": _r(float(np.mean(values))) if values else None, "n": len(values)}


def _auc_figure(scores: list[float], labels: list[bool], shown: list[float] | None = None) -> dict[str, Any]:
    """AUC with class counts and the mean shown value (e.g. the un-negated peak) per class."""
    shown = scores if shown is None else shown
    y = np.asarray(labels, dtype=bool)
    v = np.asarray(shown, dtype=float)
    return {"auc": _r(auc(scores, labels)), "ci95": auc_ci(scores, labels),
            "positives": int(y.sum()), "negatives": int((~y).sum()),
            "mean_positive": _r(v[y].mean()) if y.any() else None,
            "mean_negative": _r(v[~y].mean()) if (~y).any() else None}


def _diff_figure(diffs: list[float]) -> dict[str, Any]:
    ci = mean_ci(diffs)
    return {"mean_diff": _r(float(np.mean(diffs)), 5) if diffs else None,
            "ci95": [_r(c, 5) for c in ci] if ci else None,
            "fraction_down": _r(float(np.mean(np.asarray(diffs) < 0))) if diffs else None, "n": len(diffs)}


# ----------------------------------------------------------------------------------------------- running

def neglect_label(obj: dict[str, Any]) -> bool:
    """Is a detected object (an item of ``detect(...)["objects"]``) neglected: nothing of it drawn."""
    return obj["state"] == "neglected"


def scale_step(step_at_50: int, steps: int) -> int:
    return min(step_at_50 * steps // 50, steps - 1)


def block_requests(unet) -> dict[str, MapRequest]:
    """One request per block with cross-attention, named ``down-1`` … ``mid`` … ``up-k``, at its own size."""
    blocks = blocks_with_cross_attention(unet)
    names = {f"down-{i + 1}": b for i, b in enumerate(blocks["down"])}
    names.update({"mid": b for b in blocks["mid"]})
    names.update({f"up-{i + 1}": b for i, b in enumerate(blocks["up"])})
    return {n: MapRequest(blocks=(b,), out_level=level_of(unet, b)) for n, b in names.items()}


def _object_groups(pairs, groups) -> list[int | None]:
    """For each requested ``(colour, shape)``, the index of its entity group (the shape noun), or ``None``."""
    out = []
    for _, shape in pairs:
        out.append(next((i for i, e in enumerate(groups) if e.text.lower() == shape), None))
    return out


@contextlib.contextmanager
def cleaned_columns(unet, columns: list[int], clean: torch.Tensor, cfg: bool = True):
    """Within the block, every UNet call sees ``clean[columns]`` — the empty caption's encoding at those positions
    ("clean pads", Toker et al., *Padding Tone*, NAACL 2025) — in place of the text encoder's outputs at token
    ``columns``, in the conditional half of the batch (the second half with ``cfg``, else all of it). Figure (e)
    of the module docstring. Replacing rather than masking keeps the softmax's other columns as they are: masking
    ~60 padding columns also takes away whatever attention they absorbed, and that alone changes the image."""
    had_own = "forward" in vars(unet)
    forward = unet.forward

    def replaced(sample, timestep, encoder_hidden_states, *args, **kwargs):
        states = encoder_hidden_states.clone()
        start = states.shape[0] // 2 if cfg else 0
        states[start:, list(columns)] = clean[list(columns)].to(states.dtype)
        return forward(sample, timestep, states, *args, **kwargs)

    unet.forward = replaced
    try:
        yield
    finally:
        if had_own:
            unet.forward = forward
        else:
            del unet.forward


def _kept_figure(kept: list[bool]) -> dict[str, Any]:
    ci = mean_ci([float(k) for k in kept])
    return {"kept": _r(float(np.mean(kept))) if kept else None, "ci95": [_r(c) for c in ci] if ci else None,
            "n": len(kept)}


KNOCKOUTS = ("own_words", "other_words", "summary", "own_words_and_summary")
CARRY_KEYS = ("at_step", "next_step", "later")


# ----------------------------------------------------------------------------------------------- the record

@dataclasses.dataclass
class Plan:
    """What every prompt's runs share: the plain run's spec, (c)'s one-update specs, the maps to record, each
    figure's steps (given at 50, scaled to ``steps``) and (e)'s empty-caption encoding."""

    seeds: tuple[int, ...]
    steps: int
    guidance_scale: float
    blocks: dict[str, MapRequest]  # (a): one request per block with cross-attention
    attend_excite: Any  # (b): the method whose peak attention is scored
    ela: Any  # (d): the method whose masks are scored
    plain: Any  # the RunSpec of plain sampling
    plain_built: tuple  # and its build()
    carry: dict[str, tuple[Any, tuple]]  # (c): method name → (its RunSpec with one update, that spec's build())
    carry_steps: dict[str, tuple[int, int, int]]  # (c): method name → its update step, the next, the later step
    recorded: list[MapRequest]  # every request a figure reads, in the order of a trace step's raw_maps
    loc_steps: list[int]  # (a) and (d)
    window: list[int]  # (b)
    update_step: int  # (c): the update (step 5 of 50), the step after it and the later step; per method: carry_steps
    next_step: int
    later_step: int
    clean: torch.Tensor  # (e): the empty caption's encoding, [77, dim]

    def keep_needed(self, i: int, n: int, rec) -> None:
        """The sampler's step callback: drop the recorded maps of the steps no figure reads."""
        if i not in {*self.loc_steps, *self.window, self.update_step, self.next_step, self.later_step,
                     *(s for steps in self.carry_steps.values() for s in steps)}:
            rec.raw_maps = None


def make_plan(pipe, seeds: list[int], steps: int, guidance_scale: float,
              methods: dict[str, Any] | None = None) -> Plan:
    """:func:`run_diagnose`'s shared setup for ``pipe``; ``methods``: :data:`CARRY_METHODS` name → its
    :class:`~unbleed.run.spec.RunSpec` (options, ``step_size``, ``step_schedule``), default the method's defaults."""
    from ..run.spec import RunSpec

    unet = pipe.unet
    blocks = block_requests(unet)
    plain = RunSpec(method="sd", steps=steps, guidance_scale=guidance_scale, seeds=tuple(seeds))
    given = {name: (methods or {}).get(name) or RunSpec(method=name) for name in CARRY_METHODS}
    ae, ela = given["attend-excite"].build()[0], given["ela"].build()[0]
    s_upd = min(scale_step(CARRY_STEP, steps), steps - 2)
    later = max(scale_step(CARRY_LATER, steps), s_upd + 1)
    # (c)'s runs: each method (its options and step) with exactly one update and no refinement, at s_upd or, when
    # the method's own window starts later (ELA's T_start), at its first guided step: before it, it does nothing
    carry_steps = {}
    for name in CARRY_METHODS:
        first = given[name].replace(steps=steps).build().schedule.window[0]
        s_m = min(max(s_upd, first), steps - 2)
        carry_steps[name] = (s_m, s_m + 1, max(later, s_m + 1))
    specs = {name: plain.replace(method=name, options=dict(given[name].options), step_size=given[name].step_size,
                                 step_schedule=given[name].step_schedule,
                                 window=(carry_steps[name][0], carry_steps[name][0] + 1), refine={})
             for name in CARRY_METHODS}
    carry = {name: (spec, spec.build()) for name, spec in specs.items()}
    recorded = list(dict.fromkeys([*blocks.values(), *ae.map_requests(unet), *ela.map_requests(unet),
                                   *(r for _, built in carry.values() for r in built[0].map_requests(unet))]))
    plain_built = plain.build()
    with torch.no_grad():
        clean = pipe.encode_prompt("", pipe.device, 1, False)[0][0]
    return Plan(seeds=tuple(seeds), steps=steps, guidance_scale=guidance_scale, blocks=blocks, attend_excite=ae,
                ela=ela, plain=plain, plain_built=plain_built, carry=carry, carry_steps=carry_steps, recorded=recorded,
                loc_steps=sorted({scale_step(s, steps) for s in LOCALISATION_STEPS}),
                window=list(range(scale_step(PREDICT_WINDOW[0], steps), scale_step(PREDICT_WINDOW[1], steps) + 1)),
                update_step=s_upd, next_step=s_upd + 1, later_step=later,
                clean=clean)


@dataclasses.dataclass
class PromptRun:
    """The per-run record every figure reads: one prompt's plain run (its trace holds the recorded maps), the
    detector's verdicts and ground truth for its images, and their JSON records (``records.jsonl``), which the
    figures extend."""

    prompt: str
    groups: tuple  # the prompt's token groups (entities)
    objects: list[int | None]  # per requested object: the index of its entity group (the shape noun), or None
    result: Any  # the plain run's result: images, seeds, trace
    recorded: list[MapRequest]  # what each trace step's raw_maps holds, in order
    context: StepContext  # as the sampler builds it
    unet: Any
    arrays: list[np.ndarray]  # the images, [H, W, 3]
    verdicts: list[dict[str, Any]]  # per image: the detector's verdict (:func:`~unbleed.shapes.detect.detect`)
    truth: list[list[np.ndarray | None]]  # per image, per object: its clean blob's mask, or None
    background: list[np.ndarray]  # per image: the pixels in no blob
    records: list[dict[str, Any]]  # per image: the detector's verdict per object

    @property
    def size(self) -> tuple[int, int]:
        return tuple(self.arrays[0].shape[:2])

    def ctx(self, step: int) -> StepContext:
        return dataclasses.replace(self.context, step=step)

    def maps(self, requests: tuple[MapRequest, ...], step: int, trace=None) -> tuple:
        """Recorded maps of ``requests`` (a method's ``map_requests``, or one block's ``(request,)``) at ``step``
        of the plain run (or of another run's ``trace`` recording the same requests)."""
        rec = (self.result.trace if trace is None else trace)[step].raw_maps
        return tuple(rec[self.recorded.index(r)] for r in requests)


def plain_run(pipe, plan: Plan, prompt: str, progress: Callable[[str, str], None] | None = None) -> PromptRun:
    """Plain sampling of ``prompt`` recording every map a figure reads, and the detector's ground truth: the clean
    blob of each requested object (or None) and the background."""
    from ..methods import StepContext
    from ..text.prompt import token_groups
    from .detect import detect, find_blobs, load_image
    from .world import parse_caption

    pairs = parse_caption(prompt)
    groups = token_groups(pipe.tokenizer, prompt, None)
    if progress:
        progress(prompt, "sd")
    result = plan.plain.run(pipe, prompt, groups=groups, record=tuple(plan.recorded), callback=plan.keep_needed)
    # the context as the sampler builds it (its number of steps is the loop's: PNDM runs steps + 1 timesteps)
    context = StepContext.of(pipe.tokenizer, prompt, groups, num_steps=len(result.trace))
    arrays = [load_image(im) for im in result.images]
    verdicts = [detect(a, prompt) for a in arrays]
    truth, background, records = [], [], []
    for array, verdict, seed in zip(arrays, verdicts, result.seeds):
        blobs = find_blobs(array)
        masks = []
        for c, s in pairs:
            hits = [b for b in blobs if b.clean and b.colour == c and b.shape == s]
            masks.append(hits[0].mask.astype(bool) if len(hits) == 1 else None)
        truth.append(masks)
        fg = np.zeros(array.shape[:2], bool)
        for b in blobs:
            fg |= b.mask.astype(bool)
        background.append(~fg)
        records.append({"prompt": prompt, "seed": seed, "success": bool(verdict["success"]),
                        "fused": bool(verdict["fused"]),
                        "objects": [{"colour": o["colour"], "shape": o["shape"], "state": o["state"],
                                     "neglected": neglect_label(o), "clean": m is not None}
                                    for o, m in zip(verdict["objects"], masks)]})
    return PromptRun(prompt, groups, _object_groups(pairs, groups), result, plan.recorded, context, pipe.unet,
                     arrays, verdicts, truth, background, records)


# ----------------------------------------------------------------------------------------------- the figures
# Each takes a prompt's record and returns that prompt's values, in the order the bootstrap intervals resample them.

def _ious(masks: torch.Tensor, truths: list[np.ndarray | None]) -> list[float]:
    """IoU of ``masks[b]`` with ``truths[b]`` for each image with a truth mask and a non-empty union."""
    values = (iou(m.numpy(), t) for m, t in zip(masks, truths) if t is not None)
    return [v for v in values if v is not None]


def localisation(run: PromptRun, blocks: dict[str, MapRequest], steps: list[int]) -> dict[str, Any]:
    """(a): per block and step, the IoUs of each cleanly found object's entity map (bilinear to the image, then
    Otsu) with its blob, and of the start-of-text map with the background."""
    from ..methods.maps import group_map

    out: dict[str, Any] = {name: {} for name in blocks}
    for s in steps:
        for name, req in blocks.items():
            (maps,) = run.maps((req,), s)
            entity = [v for k, gi in enumerate(run.objects) if gi is not None
                      for v in _ious(otsu_mask(group_map(maps, run.groups[gi].indices), run.size),
                                     [t[k] for t in run.truth])]
            out[name][s] = {"entity": entity, "background": _ious(otsu_mask(maps[:, 0], run.size), run.background)}
    return out


def ela_localise(ela, maps: tuple[torch.Tensor, ...], groups) -> tuple[torch.Tensor, torch.Tensor]:
    """ELA's localisation (Zhang et al., ICML 2024, sec. 4.1) as its loss sees it: ``M_bk`` ``[B, h, w]`` and the
    entity masks ``M^{e_i}`` ``[B, entities, h, w]`` from the maps of its ``map_requests``, with its own options
    (binarisation, empty-mask fallback) — what ELA's ``prepare_step`` computes, through the public
    :func:`unbleed.methods.ela.ela_masks`."""
    from ..methods.ela import ela_masks
    from ..methods.maps import group_map

    if not groups:
        raise UnbleedError("ela needs at least one entity: the prompt names no shape")
    a = maps[0]
    entities = torch.stack([group_map(a, e.indices) for e in groups], 1)
    bk, masks, _ = ela_masks(a[:, 0], entities, ela.binarize, ela.empty_mask, ela.topk_frac)
    return bk, masks


def ela_localisation(run: PromptRun, ela, steps: list[int]) -> dict[int, dict[str, list[float]]]:
    """(d): per step, the IoUs of ELA's masks (:func:`ela_localise`, upsampled nearest-neighbour: what its loss
    sees) with the objects' clean blobs and with the background."""
    req = ela.map_requests(run.unet)
    out = {}
    for s in steps:
        bk, masks = ela_localise(ela, run.maps(req, s), run.groups)
        bk, masks = nearest_mask(bk, run.size), nearest_mask(masks, run.size)
        entity = [v for b in range(len(run.arrays)) for k, gi in enumerate(run.objects)
                  if gi is not None for v in _ious(masks[b:b + 1, gi], [run.truth[b][k]])]
        out[s] = {"entity": entity, "background": _ious(bk, run.background)}
    return out


def predictiveness(run: PromptRun, ae, window: list[int]) -> dict[str, list]:
    """(b): each found object's negated peak attention (A&E's smoothed maximum, :meth:`AttendExcite.max_attention`,
    on its own maps) with its labels (neglected; not cleanly present), and per image the largest pairwise overlap
    of the objects' entity maps with its label (fused), each averaged over the ``window`` steps. Adds ``peak``
    and ``overlap`` to the records."""
    from ..methods.maps import group_map

    req = ae.map_requests(run.unet)
    peaks, overlaps = [], []
    for s in window:
        maps = run.maps(req, s)
        peaks.append(ae.max_attention(maps[0], ae.prepare_step(maps, run.ctx(s), ae.new_run(run.unet))))
        ents = [group_map(maps[0], run.groups[gi].indices) for gi in run.objects if gi is not None]
        if len(ents) >= 2:
            pair = [overlap(ents[i], ents[j]) for i in range(len(ents)) for j in range(i + 1, len(ents))]
            overlaps.append(torch.stack(pair, 1).amax(1))
    peak = torch.stack(peaks).mean(0)  # [B, entities]
    over = torch.stack(overlaps).mean(0) if overlaps else None
    out: dict[str, list] = {"peak": [], "neglected": [], "absent": [], "overlap": [], "fused": []}
    for b, (rec, verdict) in enumerate(zip(run.records, run.verdicts)):
        for gi, entry, obj in zip(run.objects, rec["objects"], verdict["objects"]):
            if gi is not None:
                out["peak"].append(-float(peak[b, gi]))
                out["neglected"].append(entry["neglected"])
                out["absent"].append(obj["count"] == 0)
                entry["peak"] = round(float(peak[b, gi]), 5)
        if over is not None:
            out["overlap"].append(float(over[b]))
            out["fused"].append(rec["fused"])
            rec["overlap"] = round(float(over[b]), 5)
    return out


def _method_loss(method, unet, maps, ctx, state_maps=None) -> torch.Tensor:
    """The method's loss ``[B]`` on ``maps`` at ``ctx``, its step state from ``state_maps`` (default: the same
    maps) and a fresh run object."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state = method.prepare_step(maps if state_maps is None else state_maps, ctx, method.new_run(unet))
        return method.loss(maps, ctx, state).float()


def carry_over(pipe, plan: Plan, run: PromptRun, name: str) -> dict[str, list[float]]:
    """(c) for method ``name``: a run with its one update at its ``plan.carry_steps``; per image the guided − unguided
    loss difference at the update step (the updated latent, state from the pre-update maps), at the next step
    and at the later step, and the guided run's loss before its update (``before``). Adds both losses to the
    records."""
    spec, built = plan.carry[name]
    method, unet = built[0], pipe.unet
    req = method.map_requests(unet)
    guided = spec.run(pipe, run.prompt, groups=run.groups, record=tuple(plan.recorded), callback=plan.keep_needed,
                      output_type="latent", built=built)

    def loss(trace, step, state_maps=None):
        return _method_loss(method, unet, run.maps(req, step, trace), run.ctx(step), state_maps)

    plain, (s, s_next, s_later) = run.result.trace, plan.carry_steps[name]
    values = {"at_step": (loss(guided.trace, s, state_maps=run.maps(req, s)), loss(plain, s)),
              "next_step": (loss(guided.trace, s_next), loss(plain, s_next)),
              "later": (loss(guided.trace, s_later), loss(plain, s_later))}
    out = {"before": list(guided.trace[s].loss or []), "update_rms": list(guided.trace[s].update_rms or [])}
    for key, (g, u) in values.items():
        out[key] = (g - u).tolist()
        for b, rec in enumerate(run.records):
            rec.setdefault("carry_over", {}).setdefault(name, {})[key] = {
                "guided": round(float(g[b]), 6), "unguided": round(float(u[b]), 6)}
    return out


def knockout(pipe, plan: Plan, run: PromptRun, progress: Callable[[str, str], None] | None = None
             ) -> dict[str, list[bool]]:
    """(e): plain sampling with an object's words, another object's words, the summary columns (end-of-text and
    the padding after it), or an object's words and the summary replaced by the empty caption's
    (:func:`cleaned_columns`); for each object present in the plain image, whether it is still present, per
    kind of knockout (:data:`KNOCKOUTS`). Adds each image's object states per knockout to the records."""
    from .detect import detect

    words = [[*run.groups[g].indices, *(i for a in run.groups[g].attributes for i in a.indices)]
             if g is not None else None for g in run.objects]
    present = [[o["state"] == "present" for o in v["objects"]] for v in run.verdicts]
    summary = list(range(run.context.eot, plan.clean.shape[0]))
    conditions = [(f"words of object {i}", cols, i) for i, cols in enumerate(words) if cols]
    conditions.append(("summary", summary, None))
    conditions += [(f"words of object {i} and summary", cols + summary, ("and summary", i))
                   for i, cols in enumerate(words) if cols]
    kept: dict[str, list[bool]] = {k: [] for k in KNOCKOUTS}
    for label, cols, hidden in conditions:
        if progress:
            progress(run.prompt, f"sd, {label} replaced")
        with cleaned_columns(pipe.unet, cols, plan.clean, cfg=plan.guidance_scale > 1.0):
            result = plan.plain.run(pipe, run.prompt, groups=run.groups, built=plan.plain_built)
        for b, image in enumerate(result.images):
            states = [o["state"] for o in detect(image, run.prompt)["objects"]]
            for i, state in enumerate(states):
                if not present[b][i]:
                    continue
                if isinstance(hidden, tuple):  # an object's words and the summary
                    if hidden[1] != i:
                        continue
                    key = "own_words_and_summary"
                else:
                    key = "summary" if hidden is None else "own_words" if hidden == i else "other_words"
                kept[key].append(state == "present")
            run.records[b].setdefault("knockout", {})[label] = states
    return kept


# ----------------------------------------------------------------------------------------------- the run

def _extend(into: dict, new: dict) -> None:
    """Append ``new``'s lists to ``into``'s at the same keys (nested dicts alike)."""
    for key, value in new.items():
        if isinstance(value, dict):
            _extend(into.setdefault(key, {}), value)
        else:
            into.setdefault(key, []).extend(value)


def _counts(prompts: list[str], seeds: list[int], steps: int, carry_prompts: int | None,
            knockout_prompts: int | None) -> tuple[int, int]:
    """Checks :func:`run_diagnose`'s arguments; the carry-over and knockout prompt counts (``None`` = all)."""
    if steps < 2:
        raise UnbleedError(f"--steps {steps}: diagnose needs at least 2 steps (an update and the step after it)")
    if not prompts:
        raise UnbleedError("--prompts: give at least one prompt")
    if not seeds:
        raise UnbleedError("--seeds: give at least one seed")
    carry_prompts = len(prompts) if carry_prompts is None else carry_prompts
    if carry_prompts < 0:
        raise UnbleedError(f"--carry-prompts {carry_prompts}: use 0 (none) or more")
    knockout_prompts = len(prompts) if knockout_prompts is None else knockout_prompts
    if knockout_prompts < 0:
        raise UnbleedError(f"--knockout-prompts {knockout_prompts}: use 0 (none) or more")
    return carry_prompts, knockout_prompts


def run_diagnose(pipe, prompts: list[str], seeds: list[int], *, steps: int = 50, guidance_scale: float = 7.5,
                 carry_prompts: int | None = None, knockout_prompts: int | None = None,
                 out: str | Path | None = None, methods: dict[str, Any] | None = None,
                 progress: Callable[[str, str], None] | None = None) -> dict[str, Any]:
    """The five figures (module docstring) on ``prompts`` × ``seeds``; a JSON-able dict. ``carry_prompts`` and
    ``knockout_prompts``: how many of the prompts (the first ones) get the carry-over runs and the knockout runs
    (``None`` = all, 0 = none). With ``out``, writes ``diagnose.json``, ``records.jsonl`` (per image) and
    ``maps/NNNN.png`` (per prompt) there. ``methods``: as for :func:`make_plan` (A&E's for (b) and (c), ELA's for
    (c) and (d))."""
    carry_prompts, knockout_prompts = _counts(prompts, seeds, steps, carry_prompts, knockout_prompts)
    t_start = time.perf_counter()
    plan = make_plan(pipe, seeds, steps, guidance_scale, methods)
    values: dict[str, Any] = {"predictiveness": {}, "carry_over": {}, "knockout": {k: [] for k in KNOCKOUTS}}
    records: list[dict[str, Any]] = []
    out = Path(out) if out is not None else None
    if out is not None:
        (out / "maps").mkdir(parents=True, exist_ok=True)
    for p, prompt in enumerate(prompts):
        run = plain_run(pipe, plan, prompt, progress)
        _extend(values, {"localisation": localisation(run, plan.blocks, plan.loc_steps),
                         "ela_localisation": ela_localisation(run, plan.ela, plan.loc_steps),
                         "predictiveness": predictiveness(run, plan.attend_excite, plan.window)})
        if p < carry_prompts:
            for name in CARRY_METHODS:
                if progress:
                    progress(prompt, f"{name} (one update at step {plan.carry_steps[name][0]})")
                _extend(values["carry_over"], {name: carry_over(pipe, plan, run, name)})
        if p < knockout_prompts:
            _extend(values["knockout"], knockout(pipe, plan, run, progress))
        records += run.records
        if out is not None:
            _picture(run, plan).save(out / "maps" / f"{p:04d}.png")
        del run
    figures = {**summarise(plan, values, records, pipe.unet, len(prompts), carry_prompts, knockout_prompts),
               "seconds": round(time.perf_counter() - t_start, 1)}
    if out is not None:
        (out / "diagnose.json").write_text(json.dumps({**figures, "prompt_list": prompts}, indent=1))
        with open(out / "records.jsonl", "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
    return figures


def summarise(plan: Plan, values: dict[str, Any], records: list[dict[str, Any]], unet, prompts: int,
              carry_prompts: int, knockout_prompts: int) -> dict[str, Any]:
    """The figures' JSON from the values the figure functions returned over all prompts and the image records."""
    objects = [o for r in records for o in r["objects"]]
    images = len(records)
    pred, carry = values["predictiveness"], values["carry_over"]
    negated = [-x for x in pred["peak"]]

    def by_step(v):
        return {str(s): {"entity": _mean_n(d["entity"]), "background": _mean_n(d["background"])} for s, d in v.items()}

    return {
        "prompts": prompts, "seeds": list(plan.seeds), "images": images, "steps": plan.steps,
        "guidance_scale": plan.guidance_scale,
        "detector": {"success": _r(sum(r["success"] for r in records) / images),
                     "fused": _r(sum(r["fused"] for r in records) / images),
                     "objects": len(objects), "neglected_objects": sum(o["neglected"] for o in objects),
                     "clean_objects": sum(o["clean"] for o in objects), "label": "state == neglected"},
        "localisation": {
            "steps": plan.loc_steps, "upsampling": "bilinear to the image, then Otsu",
            "blocks": {name: {"resolution": list(_map_size(plan.blocks[name], unet)),
                              "by_step": by_step(values["localisation"][name])} for name in plan.blocks},
        },
        "predictiveness": {
            "steps": [plan.window[0], plan.window[-1]],
            "peak_attention_neglect": {**_auc_figure(pred["peak"], pred["neglected"], negated),
                                       "label": "state == neglected",
                                       "orientation": "score = -peak: 1.0 = lower peak always marks neglect"},
            "peak_attention_not_present": {**_auc_figure(pred["peak"], pred["absent"], negated),
                                           "label": "count == 0 (no clean blob of its colour and shape)"},
            "overlap_fused": {**_auc_figure(pred["overlap"], pred["fused"]),
                              "orientation": "score = overlap: 1.0 = higher overlap always marks fusion"},
        },
        "carry_over": {
            "update_step": plan.update_step, "next_step": plan.next_step, "later_step": plan.later_step,
            "prompts": min(carry_prompts, prompts),
            "methods": {name: {"steps": list(plan.carry_steps[name]), "options": dict(plan.carry[name][0].options),
                               "step_size": plan.carry[name][1].schedule.step_size,
                               "loss_before_update": _r(float(np.mean(v["before"]))) if v["before"] else None,
                               "update_rms": _r(float(np.mean(v["update_rms"])), 5) if v["update_rms"] else None,
                               **{k: _diff_figure(v[k]) for k in CARRY_KEYS}}
                        for name, v in carry.items()},
        },
        "knockout": {"prompts": min(knockout_prompts, prompts),
                     "intervention": "columns replaced by the empty caption's encoding, conditional half",
                     **{k: _kept_figure(v) for k, v in values["knockout"].items()}},
        "ela_localisation": {
            "steps": plan.loc_steps, "layers": list(plan.ela.layers),
            "upsampling": "nearest (binary masks at map size)",
            "by_step": by_step(values["ela_localisation"]),
        },
    }


def _map_size(request: MapRequest, unet) -> tuple[int, int]:
    from ..guidance.attention import size_at_level

    latent = unet.config.sample_size
    return size_at_level((latent, latent), request.out_level)


def _picture(run: PromptRun, plan: Plan):
    """Per seed a row: the image, the detector's masks, then at the middle localisation step the up-1 (or first
    block's) entity and start-of-text maps and ELA's masks."""
    from PIL import Image

    from ..io.plots import image_grid
    from ..io.viz import colorize
    from ..methods.maps import group_map

    s = plan.loc_steps[len(plan.loc_steps) // 2]
    name = "up-1" if "up-1" in plan.blocks else next(iter(plan.blocks))
    (maps,) = run.maps((plan.blocks[name],), s)
    bk, ela_masks = ela_localise(plan.ela, run.maps(plan.ela.map_requests(run.unet), s), run.groups)

    def heat(m):
        up = F.interpolate(m[None, None].float(), size=(64, 64), mode="bilinear", align_corners=False)[0, 0]
        lo, hi = float(up.min()), float(up.max())
        return Image.fromarray(colorize(((up - lo) / (hi - lo) if hi > lo else up * 0).numpy()))

    def mask(m):
        return Image.fromarray((np.asarray(m, bool) * 255).astype(np.uint8), "L").convert("RGB").resize(
            (64, 64), Image.NEAREST)

    groups, arrays = run.groups, run.arrays
    ents = [gi for gi in run.objects if gi is not None]
    cols = (["image"] + [f"blob: {groups[gi].text}" for gi in ents] + ["background"]
            + [f"{name} {groups[gi].text}" for gi in ents] + [f"{name} SOT"]
            + [f"ELA M: {groups[gi].text}" for gi in ents] + ["ELA M_bk"])
    rows = []
    for b, seed in enumerate(run.result.seeds):
        cells = [Image.fromarray(arrays[b].astype(np.uint8))]
        cells += [mask(run.truth[b][k] if run.truth[b][k] is not None else np.zeros(arrays[b].shape[:2]))
                  for k, gi in enumerate(run.objects) if gi is not None]
        cells.append(mask(run.background[b]))
        cells += [heat(group_map(maps, groups[gi].indices)[b]) for gi in ents]
        cells.append(heat(maps[b, 0]))
        cells += [mask(ela_masks[b, gi].numpy() > 0.5) for gi in ents]
        cells.append(mask(bk[b].numpy() > 0.5))
        rows.append((f"seed {seed}", [c.resize((96, 96), Image.NEAREST) for c in cells]))
    return image_grid(rows, col_labels=cols, title=f"{run.prompt} (maps at step {s})")


__all__ = ["auc", "auc_ci", "iou", "otsu_mask", "nearest_mask", "overlap", "mean_ci", "block_requests",
           "scale_step", "neglect_label", "Plan", "PromptRun", "make_plan", "plain_run", "localisation",
           "ela_localise", "ela_localisation", "predictiveness", "carry_over", "knockout", "summarise",
           "run_diagnose"]
