"""Writing results: one PNG per seed with every parameter in its text metadata, and the JSON records.

File names never come from the prompt: ``NNNN-METHOD-sSEED.png`` with NNNN the next free number in the folder,
and a file is created exclusively, so earlier results are never overwritten.
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL.PngImagePlugin import PngInfo

from . import __version__
from .errors import UnbleedError
from .sampler import Result
from .tokens import groups_as_dicts


def record_for(result: Result, index: int, prompt: str, method: str, model: str) -> dict:
    """The JSON record of one image (everything needed to reproduce it, and the guidance trace)."""
    guided = [r for r in result.trace if r.guided]
    return {
        "prompt": prompt,
        "seed": result.seeds[index],
        "method": method,
        "model": model,
        "tokens": groups_as_dicts(result.groups),
        **result.params,
        "guidance": [{"step": r.step, "timestep": r.timestep, "alpha": r.alpha, "loss": r.loss[index],
                      "final_loss": r.final_loss[index], "refine_iters": r.refine_iters} for r in guided],
        "seconds_batch": round(result.seconds, 3),
        "unbleed_version": __version__,
    }


def _next_index(out: Path) -> int:
    numbers = [int(p.name[:4]) for p in out.glob("[0-9][0-9][0-9][0-9]-*.png") if p.name[:4].isdigit()]
    return max(numbers, default=-1) + 1


def save_result(result: Result, prompt: str, method: str, model: str, out_dir: str | Path,
                save_attention: bool = False, extra: dict | None = None) -> list[dict]:
    """Write each image (and its attention picture) into ``out_dir``; return the records with their paths."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UnbleedError(f"--out {out_dir}: cannot create the folder ({err.strerror})") from None
    records = []
    number = _next_index(out)
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
            path = out / f"{number:04d}-{method}-s{rec['seed']}.png"
            number += 1
            try:
                with open(path, "xb") as fh:
                    image.save(fh, format="PNG", pnginfo=meta)
                break
            except FileExistsError:
                continue
        rec["path"] = str(path)
        if save_attention:
            from .viz import attention_grid

            title = f"{prompt}\nmethod {method}  seed {rec['seed']}  model {model}\nsteps {rec['steps']}"
            grid_path = path.with_name(path.stem + "-attention.png")
            attention_grid(result, i, image, title).save(grid_path)
            rec["attention_path"] = str(grid_path)
        records.append(rec)
    return records
