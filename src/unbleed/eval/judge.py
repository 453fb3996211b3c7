"""``unbleed judge FOLDER``: score images made elsewhere (or a sweep run folder again, with other metrics). The folder
holds ``records.jsonl`` (one ``{"image", "prompt", "method", "seed"[, "category"]}`` per line, image paths relative
to the folder) or a sweep's ``records-*.jsonl``; the scores go to ``OUT/judged.jsonl`` and the tables of
:func:`unbleed.eval.report.verdict_report`.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UnbleedError
from .scoring import Metrics
from .sweep import read_records


def folder_records(folder: str | Path) -> list[dict]:
    """The image records of ``folder``: a sweep's ``records-*.jsonl``, else ``records.jsonl``; every record with an
    image gets ``prompt_index`` (the prompt's first-seen order when absent) and ``category`` (``all``)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UnbleedError(f"FOLDER {folder}: no such folder: give a sweep run folder or a folder with records.jsonl")
    records = read_records(folder)
    if not records and (folder / "records.jsonl").is_file():
        for n, line in enumerate((folder / "records.jsonl").read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                if not all(isinstance(rec.get(k), str) for k in ("image", "prompt", "method")):
                    raise KeyError
                int(rec["seed"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
                raise UnbleedError(f"FOLDER {folder}: records.jsonl line {n} is not a JSON object with \"image\", "
                                   f"\"prompt\", \"method\" and \"seed\": write {{\"image\": \"0001.png\", \"prompt\": "
                                   f"\"a cat and a dog\", \"method\": \"sd\", \"seed\": 0}} per line") from None
            records.append(rec)
    records = [r for r in records if "image" in r]
    if not records:
        raise UnbleedError(f"FOLDER {folder}: no image records there (records-*.jsonl of unbleed sweep, or "
                           f"records.jsonl with one {{\"image\", \"prompt\", \"method\", \"seed\"}} per line): write "
                           f"records.jsonl next to the images")
    order: dict[str, int] = {}
    for r in records:
        r.setdefault("prompt_index", order.setdefault(r["prompt"], len(order)))
        r.setdefault("category", "all")
        r["seed"] = int(r["seed"])
    return records


def judge_folder(folder: str | Path, metrics: Metrics, out: str | Path, progress=None) -> list[dict]:
    """Score every image of ``folder`` (:func:`folder_records`) with ``metrics``; write ``OUT/judged.jsonl`` (each
    record with its new metrics merged into ``metrics``, the image path relative to ``folder``) and return the
    records."""
    from PIL import Image

    folder, out = Path(folder), Path(out)
    records = folder_records(folder)
    missing = [r["image"] for r in records if not (folder / r["image"]).is_file()]
    if missing:
        raise UnbleedError(f"FOLDER {folder}: image {missing[0]} of its records is not there ({len(missing)} "
                           f"missing): copy the images back or drop their records")
    out.mkdir(parents=True, exist_ok=True)
    by_prompt: dict[str, list[dict]] = {}
    for r in records:
        by_prompt.setdefault(r["prompt"], []).append(r)
    if progress:
        progress.start(len(records))
    done = 0
    with open(out / "judged.jsonl", "w", encoding="utf-8") as fh:
        for prompt, recs in by_prompt.items():
            images = [Image.open(folder / r["image"]).convert("RGB") for r in recs]
            for r, m in zip(recs, metrics.score(images, prompt)):
                r["metrics"] = {**(r.get("metrics") or {}), **m}
                fh.write(json.dumps(r, ensure_ascii=False) + "\n")
            done += len(recs)
            if progress:
                progress.step(done)
    return records


__all__ = ["folder_records", "judge_folder"]
