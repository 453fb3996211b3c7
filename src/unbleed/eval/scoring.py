"""The metric families of ``unbleed sweep --metrics`` and ``unbleed judge``, loaded once and run together.

* ``clip`` — Attend-and-Excite's CLIP similarities and, with a captioner, BLIP text–text (:mod:`.metrics`);
* ``verdicts`` — object-level verdicts from an open-vocabulary detector and a colour check (:mod:`.verdicts`);
* ``blip-vqa`` — T2I-CompBench's BLIP-VQA attribute-binding score (:class:`.metrics.VqaScorer`).

``unbleed judge`` (:mod:`.judge`) runs them over a folder of images made elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from ..errors import UnbleedError

METRIC_NAMES = ("clip", "verdicts", "blip-vqa")


def parse_metrics(text: str | Sequence[str], flag: str = "--metrics") -> list[str]:
    """``"verdicts,blip-vqa"`` (or a list) → the metric names, checked; one error line naming an unknown one."""
    names = [n.strip().lower() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    if not names:
        raise UnbleedError(f"{flag} is empty: give a comma-separated list of {', '.join(METRIC_NAMES)}", field=flag)
    for n in names:
        if n not in METRIC_NAMES:
            raise UnbleedError(f"{flag} {','.join(names)}: unknown metric {n!r}; use a comma-separated list of "
                               f"{', '.join(METRIC_NAMES)}", field=flag)
    if len(set(names)) != len(names):
        raise UnbleedError(f"{flag} {','.join(names)}: a metric is named twice", field=flag)
    return names


@dataclass
class Metrics:
    """Loaded metric models; :meth:`score` gives each image's record ``metrics`` (every family's fields)."""

    scorers: list = field(default_factory=list)

    @classmethod
    def load(cls, names: Sequence[str], clip_model: str, caption_model: str | None, detector_model: str,
             vqa_model: str, device="cpu", allow_pickle: bool = False) -> "Metrics":
        from .metrics import Scorer, VqaScorer
        from .verdicts import ColourCheck, Judge, OwlDetector

        names = parse_metrics(list(names))
        scorers = []
        clip = None
        if "clip" in names or "verdicts" in names:  # one CLIP for the similarities and the colour check
            clip = Scorer.load(clip_model, caption_model if "clip" in names else None, device=device,
                               allow_pickle=allow_pickle)
        if "clip" in names:
            scorers.append(clip)
        if "verdicts" in names:
            scorers.append(Judge(OwlDetector.load(detector_model, device, allow_pickle), ColourCheck(clip)))
        if "blip-vqa" in names:
            scorers.append(VqaScorer.load(vqa_model, device, allow_pickle))
        return cls(scorers)

    def score(self, images, prompt: str) -> list[dict]:
        out = [{} for _ in images]
        for s in self.scorers:
            for rec, part in zip(out, s.score(images, prompt)):
                rec.update(part)
        return out


__all__ = ["METRIC_NAMES", "parse_metrics", "Metrics"]
