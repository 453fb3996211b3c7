"""``unbleed sweep``: prompt × seed × method → images and one JSON record per image; resumable, crash-safe and
data-parallel under Hugging Face Accelerate (``accelerate launch -m unbleed sweep …``).

Design (every step survives SIGKILL at any moment):

* The work list is deterministic: the suite's prompts (``--limit`` first ones) × ``--methods`` × the seeds cut into
  batches of ``--batch-size``. A *job* is one image, keyed by ``(prompt, seed, method)``; a *unit* is one batch of
  seeds of one (prompt, method), run as one ``sampler.generate`` call.
* Units are dealt round-robin over the processes by their position in the full list (unit ``i`` → process
  ``i mod N``), so every job belongs to exactly one process and only that process writes its record.
* Each process appends to its own ``records-pK.jsonl``. An image is written under a temporary name and moved into
  place with ``os.replace``; only then is its record line appended, flushed and fsync'ed. A record therefore
  always points at a complete image; an image without a record is simply made again (same seed, same bytes).
* On start each process reads every records file (a truncated last line — a kill mid-write — is ignored), skips
  the jobs already recorded, cuts its own file back to its last complete line and empties its temporary folder.
* One pipeline (and one set of metric models) per process, loaded once. Each method runs as one
  :class:`~unbleed.run.spec.RunSpec` (:func:`method_spec`), built once; ``-o`` options reach the methods
  through the one router, :func:`unbleed.methods.route_options` (``ela.lam=…`` to ela only, a plain key to every
  method that has it).
* One sweep per run folder: the main process holds ``RUN/.lock`` (an exclusive ``flock`` on an open descriptor,
  which the OS drops however the process ends, so a lock file left by a dead sweep blocks nothing) from before
  ``sweep.json`` is read until every process is done; a second sweep on the folder stops with one error line.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UnbleedError
from .suites import Prompt, load_suite

if TYPE_CHECKING:
    from ..run.spec import RunSpec

MANIFEST = "sweep.json"
LOCK = ".lock"
# Options that change the images: a run folder keeps them fixed (methods, seeds and --limit may grow).
FIXED = ("suite", "model", "steps", "height", "width", "guidance_scale", "scheduler", "options", "clip_model",
         "caption_model", "metrics", "metric_names", "detector_model", "vqa_model")
# Lists a resumed run may extend but never shorten: every recorded method and seed must be in the new list.
GROWING = ("methods", "seeds")


@dataclass
class SweepConfig:
    suite: str
    methods: list[str]
    seeds: list[int]
    model: str
    out: str
    limit: int | None = None
    steps: int = 50
    height: int | None = None
    width: int | None = None
    guidance_scale: float = 7.5
    scheduler: str = "default"
    options: dict[str, str] = field(default_factory=dict)  # -o KEY=VALUE, parsed; routed per method
    batch_size: int = 4
    clip_model: str = "openai/clip-vit-base-patch16"
    caption_model: str | None = "Salesforce/blip-image-captioning-base"
    metrics: bool = True
    metric_names: list[str] = field(default_factory=lambda: ["clip"])  # --metrics: clip, verdicts, blip-vqa
    detector_model: str = "google/owlv2-base-patch16-ensemble"
    vqa_model: str = "Salesforce/blip-vqa-base"
    device: str = "auto"
    dtype: str = "auto"
    allow_pickle: bool = False


@dataclass(frozen=True)
class Unit:
    prompt_index: int
    prompt: Prompt
    method: str
    seeds: tuple[int, ...]


def job_key(prompt: str, seed: int, method: str) -> str:
    return json.dumps([prompt, int(seed), method], ensure_ascii=False)


def work_list(prompts: list[Prompt], methods: list[str], seeds: list[int], batch_size: int) -> list[Unit]:
    """Every unit of the sweep, in a fixed order (prompt-major, then method, then seed batch)."""
    batches = [tuple(seeds[i:i + batch_size]) for i in range(0, len(seeds), batch_size)]
    return [Unit(i, p, m, b) for i, p in enumerate(prompts) for m in methods for b in batches]


def shard(units: list[Unit], index: int, count: int) -> list[Unit]:
    """Process ``index`` of ``count``'s units: every ``count``-th one of the full list, from ``index``."""
    return units[index::count]


def read_records(run: str | Path) -> list[dict]:
    """Every complete record of a run folder (all processes' files), the first of any repeated key."""
    out, seen = [], set()
    for path in sorted(Path(run).glob("records-*.jsonl")):
        with open(path, "rb") as fh:
            data = fh.read()
        for line in data.split(b"\n"):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue  # a line cut short by a kill (only ever the last one of a file)
            if isinstance(rec, dict) and "key" in rec and rec["key"] not in seen:
                seen.add(rec["key"])
                out.append(rec)
    return out


def repair(path: Path) -> None:
    """Cut a records file back to its last complete line (what a kill mid-append leaves behind)."""
    if not path.exists():
        return
    with open(path, "rb+") as fh:
        data = fh.read()
        end = data.rfind(b"\n") + 1
        if end != len(data):
            fh.truncate(end)
            fh.flush()
            os.fsync(fh.fileno())


def seeds_text(seeds: list[int]) -> str:
    """Seeds as ``--seeds`` takes them: ``64`` for 0…63, ``10:20`` for a range, else ``0,5,7``."""
    if seeds == list(range(len(seeds))):
        return str(len(seeds))
    if seeds and seeds == list(range(seeds[0], seeds[0] + len(seeds))):  # also one seed: 3 → 3:4
        return f"{seeds[0]}:{seeds[-1] + 1}"
    return ",".join(map(str, seeds))


MAX_SEEDS = 100_000  # seeds one count or range may name (each is an image per prompt and method)


def parse_seeds(text, name: str = "seeds", *, bare_count: bool = True) -> list[int]:
    """The one seed grammar of every front end (the command line's ``--seeds``, the demo's seeds box): seeds
    separated by commas or spaces (``0,5,7``, ``0 5 7``), ranges among them (``10:20`` → 10…19; ``0,10:12`` →
    0, 10, 11), and a lone number ``64``, read as a count, seeds 0…63, or with ``bare_count=False`` as that one
    seed (``7,`` is seed 7 either way). :func:`seeds_text` is its inverse. Seeds must be distinct and follow the
    one seed rule (:func:`unbleed.checks.seeds`), a text may name at most :data:`MAX_SEEDS`; errors are one line
    starting with ``name`` (their ``field``)."""
    from ..checks import seeds as check_seeds  # the one seed rule, without torch

    raw = "" if text is None else str(text).strip()
    hint = ("a count (64 → seeds 0…63), distinct seeds 0,5,7, or a range 10:20" if bare_count
            else "whole numbers separated by commas, e.g. 0,1")
    items = raw.replace(",", " ").split()
    if not items:
        raise UnbleedError(f"{name}: give at least one seed: {hint}", field=name)
    lone = len(items) == 1 and "," not in raw and bare_count
    try:
        spans = []
        for item in items:
            if ":" in item:
                start, stop = item.split(":")
                spans.append(range(int(start), int(stop)))
            else:
                spans.append(range(int(item)) if lone else [int(item)])
        total = sum(len(span) for span in spans)  # OverflowError: a count or range too long to measure
    except (ValueError, OverflowError):
        raise UnbleedError(f"{name} {raw!r}: give {hint}", field=name) from None
    if total > MAX_SEEDS:  # a count of 10**9 would fill the memory before any check
        raise UnbleedError(f"{name} {raw!r}: {total:,} seeds; give at most {MAX_SEEDS:,}", field=name)
    if not all(spans):  # an empty count or range: 0, 3:3, 3:1
        raise UnbleedError(f"{name} {raw!r}: give {hint}", field=name)
    seeds = [seed for span in spans for seed in span]
    if len(set(seeds)) != len(seeds):
        raise UnbleedError(f"{name} {raw!r}: each seed once", field=name)
    return check_seeds(seeds, name)


def _check_manifest(run: Path, cfg: SweepConfig) -> None:
    """Write ``sweep.json`` on a fresh run; on a resumed one, refuse options that would change the images and
    method or seed lists that leave out recorded ones (longer lists extend the run and are recorded)."""
    path = run / MANIFEST
    mine = {k: v for k, v in asdict(cfg).items() if k in FIXED}
    if path.is_file():
        try:
            theirs = json.loads(path.read_text())
        except json.JSONDecodeError:
            theirs = None
        if isinstance(theirs, dict):
            diff = [k for k in FIXED if k in theirs and theirs[k] != mine[k]]
            if diff:
                k = diff[0]
                raise UnbleedError(f"--out {run}: this run folder was started with {k}={theirs[k]!r}, not "
                                   f"{mine[k]!r}: rerun with the same options to resume, or pick a new --out")
            for k in GROWING:
                old, new = theirs.get(k), getattr(cfg, k)
                if isinstance(old, list) and not set(old) <= set(new):
                    show = seeds_text if k == "seeds" else ",".join
                    raise UnbleedError(f"--{k} {show(new)}: the run folder {run} was started with --{k} "
                                       f"{show(old)} and a resumed sweep keeps all of them: rerun with --{k} "
                                       f"{show(old)} (adding {k} extends the run), or pick a new --out")
            if all(theirs.get(k) == getattr(cfg, k) for k in GROWING):
                return
            grown = [f"--{k} {','.join(map(str, theirs.get(k) or []))} → {','.join(map(str, getattr(cfg, k)))}"
                     for k in GROWING if theirs.get(k) != getattr(cfg, k)]
            warnings.warn(f"--out {run}: extending the run ({'; '.join(grown)}); sweep.json records the new lists")
    tmp = run / f".{MANIFEST}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({**mine, "methods": cfg.methods, "seeds": cfg.seeds}, indent=2))
    os.replace(tmp, path)


def lock_run(run: Path):
    """Take ``RUN/.lock`` for this process (returns the open file; closing it releases the lock), or raise one
    error line naming the sweep that holds it. The file keeps the holder's pid for that message."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): no lock
        return None
    fh = open(run / LOCK, "a+")
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        pid = fh.read().strip() or "?"
        fh.close()
        raise UnbleedError(f"--out {run}: another sweep (pid {pid}) is running on this folder; wait for it to end "
                           f"or use another --out") from None
    fh.seek(0)
    fh.truncate()
    fh.write(f"{os.getpid()}\n")
    fh.flush()
    return fh


def _claim(run: Path, cfg: SweepConfig, state):
    """Lock the run folder and check (or write) ``sweep.json`` on the main process; every process gets the
    outcome, so a refused start ends all of them with the same line instead of leaving some at a barrier."""
    lock, error = None, None
    if state.is_main_process:
        try:
            lock = lock_run(run)
            _check_manifest(run, cfg)
            (run / "images").mkdir(exist_ok=True)
        except UnbleedError as err:
            error = str(err)
        except OSError as err:
            error = f"--out {run}: cannot write to the folder ({err.strerror})"
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        error = broadcast_object_list([error])[0]
    if error is not None:
        if lock is not None:
            lock.close()
        raise UnbleedError(error)
    if not state.is_main_process:
        _check_manifest(run, cfg)
    return lock


def _append(fh, record: dict) -> None:
    fh.write((json.dumps(record, ensure_ascii=False) + "\n").encode())
    fh.flush()
    os.fsync(fh.fileno())


def method_spec(cfg: SweepConfig, method: str) -> RunSpec:
    """The run of ``method`` in this sweep: its share of ``cfg.options`` (:func:`unbleed.methods.route_options`,
    not strict: an option may be another method's), the sweep's steps, guidance scale, size and seeds."""
    from ..run.spec import RunSpec
    from ..methods import route_options

    per = route_options(method, cfg.options, strict=False)
    if len(per) == 1:
        options = next(iter(per.values()))
    else:  # a composed method: each part's options under its name, so each reaches that part only
        options = {f"{part}.{k}": v for part, mine in per.items() for k, v in mine.items()}
    return RunSpec(method=method, options=options, steps=cfg.steps, guidance_scale=cfg.guidance_scale,
                   height=cfg.height, width=cfg.width, seeds=tuple(cfg.seeds))


def _check_options(cfg: SweepConfig) -> None:
    """Every ``-o`` option must reach at least one of the methods (one line naming the option otherwise)."""
    from ..methods import route_options

    for key, value in cfg.options.items():
        if any(any(route_options(m, {key: value}, strict=False).values()) for m in cfg.methods):
            continue
        target, _, _ = key.rpartition(".")
        if target:
            raise UnbleedError(f"-o {key}: {target!r} is not one of the methods {', '.join(cfg.methods)}",
                               field="options")
        raise UnbleedError(f"-o {key}: none of the methods {', '.join(cfg.methods)} has this option",
                           field="options")


def validate(cfg: SweepConfig) -> list[Prompt]:
    """Check every option before any model loads (each method's run spec is built once); return the prompts."""
    from ..checks import seeds as check_seeds  # the one seed rule, without torch
    from ..methods import route_options

    if not cfg.methods:
        raise UnbleedError("--methods is empty: give a comma-separated list, e.g. --methods sd,ela")
    if len(set(cfg.methods)) != len(cfg.methods):
        raise UnbleedError(f"--methods {','.join(cfg.methods)}: a method is named twice")
    for m in cfg.methods:
        if "/" in m or m.startswith("."):
            raise UnbleedError(f"--methods: {m!r} is not a method name")
        route_options(m, None)  # an unknown method: one line listing the registry
    if not isinstance(cfg.options or {}, dict):
        raise TypeError("SweepConfig.options: a dict of parsed -o options ({KEY: VALUE}), not "
                        f"{type(cfg.options).__name__}")
    cfg.options = dict(cfg.options or {})
    _check_options(cfg)
    if not cfg.seeds:
        raise UnbleedError("--seeds: give a count (--seeds 64 → seeds 0…63) or a list (--seeds 0,5,7)")
    cfg.seeds = check_seeds(cfg.seeds, "--seeds")
    if cfg.steps < 1:
        raise UnbleedError(f"--steps {cfg.steps} must be ≥ 1")
    if cfg.batch_size < 1:
        raise UnbleedError(f"--batch-size {cfg.batch_size} must be ≥ 1")
    if cfg.limit is not None and cfg.limit < 1:
        raise UnbleedError(f"--limit {cfg.limit} must be ≥ 1")
    if cfg.metrics:
        from .scoring import parse_metrics

        cfg.metric_names = parse_metrics(cfg.metric_names)
    for m in cfg.methods:
        method_spec(cfg, m).build()  # option values, guidance scale, size
    prompts = load_suite(cfg.suite)
    return prompts[:cfg.limit] if cfg.limit else prompts


def run_sweep(cfg: SweepConfig, progress=None) -> dict:
    """Run this process's share of the sweep; return a summary (counts, seconds, paths)."""
    import torch
    from accelerate import PartialState

    prompts = validate(cfg)
    # CPU-only machines: cpu=True lets Accelerate form its multi-CPU (gloo) group under a torchrun-style launch
    state = PartialState(cpu=cfg.device == "cpu" or not torch.cuda.is_available())
    run = Path(cfg.out)
    try:
        run.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UnbleedError(f"--out {cfg.out}: cannot create the folder ({err.strerror})") from None
    lock = _claim(run, cfg, state)
    try:
        summary = _run_share(cfg, prompts, state, run, progress)
        state.wait_for_everyone()  # the main process's lock covers every process's writes
        return summary
    finally:
        if lock is not None:
            lock.close()


def _run_share(cfg: SweepConfig, prompts: list[Prompt], state, run: Path, progress) -> dict:
    """This process's units of a claimed run folder: skip the recorded jobs, make and record the others."""
    import torch

    from ..io.output import image_name, nest_params, save_result
    from ..models import load_model

    index, count = state.process_index, state.num_processes
    mine = shard(work_list(prompts, cfg.methods, cfg.seeds, cfg.batch_size), index, count)
    own = run / f"records-p{index}.jsonl"
    repair(own)
    done = {r["key"] for r in read_records(run)}
    todo = [(u, [s for s in u.seeds if job_key(u.prompt.text, s, u.method) not in done]) for u in mine]
    todo = [(u, seeds) for u, seeds in todo if seeds]
    n_images = sum(len(s) for _, s in todo)
    summary = {"process": index, "processes": count, "assigned": sum(len(u.seeds) for u in mine),
               "skipped": sum(len(u.seeds) for u in mine) - n_images, "made": 0, "failed": 0, "seconds": 0.0,
               "records": str(own)}
    tmp_dir = run / ".tmp" / f"p{index}"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    if not todo:
        return summary

    t_start = time.perf_counter()
    device = str(state.device) if cfg.device == "auto" else cfg.device
    if progress:
        progress.status(f"loading model {cfg.model}…")
    pipe = load_model(cfg.model, device=device, dtype=cfg.dtype, allow_pickle=cfg.allow_pickle,
                      scheduler=cfg.scheduler)
    scorer = None
    if cfg.metrics:
        from .scoring import Metrics

        if progress:
            progress.status(f"loading metric models ({','.join(cfg.metric_names)})…")
        scorer = Metrics.load(cfg.metric_names, cfg.clip_model, cfg.caption_model, cfg.detector_model, cfg.vqa_model,
                              device=pipe.device, allow_pickle=cfg.allow_pickle)
    specs = {m: method_spec(cfg, m) for m in cfg.methods}
    built = {m: spec.build() for m, spec in specs.items()}  # (method object, schedule), once per method
    groups_cache: dict[tuple[str, str], list] = {}
    if progress:
        progress.label = f"sweep p{index}/{count}" if count > 1 else "sweep"
        progress.start(n_images)
    with open(own, "ab") as fh:
        for unit, seeds in todo:
            prompt, method = unit.prompt.text, unit.method
            spec = specs[method]
            base = {"suite": cfg.suite, "prompt_index": unit.prompt_index, "prompt": prompt,
                    "category": unit.prompt.category, "method": method, "model": cfg.model, "process": index}
            try:
                if (prompt, method) not in groups_cache:
                    groups_cache[(prompt, method)] = spec.groups(pipe.tokenizer, prompt)
                groups = groups_cache[(prompt, method)]
                t0 = time.perf_counter()

                def on_step(i, total, rec, done_images=summary["made"] + summary["failed"]):
                    if progress:
                        progress.step(done_images + len(seeds) * (i + 1) / total)

                result = spec.run(pipe, prompt, groups=groups, seeds=seeds, callback=on_step, built=built[method])
                seconds_gen = time.perf_counter() - t0
            except UnbleedError as err:  # e.g. a prompt with no noun for a guided method: recorded, not retried
                for s in seeds:
                    _append(fh, {"key": job_key(prompt, s, method), **base, "seed": s, "error": str(err)})
                summary["failed"] += len(seeds)
                if progress:
                    progress.step(summary["made"] + summary["failed"])
                continue
            t1 = time.perf_counter()
            metrics = scorer.score(result.images, prompt) if scorer is not None else [None] * len(seeds)
            seconds_metrics = time.perf_counter() - t1
            records = save_result(result, prompt, method, cfg.model, tmp_dir)
            for rec, metric in zip(records, metrics):
                seed = rec["seed"]
                final = run / "images" / image_name(unit.prompt_index, method, seed)
                os.replace(rec.pop("path"), final)
                _append(fh, {"key": job_key(prompt, seed, method), **base, **nest_params(rec),
                             "image": str(final.relative_to(run)), "metrics": metric,
                             "seconds": round((seconds_gen + seconds_metrics) / len(seeds), 3)})
                summary["made"] += 1
            if progress:
                progress.step(summary["made"] + summary["failed"])
    shutil.rmtree(tmp_dir, ignore_errors=True)
    summary["seconds"] = round(time.perf_counter() - t_start, 2)
    del pipe, scorer
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return summary


def finish(cfg: SweepConfig) -> int:
    """After every process is done: the number of records in the run folder (called on the main process)."""
    return len(read_records(cfg.out))
