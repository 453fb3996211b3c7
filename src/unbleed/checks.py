"""The one validation layer of numbers, seeds, output folders and scheduler names — for the library and every
command, and importable without torch or diffusers, so that the command line refuses a bad flag before any model
library loads.

Each check raises :class:`~unbleed.errors.UnbleedError` whose message starts with ``name`` (the library's field
name, e.g. ``steps``, which the command lines rewrite into their flag, or a flag itself, e.g. ``--batch-size``) and
says the fix. They return the value, converted (``whole(3.0)`` is ``3``).

* :func:`whole` — an integer (not a bool, not 2.5), in range;
* :func:`real` — a finite number (not NaN, not ±inf), in range;
* :func:`seeds` — the one seed rule: whole numbers from 0 to 2**64 − 1, at least one;
* :func:`out_folder` — a folder that can be created and written in (a real probe), before any work starts;
* :func:`scheduler` — one of :data:`SCHEDULERS` (or ``default``);
* :func:`given` — a text flag that is not empty (``--model ''`` is not the current folder);
* :func:`device`, :func:`dtype` — the spelling of ``--device`` and ``--dtype`` (whether the device exists is
  torch's to say, when the model loads);
* :func:`part` — ``I/N``, one part of a benchmark split across processes or machines.
"""

from __future__ import annotations

import math
import re
import numbers
import tempfile
from pathlib import Path

from .errors import UnbleedError

SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed takes 0 … 2**64 − 1 (a negative seed only aliases a large one)

# --scheduler NAME → the diffusers class (the model's noise schedule is kept; see unbleed.models.set_scheduler)
SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "lms": "LMSDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
}


MAX_STEPS = 1000  # denoising steps: at most the schedulers' training timesteps (SD's and the flow models' 1000)
MAX_SIDE = 16384  # image height/width in pixels: 16× SDXL's trained 1024; more is a typo that runs out of memory


def _range_text(low, high, low_open: bool = False, high_open: bool = False) -> str:
    if low is not None and high is not None:
        return (f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
                if low_open or high_open else f"from {low} to {high}")
    if low is not None:
        return f"{'>' if low_open else '≥'} {low}"
    return f"{'<' if high_open else '≤'} {high}"


def _in_range(value, low, high, low_open: bool, high_open: bool) -> bool:
    if low is not None and (value <= low if low_open else value < low):
        return False
    return not (high is not None and (value >= high if high_open else value > high))


def whole(value, name: str, low: int | None = None, high: int | None = None, *, field: str | None = None,
          fix: str = "") -> int:
    """``value`` as an ``int`` when it is a whole number (an int, or a float such as ``3.0``; never a bool) from
    ``low`` to ``high`` (either may be ``None``)."""
    field = field or name
    wanted = "a whole number" + (f" {_range_text(low, high)}" if low is not None or high is not None else "")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise UnbleedError(f"{name} {value!r} must be {wanted}{fix}", field=field)
    if not isinstance(value, numbers.Integral):
        if not math.isfinite(value) or value != int(value):
            raise UnbleedError(f"{name} {value} must be {wanted}{fix}", field=field)
    value = int(value)
    if not _in_range(value, low, high, False, False):
        raise UnbleedError(f"{name} {value} must be {_range_text(low, high)}{fix}", field=field)
    return value


def real(value, name: str, low: float | None = None, high: float | None = None, *, low_open: bool = False,
         high_open: bool = False, field: str | None = None, fix: str = "") -> float:
    """``value`` as a ``float`` when it is a finite number (never a bool, NaN or ±inf) in the range (``low_open`` /
    ``high_open``: that end excluded)."""
    field = field or name
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise UnbleedError(f"{name} {value!r} must be a number{fix}", field=field)
    value = float(value)
    if not math.isfinite(value):
        raise UnbleedError(f"{name} {value} must be a finite number{fix}", field=field)
    if not _in_range(value, low, high, low_open, high_open):
        raise UnbleedError(f"{name} {value:g} must be {_range_text(low, high, low_open, high_open)}{fix}",
                           field=field)
    return value


def seeds(values, name: str = "seeds") -> list[int]:
    """``values`` (an iterable of seeds, not a bare number) as ints, each ``0 ≤ seed ≤ 2**64 − 1`` and never a
    bool; the one seed rule of the library and every command line."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise UnbleedError(f"{name} {values!r}: give a list of seeds, e.g. [0, 1, 2] (not a bare number)",
                           field=name)
    out = []
    for s in values:
        if isinstance(s, bool) or not isinstance(s, numbers.Integral):
            raise UnbleedError(f"{name} {s!r}: a seed is a whole number from 0 to 2**64 − 1", field=name)
        value = int(s)
        if not 0 <= value <= SEED_MAX:
            raise UnbleedError(f"{name} {value}: a seed must be from 0 to 2**64 − 1 ({SEED_MAX})", field=name)
        out.append(value)
    if not out:
        raise UnbleedError(f"{name}: give at least one seed", field=name)
    return out


def out_folder(path: str | Path, name: str = "--out") -> Path:
    """Create the folder ``path`` if needed and make sure a file can be written in it (a real probe: permission bits
    say nothing for root or on read-only mounts). Every command that writes calls it before any work starts (and
    before any model loads)."""
    if not str(path).strip():
        raise UnbleedError(f"{name} is empty: name a folder, e.g. {name} out", field=name)
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UnbleedError(f"{name} {path}: that is a file, not a folder; choose a writable folder", field=name)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UnbleedError(f"{name} {path}: cannot create the folder ({err.strerror or err}); "
                           f"choose a writable folder", field=name) from None
    try:
        tempfile.TemporaryFile(dir=out).close()
    except OSError as err:
        raise UnbleedError(f"{name} {path}: cannot write in the folder ({err.strerror or err}); "
                           f"choose a writable folder", field=name) from None
    return out


def scheduler(name: str | None) -> str | None:
    """``name`` when it is ``default`` (or ``None``) or one of :data:`SCHEDULERS`."""
    if name in (None, "default") or name in SCHEDULERS:
        return name
    raise UnbleedError(f"scheduler {name!r} is unknown: use one of {', '.join(['default', *SCHEDULERS])}",
                       field="scheduler")


def given(text: str, name: str, example: str) -> str:
    """``text`` when it is not empty or blank (an empty ``--model`` would name the current folder)."""
    if not text.strip():
        raise UnbleedError(f"{name} is empty: {example}", field=name)
    return text


def part(text: str, name: str = "--part") -> tuple[int, int]:
    """``I/N`` → ``(I, N)`` with ``1 ≤ I ≤ N``: the I-th of N parts of a prompt list (every N-th prompt starting at
    the I-th, so that each part gets easy and hard prompts alike)."""
    match = re.fullmatch(r"\s*([0-9]+)\s*/\s*([0-9]+)\s*", text or "")
    if not match or not 1 <= int(match[1]) <= int(match[2]) <= 4096:
        raise UnbleedError(f"{name} {text!r}: write I/N with 1 ≤ I ≤ N ≤ 4096, e.g. {name} 1/2", field=name)
    return int(match[1]), int(match[2])


DTYPES = ("auto", "fp32", "fp16", "bf16", "float32", "float16", "bfloat16")


def device(name: str, flag: str = "--device") -> str:
    """``name`` when it is spelt as a device: ``auto``, or a torch device type with an optional index (``cpu``,
    ``cuda``, ``cuda:1``, ``mps``)."""
    if name == "auto" or re.fullmatch(r"[a-z][a-z_]*(:[0-9]+)?", name or ""):
        return name
    raise UnbleedError(f"{flag} {name!r} is not a device: use auto, cpu, cuda or cuda:N", field="device")


def dtype(name: str, flag: str = "--dtype") -> str:
    """``name`` when it is one of :data:`DTYPES`."""
    if name in DTYPES:
        return name
    raise UnbleedError(f"{flag} {name!r} is unknown: use auto, fp32, fp16 or bf16", field="dtype")


__all__ = ["SEED_MAX", "SCHEDULERS", "DTYPES", "MAX_STEPS", "MAX_SIDE", "given", "whole", "real", "seeds",
           "out_folder", "scheduler", "device", "dtype"]
