"""The browser demo (``unbleed demo``): type a prompt, see its parse, run methods × seeds, look at what happened.

Two layers, so that the demo is testable without a browser:

* :class:`Demo` — the work, on one loaded pipeline (kept for the server's life): :meth:`Demo.parse` (the token
  groups of a prompt as a table and as ``--tokens`` text), :meth:`Demo.run` (every method on the same seeds, the
  PNGs written by :func:`unbleed.io.output.save_result` into a fresh folder per request, the grid, the attention
  pictures, the loss plot). Bad input is never an exception here: it is the command line's one-line
  ``error: …`` (library field names turned into flags by ``flags``, as :func:`unbleed.cli.common.command` does).
* :func:`build_app` — the Gradio page on a :class:`Demo` (imported only here: the rest of unbleed never needs
  gradio), queued one run at a time; :func:`serve` starts it on ``host:port`` with nothing that phones home.

File names never come from the prompt (``NNNN-METHOD-sSEED.png``, the one naming rule).
"""

from __future__ import annotations

import atexit
import html
import io
import os
import shutil
import tempfile
import threading
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from PIL import Image

from .errors import UnbleedError
from .methods import Method, method_names

DEFAULT_METHODS = ("sd", "ela")
DEFAULT_STEPS = 20
EXAMPLE_PROMPT = "a red circle and a blue square"
KEEP_REQUESTS = 32  # request folders kept on disk (older ones are removed); all are removed when the server stops
GRID_CELL = 192  # pixels per image in the grid (small images are scaled up without smoothing)


@dataclass
class Shown:
    """What one request shows on the page (``error`` set: nothing else)."""

    error: str = ""  # "" or the one line "error: …"
    notes: list[str] = field(default_factory=list)  # "warning: …" lines, timings
    grid: Image.Image | None = None  # one row per method, one column per seed
    images: list[tuple[Image.Image, str]] = field(default_factory=list)  # (image, "METHOD · seed S"), row-major
    attention: list[tuple[str, str]] = field(default_factory=list)  # (attention picture path, caption)
    loss_plot: Image.Image | None = None
    files: list[str] = field(default_factory=list)  # the PNGs with their metadata (and attention pictures)
    records: list[dict] = field(default_factory=list)
    columns: int = 1


@dataclass
class ParseView:
    """A prompt's token groups: ``rows`` (entity, token indices, attributes) and ``tokens`` as ``--tokens`` text."""

    rows: list[list[str]] = field(default_factory=list)
    tokens: str = ""
    source: str = "parse"  # "parse" or "--tokens"
    error: str = ""
    notes: list[str] = field(default_factory=list)


# --- small parts --------------------------------------------------------------------------------------------------
def error_line(e: UnbleedError, flags: dict[str, str] | None) -> str:
    """The command line's line for ``e``: ``error: `` and the message with its field named by its flag."""
    return "error: " + (e.for_flags(flags) if flags else str(e))


def parse_seeds(text) -> list[int]:
    """``0, 1 2`` → ``[0, 1, 2]``: distinct whole numbers, each a valid seed (errors name the field ``seeds``)."""
    from .guidance.sampler import check_seeds

    items = str(text if text is not None else "").replace(",", " ").split()
    try:
        seeds = [int(s) for s in items]
    except ValueError:
        raise UnbleedError(f"seeds {str(text).strip()!r}: give whole numbers separated by commas, e.g. 0,1",
                           field="seeds") from None
    if len(set(seeds)) != len(seeds):
        raise UnbleedError(f"seeds {str(text).strip()!r}: each seed once", field="seeds")
    return check_seeds(seeds, "seeds")


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


def loss_plot(series: list[tuple[str, list[int], list[float], list[float | None]]], steps: int | None = None,
              width: float = 6.4, height: float = 3.2):
    """The loss per guided step of each ``(label, steps, losses, losses after refinement)`` (``None``: that step
    was not refined), over the run's ``steps``, as an image (matplotlib's figure, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    drawn = [s for s in series if s[1]]
    refined = False
    for label, at, losses, after in drawn:
        (line,) = ax.plot(at, losses, marker="o", label=label)
        points = [(x, y) for x, y in zip(at, after) if y is not None]
        if points:
            refined = True
            ax.plot(*zip(*points), linestyle="none", marker="x", color=line.get_color())
    if refined:
        ax.plot([], [], linestyle="none", marker="x", color="gray", label="after refinement")
    if steps:
        ax.set_xlim(-0.5, steps - 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if drawn:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no guided steps (sd and conditioning methods do no latent updates)", ha="center",
                va="center", transform=ax.transAxes, fontsize=9)
    ax.set_xlabel("denoising step")
    ax.set_ylabel("loss (before the step's update)")
    ax.set_title("guidance loss per step", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def _scaled(image: Image.Image, size: int) -> Image.Image:
    """``image`` scaled up to ``size`` without smoothing (small models' pixels stay visible); large ones as they are."""
    if max(image.size) >= size:
        return image
    factor = max(1, size // max(image.size))
    return image.resize((image.width * factor, image.height * factor), Image.NEAREST)


# --- the work -----------------------------------------------------------------------------------------------------
class Demo:
    """The demo's work on one loaded pipeline ``pipe`` (``model_name`` goes into the records). ``flags``: the
    library field → flag names of error lines (the command line's :data:`unbleed.cli.common.FLAGS`). Requests'
    PNGs go to fresh folders under ``workdir`` (a temporary folder removed at exit when not given)."""

    def __init__(self, pipe, model_name: str, flags: dict[str, str] | None = None, workdir: str | Path | None = None,
                 keep: int = KEEP_REQUESTS):
        import copy

        self.pipe, self.model_name, self.flags, self.keep = pipe, model_name, dict(flags or {}), keep
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

    # --- the parse ----------------------------------------------------------------------------------------------
    def parse(self, prompt: str, tokens: str | None = None) -> ParseView:
        """The token groups the run would use: from ``tokens`` (``--tokens`` text) when given, else the parse's —
        whose ``--tokens`` text is returned to be edited."""
        from .text.prompt import parse, token_groups

        prompt = prompt or ""
        if not prompt.strip():
            return ParseView()
        try:
            with self.text_lock, warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                if tokens and tokens.strip():
                    groups, source, text = token_groups(self.tokenizer, prompt, tokens), "--tokens", tokens
                else:
                    groups = parse(prompt, self.tokenizer).entities
                    source, text = "parse", tokens_text(self.tokenizer, prompt, groups)
        except UnbleedError as e:
            return ParseView(tokens=tokens or "", source="--tokens" if tokens else "parse",
                             error=error_line(e, self.flags))
        notes = [f"warning: {w.message}" for w in caught]
        return ParseView(rows=group_rows(groups), tokens=text, source=source, notes=notes)

    # --- a run --------------------------------------------------------------------------------------------------
    def run(self, prompt: str, tokens: str | None, methods, seeds, steps,
            progress: Callable[[float, str], None] | None = None) -> Shown:
        """Every method of ``methods`` on the same ``seeds`` (text such as ``0,1``) with ``steps`` steps; bad input
        gives a :class:`Shown` with only ``error`` set, before any sampling."""
        try:
            return self._run(prompt or "", tokens, list(methods or []), seeds, steps, progress)
        except UnbleedError as e:
            return Shown(error=error_line(e, self.flags))

    def _run(self, prompt, tokens, methods, seeds, steps, progress) -> Shown:
        from .guidance.spec import RunSpec
        from .io.output import save_result
        from .io.plots import image_grid

        if not methods:
            raise UnbleedError("method: choose at least one method", field="method")
        seeds, steps = parse_seeds(seeds), parse_steps(steps)
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
        specs = [RunSpec(method=m, tokens=tokens, seeds=tuple(seeds), steps=steps) for m in methods]
        built = [spec.build() for spec in specs]  # every field checked before any work, as the CLI does
        if not prompt.strip():
            raise UnbleedError("PROMPT is empty: give the text to draw")
        notes, groups = [], []
        with self.text_lock, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for spec, (guide, _) in zip(specs, built):
                if isinstance(guide, Method):
                    guide.map_requests(self.pipe.unet)
                groups.append(spec.groups(self.pipe.tokenizer, prompt, pictures=True))
        notes += list(dict.fromkeys(f"warning: {w.message}" for w in caught))
        out = self._request_folder()
        shown = Shown(notes=notes, columns=len(seeds))
        rows, series = [], []
        for k, (method, spec, made, grp) in enumerate(zip(methods, specs, built, groups)):
            def on_step(i, total, rec, k=k, method=method):
                if progress is not None:
                    progress((k + (i + 1) / total) / len(methods), f"{method}: step {i + 1}/{total}")

            if progress is not None:
                progress(k / len(methods), f"{method}: starting")
            started = time.perf_counter()
            result = spec.run(self.pipe, prompt, groups=grp, save_attention=True, callback=on_step, built=made)
            records = save_result(result, prompt, method, self.model_name, out, save_attention=True,
                                  extra={"tokens_source": "--tokens" if tokens else "parse"})
            shown.notes.append(f"{method}: {len(seeds)} image(s), {steps} steps, "
                               f"{time.perf_counter() - started:.1f} s")
            images = []
            for rec, image in zip(records, result.images):
                caption = f"{method} · seed {rec['seed']}"
                images.append(image)
                shown.images.append((image, caption))
                shown.attention.append((rec["attention_path"], caption))
                shown.files += [rec["path"], rec["attention_path"]]
                shown.records.append(rec)
                guided = rec["guidance"]
                if isinstance(made[0], Method):
                    series.append((f"{method} s{rec['seed']}", [g["step"] for g in guided],
                                   [g["loss"] for g in guided],
                                   [g["final_loss"] if g["refine_iters"] else None for g in guided]))
            rows.append((method, [_scaled(im, GRID_CELL) for im in images]))
        if progress is not None:
            progress(1.0, "drawing")
        cell = max(max(im.size) for _, ims in rows for im in ims)
        shown.grid = image_grid(rows, col_labels=[f"seed {s}" for s in seeds], cell=cell)
        shown.loss_plot = loss_plot(series, steps)
        return shown

    def _request_folder(self) -> Path:
        """A fresh folder for one request's PNGs; the oldest beyond ``keep`` are removed."""
        folders = sorted((p for p in self.workdir.glob("request-*") if p.is_dir()), key=lambda p: p.stat().st_mtime)
        for old in folders[:max(0, len(folders) - self.keep + 1)]:
            shutil.rmtree(old, ignore_errors=True)
        return Path(tempfile.mkdtemp(prefix="request-", dir=self.workdir))


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

    head = ("token groups — from the parse (edit `--tokens` below to change them)" if view.source == "parse"
            else "token groups — from `--tokens`")
    lines = [head, "", "| entity | token indices | attributes (indices) |", "| --- | --- | --- |"]
    lines += [f"| {cell(a)} | {cell(b)} | {cell(c)} |" for a, b, c in view.rows]
    return "\n".join(lines)


def gallery_columns(seeds: int) -> int:
    """Columns of the attention pictures: one per seed (rows are then methods, as in the grid), 2 to 4."""
    return min(max(seeds, 2), 4)


def _notes_md(notes: list[str]) -> str:
    return "\n".join(f"- {html.escape(n)}" for n in notes)


def build_app(pipe, model_name: str, flags: dict[str, str] | None = None, workdir: str | Path | None = None):
    """The Gradio page on ``pipe`` (loaded once, kept): a :class:`Demo` behind it, runs queued one at a time."""
    _quiet_gradio()
    import gradio as gr

    demo = Demo(pipe, model_name, flags=flags, workdir=workdir)
    first = demo.parse(EXAMPLE_PROMPT)
    with gr.Blocks(title="unbleed demo", analytics_enabled=False, delete_cache=(3600, 3600)) as app:
        gr.Markdown(f"## unbleed — concept bleeding, fixed without training\nModel: `{html.escape(model_name)}`. "
                    "Type a prompt, check its token groups, pick methods and seeds: one row per method, one "
                    "column per seed, the same seeds for all.")
        with gr.Row():
            with gr.Column(scale=2):
                prompt = gr.Textbox(EXAMPLE_PROMPT, label="prompt", elem_id="prompt", lines=1, max_lines=3)
                table = gr.Markdown(_table_md(first, EXAMPLE_PROMPT), elem_id="parse")
                tokens = gr.Textbox(first.tokens, label="--tokens (entities, or attribute:entity pairs)",
                                    elem_id="tokens",
                                    info="Filled from the parse; edit to choose the tokens by hand (cat,frog; "
                                         "blue:bag,yellow:clock; cat#2; token indices).")
                methods = gr.CheckboxGroup(demo.methods, value=[m for m in DEFAULT_METHODS if m in demo.methods],
                                           label="methods", elem_id="methods")
                with gr.Row():
                    seeds = gr.Textbox("0", label="seeds", elem_id="seeds", info="comma-separated, e.g. 0,1,2")
                    steps = gr.Number(DEFAULT_STEPS, label="steps", elem_id="steps", precision=0)
                run = gr.Button("Generate", variant="primary", elem_id="run")
                error = gr.HTML("", elem_id="error")
                notes = gr.Markdown("", elem_id="notes")
            with gr.Column(scale=3):
                gr.Markdown("**grid** — one row per method, one column per seed")
                grid = gr.Image(show_label=False, type="pil", format="png", interactive=False, elem_id="grid")
                attention = gr.Gallery(label="attention maps over the steps and the method's masks, per image",
                                       columns=2, format="png", elem_id="attention", object_fit="contain",
                                       height="auto")
                plot = gr.Image(label="loss per guided step", type="pil", format="png", interactive=False,
                                elem_id="loss")
                files = gr.File(label="PNGs with their metadata", file_count="multiple", interactive=False,
                                elem_id="files")

        def show_parse(prompt_text, tokens_text_=None):
            view = demo.parse(prompt_text, tokens_text_)
            return _table_md(view, prompt_text or ""), view.tokens, _error_html(view.error), _notes_md(view.notes)

        def show_tokens(prompt_text, tokens_text_):
            view = demo.parse(prompt_text, tokens_text_)
            return _table_md(view, prompt_text or ""), _error_html(view.error), _notes_md(view.notes)

        def generate(prompt_text, tokens_text_, chosen, seeds_text, steps_value, progress=gr.Progress()):
            try:
                shown = demo.run(prompt_text, tokens_text_, chosen, seeds_text, steps_value,
                                 progress=lambda frac, desc: progress(frac, desc=desc))
            except Exception as e:  # never a traceback on the page: one line there, the traceback on the console
                traceback.print_exc()
                first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
                shown = Shown(error=f"error: {type(e).__name__}: {first_line}")
            return (_error_html(shown.error), _notes_md(shown.notes), shown.grid,
                    gr.Gallery(value=shown.attention or None, columns=gallery_columns(shown.columns)),
                    shown.loss_plot, shown.files or None)

        # the parse is not queued behind a running generation (it only needs the tokenizer and spaCy)
        # (on any change of the prompt: typed, pasted or filled in; the --tokens box only on what a person types
        # there, since the parse itself fills it in)
        prompt.change(show_parse, [prompt], [table, tokens, error, notes], concurrency_limit=None,
                      trigger_mode="always_last", show_progress="hidden")
        tokens.input(show_tokens, [prompt, tokens], [table, error, notes], concurrency_limit=None,
                     trigger_mode="always_last", show_progress="hidden")
        run_inputs = [prompt, tokens, methods, seeds, steps]
        run_outputs = [error, notes, grid, attention, plot, files]
        run.click(generate, run_inputs, run_outputs, concurrency_id="generate", concurrency_limit=1)
        prompt.submit(generate, run_inputs, run_outputs, concurrency_id="generate", concurrency_limit=1)
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


__all__ = ["Demo", "Shown", "ParseView", "build_app", "serve", "error_line", "parse_seeds", "tokens_text",
           "group_rows", "loss_plot", "DEFAULT_METHODS", "DEFAULT_STEPS", "EXAMPLE_PROMPT"]
