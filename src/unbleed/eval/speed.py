"""``unbleed bench speed``: time methods against plain sampling and diffusers' Attend-and-Excite, in one process.

Every method runs on the same model, prompt and seed; runs are interleaved (rep 1: sd, ela, …; rep 2: sd, ela, …)
after one untimed warm-up each, so drifts of a noisy machine hit all methods alike. Reported per method: the
median wall time of a whole generation (text encoding, denoising, VAE decoding), its ratio to ``sd``'s median,
and the peak memory above the run's starting point — CUDA: ``torch.cuda.max_memory_allocated``; CPU: the
process's peak resident set size (Linux ``VmHWM``, reset through ``/proc/self/clear_refs``; elsewhere the RSS
sampled every 2 ms) above its size at the start, after freed heap memory is handed back to the system
(``malloc_trim``) — without that, a warm run reuses memory the allocator kept and shows no growth at all.

The reference ``diffusers-attend-excite`` is diffusers' ``StableDiffusionAttendAndExcitePipeline`` on the same
components, with the same guided steps (``max_iter_to_alter``), refinement thresholds and step size. diffusers has
no SDXL Attend-and-Excite pipeline, so on an SDXL model the reference is left out (with a warning).
"""

from __future__ import annotations

import ctypes
import statistics
import threading
import time
import warnings
from typing import Callable

import torch

from ..errors import UnbleedError
from ..guidance import mmdit
from ..guidance.conditioning import is_xl
from ..run.sampler import default_size
from ..guidance.schedule import Schedule
from ..run.spec import RunSpec

REFERENCE = "diffusers-attend-excite"


def _trim_heap() -> None:
    """Hand freed heap memory back to the system (glibc), so that memory the next run reuses counts in its RSS."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _proc_status(key: str) -> int:
    """A ``/proc/self/status`` size (``VmRSS``, ``VmHWM``) in bytes."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"no {key} in /proc/self/status")


def _reset_peak_rss() -> int | None:
    """Reset the process's peak RSS (``VmHWM``) to its current RSS; that RSS, or ``None`` where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return _proc_status("VmRSS")
    except OSError:
        return None


class PeakMemory:
    """Peak memory (MB) above the start, while the ``with`` block runs (see the module docstring)."""

    def __init__(self, device: torch.device):
        self.device, self.peak_mb = device, 0.0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        _trim_heap()
        self._base = _reset_peak_rss()
        self._hwm = self._base is not None
        if self._hwm:
            return self
        import psutil

        self._proc = psutil.Process()
        self._base = self._peak = self._proc.memory_info().rss
        self._stop = threading.Event()

        def sample():
            while not self._stop.is_set():
                self._peak = max(self._peak, self._proc.memory_info().rss)
                time.sleep(0.002)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self._hwm:
            peak = _proc_status("VmHWM")
        else:
            self._stop.set()
            self._thread.join()
            peak = max(self._peak, self._proc.memory_info().rss)
        self.peak_mb = max(0.0, (peak - self._base) / 2**20)
        return False


def _diffusers_attend_excite(pipe, prompt, groups, seed, steps, height, width, schedule: Schedule,
                             output_type: str = "pil"):
    """A runner for diffusers' own A&E pipeline on ``pipe``'s components (processors restored afterwards)."""
    from diffusers import StableDiffusionAttendAndExcitePipeline

    from ..guidance.attention import level_of, resolve_block, size_at_level

    parts = {k: v for k, v in pipe.components.items() if k != "image_encoder"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ae = StableDiffusionAttendAndExcitePipeline(**parts, requires_safety_checker=False)
    ae.set_progress_bar_config(disable=True)
    latent = (height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    attn_res = size_at_level(latent, level_of(pipe.unet, resolve_block(pipe.unet, "up-1")))
    indices = [e.indices[0] for e in groups]
    thresholds = {k: 1 - v for k, v in schedule.refine.items()}  # A&E's thresholds are on max attention

    def run():
        originals = dict(pipe.unet.attn_processors)
        try:
            ae(prompt, token_indices=indices, num_inference_steps=steps, height=height, width=width,
               generator=torch.Generator("cpu").manual_seed(seed), max_iter_to_alter=schedule.window[1],
               thresholds=thresholds, scale_factor=int(schedule.step_size), attn_res=attn_res,
               output_type=output_type)
        finally:
            pipe.unet.set_attn_processor(originals)

    return run


def speed(pipe, methods: list[str], prompt: str = "a cat and a frog", steps: int = 4, height: int | None = None,
          width: int | None = None, repeats: int = 3, seed: int = 0, window: tuple[int, int] | None = None,
          refine: dict[int, float] | None = None, reference: bool = True, truncate: bool = True,
          decode: bool = True, progress: Callable[[str], None] | None = None) -> dict[str, dict[str, float]]:
    """Median seconds, ratio to ``sd`` and peak memory per method (see the module docstring).

    Every step is guided (``window=(0, steps)``) and nothing is refined unless ``window``/``refine`` say otherwise.
    ``decode=False`` stops every pipeline at the final latents (no VAE decoding), which isolates the denoising
    loop — the part guidance slows down.
    """
    output_type = "pil" if decode else "latent"
    if repeats < 1:
        raise UnbleedError(f"--repeats {repeats} must be ≥ 1")
    height, width = height or default_size(pipe), width or default_size(pipe)
    names = list(dict.fromkeys(["sd", *methods]))
    window, refine = tuple(window or (0, steps)), dict(refine or {})

    def spec_of(name: str) -> RunSpec:  # every method's defaults, with the bench's window and refinement steps
        return RunSpec(method=name, window=window, refine=refine, steps=steps, height=height, width=width,
                       seeds=(seed,), truncate=truncate)

    runners: dict[str, Callable[[], None]] = {}
    for name in names:
        spec = spec_of(name)
        built = spec.build()
        groups = spec.groups(pipe.tokenizer, prompt)

        def run(spec=spec, built=built, groups=groups):
            spec.run(pipe, prompt, groups=groups, built=built, output_type=output_type)

        runners[name] = run
    family = "SDXL" if is_xl(pipe) else mmdit.NAMES.get(mmdit.family(pipe))
    if reference and family:
        warnings.warn(f"{REFERENCE} is left out: diffusers' Attend-and-Excite pipeline is for SD 1.x/2.x, not "
                      f"{family}", stacklevel=2)
        reference = False
    if reference:
        ae = spec_of("attend-excite")
        runners[REFERENCE] = _diffusers_attend_excite(pipe, prompt, ae.groups(pipe.tokenizer, prompt), seed, steps,
                                                      height, width, ae.build()[1], output_type)
    times: dict[str, list[float]] = {n: [] for n in runners}
    peaks: dict[str, float] = {n: 0.0 for n in runners}
    device = pipe._execution_device
    for rep in range(repeats + 1):  # rep 0 warms up
        for name, run in runners.items():
            if progress:
                progress(f"{'warm-up' if rep == 0 else f'repeat {rep}/{repeats}'}: {name}")
            with PeakMemory(device) as mem:
                t0 = time.perf_counter()
                run()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                elapsed = time.perf_counter() - t0
            if rep:
                times[name].append(elapsed)
                peaks[name] = max(peaks[name], mem.peak_mb)
    base = statistics.median(times["sd"])
    return {n: {"seconds": round(statistics.median(t), 4), "ratio": round(statistics.median(t) / base, 3),
                "peak_mb": round(peaks[n], 1)} for n, t in times.items()}
