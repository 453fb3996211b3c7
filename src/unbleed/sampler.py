"""The one guided sampler every method runs on.

It is diffusers' ``StableDiffusionPipeline.__call__`` loop — the pipeline's own ``encode_prompt``,
``prepare_latents``, ``prepare_extra_step_kwargs``, scheduler and ``image_processor`` — with one addition: inside
the guidance window, before the scheduler step, the latent is moved down the method's loss,

    z_t ← z_t − α_t ∇_{z_t} L(maps(z_t)),

where the maps come from a text-conditioned UNet pass on ``z_t`` (scaled by the scheduler's
``scale_model_input``). At refinement steps the update repeats while a sample's loss is above the step's
threshold (at most ``max_refine_iters`` times; samples already below it are left alone), then the step's regular
update follows — Attend-and-Excite's iterative refinement, which ELA's Alg. 1 also follows. With no method the
loop is exactly diffusers' (tested for equality).

Seeds are a batch: one UNet pass serves all of them, each seed has its own generator, and losses are per
sample (summed only to take one gradient), so every image equals the one its seed gives alone.
"""

from __future__ import annotations

import contextlib
import operator
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .attention import AttentionStore, MapRequest, attention_store, resolve_block, level_of
from .errors import UnbleedError
from .methods import Method, Schedule, group_map
from .tokens import Entity, check_groups


@dataclass
class StepTrace:
    """What happened at one denoising step (kept for ``--save-attention`` and the JSON record)."""

    step: int
    timestep: int
    guided: bool
    loss: list[float] | None = None  # per sample, before the step's update
    final_loss: list[float] | None = None  # per sample, after refinement (before the regular update)
    refine_iters: int = 0
    alpha: float | None = None
    maps: torch.Tensor | None = None  # [B, groups, h, w] on CPU, when saving attention
    # generate(record=…): per request, the raw maps [B, 77, h, w] (conditional half, CPU) of the latent the
    # scheduler steps — at a guided step the latent after the update (captured on the regular pass)
    raw_maps: tuple[torch.Tensor, ...] | None = None
    visuals: dict[str, torch.Tensor] = field(default_factory=dict)  # method pictures [B, h, w], on CPU


@dataclass
class Result:
    images: Any  # list of PIL images (or the array for output_type="np")
    latents: torch.Tensor
    seeds: list[int]
    groups: list[Entity]
    params: dict[str, Any]
    trace: list[StepTrace]
    seconds: float


SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed takes 0 … 2**64 − 1 (a negative seed only aliases a large one)


def check_seeds(seeds, name: str = "seeds") -> list[int]:
    """``seeds`` as ints, each ``0 ≤ seed ≤ 2**64 − 1``; the one seed rule of the library and every CLI. ``name`` is
    what an error names (``--seed`` / ``--seeds`` from the CLIs)."""
    out = []
    for s in seeds:
        try:
            value = operator.index(s)
        except TypeError:
            raise UnbleedError(f"{name} {s!r}: a seed is a whole number from 0 to 2**64 − 1") from None
        if not 0 <= value <= SEED_MAX:
            raise UnbleedError(f"{name} {value}: a seed must be from 0 to 2**64 − 1 ({SEED_MAX})")
        out.append(value)
    if not out:
        raise UnbleedError(f"{name}: give at least one seed")
    return out


def _cpu_generators(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]


def default_size(pipe) -> int:
    return pipe.unet.config.sample_size * pipe.vae_scale_factor


def check_size(pipe, height: int, width: int) -> None:
    f = pipe.vae_scale_factor
    for name, v in (("--height", height), ("--width", width)):
        if v <= 0 or v % f:
            raise UnbleedError(f"{name} {v} must be a positive multiple of {f} (the VAE's downsampling factor)")


def _attention_request(pipe, method: Method | None) -> MapRequest:
    """Maps kept for pictures: the method's own, or UP-1's for plain sampling."""
    if method is not None:
        return _first(method.map_request(pipe.unet))
    up1 = resolve_block(pipe.unet, "up-1")
    return MapRequest(blocks=(up1,), out_level=level_of(pipe.unet, up1))


def picture_groups(groups: list[Entity]) -> tuple[list[str], list[tuple[int, ...]]]:
    """Rows of the attention pictures: each entity, then its attributes — names and token indices."""
    names, idx = [], []
    for e in groups:
        names.append(e.text)
        idx.append(e.indices)
        for a in e.attributes:
            names.append(f"{a.text} ({e.text})")
            idx.append(a.indices)
    return names, idx


def _pool(maps: torch.Tensor, indices: list[tuple[int, ...]]) -> torch.Tensor:
    return torch.stack([group_map(maps, i) for i in indices], 1).detach().cpu()


@torch.no_grad()
def generate(
    pipe,
    prompt: str,
    *,
    method: Method | None = None,
    groups: list[Entity] | None = None,
    seeds: list[int] = (0,),
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    height: int | None = None,
    width: int | None = None,
    negative_prompt: str | None = None,
    eta: float = 0.0,
    schedule: Schedule | None = None,
    save_attention: bool = False,
    record: MapRequest | tuple[MapRequest, ...] | None = None,
    output_type: str = "pil",
    callback: Callable[[int, int, StepTrace], None] | None = None,
    truncate: bool = True,
) -> Result:
    """Generate one image per seed, guided by ``method`` (``None`` = plain SD, identical to diffusers).

    ``truncate``: the guided passes stop after the last cross-attention layer the method reads (the loss needs
    nothing after it; the result is the same as with full passes).

    ``record``: map requests kept at every step in ``StepTrace.raw_maps`` (one ``[B, 77, h, w]`` float32 CPU
    tensor per request, all token columns, conditional half of CFG), captured on the step's regular UNet pass —
    so at a guided step they are the maps of the updated latent, the one the scheduler steps. The recorded layers
    run the explicit-softmax processor (as ``save_attention``), equal to the fused one up to float rounding.
    """
    t0 = time.perf_counter()
    seeds = check_seeds(seeds)
    if num_inference_steps < 1:
        raise UnbleedError(f"--steps {num_inference_steps} must be ≥ 1")
    groups = check_groups(pipe.tokenizer, prompt, groups or [])
    if method is not None and method.needs_groups and not groups:
        raise UnbleedError(f"{method.name} needs token groups: pass --tokens, e.g. --tokens cat,frog")
    height = height or default_size(pipe)
    width = width or default_size(pipe)
    check_size(pipe, height, width)
    if method is not None:
        schedule = (schedule or method.default_schedule(num_inference_steps)).validate(num_inference_steps)
    device = pipe._execution_device
    batch = len(seeds)
    do_cfg = guidance_scale > 1.0
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps

    cond, uncond = pipe.encode_prompt(prompt, device, batch, do_cfg, negative_prompt)
    embeds = torch.cat([uncond, cond]) if do_cfg else cond
    timesteps, num_inference_steps = retrieve_timesteps(pipe.scheduler, num_inference_steps, device)
    generators = _cpu_generators(seeds)
    latents = pipe.prepare_latents(batch, pipe.unet.config.in_channels, height, width, embeds.dtype, device,
                                   generators)
    extra = pipe.prepare_extra_step_kwargs(generators, eta)
    latent_hw = tuple(latents.shape[-2:])
    request = method.map_request(pipe.unet) if method is not None else None
    picture_request = _attention_request(pipe, method) if save_attention else None
    recorded = () if record is None else record if isinstance(record, tuple) else (record,)
    value_sets = method.value_sets(pipe, prompt, groups, embeds, batch, do_cfg) if method is not None else None
    picture_idx = picture_groups(groups)[1]
    memory: dict[str, Any] = {"num_steps": len(timesteps),
                              "prompt_length": min(len(pipe.tokenizer(prompt).input_ids),
                                                   pipe.tokenizer.model_max_length)}
    trace: list[StepTrace] = []

    with attention_store(pipe.unet) as store:
        for i, t in enumerate(timesteps):
            guided = method is not None and method.guides and schedule.guided(i)
            rec = StepTrace(step=i, timestep=int(t), guided=guided)
            if rec.guided:
                memory["step"] = i
                latents = _guide(pipe, store, method, request, schedule, groups, latents, t, cond, latent_hw,
                                 memory, rec, picture_idx if save_attention else None, truncate)
            inp = torch.cat([latents] * 2) if do_cfg else latents
            inp = pipe.scheduler.scale_model_input(inp, t)
            keep = save_attention and not rec.guided and picture_idx
            wanted = ((picture_request,) if keep else ()) + recorded
            ctx = (store.capture(wanted, latent_hw, slice(batch, None) if do_cfg else slice(None))
                   if wanted else contextlib.nullcontext())
            with ctx, store.values(value_sets):
                noise = pipe.unet(inp, t, encoder_hidden_states=embeds, return_dict=False)[0]
            if keep:
                rec.maps = _pool(store.maps(picture_request), picture_idx)
            if recorded:
                rec.raw_maps = tuple(store.maps(r).detach().cpu() for r in recorded)
            if do_cfg:
                noise_uncond, noise_text = noise.chunk(2)
                noise = noise_uncond + guidance_scale * (noise_text - noise_uncond)
            latents = pipe.scheduler.step(noise, t, latents, **extra, return_dict=False)[0]
            trace.append(rec)
            if callback is not None:
                callback(i, len(timesteps), rec)

    if output_type == "latent":
        images = latents
    else:
        image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False,
                                generator=generators)[0]
        images = pipe.image_processor.postprocess(image, output_type=output_type, do_denormalize=[True] * batch)
    params = {
        "steps": num_inference_steps, "guidance_scale": guidance_scale, "height": height, "width": width,
        "negative_prompt": negative_prompt, "eta": eta, "scheduler": type(pipe.scheduler).__name__,
        "dtype": str(pipe.unet.dtype).replace("torch.", ""), "method_options": method.options() if method else {},
        "schedule": schedule.as_dict() if method is not None else None,
    }
    return Result(images, latents, seeds, groups, params, trace, time.perf_counter() - t0)


def _first(maps):
    return maps[0] if isinstance(maps, tuple) else maps


def _detach(maps):
    return tuple(m.detach() for m in maps) if isinstance(maps, tuple) else maps.detach()


def _guide(pipe, store: AttentionStore, method: Method, request, schedule: Schedule, groups: list[Entity],
           latents: torch.Tensor, t, cond: torch.Tensor, latent_hw, memory: dict[str, Any], rec: StepTrace,
           picture_idx, truncate: bool = True) -> torch.Tensor:
    """One guided step: the update ``z ← z − α ∇L``, with refinement when this is a refinement step."""
    step = memory["step"]
    alpha = schedule.alpha(step, memory["num_steps"])
    rec.alpha = alpha
    requests = request if isinstance(request, tuple) else (request,)

    def maps_of(z: torch.Tensor):
        with store.capture(requests, latent_hw, truncate=truncate):
            pipe.unet(pipe.scheduler.scale_model_input(z, t), t, encoder_hidden_states=cond, return_dict=False)
        maps = tuple(store.maps(r) for r in requests)
        return maps if isinstance(request, tuple) else maps[0]

    with torch.enable_grad():
        z = latents.detach().requires_grad_(True)
        maps = maps_of(z)
        state = method.prepare_step(_detach(maps), groups, memory)
        loss = method.loss(maps, groups, state)
        rec.loss = loss.detach().float().cpu().tolist()
        if picture_idx:
            rec.maps = _pool(_first(maps), picture_idx)
            rec.visuals = {k: v.detach().cpu() for k, v in method.visuals(state, groups).items()}
        threshold = schedule.refine.get(step)
        if threshold is not None:
            while rec.refine_iters < schedule.refine_cap(step):
                active = method.refine_value(maps, groups, state, loss).detach() > threshold
                if not active.any():
                    break
                z = _descend(z, loss, alpha, active)
                maps = maps_of(z)
                loss = method.loss(maps, groups, state)
                rec.refine_iters += 1
        rec.final_loss = loss.detach().float().cpu().tolist()
        z = _descend(z, loss, alpha)
    return z.detach()


def _descend(z: torch.Tensor, loss: torch.Tensor, alpha: float, active: torch.Tensor | None = None) -> torch.Tensor:
    """``z − α ∇L`` per sample (only ``active`` samples move); a non-finite gradient skips that sample's update."""
    (grad,) = torch.autograd.grad(loss.sum(), z)
    ok = torch.isfinite(grad.flatten(1)).all(1)
    if not ok.all():
        warnings.warn(f"non-finite gradient for {int((~ok).sum())} sample(s): their update is skipped",
                      stacklevel=2)
        grad = torch.where(ok[:, None, None, None], grad, torch.zeros_like(grad))
    if active is not None:
        grad = grad * active.to(grad.dtype)[:, None, None, None]
    return (z - alpha * grad).detach().requires_grad_(True)


