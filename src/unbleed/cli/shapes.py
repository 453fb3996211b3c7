"""``unbleed shapes …``: render shapes-world scenes, detect bleeding in an image, validate the detector, bench and
diagnose methods on the shapes model, train it.

Mounted by the main CLI as ``unbleed shapes``. Errors are one line ``error: …`` on stderr and exit status 2, never a
traceback (:func:`unbleed.cli.common.command`)."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.text import Text

from .. import checks
from ..errors import UnbleedError
from ..run.spec import SCHEDULE_SETTINGS, RunSpec, split_settings
from .common import (Bar, Device, GuidanceScale, Steps, command, err, methods_help, parse_options, progress,
                     quiet_libraries, split_list)
from .tables import print_table

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="The shapes world: a synthetic model organism with an exact bleeding detector.")


MAX_SCENES = 1_000_000  # detect-check: about an hour of scenes on one core
MAX_SIZE = 4096  # render: pixels per side
MAX_BATCH = 65_536  # train: images per batch (a bigger one is a typo; it would only fail for memory)


def _mark(ok: bool) -> str:
    return "yes" if ok else "no"


@app.command()
@command()
def detect(
    image: Path = typer.Argument(..., help="The image to check (any format Pillow reads)."),
    prompt: str = typer.Option(..., "--prompt", "-p", help="The caption it was generated from."),
    as_json: bool = typer.Option(False, "--json", help="Print the verdicts as JSON."),
) -> None:
    """Per requested object: its state, found, right colour, count; and the image's verdicts."""
    if not image.is_file():
        raise UnbleedError(f"IMAGE {str(image)!r}: {'a folder' if image.is_dir() else 'no such file'}; give an image "
                           f"file (PNG, JPEG, …)")
    from ..shapes.detect import detect as run_detect

    result = run_detect(image, prompt)
    if as_json:
        sys.stdout.write(json.dumps(result) + "\n")
        return
    console = Console()
    print_table(console, prompt, ["object", "state", "found", "colour correct", "count"],
                [(f"{o['colour']} {o['shape']}", o["state"], _mark(o["found"]), _mark(o["colour_correct"]),
                  str(o["count"])) for o in result["objects"]])
    console.print("   ".join(f"{k.replace('_', ' ')}: {_mark(result[k])}" for k in
                             ("success", "missing", "leak", "fused", "neglected", "malformed", "wrong_shape",
                              "duplicated")), highlight=False)
    if result["extra"]:
        console.print("extra: " + ", ".join(f"{b['colour']} {b['shape'] or 'blob'}" for b in result["extra"]),
                      highlight=False)


@app.command("detect-check")
@command()
def detect_check(
    n: int = typer.Option(1000, "--n", help="How many random augmented scenes."),
    seed: int = typer.Option(0, "--seed", help="Random seed."),
    as_json: bool = typer.Option(False, "--json", help="Print the figures as JSON."),
) -> None:
    """Validate the detector on random rendered scenes (with missing, leaked, recoloured, fused, malformed,
    duplicated and wrong-shape perturbations, mild noise and blur): the fraction whose verdicts all match the
    ground truth."""
    checks.whole(n, "--n", 1, MAX_SCENES)
    checks.whole(seed, "--seed", 0, checks.SEED_MAX)
    from ..shapes.detect import detect_check as run_check

    result = run_check(n, seed)
    if as_json:
        sys.stdout.write(json.dumps(result) + "\n")
        return
    console = Console()
    console.print(f"accuracy {result['accuracy']:.4f} on {n} scenes (seed {seed})", highlight=False)
    for kind, acc in result["by_kind"].items():
        if acc is not None:
            console.print(f"  {kind}: {acc:.4f}", highlight=False)
    for e in result["errors"]:
        console.print(f"  wrong: #{e['index']} {e['kind']}: {e['prompt']}", highlight=False)


@app.command()
@command()
def render(
    prompt: str = typer.Option(..., "--prompt", "-p", help="A caption in the shapes vocabulary."),
    seed: int = typer.Option(0, "--seed", help="Random seed for sizes and positions."),
    out: str = typer.Option(..., "--out", "-o", help="Output image file (e.g. scene.png)."),
    size: int = typer.Option(64, "--size", help="Image side in pixels."),
) -> None:
    """Render a scene that matches a caption (its objects and any "above"/"below" relation)."""
    from ..shapes.render import render as run_render
    from ..shapes.world import scene_from_caption

    checks.whole(size, "--size", 16, MAX_SIZE, fix=" (pixels)")
    checks.whole(seed, "--seed", 0, checks.SEED_MAX)
    if not out.strip() or Path(out).is_dir():
        raise UnbleedError(f"--out {out!r}: {'a folder' if out.strip() else 'empty'}; give an image file name, "
                           f"e.g. --out scene.png")
    image = run_render(scene_from_caption(prompt, seed, size))
    try:
        image.save(out)
    except (OSError, ValueError) as e:
        raise UnbleedError(f"--out {str(out)!r}: cannot write it ({e})") from None
    err.print(f"wrote {out}", highlight=False)


DIAGNOSED = ("attend-excite", "ela")  # shapes diagnose's methods (unbleed.shapes.diagnose.CARRY_METHODS, no torch)


def bench_options(items: list[str], names: list[str], among: str = "the --methods") -> dict[str, dict[str, str]]:
    """``-o METHOD.KEY=VALUE`` → ``{METHOD: {KEY: VALUE}}`` for each of ``names`` (a bench compares methods, so an
    option names the one it is for; ``among`` says where the names come from, for the error)."""
    per: dict[str, dict[str, str]] = {n: {} for n in names}
    for key, value in parse_options(items).items():
        name, _, sub = key.partition(".")
        if name not in per or not sub:
            raise UnbleedError(f"-o {key}={value}: prefix the option with one of {among}, e.g. "
                               f"-o {names[-1]}.lam=0.3")
        per[name][sub] = value
    return per


def bench_spec(name: str, settings: dict[str, str], **fields) -> RunSpec:
    """One bench contender's checked :class:`RunSpec`: ``settings`` (its ``-o NAME.KEY=VALUE``) split into method
    options and schedule fields (``step_size``, ``step_schedule``, ``window``, ``refine_steps``, ``refine_iters``:
    :func:`~unbleed.run.spec.split_settings`); a bad schedule value is one line naming its ``-o``."""
    with named_settings(name, settings):
        options, schedule = split_settings(settings)
        return RunSpec(method=name, options=options, **schedule, **fields).check()


@contextlib.contextmanager
def named_settings(name: str, settings: dict[str, str]):
    """An error about a schedule field that ``-o NAME.KEY=VALUE`` set becomes one line naming that ``-o``."""
    try:
        yield
    except UnbleedError as err:
        key = next((k for k, (f, _) in SCHEDULE_SETTINGS.items() if f == err.field and k in settings), None)
        if key is None:  # not a schedule field that an -o set
            raise
        raise UnbleedError(f"-o {name}.{key}={settings[key]}: {err}", field="options") from None


@app.command()
@command(flags={"method": "--methods"})
def bench(
    methods: str = typer.Option("sd,ela", "--methods", "-m", help=methods_help("sd,ela,attend-excite")),
    prompts: Optional[int] = typer.Option(None, "--prompts", help="How many prompts of the split [default: 50] "
                                           "(with --prompts-file: the first N; 0 or unset = all)."),
    seeds: str = typer.Option("4", "--seeds", help="Seeds per prompt and method, the same for all: K (0…K−1), "
                              "a range A:B (A…B−1) or a list 3,7,9."),
    baseline: Optional[str] = typer.Option(None, "--baseline", help="The method every other is compared with "
                                           "(paired, 95 % CI); default sd when it runs, else the first."),
    split: str = typer.Option("test", "--split", help="test (unseen prompts of trained colour–shape pairs; report "
                              "here), unseen (each prompt has a never-trained pair) or train (tune here)."),
    prompts_file: Optional[Path] = typer.Option(None, "--prompts-file", help="Captions, one per line (world vocabulary)."),
    objects: int = typer.Option(2, "--objects", help="Objects per generated prompt (1-3; 1 measures single objects)."),
    part: str = typer.Option("1/1", "--part", help="I/N: only every N-th prompt, from the I-th — one of N "
                             "processes or GPUs; merge their --out folders with scripts/shapes_merge.py."),
    model: str = typer.Option("shapes", "--model", help="shapes (shipped), or a pipeline folder from shapes train."),
    steps: Steps = 50,
    guidance_scale: GuidanceScale = 7.5,
    option: list[str] = typer.Option([], "--option", "-o", help="METHOD.KEY=VALUE, e.g. -o ela.lam=0.3; KEY may "
                                     "also be step_size, step_schedule, window, refine_steps or refine_iters."),
    as_json: bool = typer.Option(False, "--json", help="Print {METHOD: {VERDICT: rate, seconds, images, ci, "
                                 "vs_baseline}} (see unbleed.shapes.bench)."),
    out: Optional[str] = typer.Option(None, "--out", help="Write per-prompt grids, bench.png, results.json there."),
    device: Device = "auto",
) -> None:
    """Run methods on the same shapes prompts and seeds; count success and each failure kind with the detector, with
    95 % intervals and paired differences from the baseline."""
    from ..eval.sweep import parse_seeds

    # the flags that need no model, checked before torch and diffusers load (unbleed.checks)
    names = split_list(methods)
    if not names:
        raise UnbleedError("--methods is empty: name methods, e.g. --methods sd,ela")
    if len(set(names)) != len(names):
        raise UnbleedError(f"--methods {methods}: name each method once")
    if baseline is not None and baseline not in names:
        raise UnbleedError(f"--baseline {baseline!r} is not among --methods {','.join(names)}: name one of them")
    if prompts is None:
        prompts = 0 if prompts_file else 50  # a file: all of it; a split: 50
    checks.whole(prompts, "--prompts", 0, fix=" (0 = all of --prompts-file)" if prompts_file else "")
    checks.whole(objects, "--objects", 1, 3)
    index, parts = checks.part(part)
    seed_list = parse_seeds(seeds)
    per = bench_options(option, names)
    contenders = [(n, bench_spec(n, per[n], seeds=tuple(seed_list), steps=steps, guidance_scale=guidance_scale))
                  for n in names]
    checks.given(model, "--model", "name a model, e.g. --model shapes")
    checks.device(device)
    if out is not None:
        out = checks.out_folder(out, "--out")

    from .. import models
    from ..shapes.bench import Contender, bench_prompts, run_bench

    quiet_libraries()
    contenders = [Contender(n, spec) for n, spec in contenders]
    for c in contenders:
        with named_settings(c.label, per[c.label]):
            c.spec.build()  # every method's options, before the model loads
    texts = bench_prompts(split, prompts, prompts_file, objects=objects)
    if prompts_file is not None and prompts > len(texts):
        raise UnbleedError(f"--prompts {prompts}: --prompts-file has only {len(texts)} caption(s); ask for at most "
                           f"{len(texts)}, or 0 for all")
    if parts > len(texts):
        raise UnbleedError(f"--part {part}: {parts} parts of {len(texts)} prompt(s) leave some part empty; split into "
                           f"at most {len(texts)}")
    texts = texts[index - 1::parts]
    with err.status(f"loading model {model}…"):
        pipe = models.load_model(model, device=device)
    with progress() as display:
        bar = Bar(display, "bench")
        bar.start(len(texts) * len(contenders))
        figures = run_bench(pipe, contenders, texts, seed_list, out=out, baseline=baseline,
                            progress=lambda prompt, label: bar.begin(f"{label}: {prompt}"))
        bar.step(len(texts) * len(contenders))
    if as_json:
        sys.stdout.write(json.dumps(figures) + "\n")
    else:
        _bench_tables(figures, f"{len(texts)} prompts × {len(seed_list)} seeds"
                               f"{'' if prompts_file else f' ({split}, {objects} object(s))'}"
                               f"{f', part {index}/{parts}' if parts > 1 else ''}")
    if out is not None:
        err.print(f"wrote {out}/grids/*.png, {out}/bench.png, {out}/bench-diff.png, {out}/results.json, "
                  f"{out}/records.jsonl", highlight=False)


_SHOWN = ("success", "neglected", "malformed", "wrong_shape", "duplicated", "leak", "fused")


def _bench_tables(figures: dict, what: str, console: Console | None = None) -> None:
    """Rates, then each method minus the baseline with its paired 95 % interval: a verdict per row, a method per
    column (so that the usual few methods fit 80 columns); split into groups of methods where the terminal is too
    narrow for one table — never a header or value cut to "…" (:mod:`.tables`)."""
    console = console or Console()
    print_table(console, f"shapes bench: {what}", ["verdict", *figures],
                [*((v.replace("_", " "), *(f"{f[v]:.3f}" for f in figures.values())) for v in _SHOWN),
                 ("seconds", *(f"{f['seconds']:.1f}" for f in figures.values()))],
                sections=[i == len(_SHOWN) - 1 for i in range(len(_SHOWN) + 1)])
    others = {k: f["vs_baseline"] for k, f in figures.items() if "vs_baseline" in f}
    if not others:
        return
    base = next(iter(others.values()))["baseline"]
    print_table(console, f"minus {base}, paired 95 % CI (bootstrap over prompts); * = the CI excludes 0",
                ["verdict", *others],
                [(v.replace("_", " "), *(f"{d[v]['diff']:+.3f} [{d[v]['ci'][0]:+.2f}, {d[v]['ci'][1]:+.2f}]"
                                         f"{'*' if d[v]['excludes_zero'] else ' '}" for d in others.values()))
                 for v in _SHOWN])


@app.command()
@command()
def diagnose(
    prompts: int = typer.Option(40, "--prompts", help="How many prompts of the split."),
    seeds: str = typer.Option("4", "--seeds", help="A count (4 → seeds 0…3), a list 0,5,7, or a range 10:20."),
    split: str = typer.Option("test", "--split", help="test, unseen or train (as for shapes bench)."),
    objects: int = typer.Option(2, "--objects", help="Objects per prompt (1-3)."),
    model: str = typer.Option("shapes", "--model", help="shapes (shipped), or a pipeline folder from shapes train."),
    steps: int = typer.Option(50, "--steps", help="Denoising steps (the figures' steps are given at 50, scaled)."),
    guidance_scale: GuidanceScale = 7.5,
    carry_prompts: Optional[int] = typer.Option(None, "--carry-prompts", help="Prompts (the first N) with the "
                                                "carry-over runs of attend-excite and ela; default all, 0 = none."),
    knockout_prompts: Optional[int] = typer.Option(None, "--knockout-prompts", help="Prompts (the first N) with "
                                                   "the token-knockout runs (e); default all, 0 = none."),
    option: list[str] = typer.Option([], "--option", "-o", help="attend-excite.KEY=VALUE or ela.KEY=VALUE: the "
                                     "diagnosed methods' options (e.g. -o attend-excite.map_scale=10); KEY may also "
                                     "be step_size or step_schedule (the carry-over update's)."),
    as_json: bool = typer.Option(False, "--json", help="Print the figures as JSON."),
    out: Optional[str] = typer.Option(None, "--out", help="Write diagnose.json, records.jsonl, maps/*.png there."),
    device: Device = "auto",
) -> None:
    """Validity of the shapes world for attention methods, on plain sampling: do entity maps localise their
    objects (IoU with the detector's masks), does peak attention predict neglect and map overlap fusion (AUC),
    does one guided update carry over to later steps, how well ELA's masks localise, and do the words decide what is
    drawn (token knockout)."""
    from ..eval.sweep import parse_seeds

    # the flags that need no model, checked before torch and diffusers load (unbleed.checks)
    seed_list = parse_seeds(seeds)
    checks.whole(prompts, "--prompts", 1)
    checks.whole(objects, "--objects", 1, 3)
    for flag, value in (("--carry-prompts", carry_prompts), ("--knockout-prompts", knockout_prompts)):
        if value is not None:
            checks.whole(value, flag, 0, fix=" (0 = none)")
    checks.whole(steps, "--steps", 2, checks.MAX_STEPS, fix=": diagnose needs an update and the step after it")
    checks.real(guidance_scale, "--guidance-scale")
    checks.given(model, "--model", "name a model, e.g. --model shapes")
    checks.device(device)
    per = bench_options(option, list(DIAGNOSED), among=f"the diagnosed methods ({', '.join(DIAGNOSED)})")
    for name, settings in per.items():
        fixed = sorted(k for k in settings if k in SCHEDULE_SETTINGS and k not in ("step_size", "step_schedule"))
        if fixed:
            raise UnbleedError(f"-o {name}.{fixed[0]}={settings[fixed[0]]}: diagnose sets the window and refinement "
                               f"itself (one update, no refinement); give options, step_size or step_schedule")
    specs = {name: bench_spec(name, settings) for name, settings in per.items()}
    if out is not None:
        out = checks.out_folder(out, "--out")

    from .. import models
    from ..shapes.bench import bench_prompts
    from ..shapes.diagnose import CARRY_METHODS, run_diagnose

    quiet_libraries()
    for name, spec in specs.items():
        with named_settings(name, per[name]):
            spec.build()  # every option, before the model loads
    texts = bench_prompts(split, prompts, objects=objects)
    n_carry = len(texts) if carry_prompts is None else min(carry_prompts, len(texts))
    n_knock = len(texts) if knockout_prompts is None else min(knockout_prompts, len(texts))
    with err.status(f"loading model {model}…"):
        pipe = models.load_model(model, device=device)
    with progress() as display:
        total = len(texts) + n_carry * len(CARRY_METHODS) + n_knock * (2 * objects + 1)
        bar = Bar(display, "diagnose")
        bar.start(total)
        figures = run_diagnose(pipe, texts, seed_list, steps=steps, guidance_scale=guidance_scale,
                               carry_prompts=n_carry, knockout_prompts=n_knock, out=out, methods=specs,
                               progress=lambda prompt, stage: bar.begin(f"{stage}: {prompt}"))
        bar.step(total)
    if as_json:
        sys.stdout.write(json.dumps({"model": model, "split": split, "objects": objects, **figures}) + "\n")
    else:
        _print_diagnose(figures, f"{len(texts)} prompts × {len(seed_list)} seeds ({split}, {objects} object(s))")
    if out is not None:
        err.print(f"wrote {out}/diagnose.json, {out}/records.jsonl, {out}/maps/*.png", highlight=False)


def _print_diagnose(f: dict, title: str, console: Console | None = None) -> None:
    def num(x, nd=3):
        return "—" if x is None else f"{x:.{nd}f}"

    def miou(v):
        return f"{num(v['entity']['miou'])} ({v['entity']['n']}) / {num(v['background']['miou'])}"

    console = console or Console()
    loc = f["localisation"]
    ela = f["ela_localisation"]
    print_table(console, f"(a) mIoU with the detector's masks, {title} (DAAM on SD: 0.59–0.65); each cell: entity "
                         f"(n) / SOT–background",
                ["block", *(f"step {s}" for s in loc["steps"])],
                [*((f"{name} {b['resolution'][0]}×{b['resolution'][1]}", *(miou(v) for v in b["by_step"].values()))
                   for name, b in loc["blocks"].items()),
                 ("ELA masks", *(miou(v) for v in ela["by_step"].values()))])
    pred = f["predictiveness"]
    pk, na, ov = pred["peak_attention_neglect"], pred["peak_attention_not_present"], pred["overlap_fused"]
    print_table(console, f"(b) AUC at steps {pred['steps'][0]}–{pred['steps'][1]} (1.0 = perfectly predictive)",
                ["predictor", "of", "AUC", "positives", "negatives", "mean pos", "mean neg"],
                [(who, of, num(x["auc"]), str(x["positives"]), str(x["negatives"]), num(x["mean_positive"]),
                  num(x["mean_negative"]))
                 for who, of, x in (("A&E peak attention (low)", f"neglected ({pk['label']})", pk),
                                    ("A&E peak attention (low)", "not cleanly present", na),
                                    ("map overlap (high)", "fused", ov))])
    c = f["carry_over"]
    if c["methods"]:
        def carried(d):
            return (Text(f"{num(d['mean_diff'], 4)} ({num(d['fraction_down'], 2)})\n"
                         f"[{num(d['ci95'][0], 4)}, {num(d['ci95'][1], 4)}]") if d["ci95"] else "—")

        print_table(console, f"(c) guided − unguided loss after one update: "
                             f"mean (fraction down) and [95 % CI], {c['prompts']} prompts",
                    ["loss", *c["methods"]],
                    [("update at step (next, later)", *("{} ({}, {})".format(*m.get("steps", (c["update_step"], c["next_step"], c["later_step"])))
                                                        for m in c["methods"].values())),
                     ("before the update", *(num(m["loss_before_update"], 4) for m in c["methods"].values())),
                     ("update size (RMS of Δz)", *(num(m.get("update_rms"), 5) for m in c["methods"].values())),
                     *((label, *(carried(m[k]) for m in c["methods"].values()))
                       for label, k in (("same step", "at_step"), ("next step", "next_step"), ("later step", "later")))],
                    sections=[False, False, True, True, True, False])
    k = f["knockout"]
    if k["prompts"]:
        print_table(console, f"(e) token knockout: of the objects plain sampling draws, the fraction still drawn "
                             f"({k['prompts']} prompts; SD-like: own words low, another's high)",
                    ["columns replaced by the empty caption's", "objects kept", "95 % CI", "n"],
                    [(label, num(k[key]["kept"]),
                      f"[{num(k[key]['ci95'][0])}, {num(k[key]['ci95'][1])}]" if k[key]["ci95"] else "—",
                      str(k[key]["n"]))
                     for key, label in (("own_words", "the object's own words"),
                                        ("other_words", "another object's words"),
                                        ("summary", "end-of-text + padding"),
                                        ("own_words_and_summary", "its own words + end-of-text + padding"))])
    console.print(f"{f['images']} images in {f['seconds']:.0f} s; detector: success {num(f['detector']['success'])}, "
                  f"fused {num(f['detector']['fused'])}, {f['detector']['neglected_objects']} of "
                  f"{f['detector']['objects']} objects neglected, {f['detector']['clean_objects']} clean",
                  highlight=False)


@app.command()
@command(interrupted="interrupted; run the same command again to resume from the last checkpoint in {out}")
def train(
    out: str = typer.Option(..., "--out", "-o", help="Run folder: checkpoint/, pipeline/ (the model), log.jsonl. "
                             "An existing run there is resumed."),
    steps: int = typer.Option(4000, "--steps", help="Diffusion training steps in total (raise it to train on)."),
    vae_steps: int = typer.Option(1500, "--vae-steps", help="VAE training steps (first phase)."),
    batch: int = typer.Option(64, "--batch", help="Diffusion batch size."),
    vae_batch: int = typer.Option(16, "--vae-batch", help="VAE batch size."),
    lr: float = typer.Option(1e-3, "--lr", help="AdamW learning rate after warm-up (text encoder + UNet)."),
    vae_lr: float = typer.Option(2e-3, "--vae-lr", help="AdamW learning rate of the VAE."),
    warmup: int = typer.Option(200, "--warmup", help="Linear learning-rate warm-up steps."),
    lr_decay: str = typer.Option("constant", "--lr-decay", help="After warm-up: constant, or cosine (down to 0 at "
                                 "--steps, from the run's start; for a warm start, from --init-from's step)."),
    ema: float = typer.Option(0.999, "--ema", help="EMA decay of the exported weights."),
    p_objects: str = typer.Option("0.5,0.4,0.1", "--p-objects",
                                  help="Caption distribution: probabilities of 1, 2 and 3 objects."),
    p_uncond: float = typer.Option(0.1, "--p-uncond", help="Fraction of empty captions (classifier-free guidance)."),
    p_words_only: float = typer.Option(0.0, "--p-words-only",
                                       help="Fraction of captioned samples whose cross-attention sees only the words "
                                            "(end-of-text and padding hidden), so that word maps decide content."),
    clean_pads: bool = typer.Option(False, "--clean-pads", help="The UNet sees the empty caption's end-of-text and "
                                    "padding outputs, and the text encoder learns to produce them: the caption "
                                    "reaches the UNet only through its words."),
    keep_eot: bool = typer.Option(False, "--keep-eot", help="With --clean-pads: the end-of-text column stays the "
                                  "caption's (one summary column, as a frozen CLIP's); only the padding is cleaned."),
    count_eot: bool = typer.Option(False, "--count-eot", help="With --clean-pads: the end-of-text column is the "
                                   "encoding of the caption's template (colours and shapes replaced by one word): "
                                   "how many objects, never which."),
    pad_caption: str = typer.Option("", "--pad-caption", help="With --clean-pads: a captioned sample's end-of-text and "
                                    "padding are this caption's (e.g. 'a'), not the empty caption's, so they say "
                                    "'captioned' and nothing of which caption; empty captions keep their own. "
                                    "Tried in session 11: the encoder's padding for 'a' ends up nearly equal to the "
                                    "empty caption's (docs/shapes.md)."),
    min_snr: float = typer.Option(5.0, "--min-snr", help="Min-SNR-γ loss weighting (γ)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the initial weights, the data and the noise."),
    arch: str = typer.Option("default", "--arch", help="Network sizes: default (the shipped model), sd32 (32×32 latents, "
                                           "16×16 up-1 maps, 4 heads: SD's geometry) or test."),
    checkpoint_every: int = typer.Option(250, "--checkpoint-every", help="Steps between checkpoints."),
    device: Device = "auto",
    init_from: Optional[Path] = typer.Option(None, "--init-from", help="Start a new run from an exported pipeline's "
                                             "weights (e.g. src/unbleed/data/shapes_model) instead of random ones."),
) -> None:
    """Train the shapes model (VAE, then text encoder + UNet), resumable: run the same command again to continue."""
    from rich.progress import TextColumn

    # every number before torch loads (unbleed.checks; TrainConfig.validate checks them again, with the rest)
    checks.whole(steps, "--steps", 1, fix=": the diffusion phase makes the model (OUT/pipeline); raise it to train on")
    for flag, value, low in (("--vae-steps", vae_steps, 0), ("--warmup", warmup, 0),
                             ("--checkpoint-every", checkpoint_every, 1)):
        checks.whole(value, flag, low)
    for flag, value in (("--batch", batch), ("--vae-batch", vae_batch)):
        checks.whole(value, flag, 1, MAX_BATCH)
    checks.whole(seed, "--seed", 0, checks.SEED_MAX)
    for flag, value in (("--lr", lr), ("--vae-lr", vae_lr), ("--min-snr", min_snr)):
        checks.real(value, flag, 0, low_open=True)
    checks.real(ema, "--ema", 0, 1, high_open=True, fix=" (the EMA decay, e.g. 0.999)")
    checks.real(p_uncond, "--p-uncond", 0, 1, high_open=True, fix=" (a probability)")
    checks.real(p_words_only, "--p-words-only", 0, 1, fix=" (a probability)")
    checks.device(device)
    try:
        probs = tuple(float(v) for v in p_objects.split(","))
    except ValueError:
        raise UnbleedError(f"--p-objects {p_objects!r}: give three comma-separated probabilities") from None
    if init_from is not None and not (init_from / "unbleed_shapes.json").is_file():
        what = ("not a pipeline exported by 'unbleed shapes train' (no unbleed_shapes.json)" if init_from.exists()
                else "no such folder")
        raise UnbleedError(f"--init-from {init_from}: {what}: give the OUT/pipeline folder of a shapes train run, "
                           f"or src/unbleed/data/shapes_model")
    out = checks.out_folder(out, "--out")  # before torch loads: an unwritable --out is one line, not a traceback

    from ..shapes.train import TrainConfig, train as run_train

    cfg = TrainConfig(steps=steps, vae_steps=vae_steps, batch=batch, vae_batch=vae_batch, lr=lr, vae_lr=vae_lr,
                      warmup=warmup, lr_decay=lr_decay, ema=ema, p_objects=probs, p_uncond=p_uncond,
                      p_words_only=p_words_only, clean_pads=clean_pads, keep_eot=keep_eot, count_eot=count_eot,
                      pad_caption=pad_caption,
                      min_snr=min_snr, seed=seed, arch=arch, checkpoint_every=checkpoint_every).validate()
    with progress(TextColumn("loss {task.fields[loss]:.4f}")) as display:
        tasks: dict[str, int] = {}

        def on_step(phase, done, total, loss):
            if phase not in tasks:
                tasks[phase] = display.add_task(phase, total=total, completed=done - 1, loss=loss)
            display.update(tasks[phase], completed=done, loss=loss)

        result = run_train(out, cfg, device=device, progress=on_step, init_from=init_from)
    err.print(f"{'resumed and ' if result['resumed'] else ''}trained to step {result['step']} (VAE {result['vae_step']}) "
              f"in {result['seconds']:.0f} s; model: {out / 'pipeline'} (use --model {out / 'pipeline'})",
              highlight=False)


__all__ = ["app", "bench_options"]
