"""The browser demo (``unbleed demo``): type a prompt, see its parse, run methods × seeds, look at what happened.

Two layers, so that the demo is testable without a browser:

* :class:`Demo` — the work, on one loaded pipeline (kept for the server's life): :meth:`Demo.parse` (the token
  groups of a prompt as a table and as ``--tokens`` text, the prompt's tokens to click), :meth:`Demo.run` (every
  method on the same seeds with the page's :class:`Settings`, the PNGs written by
  :func:`unbleed.io.output.save_result` into a fresh folder per request and zipped with their records, the grid
  with the shapes detector's verdicts, the loss plot), :meth:`Demo.attention_view` (one token's map at one step,
  over the image, for every method side by side). Bad input is never an exception here: it is one line
  ``error: …`` naming the page's control (:data:`PAGE_FIELDS`). A run stops at the next step when its
  ``should_stop`` says so (the Stop button, or the page closed or reloaded).
* :func:`build_app` — the Gradio page on a :class:`Demo` (imported only here: the rest of unbleed never needs
  gradio), queued one run at a time; :func:`serve` starts it on ``host:port`` with nothing that phones home.

File names never come from the prompt (``NNNN-METHOD-sSEED.png``, the one naming rule); NNNN keeps counting over
the server's requests, so two downloads never share a name.
"""

from __future__ import annotations

import atexit
import copy
import html
import io
import json
import os
import shutil
import tempfile
import threading
import time
import traceback
import warnings
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .errors import UnbleedError
from .eval.sweep import parse_seeds
from .methods import METHODS, make_method, method_names

DEFAULT_METHODS = ("sd", "ela")
DEFAULT_STEPS = 50  # the command line's --steps default: fewer steps draw worse images, and the page is a first look
DEFAULT_SEEDS = "0,1,2"
EXAMPLE_PROMPT = "a red circle and a blue square"
EXAMPLES = ("a red circle and a blue square", "a yellow star next to a green heart",
            "a purple triangle above an orange cross", "a white square, a black circle and a red heart")
KEEP_REQUESTS = 32  # request folders kept on disk (older ones are removed); all are removed when the server stops
KEEP_VIEWS = 8  # runs whose attention maps stay in memory for the viewer
GRID_CELL = 192  # pixels per image in the grid (small images are scaled up without smoothing)
VIEW_CELL = 256  # pixels per picture in the attention viewer

# What the benchmark has and has not shown: the page's headline. The one place to change when the evidence does
# (README "The shapes world" holds the measurements and the command that made them).
EVIDENCE = (
    "**What is shown so far** (shapes model, 100 `test` prompts × 4 seeds, paired with plain sampling, 95 % CI; "
    "docs/shapes.md). Tuned on the train split, two methods raise success: Attend-and-Excite "
    "(+0.16 [+0.10, +0.23], `map_scale=10`, `step_size=40`) and InitNO (+0.13 [+0.05, +0.21], `map_scale=10`, "
    "`lr=0.02`); both lower neglected objects. **ELA lowers success here** (−0.07 [−0.11, −0.03]; its images fuse "
    "more), SynGen removes objects (−0.20), and Divide & Bind, CONFORM, A-STAR, StructureDiffusion and ELA + SynGen "
    "show no measured difference in success. This page runs each method at the library's defaults (the papers'), "
    "not at these tuned settings: set them in the method options and the step size. The badges are the shapes "
    "detector's verdicts on each image (`fused` also counts two objects drawn 1–2 pixels apart, which the "
    "detector joins into one blob)."
)

# the library's field names → the page's controls, for error lines (the command line names its flags instead)
PAGE_FIELDS = {
    "method": "methods", "options": "method options", "weights": "weights", "window": "window",
    "refine": "refine steps", "refine_iters": "refine iterations", "step_size": "step size",
    "step_schedule": "step schedule", "steps": "steps", "seeds": "seeds", "height": "size", "width": "size",
    "guidance_scale": "guidance scale", "groups": "--tokens", "tokens": "--tokens", "scheduler": "scheduler",
}

# the words of the shapes world's captions besides its colours and shapes (see unbleed.shapes.world.caption)
SHAPES_LINK_WORDS = ("a", "an", "and", "next", "to", "with", "above", "below")
VERDICTS_SHOWN = ("neglected", "malformed", "wrong_shape", "recoloured", "duplicated", "leak", "fused")


@dataclass
class Settings:
    """The page's advanced controls. Empty text keeps the method's or the model's default."""

    guidance_scale: float = 7.5
    scheduler: str = "default"
    step_size: str = ""
    step_schedule: str = "default"
    window: str = ""
    refine: str = ""
    size: str = ""  # "" or pixels (square) or "HxW"
    options: dict[str, dict[str, str]] = field(default_factory=dict)  # method → option → value (changed only)


@dataclass
class Shown:
    """What one request shows on the page (``error`` set: nothing else)."""

    error: str = ""  # "" or the one line "error: …"
    notes: list[str] = field(default_factory=list)  # "warning: …" lines, timings
    grid: Image.Image | None = None  # one row per method, one column per seed (verdict badges on the shapes model)
    images: list[tuple[Image.Image, str]] = field(default_factory=list)  # (image, "METHOD · seed S"), row-major
    verdicts: list[dict | None] = field(default_factory=list)  # per image: the detector's verdicts (shapes model)
    attention: list[tuple[str, str]] = field(default_factory=list)  # (attention picture path, caption)
    loss_plot: Image.Image | None = None
    files: list[str] = field(default_factory=list)  # one PNG per image (with its metadata), then the run's zip
    zip_path: str = ""  # every PNG (images, attention pictures) and records.jsonl
    records: list[dict] = field(default_factory=list)
    columns: int = 1
    methods: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    view: str = ""  # the key of this run's attention maps (Demo.attention_view)
    tokens: list[str] = field(default_factory=list)  # the viewer's token rows
    steps: int = 0  # the viewer's steps (the sampler's passes: PNDM makes 51 of 50 steps)
    stopped: bool = False


@dataclass
class ParseView:
    """A prompt's token groups: ``rows`` (entity, token indices, attributes) and ``tokens`` as ``--tokens`` text;
    ``chips``: the prompt's tokens ``(index, text, ref)``, ``ref`` being what clicking it adds to ``--tokens``."""

    rows: list[list[str]] = field(default_factory=list)
    tokens: str = ""
    source: str = "parse"  # "parse" or "--tokens"
    error: str = ""
    notes: list[str] = field(default_factory=list)
    chips: list[tuple[int, str, str]] = field(default_factory=list)


class Stopped(Exception):
    """Raised from the step callback when a run is to stop (Stop, or the page went away)."""


# --- small parts --------------------------------------------------------------------------------------------------
def error_line(e: UnbleedError, flags: dict[str, str] | None) -> str:
    """The command line's line for ``e``: ``error: `` and the message with its field named by its flag."""
    return "error: " + (e.for_flags(flags) if flags else str(e))


def parse_steps(value) -> int:
    """The number of steps, from the page's number box (``None`` or ``""`` when left empty)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise UnbleedError("steps: give the number of denoising steps, e.g. 20", field="steps")
    try:
        steps = int(value)
        if steps != float(value):
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        raise UnbleedError(f"steps {value!r} must be a whole number ≥ 1", field="steps") from None
    return steps


def tokens_text(tokenizer, prompt: str, groups) -> str:
    """``groups`` written as ``--tokens`` takes them: ``red:circle,blue:square``; a word that occurs more than once
    as ``word#N`` (its occurrence), one whose text cannot be named by its words by its token indices."""
    from .text.tokens import find_word

    def ref(group) -> str:
        text = group.text.strip()
        if text and not any(c in text for c in ",:#") and not text.isdigit():
            found = []
            for n in range(1, 78):
                try:
                    found.append(find_word(tokenizer, prompt, text, n))
                except UnbleedError:
                    break
                if found[-1] == tuple(group.indices):
                    break
            if found and found[-1] == tuple(group.indices):
                repeated = len(found) > 1 or _occurs_twice(tokenizer, prompt, text)
                return f"{text}#{len(found)}" if repeated else text
        return str(group.indices[0]) if len(group.indices) == 1 else text

    items = []
    for g in groups:
        entity = ref(g)
        items += [f"{ref(a)}:{entity}" for a in g.attributes] or [entity]
    return ",".join(items)


def _occurs_twice(tokenizer, prompt: str, text: str) -> bool:
    from .text.tokens import find_word

    try:
        find_word(tokenizer, prompt, text, 2)
        return True
    except UnbleedError:
        return False


def group_rows(groups) -> list[list[str]]:
    """One row per entity: its text, its token indices, its attributes with theirs (the ``unbleed parse`` table)."""
    return [[g.text, ", ".join(map(str, g.indices)),
             "; ".join(f"{a.text} ({', '.join(map(str, a.indices))})" for a in g.attributes)] for g in groups]


def unknown_shapes_words(prompt: str) -> list[str]:
    """The words of ``prompt`` the shapes model never saw in a caption (its colours, shapes — also plural — and
    the captions' few link words are known), each once, in order."""
    from .shapes.world import COLOURS, SHAPES

    known = set(COLOURS) | set(SHAPES) | set(SHAPES_LINK_WORDS)
    words = "".join(c if c.isalnum() else " " for c in prompt.lower()).split()
    plural = {w: w[:-2] if w.endswith("es") else w[:-1] if w.endswith("s") else w for w in words}
    return list(dict.fromkeys(w for w in words if w not in known and plural[w] not in known))


def shapes_vocabulary() -> str:
    """The shapes model's words, as one line for the page."""
    from .shapes.world import COLOURS, SHAPES

    return (f"colours {', '.join(COLOURS)}; shapes {', '.join(SHAPES)}; joined by "
            f"'and', 'next to', 'with', 'above', 'below' (1 to 3 objects)")


def token_chips(tokenizer, prompt: str) -> list[tuple[int, str, str]]:
    """The prompt's tokens ``(index, text, ref)`` (start-of-text and end-of-text left out). ``ref`` names the
    token as ``--tokens`` takes it: the word (``word#N`` for its N-th occurrence) when the token is a whole word,
    else its index."""
    from .text.tokens import find_word

    ids = tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids
    pieces = tokenizer.convert_ids_to_tokens(ids)
    chips, seen = [], {}
    for i, piece in enumerate(pieces[1:-1], start=1):
        word = piece.replace("</w>", "")
        whole = piece.endswith("</w>") and (i == 1 or pieces[i - 1].endswith("</w>")) and word.isalpha()
        ref = str(i)
        if whole:
            n = seen.get(word, 0) + 1
            seen[word] = n
            try:
                if find_word(tokenizer, prompt, word, n) == (i,):
                    ref = f"{word}#{n}" if n > 1 or _occurs_twice(tokenizer, prompt, word) else word
            except UnbleedError:
                pass
        chips.append((i, word, ref))
    return chips


def click_token(tokens: str, ref: str) -> str:
    """``--tokens`` text after clicking a token named ``ref``: appended as a new item, or — when the text ends
    with ``:`` (an attribute waiting for its entity) — as that pair's entity."""
    text = (tokens or "").strip()
    if not text or text.endswith(":"):
        return text + ref
    return f"{text.rstrip(',')},{ref}"


def option_defaults() -> dict[str, dict[str, str]]:
    """Every registered method's ``-o`` options and their defaults, as ``-o`` text (tuples comma-joined), from
    the registry (a method built with no options)."""
    out = {}
    for name in METHODS:
        made = make_method(name, {})
        if made is None:
            continue
        out[name] = {k: ",".join(map(str, v)) if isinstance(v, (tuple, list)) else str(v).lower()
                     if isinstance(v, bool) else str(v) for k, v in made.options().items()}
    return {k: v for k, v in out.items() if v}


def verdict_labels(verdicts: dict | None) -> list[str]:
    """The badge words of a detector verdict: ``["success"]`` or its failures (``neglected``, ``leak`` …)."""
    if verdicts is None:
        return []
    if verdicts.get("success"):
        return ["success"]
    return [k for k in VERDICTS_SHOWN if verdicts.get(k)] or ["failed"]


def _badged(image: Image.Image, labels: list[str]) -> Image.Image:
    """``image`` with a badge strip at its bottom: green for success, red otherwise."""
    if not labels:
        return image
    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default(size=max(11, out.width // 14))
    text = " · ".join(labels)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    h = bottom - top + 8
    colour = (22, 128, 61) if labels == ["success"] else (185, 28, 28)
    draw.rectangle([0, out.height - h, min(out.width, right - left + 10), out.height], fill=colour)
    draw.text((5, out.height - h + 4 - top), text, fill="white", font=font)
    return out


def loss_plot(series: list[tuple[str, list[int], list[float], list[float | None]]], steps: int | None = None,
              width: float = 6.4, row_height: float = 2.0):
    """The loss per guided step of each ``(label, steps, losses, losses after refinement)`` series (``None``: that
    step was not refined; labels ``METHOD sSEED``), over the run's ``steps``, as an image: one panel per method,
    each on its own y axis (the methods' losses have different scales), one colour per seed with its legend
    outside the data (matplotlib's figure, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    drawn = [s for s in series if s[1]]
    methods = list(dict.fromkeys(label.rsplit(" ", 1)[0] for label, *_ in drawn))
    seeds = list(dict.fromkeys(label.rsplit(" ", 1)[-1] for label, *_ in drawn))
    fig = Figure(figsize=(width, max(1, len(methods)) * row_height + 0.6), dpi=100)
    FigureCanvasAgg(fig)
    if not drawn:
        ax = fig.add_subplot()
        ax.text(0.5, 0.5, "no guided steps (sd and conditioning methods do no latent updates)", ha="center",
                va="center", transform=ax.transAxes, fontsize=9)
        ax.set_axis_off()
    else:
        colours = [f"C{k % 10}" for k in range(len(seeds))]
        markers = "os^Dv<>ph*"
        axes = fig.subplots(len(methods), 1, sharex=True, squeeze=False)[:, 0]
        for ax, method in zip(axes, methods):
            for label, at, losses, after in drawn:
                name, seed = label.rsplit(" ", 1)
                if name != method:
                    continue
                k = seeds.index(seed)
                style = dict(color=colours[k], marker=markers[(k // 10) % len(markers)], markersize=3)
                ax.plot(at, losses, label=seed, linewidth=1, **style)
                points = [(x, y) for x, y in zip(at, after) if y is not None]
                if points:
                    ax.plot(*zip(*points), linestyle="none", marker="x", color=colours[k], markersize=5)
            ax.set_title(f"{method}", fontsize=9)
            ax.set_ylabel("loss", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
            if steps:
                ax.set_xlim(-0.5, steps - 0.5)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes[-1].set_xlabel("denoising step (loss before the step's update; × after refinement)", fontsize=8)
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, [label.lstrip("s") for label in labels], loc="outside right center", fontsize=7,
                   title="seed", title_fontsize=7)
    fig.set_layout_engine("constrained")
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def overlay(image: Image.Image, attention: np.ndarray, size: int = VIEW_CELL, alpha: float = 0.55) -> Image.Image:
    """``attention`` ([h, w], min–max normalised here) drawn with the inferno ramp over ``image``, both scaled to
    ``size`` (the image without smoothing, the map bilinearly)."""
    from .io.viz import colorize

    base = image.convert("RGB").resize((size, size), Image.NEAREST)
    m = np.asarray(Image.fromarray(attention.astype(np.float32), mode="F").resize((size, size), Image.BILINEAR))
    lo, hi = float(m.min()), float(m.max())
    norm = (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)
    heat = Image.fromarray(colorize(norm))
    return Image.blend(base, heat, alpha)


def _scaled(image: Image.Image, size: int) -> Image.Image:
    """``image`` scaled up to ``size`` without smoothing (small models' pixels stay visible); large ones as they are."""
    if max(image.size) >= size:
        return image
    factor = max(1, size // max(image.size))
    return image.resize((image.width * factor, image.height * factor), Image.NEAREST)


# --- the work -----------------------------------------------------------------------------------------------------
class Demo:
    """The demo's work on one loaded pipeline ``pipe`` (``model_name`` goes into the records; ``shapes`` adds the
    detector's verdicts and the vocabulary check). ``flags``: the library field → control names of error lines
    (default :data:`PAGE_FIELDS`, the page's). Requests' PNGs go to fresh folders under ``workdir`` (a temporary
    folder removed at exit when not given)."""

    def __init__(self, pipe, model_name: str, flags: dict[str, str] | None = None, workdir: str | Path | None = None,
                 keep: int = KEEP_REQUESTS):
        self.pipe, self.model_name, self.keep = pipe, model_name, keep
        self.flags = dict(PAGE_FIELDS if flags is None else flags)
        if workdir is None:
            workdir = tempfile.mkdtemp(prefix="unbleed-demo-")
            atexit.register(shutil.rmtree, workdir, ignore_errors=True)
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        # The parse runs while a generation may run (it is not queued behind it): it gets its own tokenizer, and
        # one lock keeps the text work (spaCy, tokenizers) to one thread at a time.
        self.tokenizer = copy.deepcopy(pipe.tokenizer)
        self.text_lock = threading.Lock()
        self.methods = method_names()
        self.options = option_defaults()
        self.shapes = model_name == "shapes"
        self.number = 0  # the next image number (NNNN) over the server's life
        self.runs = 0
        self.views: OrderedDict[str, dict] = OrderedDict()
        self.state_lock = threading.Lock()
        self.stops: dict[str, threading.Event] = {}  # session → the stop flag of its running request

    # --- stopping -----------------------------------------------------------------------------------------------
    def stop_flag(self, session: str) -> threading.Event:
        """A fresh stop flag for ``session``'s next run."""
        with self.state_lock:
            flag = self.stops[session] = threading.Event()
        return flag

    def finished(self, session: str, flag: threading.Event) -> None:
        """Forget ``session``'s stop flag once its run is over (unless a newer run replaced it)."""
        with self.state_lock:
            if self.stops.get(session) is flag:
                del self.stops[session]

    def stop(self, session: str) -> None:
        """Stop ``session``'s running request at its next step (Stop, or its page closed or reloaded: Gradio itself
        drops a closed page's queued requests, but cannot end a running one)."""
        with self.state_lock:
            flag = self.stops.get(session)
        if flag is not None:
            flag.set()

    # --- the parse ----------------------------------------------------------------------------------------------
    def parse(self, prompt: str, tokens: str | None = None) -> ParseView:
        """The token groups the run would use: from ``tokens`` (``--tokens`` text) when given and not the parse's
        own text, else the parse's — whose ``--tokens`` text is returned to be edited."""
        from .text.prompt import parse, token_groups

        prompt = prompt or ""
        if not prompt.strip():
            return ParseView()
        try:
            with self.text_lock, warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                chips = token_chips(self.tokenizer, prompt)
                parsed = parse(prompt, self.tokenizer).entities
                own = tokens_text(self.tokenizer, prompt, parsed)
                if tokens and tokens.strip() and tokens.strip() != own:
                    groups, source, text = token_groups(self.tokenizer, prompt, tokens), "--tokens", tokens
                else:
                    groups, source, text = parsed, "parse", own
        except UnbleedError as e:
            return ParseView(tokens=tokens or "", source="--tokens" if tokens else "parse",
                             error=error_line(e, self.flags), notes=self._vocabulary_notes(prompt))
        notes = list(dict.fromkeys(f"warning: {w.message}" for w in caught)) + self._vocabulary_notes(prompt)
        return ParseView(rows=group_rows(groups), tokens=text, source=source, notes=notes, chips=chips)

    def _vocabulary_notes(self, prompt: str) -> list[str]:
        unknown = unknown_shapes_words(prompt) if self.shapes else []
        if not unknown:
            return []
        return [f"warning: the shapes model never saw {', '.join(repr(w) for w in unknown)}: it knows only "
                f"{shapes_vocabulary()}; its images of other words mean nothing"]

    # --- a run --------------------------------------------------------------------------------------------------
    def run(self, prompt: str, tokens: str | None, methods, seeds, steps,
            progress: Callable[[float, str], None] | None = None, settings: Settings | None = None,
            should_stop: Callable[[], bool] | None = None) -> Shown:
        """Every method of ``methods`` (in the registry's order) on the same ``seeds`` (text such as ``0,1``) with
        ``steps`` steps and ``settings``; bad input gives a :class:`Shown` with only ``error`` set, before any
        sampling. ``should_stop`` is asked after every step: true ends the run there (``stopped``, nothing kept)."""
        try:
            return self._run(prompt or "", tokens, list(methods or []), seeds, steps, progress,
                             settings or Settings(), should_stop)
        except UnbleedError as e:
            return Shown(error=error_line(e, self.flags))
        except Stopped as e:
            return Shown(notes=[f"stopped at {e}: nothing kept"], stopped=True)

    def _specs(self, methods, tokens, seeds, steps, settings: Settings):
        from .run.spec import RunSpec

        height = width = None
        size = settings.size.strip().lower().replace("×", "x") if settings.size else ""
        if size:
            try:
                parts = [int(p) for p in size.split("x")]
                if len(parts) not in (1, 2):
                    raise ValueError
            except ValueError:
                raise UnbleedError(f"size {settings.size!r}: give pixels, e.g. 64 or 64x96 (height x width)",
                                   field="height") from None
            height, width = parts[0], parts[-1]
        schedule = dict(window=settings.window.strip() or None, refine=settings.refine.strip() or None,
                        step_size=float(settings.step_size) if _number(settings.step_size, "step_size") else None,
                        step_schedule=None if settings.step_schedule in ("", "default") else settings.step_schedule)
        return [RunSpec(method=m, options=settings.options.get(m, {}), tokens=tokens, seeds=tuple(seeds), steps=steps,
                        guidance_scale=_guidance(settings.guidance_scale), height=height, width=width, **schedule)
                for m in methods]  # plain sampling and conditioning methods have no schedule: theirs is ignored

    def _run(self, prompt, tokens, methods, seeds, steps, progress, settings, should_stop) -> Shown:
        from .io.output import save_result
        from .io.plots import image_grid

        if not methods:
            raise UnbleedError("method: choose at least one method", field="method")
        methods = [m for m in self.methods if m in methods] + [m for m in methods if m not in self.methods]
        seeds, steps = parse_seeds(seeds, bare_count=False), parse_steps(steps)
        tokens = tokens.strip() if tokens and tokens.strip() else None
        with self.text_lock:  # tokens equal to the parse's own text are the parse (the record says so)
            if tokens is not None and prompt.strip():
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    from .text.prompt import parse

                    try:
                        if tokens == tokens_text(self.tokenizer, prompt, parse(prompt, self.tokenizer).entities):
                            tokens = None
                    except UnbleedError:
                        pass
        specs = self._specs(methods, tokens, seeds, steps, settings)
        built = [spec.build() for spec in specs]  # every field checked before any work, as the CLI does
        if not prompt.strip():
            raise UnbleedError("PROMPT is empty: give the text to draw")
        if settings.scheduler not in (None, "", "default"):
            from .models import SCHEDULERS

            if settings.scheduler not in SCHEDULERS:
                raise UnbleedError(f"scheduler {settings.scheduler!r} is unknown: use one of "
                                   f"{', '.join(['default', *SCHEDULERS])}", field="scheduler")
        with self.text_lock, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            plans = [spec.prepare(self.pipe, prompt, pictures=True, built=b) for spec, b in zip(specs, built)]
        notes = list(dict.fromkeys(f"warning: {w.message}" for w in caught)) + self._vocabulary_notes(prompt)
        if should_stop is not None and should_stop():
            raise Stopped("the start")
        scheduler = self.pipe.scheduler
        try:
            from .models import set_scheduler

            set_scheduler(self.pipe, settings.scheduler)
            return self._sample(prompt, tokens, methods, specs, plans, seeds, steps, progress, should_stop, notes,
                                image_grid, save_result)
        finally:
            self.pipe.scheduler = scheduler

    def _sample(self, prompt, tokens, methods, specs, plans, seeds, steps, progress, should_stop, notes,
                image_grid, save_result) -> Shown:
        from .run.sampler import picture_groups

        out = self._request_folder()
        shown = Shown(notes=notes, columns=len(seeds), methods=list(methods), seeds=list(seeds))
        rows, series, view = [], [], {"images": {}, "maps": {}, "guided": {}, "names": []}
        for k, (method, spec, plan) in enumerate(zip(methods, specs, plans)):
            def on_step(i, total, rec, k=k, method=method):
                done = max(1, round((i + 1) * steps / total))  # schedulers such as PNDM make 51 passes of 50 steps
                if should_stop is not None and should_stop():
                    raise Stopped(f"{method} step {done}/{steps}")
                if progress is not None:
                    progress((k + (i + 1) / total) / len(methods), f"{method}: step {done}/{steps}")

            if progress is not None:
                progress(k / len(methods), f"{method}: starting")
            started = time.perf_counter()
            result = spec.run(self.pipe, prompt, plan, save_attention=True, callback=on_step)
            with self.state_lock:
                number, self.number = self.number, self.number + len(seeds)
            records = save_result(result, prompt, method, self.model_name, out, save_attention=True,
                                  extra={"tokens_source": "--tokens" if tokens else "parse"}, number=number)
            self.number = max(self.number, number + len(records))
            shown.notes.append(f"{method}: {len(seeds)} image(s), {steps} steps, "
                               f"{time.perf_counter() - started:.1f} s")
            names = picture_groups(result.groups)[0]
            view["names"] = view["names"] or names
            traced = [r for r in result.trace if r.maps is not None]
            images = []
            for j, (rec, image) in enumerate(zip(records, result.images)):
                caption = f"{method} · seed {rec['seed']}"
                verdict = self._verdict(image, prompt)
                if verdict is not None:
                    rec["verdicts"] = {k: verdict[k] for k in ("success", *VERDICTS_SHOWN)}
                    rec["objects"] = [{k: o[k] for k in ("colour", "shape", "state", "count")}
                                      for o in verdict["objects"]]
                images.append(_badged(_scaled(image, GRID_CELL), verdict_labels(verdict)))
                shown.images.append((image, caption))
                shown.verdicts.append(verdict)
                shown.attention.append((rec["attention_path"], caption))
                shown.files.append(rec["path"])
                shown.records.append(rec)
                view["images"][(method, rec["seed"])] = image
                if names == view["names"] and traced:
                    view["maps"][(method, rec["seed"])] = np.stack([r.maps[j].float().numpy() for r in traced])
                    view["guided"][(method, rec["seed"])] = [r.guided for r in traced]
                guided = rec["guidance"]
                if plan.guiding:
                    series.append((f"{method} s{rec['seed']}", [g["step"] for g in guided],
                                   [g["loss"] for g in guided],
                                   [g["final_loss"] if g["refine_iters"] else None for g in guided]))
            rows.append((method, images))
        if progress is not None:
            progress(1.0, "drawing")
        cell = max(max(im.size) for _, ims in rows for im in ims)
        shown.grid = image_grid(rows, col_labels=[f"seed {s}" for s in seeds], cell=cell)
        shown.loss_plot = loss_plot(series, steps)
        shown.zip_path = str(self._zip(out, shown.records))
        shown.files.append(shown.zip_path)
        shown.tokens = list(view["names"])
        shown.steps = max((len(m) for m in view["maps"].values()), default=0)
        shown.view = self._keep_view(view)
        return shown

    def _verdict(self, image: Image.Image, prompt: str) -> dict | None:
        """The shapes detector's verdicts on ``image`` (the shapes model only; ``None`` when the prompt names no
        object of the shapes world)."""
        if not self.shapes:
            return None
        from .shapes.detect import detect

        try:
            return detect(image, prompt)
        except UnbleedError:
            return None

    def _zip(self, out: Path, records: list[dict]) -> Path:
        """The run as one zip: every PNG of the request folder and ``records.jsonl`` (one record per image)."""
        first, last = (Path(records[0]["path"]).name[:4], Path(records[-1]["path"]).name[:4])
        path = out / f"unbleed-run-{first}-{last}.zip"
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
            for png in sorted(out.glob("*.png")):
                z.write(png, png.name)
            z.writestr("records.jsonl", "".join(json.dumps(r) + "\n" for r in records))
        return path

    def _keep_view(self, view: dict) -> str:
        with self.state_lock:
            self.runs += 1
            key = f"run-{self.runs}"
            self.views[key] = view
            while len(self.views) > KEEP_VIEWS:
                self.views.popitem(last=False)
        return key

    # --- the attention viewer -----------------------------------------------------------------------------------
    def attention_view(self, key: str, token: str | None, step, seed=None) -> Image.Image | None:
        """Run ``key``'s map of ``token`` at ``step`` (the sampler's pass index) for ``seed`` (default the first),
        over each method's image, the methods side by side (top: over the image; bottom: the map alone)."""
        from .io.viz import colorize

        view = self.views.get(key or "")
        if view is None or not view["maps"] or not view["names"]:
            return None
        names = view["names"]
        t = names.index(token) if token in names else 0
        seeds = list(dict.fromkeys(s for _, s in view["maps"]))
        seed = int(seed) if seed not in (None, "") and int(seed) in seeds else seeds[0]
        panels = [(m, view["images"][(m, s)], view["maps"][(m, s)], view["guided"][(m, s)])
                  for (m, s) in view["maps"] if s == seed]
        n_steps = max(len(p[2]) for p in panels)
        i = min(max(0, int(step or 0)), n_steps - 1)
        font = ImageFont.load_default(size=14)
        pad, head = 8, 40
        canvas = Image.new("RGB", (pad + len(panels) * (VIEW_CELL + pad), head + 2 * (VIEW_CELL + pad)), "white")
        draw = ImageDraw.Draw(canvas)
        for c, (method, image, maps, guided) in enumerate(panels):
            x = pad + c * (VIEW_CELL + pad)
            k = min(i, len(maps) - 1)
            m = maps[k, t]
            draw.text((x, 4), f"{method} · seed {seed}", fill="black", font=font)
            draw.text((x, 22), f"'{names[t]}' · step {k}{' (guided)' if guided[k] else ''}", fill="dimgray",
                      font=font)
            canvas.paste(overlay(image, m), (x, head))
            up = np.asarray(Image.fromarray(m.astype(np.float32), mode="F").resize((VIEW_CELL, VIEW_CELL),
                                                                                   Image.BILINEAR))
            lo, hi = float(up.min()), float(up.max())
            canvas.paste(Image.fromarray(colorize((up - lo) / (hi - lo) if hi > lo else np.zeros_like(up))),
                         (x, head + VIEW_CELL + pad))
        return canvas

    def _request_folder(self) -> Path:
        """A fresh folder for one request's PNGs; the oldest beyond ``keep`` are removed."""
        folders = sorted((p for p in self.workdir.glob("request-*") if p.is_dir()), key=lambda p: p.stat().st_mtime)
        for old in folders[:max(0, len(folders) - self.keep + 1)]:
            shutil.rmtree(old, ignore_errors=True)
        return Path(tempfile.mkdtemp(prefix="request-", dir=self.workdir))


def _number(text: str, name: str) -> bool:
    """Whether ``text`` holds a number (empty: no); anything else is an error naming ``name``."""
    if text is None or not str(text).strip():
        return False
    try:
        float(text)
    except ValueError:
        raise UnbleedError(f"{name} {str(text).strip()!r} must be a number (empty: the method's default)",
                           field=name) from None
    return True


def _guidance(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise UnbleedError(f"guidance_scale {value!r} must be a number, e.g. 7.5", field="guidance_scale") from None


# --- the page -----------------------------------------------------------------------------------------------------
def _quiet_gradio() -> None:
    """No analytics, no version check, no telemetry: set before gradio is imported."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def _error_html(line: str) -> str:
    if not line:
        return ""
    return (f'<div class="unbleed-error" style="color:#b91c1c;font-family:monospace;white-space:pre-wrap;'
            f'padding:4px 0">{html.escape(line)}</div>')


def _table_md(view: ParseView, prompt: str = "") -> str:
    if view.error:
        return ""
    if not view.rows:
        return ("*no entity (noun) found: name the tokens in `--tokens`*" if prompt.strip()
                else "*type a prompt to see its entities*")

    def cell(text: str) -> str:
        return html.escape(text).replace("|", "&#124;") or "–"

    head = ("token groups — from the parse (edit `--tokens` below, or click tokens, to change them)"
            if view.source == "parse" else "token groups — from `--tokens`")
    lines = [head, "", "| entity | token indices | attributes (indices) |", "| --- | --- | --- |"]
    lines += [f"| {cell(a)} | {cell(b)} | {cell(c)} |" for a, b, c in view.rows]
    return "\n".join(lines)


def verdicts_html(shown: Shown) -> str:
    """The detector's verdict badges, one row per method, one column per seed (empty off the shapes model)."""
    if not any(v is not None for v in shown.verdicts):
        return ""
    head = "".join(f"<th>seed {s}</th>" for s in shown.seeds)
    rows, k = [], 0
    for method in shown.methods:
        cells = []
        for _ in shown.seeds:
            labels = verdict_labels(shown.verdicts[k])
            kind = "success" if labels == ["success"] else "failure"
            cells.append(f'<td><span class="verdict verdict-{kind}" style="display:inline-block;padding:2px 6px;'
                         f'border-radius:4px;color:white;background:{"#16803d" if kind == "success" else "#b91c1c"}'
                         f'">{html.escape(" · ".join(labels))}</span></td>')
            k += 1
        rows.append(f"<tr><th>{html.escape(method)}</th>{''.join(cells)}</tr>")
    return ('<div><b>shapes detector</b> (per image: <i>success</i> = every object once, in its colour, apart; '
            'else its failures)<table style="border-collapse:separate;border-spacing:6px 2px">'
            f"<tr><th></th>{head}</tr>{''.join(rows)}</table></div>")


def gallery_columns(seeds: int) -> int:
    """Columns of the attention strips: one per seed (rows are then methods, as in the grid), 1 to 3."""
    return min(max(seeds, 1), 3)


def _notes_md(notes: list[str]) -> str:
    return "\n".join(f"- {html.escape(n)}" for n in notes)


def _session(request) -> str:
    return getattr(request, "session_hash", None) or "local"


def build_app(pipe, model_name: str, flags: dict[str, str] | None = None, workdir: str | Path | None = None):
    """The Gradio page on ``pipe`` (loaded once, kept): a :class:`Demo` behind it, runs queued one at a time."""
    _quiet_gradio()
    import gradio as gr

    from .models import SCHEDULERS

    demo = Demo(pipe, model_name, flags=flags, workdir=workdir)
    first = demo.parse(EXAMPLE_PROMPT)
    chip_choices = lambda view: [(f"{word} ({i})", ref) for i, word, ref in view.chips]  # noqa: E731
    with gr.Blocks(title="unbleed demo", analytics_enabled=False, delete_cache=(3600, 3600)) as app:
        gr.Markdown(f"## unbleed — what guidance does to concept bleeding\nModel: `{html.escape(model_name)}`. "
                    "Type a prompt, check its token groups, pick methods and seeds: one row per method, one "
                    "column per seed, the same seeds for all.")
        gr.Markdown(EVIDENCE, elem_id="evidence")
        with gr.Row():
            with gr.Column(scale=2):
                prompt = gr.Textbox(EXAMPLE_PROMPT, label="prompt", elem_id="prompt", lines=1, max_lines=3)
                gr.Examples([[p] for p in EXAMPLES], [prompt], label="example prompts")
                if demo.shapes:
                    gr.Markdown(f"The shapes model knows only: {shapes_vocabulary()}.", elem_id="vocabulary")
                chips = gr.Radio(chip_choices(first), value=None, label="the prompt's tokens (index) — click to add "
                                 "one to --tokens; type attribute: first to bind the next click to it",
                                 elem_id="chips")
                table = gr.Markdown(_table_md(first, EXAMPLE_PROMPT), elem_id="parse")
                tokens = gr.Textbox(first.tokens, label="--tokens (entities, or attribute:entity pairs)",
                                    elem_id="tokens",
                                    info="Filled from the parse; edit to choose the tokens by hand (cat,frog; "
                                         "blue:bag,yellow:clock; cat#2; token indices).")
                methods = gr.CheckboxGroup(demo.methods, value=[m for m in DEFAULT_METHODS if m in demo.methods],
                                           label="methods", elem_id="methods")
                with gr.Row():
                    seeds = gr.Textbox(DEFAULT_SEEDS, label="seeds", elem_id="seeds",
                                       info="comma-separated, e.g. 0,1,2")
                    steps = gr.Number(DEFAULT_STEPS, label="steps", elem_id="steps", precision=0)
                with gr.Row():
                    run = gr.Button("Generate", variant="primary", elem_id="run")
                    stop = gr.Button("Stop", variant="stop", elem_id="stop")
                error = gr.HTML("", elem_id="error")
                notes = gr.Markdown("", elem_id="notes")
                with gr.Accordion("advanced: sampling and method options", open=False, elem_id="advanced"):
                    with gr.Row():
                        guidance = gr.Number(7.5, label="guidance scale", elem_id="guidance-scale")
                        scheduler = gr.Dropdown(["default", *SCHEDULERS], value="default", label="scheduler",
                                                elem_id="scheduler")
                        size = gr.Textbox("", label="size", placeholder="model's (e.g. 64 or 64x96)",
                                          elem_id="size")
                    with gr.Row():
                        step_size = gr.Textbox("", label="step size", placeholder="method's", elem_id="step-size")
                        step_schedule = gr.Dropdown(["default", "sqrt-linear", "constant"], value="default",
                                                    label="step schedule", elem_id="step-schedule")
                        window = gr.Textbox("", label="window", placeholder="method's (START:END, none)",
                                            elem_id="window")
                        refine = gr.Textbox("", label="refine steps", placeholder="method's (0:0.2,10:0.1, none)",
                                            elem_id="refine")
                    option_boxes: dict[tuple[str, str], object] = {}
                    for name, options in demo.options.items():
                        with gr.Accordion(f"{name} options (-o)", open=False):
                            with gr.Row():
                                for key, default in options.items():
                                    option_boxes[(name, key)] = gr.Textbox(default, label=key, min_width=120,
                                                                           elem_id=f"opt-{name}-{key}")
            with gr.Column(scale=3):
                gr.Markdown("**grid** — one row per method, one column per seed")
                grid = gr.Image(show_label=False, type="pil", format="png", interactive=False, elem_id="grid",
                                buttons=["download", "fullscreen"])
                verdicts = gr.HTML("", elem_id="verdicts")
                gr.Markdown("**attention viewer** — one token's map at one step, over the image, every method side "
                            "by side (below: the map alone; each map scaled to its own range)")
                view_key = gr.State("")
                with gr.Row():
                    view_token = gr.Dropdown([], label="token", elem_id="view-token", interactive=True)
                    view_seed = gr.Dropdown([], label="seed", elem_id="view-seed", interactive=True)
                view_step = gr.Slider(0, 1, value=0, step=1, label="step (the sampler's pass: PNDM makes 51 of 50 "
                                      "steps); maps over the final image", elem_id="view-step", interactive=True)
                viewer = gr.Image(show_label=False, type="pil", format="png", interactive=False, elem_id="viewer",
                                  buttons=["download"])
                gr.Markdown("**loss per guided step** — one panel per method, each on its own axis")
                plot = gr.Image(show_label=False, type="pil", format="png", interactive=False, elem_id="loss",
                                buttons=["download"])
                files = gr.File(label="downloads: each image's PNG with its metadata, and the whole run as a zip "
                                      "(every PNG and records.jsonl)", file_count="multiple", interactive=False,
                                elem_id="files")
                with gr.Accordion("attention strips (each token over the steps, and the method's masks)",
                                  open=False):
                    attention = gr.Gallery(show_label=False, columns=1, format="png", elem_id="attention",
                                           object_fit="contain", height="auto")

        def show_parse(prompt_text):
            view = demo.parse(prompt_text)
            return (_table_md(view, prompt_text or ""), view.tokens, _error_html(view.error), _notes_md(view.notes),
                    gr.Radio(choices=chip_choices(view), value=None))

        def show_tokens(prompt_text, tokens_text_):
            view = demo.parse(prompt_text, tokens_text_)
            return _table_md(view, prompt_text or ""), _error_html(view.error), _notes_md(view.notes)

        def add_token(tokens_text_, ref):
            if not ref:
                return gr.Textbox(), gr.Radio()
            return click_token(tokens_text_, ref), gr.Radio(value=None)

        advanced = [guidance, scheduler, step_size, step_schedule, window, refine, size, *option_boxes.values()]

        def generate(data, request, progress=gr.Progress()):
            options: dict[str, dict[str, str]] = {}
            for (name, key), box in option_boxes.items():
                value = str(data[box] if data[box] is not None else "").strip()
                if value != demo.options[name][key]:
                    options.setdefault(name, {})[key] = value
            settings = Settings(guidance_scale=data[guidance], scheduler=data[scheduler] or "default",
                                step_size=data[step_size] or "", step_schedule=data[step_schedule] or "default",
                                window=data[window] or "", refine=data[refine] or "", size=data[size] or "",
                                options=options)
            flag = demo.stop_flag(_session(request))
            try:
                shown = demo.run(data[prompt], data[tokens], data[methods], data[seeds], data[steps],
                                 progress=lambda frac, desc: progress(frac, desc=desc), settings=settings,
                                 should_stop=flag.is_set)
            except Exception as e:  # never a traceback on the page: one line there, the traceback on the console
                traceback.print_exc()
                first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
                shown = Shown(error=f"error: {type(e).__name__}: {first_line}")
            finally:
                demo.finished(_session(request), flag)
            steps_max = max(shown.steps - 1, 1)
            return (_error_html(shown.error), _notes_md(shown.notes), shown.grid, verdicts_html(shown),
                    gr.Gallery(value=shown.attention or None, columns=gallery_columns(shown.columns)),
                    shown.loss_plot, shown.files or None, shown.view,
                    gr.Dropdown(choices=shown.tokens, value=shown.tokens[0] if shown.tokens else None),
                    gr.Dropdown(choices=[str(s) for s in shown.seeds],
                                value=str(shown.seeds[0]) if shown.seeds else None),
                    gr.Slider(minimum=0, maximum=steps_max, value=max(shown.steps - 1, 0), step=1),
                    demo.attention_view(shown.view, shown.tokens[0] if shown.tokens else None, shown.steps - 1)
                    if shown.view else None)

        def stop_run(request):
            demo.stop(_session(request))

        def page_gone(request):
            demo.stop(_session(request))

        for fn in (generate, stop_run, page_gone):  # gradio passes the request by this annotation (a class here:
            fn.__annotations__ = {"request": gr.Request}  # the module's string annotations name no gradio)

        def show_view(key, token, step, seed):
            return demo.attention_view(key, token, step, seed)

        # the parse, the token clicks and the viewer are not queued behind a running generation
        # (the parse only needs the tokenizer and spaCy; the viewer the maps kept in memory)
        quick = dict(concurrency_limit=None, trigger_mode="always_last", show_progress="hidden")
        prompt.change(show_parse, [prompt], [table, tokens, error, notes, chips], **quick)
        tokens.change(show_tokens, [prompt, tokens], [table, error, notes], **quick)
        chips.input(add_token, [tokens, chips], [tokens, chips], concurrency_limit=None, show_progress="hidden")
        for control in (view_token, view_seed, view_step):
            control.change(show_view, [view_key, view_token, view_step, view_seed], [viewer], **quick)
        run_inputs = {prompt, tokens, methods, seeds, steps, *advanced}
        run_outputs = [error, notes, grid, verdicts, attention, plot, files, view_key, view_token, view_seed,
                       view_step, viewer]
        clicked = run.click(generate, run_inputs, run_outputs, concurrency_id="generate", concurrency_limit=1)
        submitted = prompt.submit(generate, run_inputs, run_outputs, concurrency_id="generate",
                                  concurrency_limit=1)
        # Stop: the running step loop ends at its next step (the Gradio cancel alone would leave the thread running)
        stop.click(stop_run, None, None, cancels=[clicked, submitted], concurrency_limit=None,
                   show_progress="hidden")
        # a closed or reloaded page frees the queue: its run stops at the next step (its queued runs Gradio drops)
        app.unload(page_gone)
    app.queue(default_concurrency_limit=1)  # one generation at a time; a second request waits in the queue
    app.unbleed_demo = demo
    return app


def serve(app, host: str = "127.0.0.1", port: int = 7860, block: bool = True) -> None:
    """Start ``app`` on ``host:port``: no share link, no analytics, no server-side rendering, no MCP server. With
    ``block``, wait until Ctrl-C (a :class:`KeyboardInterrupt`), then close the server."""
    _quiet_gradio()
    app.launch(server_name=host, server_port=port, share=False, inbrowser=False, quiet=True, show_error=False,
               ssr_mode=False, mcp_server=False, prevent_thread_lock=True, footer_links=[])
    if not block:
        return
    try:
        while app.is_running:
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        app.close()


__all__ = ["Demo", "Shown", "ParseView", "Settings", "build_app", "serve", "error_line", "parse_seeds",
           "tokens_text", "token_chips", "click_token", "group_rows", "loss_plot", "overlay", "option_defaults",
           "unknown_shapes_words", "shapes_vocabulary", "verdict_labels", "verdicts_html", "DEFAULT_METHODS", "DEFAULT_STEPS",
           "DEFAULT_SEEDS", "EXAMPLE_PROMPT", "EVIDENCE", "PAGE_FIELDS"]
