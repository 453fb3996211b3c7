"""Object-level verdicts for generated images: the shapes bench's verdicts on real images, and their tables.

One verdict logic and one table code path serve both worlds:

* :func:`judge` turns the *requested* objects of a prompt (``(attribute, noun)`` pairs) and the *regions* found in
  an image into the verdicts ``success``, ``neglected``, ``malformed``, ``wrong_shape``, ``recoloured``,
  ``duplicated``, ``leak``, ``fused`` (and the coarse ``missing``), named and defined as in the shapes bench
  (:mod:`unbleed.shapes.detect` documents each one). The shapes world's exact detector feeds it blobs
  (:func:`unbleed.shapes.detect.detect`); real images feed it :class:`Region` s built by :func:`regions_from_detections`
  from an open-vocabulary detector and a colour check (:class:`Judge`).
* :func:`summarise` gives every verdict's rate with its 95 % interval from a bootstrap over prompts and the paired
  difference from a baseline with its interval and McNemar p (:mod:`unbleed.stats`); :func:`write_plots` draws them
  and :func:`verdict_markdown` prints them. ``unbleed shapes bench``, ``unbleed report`` and ``unbleed judge`` all
  use these three.

**Real images** (``--metrics verdicts``). The protocol follows TIAM (Grimal et al., "TIAM — A Metric for Evaluating
Alignment in Text-to-Image Generation", WACV 2024: detect each entity the prompt names; an image succeeds only
when every entity is found, with its colour where one is asked for) and GenEval (Ghosh et al., NeurIPS 2023,
``evaluation/evaluate_images.py``: the detector's boxes per class above a confidence threshold, no NMS between
them; an object's colour by CLIP zero-shot classification of its box crop over the colours ``red orange yellow
green blue purple pink brown black white`` with the three templates "a photo of a {c} {noun}", "a photo of a
{c}-colored {noun}", "a photo of a {c} object", each class the normalised mean of its normalised template
embeddings). Both use closed-vocabulary COCO detectors (TIAM YOLOv8, GenEval Mask2Former); prompts such as
T2I-CompBench's name objects outside COCO, so we use an open-vocabulary detector:

* **Detector: OWLv2** (``Owlv2ForObjectDetection``, ``google/owlv2-base-patch16-ensemble``; Minderer et al., "Scaling
  Open-Vocabulary Object Detection", NeurIPS 2023). Chosen over Grounding DINO because each text query is scored
  independently for every predicted box (a sigmoid per query), so "the boxes of entity *n*" is well defined, one
  query per noun, with no phrase-span bookkeeping over a joint caption; its architecture is a CLIP ViT with box
  heads, so a tiny random configuration builds and runs in a second on a CPU (Grounding DINO's deformable attention
  and BERT text tower make the tiny one slow). Queries are "a photo of a {noun}" (as transformers' OWLv2 examples);
  each box keeps its best query (``post_process_object_detection``), boxes scoring below ``threshold`` (0.1, the
  transformers default) are dropped.
* **Duplicates and fusion (our choices; TIAM and GenEval have no such verdicts).** OWLv2 predicts a box per image
  patch, so one object gets several near-identical boxes: boxes of the same noun overlapping by IoU ≥ ``NMS_IOU``
  (0.5) are one object (greedy NMS by score); more than the requested count of the rest is ``duplicated``. Boxes of
  two *different* requested nouns overlapping by IoU ≥ ``FUSE_IOU`` (0.8) are one region read as both: a fused
  region (no single entity), as the shapes world's fused blob.
* **Colour.** Only entities whose prompt attributes include a colour word (:data:`COLOUR_WORDS`) get the colour
  check, GenEval's classifier on the box crop (GenEval composites the instance mask over grey first; OWLv2 has no
  masks, so the crop is the plain box), over GenEval's ten colours plus the requested colour when it is not among
  them. GenEval uses CLIP ViT-L/14; we use the sweep's ``--clip-model`` (pass ``openai/clip-vit-large-patch14`` to
  match GenEval). Other attributes (shape, texture) are not checked: T2I-CompBench's BLIP-VQA covers them.
* ``wrong_shape`` needs the detector to see nouns the prompt does not request; OWLv2 is queried with the prompt's
  nouns only, so on real images it is never set (the shapes stand-in, which sees the whole world, sets it).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import UnbleedError

VERDICTS = ("success", "neglected", "malformed", "wrong_shape", "recoloured", "duplicated", "leak", "fused", "missing")
STATES = ("present", "fused", "leaked", "malformed", "wrong_shape", "recoloured", "neglected")

GENEVAL_COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
COLOUR_TEMPLATES = ("a photo of a {c} {noun}", "a photo of a {c}-colored {noun}", "a photo of a {c} object")
COLOUR_WORDS = GENEVAL_COLOURS + ("gray", "grey", "gold", "golden", "silver", "beige", "tan", "cyan", "violet",
                                  "maroon", "navy", "turquoise", "magenta", "teal")
DEFAULT_DETECTOR = "google/owlv2-base-patch16-ensemble"
DETECTOR_QUERY = "a photo of a {}"
THRESHOLD = 0.1
NMS_IOU = 0.5
FUSE_IOU = 0.8


# ------------------------------------------------------------------------------------------- the verdict logic

def judge(requested: Sequence[tuple[str | None, str]], regions: Sequence[Any]) -> dict[str, Any]:
    """Verdicts of an image whose regions are ``regions`` against the ``requested`` ``(colour, noun)`` objects.

    A region needs ``shape`` (the entity it reads as, or None when it is no single entity), ``significant`` (its
    colours, most likely first), ``colour``, ``clean`` (one entity in one colour), ``to_json()``, and optionally
    ``nouns`` (the requested nouns whose boxes were merged into it, for a fused region). A requested colour of
    None asks for no colour: any clean region of the noun counts. The rules are the shapes bench's
    (:mod:`unbleed.shapes.detect`, steps 4 and 5); with every colour given and no ``nouns`` they are exactly those.
    Returns ``objects`` (per requested object: found, colour_correct, count, state), ``extra``, ``colour_leaks``,
    ``fused_blobs`` and the booleans of :data:`VERDICTS`."""
    requested = [tuple(r) for r in requested]
    req_colours = [c for c, _ in requested]
    clean = [b for b in regions if b.clean]

    def merged(b) -> tuple[str, ...]:
        return tuple(getattr(b, "nouns", ()) or ())

    fused = [b for b in regions if b.shape is None and
             (len(b.significant) >= 2 or (b.significant and req_colours.count(b.significant[0]) >= 2)
              or len(set(merged(b))) >= 2)]
    leaks: list[dict[str, Any]] = []
    for b in regions:
        if len(b.significant) >= 2 and b.shape is not None:
            leaks.append({"kind": "mixed", "shape": b.shape, "colours": list(b.significant)})
        elif b.clean and b.colour is not None:
            wanted = {c for c, s in requested if s == b.shape}
            if wanted and None not in wanted and b.colour not in wanted and b.colour in req_colours:
                leaks.append({"kind": "wrong_colour", "shape": b.shape, "colour": b.colour,
                              "requested": sorted(wanted)})
    fused_colours = {c for b in fused for c in b.significant}
    fused_nouns = {n for b in fused for n in merged(b)}

    objects = []
    for c, s in requested:
        count = sum(1 for b in clean if b.shape == s and (c is None or b.colour == c))
        found = count > 0 or any(b.shape == s for b in regions)
        objects.append({"colour": c, "shape": s, "found": found, "colour_correct": count > 0, "count": count,
                        "state": object_state(c, s, count, requested, regions, fused_colours, fused_nouns)})
    extra = [b.to_json() for b in regions
             if b not in fused and (b.shape is None or (b.colour, b.shape) not in requested
                                    and (None, b.shape) not in requested)]
    missing = any(not o["found"] and o["colour"] not in fused_colours and o["shape"] not in fused_nouns
                  for o in objects)
    success = (all(o["count"] == requested.count((o["colour"], o["shape"])) for o in objects)
               and not leaks and not fused)
    states = {o["state"] for o in objects}
    finer = {k: k in states for k in ("neglected", "malformed", "wrong_shape", "recoloured")}
    finer["duplicated"] = any(o["count"] > requested.count((o["colour"], o["shape"])) for o in objects)
    return {"objects": objects, "extra": extra, "colour_leaks": leaks, "fused_blobs": [b.to_json() for b in fused],
            "success": success, "missing": missing, "leak": bool(leaks), "fused": bool(fused), **finer}


def object_state(c: str | None, s: str, count: int, requested: Sequence[tuple[str | None, str]],
                 regions: Sequence[Any], fused_colours: set, fused_nouns: set = frozenset()) -> str:
    """What became of the requested object ``(c, s)``: the first of :data:`STATES` that holds (see
    :mod:`unbleed.shapes.detect`, step 5)."""
    req_colours = {rc for rc, _ in requested if rc is not None}
    req_shapes = {rs for _, rs in requested}
    if count > 0:
        return "present"
    if (c is not None and c in fused_colours) or s in fused_nouns:
        return "fused"
    if c is None:
        return "neglected"  # no colour asked: the noun is there (counted above), fused, or not there
    if any(b.shape == s and b.colour != c and (b.colour in req_colours or len(b.significant) >= 2) for b in regions):
        return "leaked"
    mine = [b for b in regions if c in b.significant]
    if any(b.shape is None for b in mine):
        return "malformed"
    if any(b.clean and b.colour == c and b.shape not in req_shapes for b in mine):
        return "wrong_shape"
    if any(b.clean and b.shape == s for b in regions):
        return "recoloured"
    return "neglected"


# ------------------------------------------------------------------------------------ detections → regions

@dataclass(frozen=True)
class Detection:
    """One detector box: ``box`` ``(x0, y0, x1, y1)`` in pixels, the ``label`` (the entity noun it reads as; None:
    a thing the detector sees that is no single entity), its ``score``, and its ``colours`` when the detector
    already knows them (None: the colour check decides)."""

    box: tuple[float, float, float, float]
    label: str | None
    score: float
    colours: tuple[str, ...] | None = None


@dataclass(eq=False)
class Region:
    """One object of a real image: a detection (or several merged), its entity (``shape``, None when fused), its
    ``significant`` colours (empty when no colour was checked), the ``nouns`` merged into it."""

    box: tuple[float, float, float, float]
    shape: str | None
    significant: list[str]
    score: float
    checked: bool = True  # a colour check ran (then clean means exactly one colour)
    nouns: tuple[str, ...] = ()

    @property
    def colour(self) -> str | None:
        return self.significant[0] if self.significant else None

    @property
    def clean(self) -> bool:
        return self.shape is not None and (len(self.significant) == 1 if self.checked else len(self.significant) <= 1)

    def to_json(self) -> dict[str, Any]:
        return {"shape": self.shape, "colours": list(self.significant), "score": round(self.score, 4),
                "box": [round(float(v), 1) for v in self.box], **({"nouns": list(self.nouns)} if self.nouns else {})}


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two ``(x0, y0, x1, y1)`` boxes."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(w, 0.0) * max(h, 0.0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def regions_from_detections(detections: Sequence[Detection], nms_iou: float = NMS_IOU,
                            fuse_iou: float = FUSE_IOU) -> list[Region]:
    """Regions of one image: detections by decreasing score; one of the same label as a kept one with IoU ≥
    ``nms_iou`` is dropped (greedy NMS per label); one of another label overlapping a kept region with IoU ≥
    ``fuse_iou`` is merged into it, which makes the region fused (``shape`` None, both nouns, both colours)."""
    regions: list[Region] = []
    labels: list[set] = []  # every label merged into each region
    for d in sorted(detections, key=lambda d: -d.score):
        same = [k for k, r in enumerate(regions) if d.label in labels[k] and box_iou(d.box, r.box) >= nms_iou]
        if same:
            continue
        other = [k for k, r in enumerate(regions) if d.label is not None and None not in labels[k]
                 and d.label not in labels[k] and box_iou(d.box, r.box) >= fuse_iou]
        colours = list(d.colours or ())
        if other:
            r = regions[other[0]]
            labels[other[0]].add(d.label)
            r.nouns = tuple(dict.fromkeys(r.nouns + ((r.shape,) if r.shape else ()) + (d.label,)))
            r.shape = None
            r.significant += [c for c in colours if c not in r.significant]
            continue
        regions.append(Region(tuple(map(float, d.box)), d.label, colours, float(d.score), d.colours is not None))
        labels.append({d.label})
    return regions


@functools.lru_cache(maxsize=1)
def _parser_tokenizer():
    from ..text.tokenizers import load_clip_tokenizer

    return load_clip_tokenizer()


def prompt_entities(prompt: str) -> list[tuple[str | None, str]]:
    """The requested ``(colour, noun)`` objects of a prompt: each entity of the prompt parser (``unbleed parse``),
    its first colour attribute (:data:`COLOUR_WORDS`) or None; one error line when the prompt names no entity."""
    from ..text.prompt import parse

    entities = parse(prompt, _parser_tokenizer()).entities
    if not entities:
        raise UnbleedError(f"prompt {prompt!r}: the parser finds no entity in it, so there is nothing to detect")
    out = []
    for e in entities:
        colours = [a.text.lower() for a in e.attributes if a.text.lower() in COLOUR_WORDS]
        out.append((colours[0] if colours else None, e.text.lower()))
    return out


# ----------------------------------------------------------------------------------- models: OWLv2 and colour

def tiny_owlv2(seed: int = 0):
    """A small OWLv2 with seeded random weights, the real CLIP BPE tokenizer, 32-px images (tests, offline)."""
    import torch
    from transformers import Owlv2Config, Owlv2ForObjectDetection

    from ..text.tokenizers import load_clip_tokenizer
    from .metrics import image_processor_class

    tokenizer = load_clip_tokenizer()
    config = Owlv2Config(
        text_config=dict(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16, bos_token_id=49406, eos_token_id=49407,
                         pad_token_id=0),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4),
        projection_dim=32,  # the class head compares projected queries with image features of the text width
    )
    torch.manual_seed(seed)
    model = Owlv2ForObjectDetection(config)
    processor = image_processor_class("Owlv2ImageProcessor")(size={"height": 32, "width": 32})
    return model, tokenizer, processor


class OwlDetector:
    """OWLv2 as a detector: ``detector(images, nouns)`` → per image, the :class:`Detection` s of those nouns."""

    def __init__(self, model, tokenizer, processor, device="cpu", threshold: float = THRESHOLD):
        self.model, self.tokenizer, self.processor = model, tokenizer, processor
        self.device, self.threshold = device, threshold

    @classmethod
    def load(cls, spec: str = DEFAULT_DETECTOR, device="cpu", allow_pickle: bool = False,
             threshold: float = THRESHOLD) -> "OwlDetector":
        from .metrics import load_model

        return cls(*load_model("--detector-model", spec, tiny_owlv2, "Owlv2ForObjectDetection", "AutoTokenizer",
                               "Owlv2ImageProcessor", device, allow_pickle), device=device, threshold=threshold)

    def __call__(self, images, nouns: Sequence[str]) -> list[list[Detection]]:
        import torch

        queries = [DETECTOR_QUERY.format(n) for n in nouns]
        text = self.tokenizer(queries, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
        out = []
        with torch.no_grad():
            for image in images:
                image = image.convert("RGB")
                pixels = self.processor(images=[image], return_tensors="pt")["pixel_values"].to(self.device)
                res = self.model(input_ids=text["input_ids"].to(self.device), pixel_values=pixels,
                                 attention_mask=text["attention_mask"].to(self.device))
                side = max(image.size)  # OWLv2 pads to a square before resizing: boxes are in the padded frame
                post = self.processor.post_process_object_detection(res, threshold=self.threshold,
                                                                    target_sizes=[(side, side)])[0]
                w, h = image.size
                dets = []
                for box, label, score in zip(post["boxes"].tolist(), post["labels"].tolist(),
                                             post["scores"].tolist()):
                    x0, y0, x1, y1 = min(max(box[0], 0), w), min(max(box[1], 0), h), min(box[2], w), min(box[3], h)
                    if x1 - x0 >= 1 and y1 - y0 >= 1:  # boxes clipped to the image; empty ones are no object
                        dets.append(Detection((x0, y0, x1, y1), nouns[int(label)], float(score)))
                out.append(dets)
        return out


class ColourCheck:
    """GenEval's colour classifier on a CLIP model (:class:`unbleed.eval.metrics.Scorer`'s encoders): a crop's
    colour is the class whose normalised mean template embedding is most similar."""

    def __init__(self, scorer):
        self.scorer = scorer
        self._classifiers: dict[tuple, Any] = {}

    def classifier(self, noun: str, classes: Sequence[str]):
        """``[classes, d]``: per colour, the normalised mean of its normalised template embeddings (GenEval's
        ``zero_shot_classifier``)."""
        import torch

        key = (noun, tuple(classes))
        if key not in self._classifiers:
            rows = []
            for c in classes:
                emb = self.scorer.encode_texts([t.format(c=c, noun=noun) for t in COLOUR_TEMPLATES]).mean(0)
                rows.append(emb / emb.norm())
            self._classifiers[key] = torch.stack(rows)
        return self._classifiers[key]

    def __call__(self, image, boxes: Sequence[Sequence[float]], noun: str, classes: Sequence[str]) -> list[str]:
        if not boxes:
            return []
        w, h = image.size
        crops = []
        for x0, y0, x1, y1 in boxes:
            x0, y0 = min(max(0, int(math.floor(x0))), w - 1), min(max(0, int(math.floor(y0))), h - 1)
            x1, y1 = min(w, max(x0 + 1, int(math.ceil(x1)))), min(h, max(y0 + 1, int(math.ceil(y1))))
            crops.append(image.crop((x0, y0, x1, y1)))
        sims = self.scorer.image_embeddings(crops) @ self.classifier(noun, classes).T
        return [classes[i] for i in sims.argmax(-1).tolist()]


class Judge:
    """Verdicts of real images: a detector (``detector(images, nouns)`` → :class:`Detection` s per image) and a
    colour check (``colours(image, boxes, noun, classes)`` → a colour per box), then
    :func:`regions_from_detections` and :func:`judge`. ``entities`` maps a prompt to its requested objects."""

    def __init__(self, detector: Callable, colours: Callable | None = None,
                 entities: Callable[[str], list] = prompt_entities):
        self.detector, self.colours, self.entities = detector, colours, entities

    def verdicts(self, images, prompt: str) -> list[dict[str, Any]]:
        """Per image: :func:`judge`'s dict plus ``regions`` (their JSON)."""
        requested = self.entities(prompt)
        nouns = list(dict.fromkeys(s for _, s in requested))
        wanted = {s: [c for c, s2 in requested if s2 == s and c is not None] for s in nouns}
        out = []
        for image, dets in zip(images, self.detector(images, nouns)):
            checked = [d for d in dets if d.colours is not None or d.label not in nouns]  # already coloured
            for noun in nouns:
                mine = [d for d in dets if d.label == noun and d.colours is None]
                if mine and wanted[noun]:
                    if self.colours is None:
                        raise UnbleedError(f"prompt {prompt!r} asks for colours and the verdicts have no colour "
                                           f"check: give the Judge a ColourCheck (a CLIP model)")
                    classes = list(GENEVAL_COLOURS) + [c for c in dict.fromkeys(wanted[noun])
                                                       if c not in GENEVAL_COLOURS]
                    found = self.colours(image, [d.box for d in mine], noun, classes)
                    checked += [Detection(d.box, d.label, d.score, (c,)) for d, c in zip(mine, found)]
                else:
                    checked += mine  # no colour asked for this noun: its regions carry none
            regions = regions_from_detections(checked)
            result = judge(requested, regions)
            out.append({**result, "regions": [r.to_json() for r in regions]})
        return out

    def score(self, images, prompt: str) -> list[dict[str, Any]]:
        """The record fields of ``--metrics verdicts``: ``verdicts`` (the booleans of :data:`VERDICTS`), ``states``
        (each requested object's) and ``regions``."""
        try:
            results = self.verdicts(images, prompt)
        except UnbleedError as err:  # e.g. a prompt with no entity: recorded, not fatal to a sweep
            return [{"verdicts": None, "verdicts_error": str(err)} for _ in images]
        return [{"verdicts": {v: bool(r[v]) for v in VERDICTS}, "states": [o["state"] for o in r["objects"]],
                 "regions": r["regions"]} for r in results]


# --------------------------------------------------------------------------------------------------- tables

def summarise(outcomes: dict[str, dict[str, Any]], baseline: str, verdicts: Sequence[str] = VERDICTS) -> dict:
    """Rates, their intervals and the paired differences from ``baseline`` of ``{label: {VERDICT: [prompts,
    seeds] booleans}}``: ``{label: {VERDICT: rate, "images", "ci": {VERDICT: [lo, hi]}, "vs_baseline": {"baseline",
    VERDICT: {diff, ci, excludes_zero, prompts, images, p_mcnemar}}}}`` (``vs_baseline`` absent for the baseline)."""
    from ..stats import compare, rate_interval

    figures: dict = {}
    for c, per in outcomes.items():
        rates = {v: rate_interval(per[v]) for v in verdicts}
        figures[c] = {**{v: r["rate"] for v, r in rates.items()}, "images": rates[verdicts[0]]["n"],
                      "ci": {v: r["ci"] for v, r in rates.items()}}
    for v in verdicts:
        diffs = compare({c: per[v] for c, per in outcomes.items()}, baseline)
        for c, d in diffs.items():
            figures[c].setdefault("vs_baseline", {"baseline": baseline})[v] = d
    return figures


def write_plots(figures: dict, baseline: str, out: Path, title: str, verdicts: Sequence[str] = VERDICTS,
                stem: str = "bench") -> list[Path]:
    """``STEM.png``: every rate with its 95 % interval; ``STEM-diff.png``: each contender minus the baseline,
    with its paired 95 % interval (when there is more than one contender). ``missing`` is left out of both."""
    from ..io.plots import bar_plot

    shown = [v for v in verdicts if v != "missing"]
    labels = list(figures)
    paths = [bar_plot({v: {c: figures[c][v] for c in labels} for v in shown}, out / f"{stem}.png",
                      errors={v: {c: tuple(figures[c]["ci"][v]) for c in labels} for v in shown},
                      title=title + " (95 % CI over prompts)", ylabel="fraction of images")]
    others = [c for c in labels if c != baseline]
    if others:
        paths.append(bar_plot({v: {c: figures[c]["vs_baseline"][v]["diff"] for c in others} for v in shown},
                              out / f"{stem}-diff.png",
                              errors={v: {c: tuple(figures[c]["vs_baseline"][v]["ci"]) for c in others}
                                      for v in shown},
                              title=f"{title}: difference from {baseline} (paired 95 % CI)",
                              ylabel=f"method − {baseline}"))
    return paths


def verdict_markdown(figures: dict, baseline: str, verdicts: Sequence[str] = VERDICTS) -> str:
    """Two Markdown tables: each verdict's rate with its 95 % interval, then each method minus ``baseline`` with its
    paired 95 % interval (``*`` where the interval excludes 0). ``missing`` is kept (TIAM's success is
    ``1 − missing``)."""
    shown = list(verdicts)
    head = ["method", "images"] + shown
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c, f in figures.items():
        lines.append("| " + " | ".join([c, str(f["images"])] + [
            f"{f[v]:.3f} [{f['ci'][v][0]:.3f}, {f['ci'][v][1]:.3f}]" for v in shown]) + " |")
    others = [c for c in figures if c != baseline]
    if others:
        lines += ["", f"paired difference from {baseline} (95 % CI over prompts; * excludes 0)", "",
                  "| " + " | ".join(["method", "prompts"] + shown) + " |", "|" + "---|" * (len(shown) + 2)]
        for c in others:
            d = figures[c]["vs_baseline"]
            lines.append("| " + " | ".join([c, str(d[shown[0]]["prompts"])] + [
                f"{d[v]['diff']:+.3f} [{d[v]['ci'][0]:+.3f}, {d[v]['ci'][1]:+.3f}]{'*' if d[v]['excludes_zero'] else ''}"
                for v in shown]) + " |")
    return "\n".join(lines) + "\n"


def outcomes_from_records(records: Sequence[dict], key: str = "verdicts",
                          verdicts: Sequence[str] = VERDICTS) -> tuple[dict, dict]:
    """Paired outcome matrices from per-image records (``metrics[key]``: ``{VERDICT: bool}``): ``({method:
    {VERDICT: [prompts, seeds] bool array}}, {"prompts", "seeds", "dropped"})`` over the prompts and seeds that
    every method has scored (an image missing for one method drops its prompt–seed pair from all, so the
    comparison stays paired)."""
    import numpy as np

    cells: dict[tuple, dict[str, dict]] = {}
    methods: list[str] = []
    for r in records:
        v = (r.get("metrics") or {}).get(key)
        if not isinstance(v, dict):
            continue
        methods.append(r["method"])
        cells.setdefault((r["prompt_index"], r["seed"]), {})[r["method"]] = v
    methods = list(dict.fromkeys(methods))
    full = {k: m for k, m in cells.items() if all(x in m for x in methods)}
    prompts = sorted({p for p, _ in full})
    seeds = sorted({s for _, s in full})
    keep = [p for p in prompts if all((p, s) in full for s in seeds)]  # a [prompts, seeds] grid
    out = {m: {v: np.zeros((len(keep), len(seeds)), bool) for v in verdicts} for m in methods}
    for i, p in enumerate(keep):
        for j, s in enumerate(seeds):
            for m in methods:
                for v in verdicts:
                    out[m][v][i, j] = bool(full[(p, s)][m].get(v, False))
    dropped = sum(len(m) for k, m in cells.items()) - len(keep) * len(seeds) * len(methods)
    return out, {"prompts": len(keep), "seeds": len(seeds), "dropped": dropped}


__all__ = ["VERDICTS", "STATES", "GENEVAL_COLOURS", "COLOUR_TEMPLATES", "COLOUR_WORDS", "DEFAULT_DETECTOR",
           "THRESHOLD", "NMS_IOU", "FUSE_IOU", "judge", "object_state", "Detection", "Region", "box_iou",
           "regions_from_detections", "prompt_entities", "tiny_owlv2", "OwlDetector", "ColourCheck", "Judge",
           "summarise", "write_plots", "verdict_markdown", "outcomes_from_records"]
