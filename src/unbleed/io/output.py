"""Writing results: one PNG per seed with every parameter in its text metadata, and the JSON records.

The one home of the per-image record (:func:`record_for`: what ``unbleed generate`` prints and embeds in the PNG,
what a sweep's ``records-*.jsonl`` and a shapes bench's ``records.jsonl`` hold around their own fields) and of the
image names (:func:`image_name`). File names never come from the prompt: ``NNNN-METHOD-sSEED.png`` with NNNN the
next free number in the folder (a sweep: the prompt's index in its suite), and a file is created exclusively, so
earlier results are never overwritten.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from PIL.PngImagePlugin import PngInfo

from .. import __version__
from ..checks import out_folder
from ..errors import UnbleedError
from ..run.sampler import Result
from ..text.tokens import groups_as_dicts

IDENTITY = ("prompt", "seed", "method", "model")  # what names an image; the rest of a record is its parameters


def image_name(number: int, method: str, seed: int) -> str:
    """``NNNN-METHOD-sSEED.png``: the one naming rule of result images (``number``: the next free number of the
    folder, or a sweep's prompt index — never anything from the prompt's text)."""
    return f"{number:04d}-{method}-s{seed}.png"


def record_for(result: Result, index: int, prompt: str, method: str, model: str | None) -> dict:
    """The JSON record of ``result``'s ``index``-th image: its identity (prompt, seed, method — the label it runs
    under — and model), the token groups, the run's parameters (steps, guidance scale, size, scheduler, method
    options, schedule…), the guidance trace and the version. Everything needed to reproduce the image.

    Front ends add their own fields around it: ``save_result`` the paths, a sweep its key, suite fields, image and
    metrics (with the parameters nested, :func:`nest_params`), a shapes bench the detector's verdicts."""
    guided = [r for r in result.trace if r.guided]
    return {
        "prompt": prompt,
        "seed": result.seeds[index],
        "method": method,
        "model": model,
        "tokens": groups_as_dicts(result.groups),
        **result.params,
        "guidance": [{"step": r.step, "timestep": r.timestep, "alpha": r.alpha, "loss": r.loss[index],
                      "final_loss": r.final_loss[index], "refine_iters": r.refine_iters,
                      "update_rms": r.update_rms[index]} for r in guided],
        "seconds_batch": round(result.seconds, 3),
        "unbleed_version": __version__,
    }


def nest_params(record: dict) -> dict:
    """``record`` with everything but its identity (:data:`IDENTITY`) under ``params``: the layout of a sweep's
    records, whose top level holds the suite's fields."""
    return {**{k: record[k] for k in IDENTITY if k in record},
            "params": {k: v for k, v in record.items() if k not in IDENTITY}}


def _next_index(out: Path) -> int:
    numbers = [int(p.name[:4]) for p in out.glob("[0-9][0-9][0-9][0-9]-*.png") if p.name[:4].isdigit()]
    return max(numbers, default=-1) + 1


def check_out_dir(out_dir: str | Path) -> Path:
    """Create ``out_dir`` if needed and make sure a file can be written in it: :func:`unbleed.checks.out_folder`
    (a real probe). Call it before any work starts."""
    return out_folder(out_dir)


def _write_png(path: Path, image, out_dir, mode: str = "xb", **params) -> bool:
    """Write ``image`` as a PNG at ``path`` (``xb``: only if the name is free — False when taken). A failed write
    leaves no partial file and is one :class:`UnbleedError`."""
    try:
        with open(path, mode) as fh:
            image.save(fh, format="PNG", **params)
    except FileExistsError:
        return False
    except BaseException as err:
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise UnbleedError(f"--out {out_dir}: cannot write {path.name} ({err.strerror or err}); the images "
                               f"written before it are kept; free some space or choose a writable folder") from None
        raise
    return True


def save_result(result: Result, prompt: str, method: str, model: str, out_dir: str | Path,
                save_attention: bool = False, extra: dict | None = None, number: int | None = None) -> list[dict]:
    """Write each image (and its attention picture) into ``out_dir``; return the records with their paths.
    ``number``: the first NNNN to try (default: the folder's next free number; a taken name is skipped)."""
    out = check_out_dir(out_dir)
    records = []
    number = _next_index(out) if number is None else max(number, _next_index(out))
    for i, image in enumerate(result.images):
        rec = {**record_for(result, i, prompt, method, model), **(extra or {})}
        meta = PngInfo()
        for key in ("prompt", "seed", "method", "model"):
            meta.add_itxt(key, str(rec[key]))
        meta.add_itxt("unbleed", json.dumps(rec))
        meta.add_itxt("parameters", f"{prompt}\nSteps: {rec['steps']}, Sampler: {rec['scheduler']}, CFG scale: "
                                    f"{rec['guidance_scale']}, Seed: {rec['seed']}, Size: {rec['width']}x"
                                    f"{rec['height']}, Model: {model}, Method: {method}")
        while True:
            path = out / image_name(number, method, rec["seed"])
            number += 1
            if _write_png(path, image, out_dir, pnginfo=meta):
                break
        rec["path"] = str(path)
        if save_attention:
            from .viz import attention_grid

            title = f"{prompt}\nmethod {method}  seed {rec['seed']}  model {model}\nsteps {rec['steps']}"
            grid_path = path.with_name(path.stem + "-attention.png")
            _write_png(grid_path, attention_grid(result, i, image, title), out_dir, mode="wb")
            rec["attention_path"] = str(grid_path)
        records.append(rec)
    return records
