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
with no update on the same seed? For ``attend-excite`` and ``ela`` (their default options) and
the first ``carry_prompts`` prompts × all seeds: the plain run (recorded above) and a run with exactly one update
at step s = 5 (the method's default schedule with window ``(s, s+1)``, no refinement). The loss is the method's
own (``prepare_step`` on the detached maps, then ``loss``), from maps recorded on the regular pass, i.e. of the
latent the scheduler steps, with the :class:`~unbleed.methods.StepContext` the sampler builds (step, number of
steps, prompt length, groups). Both runs are :class:`~unbleed.guidance.spec.RunSpec` runs of the sampler.
Reported per method: the guided − unguided loss difference at s (the updated latent, with the step's own state
from the pre-update maps — the update's immediate effect), at s+1 and at 25 (state recomputed from that step's
maps, as the method would), each with its mean, a 95 % paired bootstrap CI over the images (2,000 resamples,
seed 0) and the fraction of images where it went down; plus the trace's loss before the update.

**(d) ELA's localisation.** The IoU of each ELA mask ``M^{e_i}`` with its object's clean blob and of ``M_bk`` with
the background, masks computed by ELA's own ``prepare_step`` (its ``layers``, Otsu, empty-mask fallback) on the
maps it requests, at steps 5, 10, 25. These masks are binary at map resolution (8×8), so they are upsampled
nearest-neighbour (each cell 8×8 pixels): what ELA's loss sees.

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
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..guidance.attention import MapRequest, blocks_with_cross_attention, level_of
from ..errors import UnbleedError
from ..stats import rate_interval

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


def _maps_for(trace, recorded: list[MapRequest], requests: tuple[MapRequest, ...], step: int) -> tuple:
    """Recorded maps of ``requests`` (a method's ``map_requests``, or one block's ``(request,)``) at ``step``."""
    rec = trace[step].raw_maps
    return tuple(rec[recorded.index(r)] for r in requests)


def _method_loss(method, unet, maps, ctx, state_maps=None) -> torch.Tensor:
    """The method's loss ``[B]`` on ``maps`` at ``ctx``, its step state from ``state_maps`` (default: the same
    maps) and a fresh run object."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state = method.prepare_step(maps if state_maps is None else state_maps, ctx, method.new_run(unet))
        return method.loss(maps, ctx, state).float()


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


def run_diagnose(pipe, prompts: list[str], seeds: list[int], *, steps: int = 50, guidance_scale: float = 7.5,
                 carry_prompts: int | None = None, knockout_prompts: int | None = None,
                 out: str | Path | None = None,
                 progress: Callable[[str, str], None] | None = None) -> dict[str, Any]:
    """The five figures (module docstring) on ``prompts`` × ``seeds``; a JSON-able dict. ``carry_prompts`` and
    ``knockout_prompts``: how many of the prompts (the first ones) get the carry-over runs and the knockout runs
    (``None`` = all, 0 = none). With ``out``, writes ``diagnose.json``, ``records.jsonl`` (per image) and
    ``maps/NNNN.png`` (per prompt) there."""
    from ..guidance.spec import RunSpec
    from ..methods import StepContext
    from ..methods.maps import group_map
    from ..text.prompt import token_groups
    from .detect import detect, find_blobs, load_image
    from .world import parse_caption

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
    t_start = time.perf_counter()
    unet = pipe.unet
    blocks = block_requests(unet)
    plain_spec = RunSpec(method="sd", steps=steps, guidance_scale=guidance_scale, seeds=tuple(seeds))
    ae, ela = RunSpec(method="attend-excite").build()[0], RunSpec(method="ela").build()[0]
    ae_req, ela_req = ae.map_requests(unet), ela.map_requests(unet)

    loc_steps = sorted({scale_step(s, steps) for s in LOCALISATION_STEPS})
    window = list(range(scale_step(PREDICT_WINDOW[0], steps), scale_step(PREDICT_WINDOW[1], steps) + 1))
    s_upd = min(scale_step(CARRY_STEP, steps), steps - 2)
    s_next, s_later = s_upd + 1, max(scale_step(CARRY_LATER, steps), s_upd + 1)
    # (c)'s runs: each method's defaults with exactly one update, at s_upd, and no refinement
    carry_specs = {name: plain_spec.replace(method=name, window=(s_upd, s_upd + 1), refine={})
                   for name in CARRY_METHODS}
    carry_built = {name: spec.build() for name, spec in carry_specs.items()}
    carry = {name: built[0] for name, built in carry_built.items()}
    recorded: list[MapRequest] = list(dict.fromkeys(
        [*blocks.values(), *ae_req, *ela_req, *(r for m in carry.values() for r in m.map_requests(unet))]))
    carry_steps = sorted({s_upd, s_next, s_later})
    needed = set(loc_steps) | set(window) | set(carry_steps)

    def keep_needed(i, n, rec):
        if i not in needed:
            rec.raw_maps = None

    loc = {b: {s: {"entity": [], "background": []} for s in loc_steps} for b in blocks}
    ela_loc = {s: {"entity": [], "background": []} for s in loc_steps}
    peak_scores, peak_labels, absent_labels = [], [], []
    ov_scores, ov_labels = [], []
    carry_diffs = {m: {"at_step": [], "next_step": [], "later": []} for m in carry}
    carry_before = {m: [] for m in carry}
    knocked: dict[str, list[bool]] = {"own_words": [], "other_words": [], "summary": [], "own_words_and_summary": []}
    plain_built = plain_spec.build()
    with torch.no_grad():  # the empty caption's encoding: (e)'s clean columns
        clean = pipe.encode_prompt("", pipe.device, 1, False)[0][0]
    n_images = n_success = n_fused = n_objects = n_neglected = n_clean = 0
    records: list[dict[str, Any]] = []
    out = Path(out) if out is not None else None
    if out is not None:
        (out / "maps").mkdir(parents=True, exist_ok=True)

    for p, prompt in enumerate(prompts):
        pairs = parse_caption(prompt)
        groups = token_groups(pipe.tokenizer, prompt, None)
        obj_group = _object_groups(pairs, groups)
        if progress:
            progress(prompt, "sd")
        plain = plain_spec.run(pipe, prompt, groups=groups, record=tuple(recorded), callback=keep_needed)
        # the context as the sampler builds it (its number of steps is the loop's: PNDM runs steps + 1 timesteps)
        context = StepContext.of(pipe.tokenizer, prompt, groups, num_steps=len(plain.trace))

        def ctx(step: int, context: StepContext = context) -> StepContext:
            return dataclasses.replace(context, step=step)

        arrays = [load_image(im) for im in plain.images]
        size = tuple(arrays[0].shape[:2])
        verdicts = [detect(a, prompt) for a in arrays]
        blob_lists = [find_blobs(a) for a in arrays]
        # Ground truth per image: the clean blob of each object (or None), and the background.
        truth, background = [], []
        for blobs, verdict in zip(blob_lists, verdicts):
            masks = []
            for c, s in pairs:
                hits = [b for b in blobs if b.clean and b.colour == c and b.shape == s]
                masks.append(hits[0].mask.astype(bool) if len(hits) == 1 else None)
            truth.append(masks)
            fg = np.zeros(size, bool)
            for b in blobs:
                fg |= b.mask.astype(bool)
            background.append(~fg)
            n_images += 1
            n_success += bool(verdict["success"])
            n_fused += bool(verdict["fused"])

        # (a) localisation per block and step; (d) ELA's masks
        for s in loc_steps:
            for name, req in blocks.items():
                (maps,) = _maps_for(plain.trace, recorded, (req,), s)
                sot = otsu_mask(maps[:, 0], size)
                for k, gi in enumerate(obj_group):
                    if gi is None:
                        continue
                    ent = otsu_mask(group_map(maps, groups[gi].indices), size)
                    for b in range(len(seeds)):
                        if truth[b][k] is not None:
                            v = iou(ent[b].numpy(), truth[b][k])
                            if v is not None:
                                loc[name][s]["entity"].append(v)
                for b in range(len(seeds)):
                    v = iou(sot[b].numpy(), background[b])
                    if v is not None:
                        loc[name][s]["background"].append(v)
            maps = _maps_for(plain.trace, recorded, ela_req, s)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                state = ela.prepare_step(maps, ctx(s), ela.new_run(unet))
            bk = nearest_mask(state["background"], size)
            ent_masks = nearest_mask(state["masks"], size)
            for b in range(len(seeds)):
                v = iou(bk[b].numpy(), background[b])
                if v is not None:
                    ela_loc[s]["background"].append(v)
                for k, gi in enumerate(obj_group):
                    if gi is not None and truth[b][k] is not None:
                        v = iou(ent_masks[b, gi].numpy(), truth[b][k])
                        if v is not None:
                            ela_loc[s]["entity"].append(v)

        # (b) predictiveness: A&E's peak attention and the entities' overlap, averaged over the window
        peaks, overlaps = [], []
        for s in window:
            maps = _maps_for(plain.trace, recorded, ae_req, s)
            state = ae.prepare_step(maps, ctx(s), ae.new_run(unet))
            peaks.append(ae.max_attention(maps[0], state))  # [B, entities]
            ents = [group_map(maps[0], groups[gi].indices) for gi in obj_group if gi is not None]
            if len(ents) >= 2:
                pair = [overlap(ents[i], ents[j]) for i in range(len(ents)) for j in range(i + 1, len(ents))]
                overlaps.append(torch.stack(pair, 1).amax(1))
        peak = torch.stack(peaks).mean(0)
        over = torch.stack(overlaps).mean(0) if overlaps else None
        for b, verdict in enumerate(verdicts):
            rec: dict[str, Any] = {"prompt": prompt, "seed": seeds[b], "success": bool(verdict["success"]),
                                   "fused": bool(verdict["fused"]), "objects": []}
            for k, gi in enumerate(obj_group):
                o = verdict["objects"][k]
                neglected = neglect_label(o)
                n_objects += 1
                n_neglected += neglected
                n_clean += truth[b][k] is not None
                entry = {"colour": o["colour"], "shape": o["shape"], "state": o["state"], "neglected": neglected,
                         "clean": truth[b][k] is not None}
                if gi is not None:
                    pk = float(peak[b, gi])
                    peak_scores.append(-pk)
                    peak_labels.append(neglected)
                    absent_labels.append(o["count"] == 0)
                    entry["peak"] = round(pk, 5)
                rec["objects"].append(entry)
            if over is not None:
                ov_scores.append(float(over[b]))
                ov_labels.append(bool(verdict["fused"]))
                rec["overlap"] = round(float(over[b]), 5)
            records.append(rec)

        # (c) carry-over: one update at s_upd against none
        if p < carry_prompts:
            for name, method in carry.items():
                if progress:
                    progress(prompt, f"{name} (one update at step {s_upd})")
                req = method.map_requests(unet)
                guided = carry_specs[name].run(pipe, prompt, groups=groups, record=tuple(recorded),
                                               callback=keep_needed, output_type="latent", built=carry_built[name])

                def loss(trace, step, state_maps=None, method=method, req=req):
                    return _method_loss(method, unet, _maps_for(trace, recorded, req, step), ctx(step), state_maps)

                pre = _maps_for(plain.trace, recorded, req, s_upd)
                values = {
                    "at_step": (loss(guided.trace, s_upd, state_maps=pre), loss(plain.trace, s_upd)),
                    "next_step": (loss(guided.trace, s_next), loss(plain.trace, s_next)),
                    "later": (loss(guided.trace, s_later), loss(plain.trace, s_later)),
                }
                carry_before[name] += list(guided.trace[s_upd].loss or [])
                for key, (g, u) in values.items():
                    diffs = (g - u).tolist()
                    carry_diffs[name][key] += diffs
                    for b, d in enumerate(diffs):
                        records[-len(seeds) + b].setdefault("carry_over", {}).setdefault(name, {})[key] = {
                            "guided": round(float(g[b]), 6), "unguided": round(float(u[b]), 6)}
        # (e) token knockout: replace an object's words, another's, the summary, or words and summary
        if p < knockout_prompts:
            words = [[*groups[g].indices, *(i for a in groups[g].attributes for i in a.indices)]
                     if g is not None else None for g in obj_group]
            present = [[o["state"] == "present" for o in v["objects"]] for v in verdicts]
            summary = list(range(context.eot, clean.shape[0]))
            conditions = [(f"words of object {i}", cols, i) for i, cols in enumerate(words) if cols]
            conditions.append(("summary", summary, None))
            conditions += [(f"words of object {i} and summary", cols + summary, ("and summary", i))
                           for i, cols in enumerate(words) if cols]
            for label, cols, hidden in conditions:
                if progress:
                    progress(prompt, f"sd, {label} replaced")
                with cleaned_columns(unet, cols, clean, cfg=guidance_scale > 1.0):
                    result = plain_spec.run(pipe, prompt, groups=groups, built=plain_built)
                for b, image in enumerate(result.images):
                    states = [o["state"] for o in detect(image, prompt)["objects"]]
                    for i, state in enumerate(states):
                        if not present[b][i]:
                            continue
                        if isinstance(hidden, tuple):  # an object's words and the summary
                            if hidden[1] != i:
                                continue
                            key = "own_words_and_summary"
                        else:
                            key = "summary" if hidden is None else "own_words" if hidden == i else "other_words"
                        knocked[key].append(state == "present")
                    records[-len(seeds) + b].setdefault("knockout", {})[label] = states
        if out is not None:
            _picture(plain, arrays, truth, background, groups, obj_group, blocks, recorded, ela, ela_req,
                     ctx, loc_steps, prompt, unet).save(out / "maps" / f"{p:04d}.png")
        del plain

    figures: dict[str, Any] = {
        "prompts": len(prompts), "seeds": list(seeds), "images": n_images, "steps": steps,
        "guidance_scale": guidance_scale,
        "detector": {"success": _r(n_success / n_images), "fused": _r(n_fused / n_images),
                     "objects": n_objects, "neglected_objects": n_neglected, "clean_objects": n_clean,
                     "label": "state == neglected"},
        "localisation": {
            "steps": loc_steps, "upsampling": "bilinear to the image, then Otsu",
            "blocks": {name: {"resolution": list(_map_size(blocks[name], unet)),
                              "by_step": {str(s): {"entity": _mean_n(v["entity"]),
                                                   "background": _mean_n(v["background"])}
                                          for s, v in loc[name].items()}}
                       for name in blocks},
        },
        "predictiveness": {
            "steps": [window[0], window[-1]],
            "peak_attention_neglect": {**_auc_figure(peak_scores, peak_labels, [-x for x in peak_scores]),
                                       "label": "state == neglected",
                                       "orientation": "score = -peak: 1.0 = lower peak always marks neglect"},
            "peak_attention_not_present": {**_auc_figure(peak_scores, absent_labels, [-x for x in peak_scores]),
                                           "label": "count == 0 (no clean blob of its colour and shape)"},
            "overlap_fused": {**_auc_figure(ov_scores, ov_labels),
                              "orientation": "score = overlap: 1.0 = higher overlap always marks fusion"},
        },
        "carry_over": {
            "update_step": s_upd, "next_step": s_next, "later_step": s_later,
            "prompts": min(carry_prompts, len(prompts)),
            "methods": {name: {"loss_before_update": _r(float(np.mean(carry_before[name])))
                               if carry_before[name] else None,
                               **{k: _diff_figure(v) for k, v in carry_diffs[name].items()}}
                        for name in carry} if carry_prompts else {},
        },
        "knockout": {"prompts": min(knockout_prompts, len(prompts)),
                     "intervention": "columns replaced by the empty caption's encoding, conditional half",
                     **{k: _kept_figure(v) for k, v in knocked.items()}},
        "ela_localisation": {
            "steps": loc_steps, "layers": list(ela.layers), "upsampling": "nearest (binary masks at map size)",
            "by_step": {str(s): {"entity": _mean_n(v["entity"]), "background": _mean_n(v["background"])}
                        for s, v in ela_loc.items()},
        },
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    if out is not None:
        (out / "diagnose.json").write_text(json.dumps({**figures, "prompt_list": prompts}, indent=1))
        with open(out / "records.jsonl", "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
    return figures


def _map_size(request: MapRequest, unet) -> tuple[int, int]:
    from ..guidance.attention import size_at_level

    latent = unet.config.sample_size
    return size_at_level((latent, latent), request.out_level)


def _picture(plain, arrays, truth, background, groups, obj_group, blocks, recorded, ela, ela_req, ctx,
             loc_steps, prompt, unet):
    """Per seed a row: the image, the detector's masks, then at the middle localisation step the up-1 (or first
    block's) entity and start-of-text maps and ELA's masks."""
    from PIL import Image

    from ..io.plots import image_grid
    from ..io.viz import colorize
    from ..methods.maps import group_map

    s = loc_steps[len(loc_steps) // 2]
    name = "up-1" if "up-1" in blocks else next(iter(blocks))
    (maps,) = _maps_for(plain.trace, recorded, (blocks[name],), s)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state = ela.prepare_step(_maps_for(plain.trace, recorded, ela_req, s), ctx(s), ela.new_run(unet))

    def heat(m):
        up = F.interpolate(m[None, None].float(), size=(64, 64), mode="bilinear", align_corners=False)[0, 0]
        lo, hi = float(up.min()), float(up.max())
        return Image.fromarray(colorize(((up - lo) / (hi - lo) if hi > lo else up * 0).numpy()))

    def mask(m):
        return Image.fromarray((np.asarray(m, bool) * 255).astype(np.uint8), "L").convert("RGB").resize(
            (64, 64), Image.NEAREST)

    ents = [gi for gi in obj_group if gi is not None]
    cols = (["image"] + [f"blob: {groups[gi].text}" for gi in ents] + ["background"]
            + [f"{name} {groups[gi].text}" for gi in ents] + [f"{name} SOT"]
            + [f"ELA M: {groups[gi].text}" for gi in ents] + ["ELA M_bk"])
    rows = []
    for b, seed in enumerate(plain.seeds):
        cells = [Image.fromarray(arrays[b].astype(np.uint8))]
        cells += [mask(truth[b][k] if truth[b][k] is not None else np.zeros(arrays[b].shape[:2]))
                  for k, gi in enumerate(obj_group) if gi is not None]
        cells.append(mask(background[b]))
        cells += [heat(group_map(maps, groups[gi].indices)[b]) for gi in ents]
        cells.append(heat(maps[b, 0]))
        cells += [mask(state["masks"][b, gi].numpy() > 0.5) for gi in ents]
        cells.append(mask(state["background"][b].numpy() > 0.5))
        rows.append((f"seed {seed}", [c.resize((96, 96), Image.NEAREST) for c in cells]))
    return image_grid(rows, col_labels=cols, title=f"{prompt} (maps at step {s})")


__all__ = ["auc", "auc_ci", "iou", "otsu_mask", "nearest_mask", "overlap", "mean_ci", "block_requests",
           "scale_step", "neglect_label", "run_diagnose"]
