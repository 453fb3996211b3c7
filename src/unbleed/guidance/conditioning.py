"""The model-family seam: what an SD 1.x/2.x and an SDXL pipeline differ in, behind the few functions the one
sampler (and StructureDiffusion) call — each written with the pipeline's own helpers, as its ``__call__`` does.

* :func:`encode` — the prompt's conditioning (:class:`TextConditioning`): the ``encoder_hidden_states`` of the
  classifier-free-guided batch and of its conditional half, and the UNet's ``added_cond_kwargs`` for each. SD:
  ``StableDiffusionPipeline.encode_prompt``, no added kwargs. SDXL: ``StableDiffusionXLPipeline.encode_prompt``
  (both text encoders' penultimate hidden states concatenated, the second encoder's pooled projection) and
  ``_get_add_time_ids`` (original size, crop top-left, target size: ``(h, w)``, ``(0, 0)``, ``(h, w)`` by
  default, as diffusers), concatenated ``[negative, positive]`` under CFG as diffusers does.
* :func:`encode_phrase` — one text's conditional embedding (StructureDiffusion's noun phrases; on SDXL both
  encoders, so a spliced phrase has the same 2048 channels as the prompt).
* :func:`begin` — what the pipeline does to the scheduler right before its loop (SDXL: ``set_begin_index(0)``).
* :func:`decode` — latents to the image tensor. SD: ``vae.decode(latents / scaling_factor)`` as
  ``StableDiffusionPipeline``. SDXL: diffusers' ``force_upcast`` — an fp16 VAE whose config says
  ``force_upcast`` (SDXL's does: it overflows to inf/NaN in fp16) decodes in fp32 and is cast back afterwards;
  ``latents_mean``/``latents_std`` when the VAE has them; the watermark when the pipeline has one.

Token indices: the maps' columns are the 77 positions of the concatenated embedding, so a token group's indices
must mean the same piece in both of SDXL's tokenizers. They are the same BPE (CLIP ViT-L's and OpenCLIP bigG's
share vocabulary and merges) and differ in the padding token (``<|endoftext|>`` vs ``!``, id 0). Padding lies
after end-of-text, but a special token is also matched inside the text: tokenizer 2 reads every ``!`` of a
prompt as its padding token. A lone ``!`` is then still one piece at the same position (another id, the same
column), while a run such as ``!!`` (one piece ``!!</w>`` in tokenizer 1) is one piece per ``!`` in tokenizer 2,
and every later piece of tokenizer 2 sits that many columns to the right. diffusers' SDXL pipeline concatenates
the two encoders position by position all the same; unbleed does as diffusers, token groups use tokenizer 1's
indices, and :func:`check_tokenizers` warns when the positions no longer line up.

SD3 and FLUX (MMDiT transformers, :mod:`unbleed.guidance.mmdit`) sit behind the same functions and a few more
that a UNet pipeline answers trivially: :func:`denoiser` (the network whose attention is read: ``pipe.unet`` or
``pipe.transformer``), :func:`predict` (one network pass), :func:`prepare_latents`, :func:`timesteps`,
:func:`model_input` / :func:`input_scale` (the scheduler's input scaling), :func:`extra_step_kwargs`,
:func:`size_multiple`, :func:`uses_cfg`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from ..errors import UnbleedError
from . import mmdit


def denoiser(pipe):
    """The network whose attention the methods read: the UNet, or the MMDiT transformer."""
    return pipe.transformer if mmdit.family(pipe) else pipe.unet


def uses_cfg(pipe, guidance_scale: float) -> bool:
    """Whether the regular pass runs classifier-free guidance (``[uncond; cond]``): scale > 1, never on FLUX."""
    return mmdit.uses_cfg(pipe, guidance_scale) if mmdit.family(pipe) else guidance_scale > 1.0


def predict(pipe, x: torch.Tensor, t, embeds: torch.Tensor, added: dict | None) -> torch.Tensor:
    """One pass of the network on model input ``x`` (the UNet's noise, the transformer's velocity)."""
    if mmdit.family(pipe):
        return mmdit.predict(pipe, x, t, embeds, added)
    return pipe.unet(x, t, encoder_hidden_states=embeds, added_cond_kwargs=added, return_dict=False)[0]


def prepare_latents(pipe, batch: int, height: int, width: int, dtype, device, generators) -> torch.Tensor:
    """The pipeline's initial latents ``[B, C, h, w]`` (FLUX's unpacked)."""
    if mmdit.family(pipe):
        return mmdit.prepare_latents(pipe, batch, height, width, dtype, device, generators)
    return pipe.prepare_latents(batch, pipe.unet.config.in_channels, height, width, dtype, device, generators)


def timesteps(pipe, num_steps: int, device, latent_hw: tuple[int, int]):
    """``(timesteps, num_steps)`` as the pipeline's ``__call__`` sets them."""
    if mmdit.family(pipe):
        return mmdit.timesteps(pipe, num_steps, device, latent_hw)
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps

    return retrieve_timesteps(pipe.scheduler, num_steps, device)


def model_input(pipe, z: torch.Tensor, t) -> torch.Tensor:
    """What the network sees of latent ``z``: ``scale_model_input`` (flow matching: ``z`` itself)."""
    scale = getattr(pipe.scheduler, "scale_model_input", None)
    return z if scale is None else scale(z, t)


def input_scale(pipe, z: torch.Tensor, t) -> float:
    """``c`` of ``x = c·z``, the variance-preserving model input of latent ``z`` (the guided step's units): the
    scheduler's ``scale_model_input`` factor; on flow matching ``1/sqrt((1 − σ)² + σ²)``
    (:func:`unbleed.guidance.mmdit.input_scale`)."""
    if mmdit.family(pipe):
        return mmdit.input_scale(pipe, t)
    one = torch.ones((1,) * z.dim(), dtype=torch.float32, device=z.device)
    return float(pipe.scheduler.scale_model_input(one, t).flatten()[0])


def extra_step_kwargs(pipe, generators, eta: float) -> dict:
    """The scheduler step's extra arguments (the MMDiT pipelines pass none)."""
    if mmdit.family(pipe):
        return {}
    return pipe.prepare_extra_step_kwargs(generators, eta)


def size_multiple(pipe) -> int:
    """Image sizes must be multiples of this: the VAE's factor (× 2 for the transformers' 2×2 patches)."""
    return pipe.vae_scale_factor * (2 if mmdit.family(pipe) else 1)


def default_size(pipe) -> int:
    """The model's native size in pixels (UNet: ``sample_size × 8``; MMDiT: the pipeline's
    ``default_sample_size × 8``)."""
    if mmdit.family(pipe):
        return pipe.default_sample_size * pipe.vae_scale_factor
    return pipe.unet.config.sample_size * pipe.vae_scale_factor


def is_xl(pipe) -> bool:
    """Whether ``pipe`` is SDXL-style: a second text encoder and the UNet's "text_time" added embedding."""
    unet = getattr(pipe, "unet", None)
    return unet is not None and getattr(unet.config, "addition_embed_type", None) == "text_time"


@dataclass
class TextConditioning:
    """The prompt's conditioning for one run of ``batch`` samples."""

    embeds: torch.Tensor  # [2B or B, 77, d]: the regular pass's encoder_hidden_states ([uncond; cond] under CFG)
    cond: torch.Tensor  # [B, 77, d]: the conditional half (the guided, text-conditioned pass)
    added: dict[str, torch.Tensor] | None = None  # the regular pass's added_cond_kwargs (SDXL), None for SD
    added_cond: dict[str, torch.Tensor] | None = None  # the conditional half's

    def unet_kwargs(self, half: bool = False) -> dict:
        """``encoder_hidden_states`` and ``added_cond_kwargs`` of the full batch, or of the conditional half."""
        if half:
            return {"encoder_hidden_states": self.cond, "added_cond_kwargs": self.added_cond}
        return {"encoder_hidden_states": self.embeds, "added_cond_kwargs": self.added}


def check_tokenizers(pipe, prompt: str) -> None:
    """Warn when an SDXL pipeline's two tokenizers put different pieces at the prompt's positions (see the module
    docstring; a lone ``!``, read by tokenizer 2 as its padding token at the same position, is not a warning)."""
    second = getattr(pipe, "tokenizer_2", None)
    if second is None or pipe.tokenizer is None:
        return
    ids = [t(prompt, truncation=True, max_length=t.model_max_length).input_ids for t in (pipe.tokenizer, second)]
    aligned = len(ids[0]) == len(ids[1]) and all(a == b or b == second.pad_token_id for a, b in zip(*ids))
    if not aligned:
        first = next((i for i, (a, b) in enumerate(zip(*ids)) if a != b), min(map(len, ids)))
        warnings.warn(f"the model's two tokenizers split the prompt differently from token {first} on (SDXL's "
                      f"second tokenizer reads each '!' as its padding token): token groups use tokenizer 1's "
                      f"indices, so from there on text encoder 2's columns hold other pieces", stacklevel=2)


def encode(pipe, prompt: str, device, batch: int, do_cfg: bool, negative_prompt: str | None = None,
           height: int | None = None, width: int | None = None, original_size: tuple[int, int] | None = None,
           crops_coords_top_left: tuple[int, int] = (0, 0),
           target_size: tuple[int, int] | None = None, guidance_scale: float = 7.5) -> TextConditioning:
    """The conditioning of ``prompt`` for ``batch`` samples (see the module docstring); ``height``/``width`` give
    SDXL's default original and target sizes; ``guidance_scale`` is FLUX's guidance embedding. On an MMDiT
    ``added``/``added_cond`` hold the transformer's other inputs (``pooled_projections``…)."""
    if mmdit.family(pipe):
        if mmdit.family(pipe) == "sd3":  # CLIP-L and CLIP-G share positions 0…76 of the joint sequence, as SDXL's
            check_tokenizers(pipe, prompt)
        return TextConditioning(*mmdit.encode(pipe, prompt, device, batch, do_cfg, negative_prompt, guidance_scale))
    if not is_xl(pipe):
        cond, uncond = pipe.encode_prompt(prompt, device, batch, do_cfg, negative_prompt)
        return TextConditioning(torch.cat([uncond, cond]) if do_cfg else cond, cond)
    check_tokenizers(pipe, prompt)
    cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(
        prompt=prompt, device=device, num_images_per_prompt=batch, do_classifier_free_guidance=do_cfg,
        negative_prompt=negative_prompt)
    original_size = tuple(original_size or (height, width))
    target_size = tuple(target_size or (height, width))
    projection = (int(pooled.shape[-1]) if pipe.text_encoder_2 is None
                  else pipe.text_encoder_2.config.projection_dim)
    time_ids = pipe._get_add_time_ids(original_size, tuple(crops_coords_top_left), target_size, dtype=cond.dtype,
                                      text_encoder_projection_dim=projection)
    half = {"text_embeds": pooled.to(device), "time_ids": time_ids.to(device).repeat(batch, 1)}
    if not do_cfg:
        return TextConditioning(cond.to(device), cond.to(device), half, half)
    full = {"text_embeds": torch.cat([uncond_pooled, pooled]).to(device),
            "time_ids": torch.cat([time_ids, time_ids]).to(device).repeat(batch, 1)}
    return TextConditioning(torch.cat([uncond, cond]).to(device), cond.to(device), full, half)


def encode_phrase(pipe, text: str, device, batch: int) -> torch.Tensor:
    """``text``'s conditional embedding ``[batch, 77, d]``, without classifier-free guidance (on SDXL: both text
    encoders, as the prompt)."""
    if mmdit.family(pipe):
        raise UnbleedError(f"phrase encoding is not defined on {mmdit.NAMES[mmdit.family(pipe)]}", field="method")
    if not is_xl(pipe):
        return pipe.encode_prompt(text, device, batch, False)[0]
    return pipe.encode_prompt(prompt=text, device=device, num_images_per_prompt=batch,
                              do_classifier_free_guidance=False)[0]


def begin(pipe) -> None:
    """What the pipeline's ``__call__`` does to the scheduler after ``set_timesteps``, before its loop."""
    if (is_xl(pipe) or mmdit.family(pipe) == "flux") and hasattr(pipe.scheduler, "set_begin_index"):
        pipe.scheduler.set_begin_index(0)


def needs_upcast(vae) -> bool:
    """diffusers' rule: an fp16 VAE whose config says ``force_upcast`` decodes in fp32 (bf16 has fp32's range)."""
    return vae.dtype == torch.float16 and bool(getattr(vae.config, "force_upcast", False))


def _cast(module, dtype: torch.dtype) -> None:
    """``module.to(dtype=…)`` without diffusers 0.42's warning on every cast ("modules … should be kept in
    float32: []", logged even when there are none)."""
    import logging

    log = logging.getLogger("diffusers.models.modeling_utils")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        module.to(dtype=dtype)
    finally:
        log.setLevel(level)


def decode(pipe, latents: torch.Tensor, generators=None) -> torch.Tensor:
    """Final latents → image tensor in [-1, 1] (before ``image_processor.postprocess``); see the module docstring."""
    vae = pipe.vae
    if mmdit.family(pipe):
        return mmdit.decode(pipe, latents)
    if not is_xl(pipe):
        return vae.decode(latents / vae.config.scaling_factor, return_dict=False, generator=generators)[0]
    upcast = needs_upcast(vae)
    if upcast:
        _cast(vae, torch.float32)
    try:
        latents = latents.to(vae.dtype)
        mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
        if mean is not None and std is not None:
            mean = torch.tensor(mean).view(1, -1, 1, 1).to(latents.device, latents.dtype)
            std = torch.tensor(std).view(1, -1, 1, 1).to(latents.device, latents.dtype)
            latents = latents * std / vae.config.scaling_factor + mean
        else:
            latents = latents / vae.config.scaling_factor
        image = vae.decode(latents, return_dict=False)[0]
    finally:
        if upcast:
            _cast(vae, torch.float16)
    if getattr(pipe, "watermark", None) is not None:
        image = pipe.watermark.apply_watermark(image)
    return image
