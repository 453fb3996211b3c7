"""The one guided sampler every method runs on.

:func:`generate` is diffusers' ``StableDiffusionPipeline.__call__`` loop (on SDXL ``StableDiffusionXLPipeline``'s:
the family's differences — two text encoders, pooled embedding, time ids, VAE upcast — are behind
:mod:`unbleed.guidance.conditioning`) — the pipeline's own ``encode_prompt``, ``prepare_latents``,
``prepare_extra_step_kwargs``, scheduler and ``image_processor`` — with one addition: inside
the guidance window, before the scheduler step, :func:`guided_step` moves the latent down the method's loss,

    z_t ← z_t − α_t ∇_{z_t} L(maps(z_t)),

where the maps come from a text-conditioned UNet pass on ``z_t`` (scaled by the scheduler's
``scale_model_input``, ``x_t = c_t z_t``). The step is taken on the model input, ``x_t ← x_t − α_t ∇_{x_t} L``,
i.e. ``z_t ← z_t − (α_t / c_t²) ∇_{z_t} L`` (:meth:`Guide.gain`). For DDIM, PNDM and DPM++ ``c_t = 1``: the
papers' update as written. For Euler-type schedulers (SDXL's default) ``c_t = 1/sqrt(σ_t² + 1)`` and ``x_t`` is
exactly the variance-preserving latent the papers' α were set on; without the gain the update would be
``σ_t² + 1`` times (about 170× at the first of 50 SDXL steps) smaller, a silent no-op (docs/sdxl.md). On SD3 and
FLUX (flow matching, ``z = (1 − σ) x_0 + σ ε``) ``c_t = 1/sqrt((1 − σ)² + σ²)``, the same rule (docs/mmdit.md).
At refinement steps the update repeats while a sample's loss is above the step's threshold (at most
``max_refine_iters`` times; samples already below it are left alone), then the step's regular update follows —
Attend-and-Excite's iterative refinement, which ELA's Alg. 1 also follows. With no method the loop is exactly
diffusers' (tested for equality).

Seeds are a batch: one UNet pass serves all of them, each seed has its own generator, and losses are per
sample (summed only to take one gradient), so every image equals the one its seed gives alone.

Attention pictures (``save_attention``) are an observer of the loop: they read the maps the guided step already
has, or capture UP-1 on the regular pass, and never change the guidance.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .. import checks
from ..checks import SEED_MAX  # noqa: F401  (re-exported: the seed rule's top)
from ..errors import UnbleedError
from ..guidance import conditioning, mmdit
from ..guidance.attention import AttentionEdit, AttentionStore, MapRequest, attention_store, level_of, resolve_block
from ..guidance.schedule import Schedule
from ..methods import Conditioning, Maps, Method, StepContext
from ..methods.maps import group_map
from ..text.tokens import Entity, check_groups


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
    # per sample, the root mean square of the step's whole change of the latent (refinement and update): how far the
    # method moved it, comparable across methods whose losses are on different scales
    update_rms: list[float] | None = None
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


def check_seeds(seeds, name: str = "seeds") -> list[int]:
    """``seeds`` as ints, each ``0 ≤ seed ≤ 2**64 − 1``; the one seed rule of the library and every CLI
    (:func:`unbleed.checks.seeds`)."""
    return checks.seeds(seeds, name)


def default_size(pipe) -> int:
    return conditioning.default_size(pipe)


def check_size(pipe, height: int, width: int) -> None:
    f = conditioning.size_multiple(pipe)
    what = "the VAE's downsampling factor" + (" × the 2×2 patches" if f != pipe.vae_scale_factor else "")
    for name, v in (("height", height), ("width", width)):
        if v <= 0 or v % f:
            raise UnbleedError(f"{name} {v} must be a positive multiple of {f} ({what})", field=name)


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


class Guide:
    """One run's guidance: the method, its map requests and schedule, the prompt's context and the method's
    per-run state. Built by :func:`begin`; tests build one to call :func:`guided_step` directly."""

    def __init__(self, pipe, method: Method, schedule: Schedule, groups: list[Entity], prompt_length: int,
                 cond: torch.Tensor, latent_hw: tuple[int, int], num_steps: int, truncate: bool = True,
                 added_cond: dict[str, torch.Tensor] | None = None, columns: torch.Tensor | None = None):
        self.pipe, self.method, self.schedule = pipe, method, schedule
        self.groups, self.prompt_length, self.cond = tuple(groups), prompt_length, cond
        self.added_cond = added_cond  # the conditional half's added_cond_kwargs (SDXL: pooled text, time ids)
        self.latent_hw, self.num_steps, self.truncate = tuple(latent_hw), num_steps, truncate
        self.columns = columns  # MMDiT: the joint text columns → the 77 CLIP columns (mmdit.token_columns)
        self.requests = method.map_requests(conditioning.denoiser(pipe))
        self.run = method.new_run(conditioning.denoiser(pipe))

    def context(self, step: int) -> StepContext:
        return StepContext(step, self.num_steps, self.prompt_length, self.groups)

    def maps(self, store: AttentionStore, z: torch.Tensor, t) -> Maps:
        """The method's maps of latent ``z`` at timestep ``t`` (a text-conditioned, possibly truncated pass)."""
        if self.columns is not None:
            store.columns = self.columns
        with store.capture(self.requests, self.latent_hw, truncate=self.truncate):
            conditioning.predict(self.pipe, conditioning.model_input(self.pipe, z, t), t, self.cond,
                                 self.added_cond)
        return tuple(store.maps(r) for r in self.requests)

    def gain(self, z: torch.Tensor, t) -> float:
        """``1/c²`` for the scheduler's ``scale_model_input(z, t) = c·z``: the factor that makes
        ``z − (α/c²) ∇_z L`` the update ``x − α ∇_x L`` of the UNet's input ``x = c·z`` (1 for DDIM, PNDM and
        DPM++; ``σ² + 1`` for Euler; ``(1 − σ)² + σ²`` for flow matching, docs/mmdit.md)."""
        c = conditioning.input_scale(self.pipe, z, t)
        return 1.0 / (c * c)


class NoiseStage:
    """What :meth:`Method.initial_noise` gets in step 4b of :func:`generate` (InitNO's initial-noise
    optimisation): the method's maps of a candidate initial latent at the first timestep, fresh noise from one
    seed's own generator, and a ``record`` the method may fill (JSON values; kept in ``Result.params``).

    No denoising step runs here: a stage evaluates candidates at the first timestep only, and the loop of step 6
    starts from the latents it returns.
    """

    def __init__(self, guide: Guide, store: AttentionStore, timestep, generators: list[torch.Generator],
                 dtype: torch.dtype):
        self.guide, self.store, self.timestep, self.generators, self.dtype = guide, store, timestep, generators, dtype
        self.sigma = float(guide.pipe.scheduler.init_noise_sigma)  # the scheduler's scale of the initial noise
        self.record: dict[str, Any] = {}

    @property
    def context(self) -> StepContext:
        """The context of the first denoising step (step 0)."""
        return self.guide.context(0)

    def maps(self, z: torch.Tensor) -> Maps:
        """The method's maps of initial latents ``z`` (the whole batch, in seed order) at the first timestep: the
        guided steps' own pass (:meth:`Guide.maps`), differentiable w.r.t. ``z`` under ``torch.enable_grad``."""
        return self.guide.maps(self.store, z, self.timestep)

    def draw(self, index: int) -> torch.Tensor:
        """A fresh initial latent ``[1, C, h, w]`` for sample ``index``, from its own seed's generator (as the
        pipeline's ``prepare_latents`` draws it, ``init_noise_sigma`` included), so a seed's draws do not depend on
        the other seeds of the batch."""
        pipe = self.guide.pipe
        h, w = self.guide.latent_hw
        f = pipe.vae_scale_factor
        return conditioning.prepare_latents(pipe, 1, h * f, w * f, self.dtype, pipe._execution_device,
                                            [self.generators[index]])


def guided_step(guide: Guide, store: AttentionStore, latents: torch.Tensor, step: int, t,
                observe: Callable[[Maps, dict, StepContext], None] | None = None) -> tuple[torch.Tensor, StepTrace]:
    """One guided step: ``z ← z − α ∇L`` (on the model input: α × :meth:`Guide.gain`), with refinement first
    when ``step`` is a refinement step.

    Returns the updated latent and the step's trace (losses, refinement iterations, α). ``observe(maps, state,
    ctx)`` is called with the step's first (detached) maps and state — how attention pictures are drawn.
    """
    method, schedule = guide.method, guide.schedule
    ctx = guide.context(step)
    alpha = schedule.alpha(step, guide.num_steps)
    rec = StepTrace(step=step, timestep=int(t), guided=True, alpha=alpha)
    size = alpha * guide.gain(latents, t)  # α on the model input (scale_model_input), see the module docstring
    with torch.enable_grad():
        z = latents.detach().requires_grad_(True)
        maps = guide.maps(store, z, t)
        detached = tuple(m.detach() for m in maps)
        state = method.prepare_step(detached, ctx, guide.run)
        loss = method.loss(maps, ctx, state)
        rec.loss = loss.detach().float().cpu().tolist()
        if observe is not None:
            observe(detached, state, ctx)
        threshold = schedule.refine.get(step)
        if threshold is not None:
            while rec.refine_iters < schedule.refine_cap(step):
                active = method.refine_value(maps, ctx, state, loss).detach() > threshold
                if not active.any():
                    break
                z = _descend(z, loss, size, active)
                maps = guide.maps(store, z, t)
                loss = method.loss(maps, ctx, state)
                rec.refine_iters += 1
        rec.final_loss = loss.detach().float().cpu().tolist()
        z = _descend(z, loss, size)
    rec.update_rms = (z.detach() - latents).float().pow(2).flatten(1).mean(1).sqrt().cpu().tolist()
    return z.detach(), rec


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


class _Pictures:
    """``--save-attention``: pooled maps of each group (and the method's visuals) per step, on CPU."""

    def __init__(self, pipe, method, groups: list[Entity]):
        self.rows = picture_groups(groups)[1]
        net = conditioning.denoiser(pipe)
        if isinstance(method, Method):
            self.request = method.map_requests(net)[0]
        else:  # plain sampling and conditioning methods: UP-1's maps
            up1 = resolve_block(net, "up-1")
            self.request = MapRequest(blocks=(up1,), out_level=level_of(net, up1))
        self.method = method
        self.pending: tuple[torch.Tensor, dict] | None = None  # the last guided step's pictures

    def pool(self, maps: torch.Tensor) -> torch.Tensor:
        return torch.stack([group_map(maps, i) for i in self.rows], 1).detach().cpu()

    def on_guided(self, maps: Maps, state: dict, ctx: StepContext) -> None:
        self.pending = (self.pool(maps[0]),
                        {k: v.detach().cpu() for k, v in self.method.visuals(state, ctx).items()})


@dataclass(frozen=True)
class Plan:
    """One run checked against its pipeline (:func:`plan`): what :func:`sample` runs, with no check of its own.
    :func:`generate` makes one for a direct caller; :meth:`unbleed.run.spec.RunSpec.prepare` for every front end."""

    method: Method | Conditioning | None
    schedule: Schedule | None  # a guidance method's, validated; None without guidance
    groups: list[Entity]
    steps: int
    guidance_scale: float
    height: int
    width: int
    negative_prompt: str | None = None
    eta: float = 0.0
    truncate: bool = True

    @property
    def guiding(self) -> bool:
        return self.schedule is not None


def plan(pipe, prompt: str, *, method: Method | Conditioning | None = None, groups: list[Entity] | None = None,
         steps: int = 50, guidance_scale: float = 7.5, height: int | None = None, width: int | None = None,
         negative_prompt: str | None = None, eta: float = 0.0, schedule: Schedule | None = None,
         truncate: bool = True) -> Plan:
    """Check a run against ``pipe``, once: the steps (at most the scheduler's training timesteps), the token groups
    on the prompt, the size, the method on this model family and its layers (a bad ``-o layers=…`` is one line
    before any work). ``schedule``: a guidance method's, validated by its maker (:meth:`RunSpec.build
    <unbleed.run.spec.RunSpec.build>`, :func:`generate`); without one, the method's default."""
    steps = checks.whole(steps, "steps", 1, getattr(pipe.scheduler.config, "num_train_timesteps", checks.MAX_STEPS))
    groups = check_groups(pipe.tokenizer, prompt, groups or [])
    if method is not None and method.needs_groups and not groups:
        raise UnbleedError(f"{method.name} needs token groups: pass --tokens, e.g. --tokens cat,frog", field="groups")
    height, width = height or default_size(pipe), width or default_size(pipe)
    check_size(pipe, height, width)
    mmdit.check_method(pipe, method)
    guiding = isinstance(method, Method)
    if guiding:
        method.map_requests(conditioning.denoiser(pipe))  # names a bad -o layers=… before any work starts
        schedule = schedule or method.default_schedule(steps).validate(steps)
    return Plan(method, schedule if guiding else None, groups, steps, guidance_scale, height, width,
                negative_prompt, eta, truncate)


@torch.no_grad()
def generate(
    pipe,
    prompt: str,
    *,
    method: Method | Conditioning | None = None,
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

    ``method`` is a guidance :class:`Method` (updates the latent in ``schedule``'s window, default the method's
    own) or a :class:`Conditioning` (edits the cross-attention of every pass). ``truncate``: the guided
    passes stop after the last cross-attention layer the method reads (the loss needs nothing after it; the
    result is the same as with full passes).

    ``record``: map requests kept at every step in ``StepTrace.raw_maps`` (one ``[B, 77, h, w]`` float32 CPU
    tensor per request, all token columns, conditional half of CFG), captured on the step's regular UNet pass —
    so at a guided step they are the maps of the updated latent, the one the scheduler steps. The recorded layers
    run the explicit-softmax processor (as ``save_attention``), equal to the fused one up to float rounding.

    The inputs are checked once (:func:`plan`; a given ``schedule`` here), then :func:`sample` runs the loop.
    """
    seeds = check_seeds(seeds)
    if schedule is not None and isinstance(method, Method):  # the caller's own: validated here (a spec's: by build)
        schedule.validate(checks.whole(num_inference_steps, "steps", 1, checks.MAX_STEPS))
    checked = plan(pipe, prompt, method=method, groups=groups, steps=num_inference_steps,
                   guidance_scale=guidance_scale, height=height, width=width, negative_prompt=negative_prompt,
                   eta=eta, schedule=schedule, truncate=truncate)
    return sample(pipe, prompt, checked, seeds, save_attention=save_attention, record=record,
                  output_type=output_type, callback=callback)


@dataclass
class Loop:
    """Steps 2–5 of :func:`sample`, done: the encoded prompt, the timesteps, each seed's generator, the initial
    latents and the scheduler's step arguments, and the guidance of a guided run."""

    text: Any  # conditioning.encode's result: embeds, cond, added, added_cond
    do_cfg: bool
    timesteps: Any
    steps: int  # the scheduler's count of steps (PNDM makes 51 passes of 50 steps)
    generators: list[torch.Generator]
    latents: torch.Tensor
    latent_hw: tuple[int, int]
    extra: dict[str, Any]
    columns: torch.Tensor | None  # MMDiT: the joint text columns → the 77 CLIP columns
    guide: Guide | None
    edit: AttentionEdit | None  # a Conditioning method's edit of cross-attention (StructureDiffusion)

    @property
    def batch(self) -> int:
        return len(self.generators)


def begin(pipe, prompt: str, plan: Plan, seeds: list[int]) -> Loop:
    """2. Encode the prompt, 3. the timesteps, 4. the initial latents (one CPU generator per seed), 5. the
    scheduler's extra step arguments, and the run's :class:`Guide` when it guides."""
    device, batch = pipe._execution_device, len(seeds)
    do_cfg = conditioning.uses_cfg(pipe, plan.guidance_scale)
    text = conditioning.encode(pipe, prompt, device, batch, do_cfg, plan.negative_prompt, plan.height, plan.width,
                               guidance_scale=plan.guidance_scale)
    f = pipe.vae_scale_factor
    timesteps, steps = conditioning.timesteps(pipe, plan.steps, device, (plan.height // f, plan.width // f))
    conditioning.begin(pipe)
    generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    latents = conditioning.prepare_latents(pipe, batch, plan.height, plan.width, text.embeds.dtype, device,
                                           generators)
    latent_hw = tuple(latents.shape[-2:])
    extra = conditioning.extra_step_kwargs(pipe, generators, plan.eta)
    columns = mmdit.token_columns(pipe, prompt) if mmdit.family(pipe) else None
    guide = edit = None
    if plan.guiding:
        prompt_length = min(len(pipe.tokenizer(prompt).input_ids), pipe.tokenizer.model_max_length)
        guide = Guide(pipe, plan.method, plan.schedule, plan.groups, prompt_length, text.cond, latent_hw,
                      len(timesteps), plan.truncate, added_cond=text.added_cond, columns=columns)
    elif isinstance(plan.method, Conditioning):
        edit = plan.method.attention_edit(pipe, prompt, plan.groups, text.embeds, batch, do_cfg)
    return Loop(text, do_cfg, timesteps, steps, generators, latents, latent_hw, extra, columns, guide, edit)


def initial_noise(loop: Loop) -> dict[str, Any]:
    """4b. The initial-noise stage: the method may replace ``loop.latents``, evaluating candidates at the first
    timestep (InitNO); every other method keeps them as drawn. Not a denoising loop: step 6 starts from them.
    Returns the stage's record (empty without a stage)."""
    guide = loop.guide
    if guide is None or type(guide.method).initial_noise is Method.initial_noise:  # only methods with a stage
        return {}
    with attention_store(conditioning.denoiser(guide.pipe)) as store:
        stage = NoiseStage(guide, store, loop.timesteps[0], loop.generators, loop.text.embeds.dtype)
        loop.latents = guide.method.initial_noise(stage, loop.latents)
    return stage.record


def denoise(pipe, plan: Plan, loop: Loop, store: AttentionStore, i: int, t, pictures: _Pictures | None,
            recorded: tuple[MapRequest, ...]) -> StepTrace:
    """6. One step of the loop on ``loop.latents``: a. the guided update (in the window), b. the regular
    classifier-free-guided pass (capturing pictures and recorded maps when asked), c. the scheduler step."""
    latents = loop.latents
    if loop.guide is not None and plan.schedule.guided(i):
        latents, rec = guided_step(loop.guide, store, latents, i, t,
                                   pictures.on_guided if pictures is not None else None)
        if pictures is not None:
            rec.maps, rec.visuals = pictures.pending
    else:
        rec = StepTrace(step=i, timestep=int(t), guided=False)
    inp = conditioning.model_input(pipe, torch.cat([latents] * 2) if loop.do_cfg else latents, t)
    keep = pictures is not None and not rec.guided
    wanted = ((pictures.request,) if keep else ()) + recorded
    ctx = (store.capture(wanted, loop.latent_hw, slice(loop.batch, None) if loop.do_cfg else slice(None))
           if wanted else contextlib.nullcontext())
    with ctx:
        noise = conditioning.predict(pipe, inp, t, loop.text.embeds, loop.text.added)
    if keep:
        rec.maps = pictures.pool(store.maps(pictures.request))
    if recorded:
        rec.raw_maps = tuple(store.maps(r).detach().cpu() for r in recorded)
    if loop.do_cfg:
        noise_uncond, noise_text = noise.chunk(2)
        noise = noise_uncond + plan.guidance_scale * (noise_text - noise_uncond)
    loop.latents = pipe.scheduler.step(noise, t, latents, **loop.extra, return_dict=False)[0]
    return rec


@torch.no_grad()
def sample(pipe, prompt: str, plan: Plan, seeds: list[int], *, save_attention: bool = False,
           record: MapRequest | tuple[MapRequest, ...] | None = None, output_type: str = "pil",
           callback: Callable[[int, int, StepTrace], None] | None = None) -> Result:
    """Run a checked :class:`Plan` for ``seeds`` (checked by the caller, :func:`check_seeds`): steps 2–7 of
    :func:`generate`, which documents ``save_attention``, ``record``, ``output_type`` and ``callback``."""
    t0 = time.perf_counter()
    loop = begin(pipe, prompt, plan, seeds)
    noise_record = initial_noise(loop)
    pictures = _Pictures(pipe, plan.method, plan.groups) if save_attention and plan.groups else None
    recorded = () if record is None else record if isinstance(record, tuple) else (record,)
    trace: list[StepTrace] = []
    with attention_store(conditioning.denoiser(pipe)) as store, store.editing(loop.edit):
        store.columns = loop.columns
        for i, t in enumerate(loop.timesteps):  # 6. The denoising loop.
            trace.append(denoise(pipe, plan, loop, store, i, t, pictures, recorded))
            if callback is not None:
                callback(i, len(loop.timesteps), trace[-1])
    if output_type == "latent":  # 7. Decode.
        images = loop.latents
    else:
        image = conditioning.decode(pipe, loop.latents, loop.generators)
        images = pipe.image_processor.postprocess(image, output_type=output_type,
                                                  do_denormalize=[True] * loop.batch)
    params = run_params(pipe, plan, loop.steps)
    if noise_record:  # the initial-noise stage's record, one entry per seed in the order of "seeds"
        params["initial_noise"] = {"seeds": list(seeds), **noise_record}
    return Result(images, loop.latents, list(seeds), plan.groups, params, trace, time.perf_counter() - t0)


def run_params(pipe, plan: Plan, steps: int) -> dict[str, Any]:
    """The run's parameters as the record keeps them (``steps``: the scheduler's count)."""
    return {
        "steps": steps, "guidance_scale": plan.guidance_scale, "height": plan.height, "width": plan.width,
        "negative_prompt": plan.negative_prompt, "eta": plan.eta, "scheduler": type(pipe.scheduler).__name__,
        "dtype": str(conditioning.denoiser(pipe).dtype).replace("torch.", ""),
        "method_options": plan.method.options() if plan.method else {},
        "schedule": plan.schedule.as_dict() if plan.guiding else None,
    }
