"""``unbleed generate`` (one image per seed, guided by a method) and ``unbleed parse`` (the prompt's entities)."""

from __future__ import annotations

import json
import os
import sys
import warnings
from typing import Annotated, Optional

import typer
from rich.console import Console

from .. import checks
from ..errors import UnbleedError
from ..run.spec import RunSpec
from .common import (DEFAULT_MODEL, AllowPickle, BatchSize, Device, Dtype, GuidanceScale, Height, Layout, MethodName,
                     MethodOptions, Model, RefineIters, RefineSteps, Scheduler, Steps, StepSchedule, StepSize, Width,
                     Window, Bar, command, err, parse_options, parse_weights, progress, quiet_libraries, with_layout)


def describe(groups) -> str:
    """``cat=[2]; frog=[5] ← green=[4]``: token groups as the commands print them."""
    return "; ".join(f"{g.text}={list(g.indices)}" + "".join(f" ← {a.text}={list(a.indices)}" for a in g.attributes)
                     for g in groups)


def check_tokens(model: str, prompt: str, tokens: str) -> None:
    """``--tokens`` checked with the model's tokenizer alone, before the model loads (a wrong word is one line in
    seconds, not after the whole model). SD 1.x/2.x and SDXL's first tokenizer are CLIP's BPE, which the shipped
    shapes model uses too; a model whose tokenizer cannot be had alone is checked after it loads, as before."""
    from ..text.tokenizers import load_tokenizer
    from ..text.tokens import parse_token_spec

    try:
        tokenizer = load_tokenizer("clip" if model == "shapes" else model)
    except UnbleedError:
        return
    parse_token_spec(tokenizer, prompt, tokens)


@command(interrupted="interrupted; images finished so far are in {out}", flags={"seeds": "--seed"})
def generate(
    prompt: Annotated[str, typer.Argument(help="The text prompt.")],
    method: MethodName = "sd",
    model: Model = DEFAULT_MODEL,
    tokens: Annotated[Optional[str], typer.Option(
        "--tokens", "-t", help="Entities (cat,frog) or attribute:entity pairs (blue:bag,yellow:clock); words, word#N "
                               "for the N-th occurrence, or token indices.")] = None,
    seed: Annotated[list[int], typer.Option("--seed", "-s", help="Seed; repeat for several images.")] = [0],
    steps: Steps = 50,
    height: Height = None,
    width: Width = None,
    guidance_scale: GuidanceScale = 7.5,
    negative_prompt: Annotated[Optional[str], typer.Option("--negative-prompt", help="Negative prompt.")] = None,
    scheduler: Scheduler = "default",
    window: Window = None,
    refine_steps: RefineSteps = None,
    refine_iters: RefineIters = None,
    step_size: StepSize = None,
    step_schedule: StepSchedule = None,
    option: MethodOptions = [],
    weights: Annotated[Optional[str], typer.Option(
        "--weights", help="Loss weights of composed methods, e.g. --method ela+syngen --weights 1,0.5.")] = None,
    layout: Layout = [],
    out: Annotated[str, typer.Option("--out", help="Output folder (created; files are never overwritten).")] = "out",
    save_attention: Annotated[bool, typer.Option(
        "--save-attention", help="Also write a picture of the attention maps and masks per image.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the records as a JSON list on stdout.")] = False,
    batch_size: BatchSize = 4,
    device: Device = "auto",
    dtype: Dtype = "auto",
    allow_pickle: AllowPickle = False,
) -> None:
    """Generate one image per seed, guided by a method, with full PNG metadata."""
    # the flags that need no model, checked before torch and diffusers load (unbleed.checks)
    checks.whole(batch_size, "--batch-size", 1)
    spec = RunSpec(method=method, options=parse_options(option), weights=parse_weights(weights), window=window,
                   refine=refine_steps, refine_iters=refine_iters, step_size=step_size, step_schedule=step_schedule,
                   tokens=tokens, seeds=tuple(seed), steps=steps, guidance_scale=guidance_scale, height=height,
                   width=width, negative_prompt=negative_prompt).check()
    if not prompt.strip():
        raise UnbleedError("PROMPT is empty: give the text to draw")
    checks.scheduler(scheduler)
    checks.given(model, "--model", "name a model, e.g. --model tiny")
    checks.device(device)
    checks.dtype(dtype)
    checks.out_folder(out)  # before the model loads: an unwritable --out must not cost a whole run
    if tokens and tokens.strip():
        check_tokens(model, prompt, tokens)

    from .. import models
    from ..io.output import save_result

    quiet_libraries()
    warnings.filterwarnings("ignore", module="diffusers")
    spec.options = with_layout(spec.options, layout, [method])
    built = spec.build()  # the method's options and the schedule, before the model loads
    if spec.sets_schedule and not built.guiding:
        err.print(f"note: --method {method} does no guidance; the schedule options are ignored", highlight=False)
    with err.status(f"loading model {model}…"):
        pipe = models.load_model(model, device=device, dtype=dtype, allow_pickle=allow_pickle, scheduler=scheduler)
    prepared = spec.prepare(pipe, prompt, pictures=save_attention, built=built)  # one line for what does not fit
    announce(model, prompt, prepared.groups, bool(tokens))
    source = ("--tokens" if tokens else "parse") if prepared.groups else None
    records = sample_batches(spec, pipe, prompt, prepared, batch_size, save_attention,
                             lambda result: save_result(result, prompt, method, model, out,
                                                        save_attention=save_attention,
                                                        extra={"tokens_source": source}))
    if as_json:
        sys.stdout.write(json.dumps(records, indent=2) + "\n")


def announce(model: str, prompt: str, groups, given: bool) -> None:
    """The lines before sampling: words the shapes model never saw, and the token groups (``given``: from
    ``--tokens``)."""
    if model == "shapes":  # words the shapes model never saw in a caption draw nothing meaningful
        from ..demo import shapes_vocabulary, unknown_shapes_words

        unknown = unknown_shapes_words(prompt)
        if unknown:
            err.print(f"warning: the shapes model never saw {', '.join(repr(w) for w in unknown)}: it knows only "
                      f"{shapes_vocabulary()}", highlight=False, soft_wrap=True)
    if groups:
        err.print(("tokens: " if given else "tokens (from the parse; --tokens overrides): ") + describe(groups),
                  highlight=False, soft_wrap=True)


def sample_batches(spec: RunSpec, pipe, prompt: str, prepared, batch_size: int, save_attention: bool,
                   save) -> list[dict]:
    """The spec's seeds in batches of ``batch_size`` under one progress bar, each batch ``save``d (and its files
    named) as soon as it is done; the records of every image."""
    seeds = list(spec.seeds)
    batches = [seeds[i:i + batch_size] for i in range(0, len(seeds), batch_size)]
    records = []
    with progress() as display:
        bar = Bar(display, f"{spec.method} ×{len(seeds)}")
        bar.status(bar.label)
        for b, batch in enumerate(batches):
            def on_step(i, total, rec, b=b):  # in --steps (a PNDM run of 50 steps makes 51 passes)
                bar.step(b * spec.steps + round((i + 1) * spec.steps / total), total=spec.steps * len(batches))

            result = spec.run(pipe, prompt, prepared, seeds=batch, save_attention=save_attention, callback=on_step)
            saved = save(result)
            for rec in saved:
                err.print(f"wrote {rec['path']}" + (f" and {rec['attention_path']}" if "attention_path" in rec
                                                    else ""), highlight=False, soft_wrap=True)
            records += saved
    return records


@command()
def parse(
    prompt: Annotated[str, typer.Argument(help="The text prompt.")],
    model: Annotated[str, typer.Option(
        "--model", help="Whose tokenizer: clip (SD 1.x/2.x, shipped), tiny, a hub id or a local folder.")] = "clip",
    as_json: Annotated[bool, typer.Option("--json", help="Print the parse as JSON.")] = False,
) -> None:
    """Entities, their attributes and their CLIP token indices, from a dependency parse of the prompt."""
    from rich.table import Table

    from ..text.prompt import parse as parse_prompt
    from ..text.tokenizers import load_tokenizer

    if not prompt.strip():
        raise UnbleedError("PROMPT is empty: give the text to parse")
    # transformers' logging quiet from its first import on, without importing it before --model is checked (a bad
    # hub id answers in a second, not after transformers loads)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = parse_prompt(prompt, load_tokenizer(model))
    for w in caught:
        err.print(f"warning: {w.message}", highlight=False, soft_wrap=True)
    if as_json:
        sys.stdout.write(json.dumps(result.as_dict(), ensure_ascii=False) + "\n")
        return
    table = Table("entity", "token indices", "attributes (indices)", title=prompt)
    for e in result.entities:
        table.add_row(e.text, ", ".join(map(str, e.indices)),
                      "; ".join(f"{a.text} ({', '.join(map(str, a.indices))})" for a in e.attributes))
    Console().print(table)
    if result.dropped:
        err.print("dropped: " + ", ".join(d["text"] for d in result.dropped), highlight=False)


__all__ = ["generate", "parse", "describe", "check_tokens", "announce", "sample_batches"]
