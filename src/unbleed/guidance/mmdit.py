"""The MMDiT families — Stable Diffusion 3/3.5 (``StableDiffusion3Pipeline``) and FLUX.1 (``FluxPipeline``) — behind
the seam of :mod:`unbleed.guidance.conditioning`, each written with the pipeline's own helpers as its
``__call__`` uses them (docs/mmdit.md).

* Text: SD3 — ``encode_prompt`` (CLIP-L and CLIP-G penultimate states concatenated, padded to T5's width, then
  T5's ``max_sequence_length`` = 256 tokens after CLIP's 77 in the sequence; the pooled projections of both CLIPs),
  ``[negative; positive]`` under classifier-free guidance. FLUX — ``encode_prompt`` (T5's 512 tokens are the
  whole text sequence; CLIP-L gives only the pooled vector); FLUX.1-dev is guidance-distilled: no CFG pass, the
  guidance scale enters the transformer through its guidance embedding (``guidance_embeds``).
* Latents: kept as ``[B, 16, h, w]`` in the sampler for both families. FLUX's pipeline packs them into 2×2
  patches ``[B, h/2 · w/2, 64]``; :func:`predict` packs on the way in and unpacks the velocity on the way out
  (the flow-matching Euler step is element-wise, so stepping the unpacked latent is the same numbers).
* Timesteps: ``retrieve_timesteps`` as the pipelines call it — FLUX with ``sigmas = linspace(1, 1/n, n)`` and the
  resolution-dependent shift ``mu``; SD3 with ``mu`` only when its scheduler uses dynamic shifting.
* Decode: ``latents / scaling_factor + shift_factor``, then the VAE.
* Token columns (:func:`token_columns`): the methods index the 77 CLIP token positions of the prompt; the joint
  sequence's text columns are projected onto them (SD3: CLIP's own 77 columns plus the T5 pieces of the same
  characters; FLUX: the T5 pieces only).
* The step (:func:`input_scale`): flow matching's latent ``z_t = (1 − σ) x_0 + σ ε`` has standard deviation
  ``s = sqrt((1 − σ)² + σ²)`` for unit-variance ``x_0``; ``z_t / s`` is the variance-preserving latent DDIM's
  ``x_t`` is, so ``c = 1/s`` plays the role of Euler's ``scale_model_input`` and the sampler's gain ``1/c² = s²``
  makes α mean the same update as under DDIM (docs/mmdit.md, "The step").
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import UnbleedError

FAMILIES = {"StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux"}
NAMES = {"sd3": "SD3", "flux": "FLUX"}


def family(pipe) -> str | None:
    """``"sd3"``, ``"flux"`` or None (a UNet pipeline)."""
    for cls in type(pipe).__mro__:
        if cls.__name__ in FAMILIES:
            return FAMILIES[cls.__name__]
    return None


def max_sequence_length(pipe) -> int:
    """T5's token count as the pipelines' defaults: 256 (SD3), 512 (FLUX)."""
    return 512 if family(pipe) == "flux" else 256


def t5_tokenizer(pipe):
    return pipe.tokenizer_2 if family(pipe) == "flux" else pipe.tokenizer_3


# --- refusals -----------------------------------------------------------------------------------------------------

REFUSED = {
    "structure": "StructureDiffusion averages cross-attention outputs over the noun phrases' value sets, and joint "
                 "attention has no separate text values: the text tokens are updated by every block, so there is "
                 "nothing to splice",
    "initno": "InitNO's conflict score reads the UNet's self-attention layers (attn1), which an MMDiT does not have "
              "(the image-image block of joint attention is not captured)",
}


def check_method(pipe, method) -> None:
    """One line naming the method, the family and why, for a method that cannot run on an MMDiT."""
    fam = family(pipe)
    if fam is None or method is None:
        return
    for part in getattr(method, "methods", None) or [method]:
        why = REFUSED.get(getattr(part, "name", ""))
        if why:
            raise UnbleedError(f"--method {part.name} cannot run on {NAMES[fam]}: {why}; use ela, attend-excite, "
                               f"astar, conform, divide-bind or syngen", field="method")


# --- conditioning -------------------------------------------------------------------------------------------------

def encode(pipe, prompt: str, device, batch: int, do_cfg: bool, negative_prompt: str | None, guidance_scale: float):
    """``(embeds, cond, added, added_cond)``: the full batch's and the conditional half's ``encoder_hidden_states``
    and other transformer inputs (``pooled_projections``; FLUX: ``txt_ids`` and ``guidance``)."""
    if family(pipe) == "sd3":
        cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(
            prompt=prompt, prompt_2=None, prompt_3=None, device=device, num_images_per_prompt=batch,
            do_classifier_free_guidance=do_cfg, negative_prompt=negative_prompt,
            max_sequence_length=max_sequence_length(pipe))
        half = {"pooled_projections": pooled}
        if not do_cfg:
            return cond, cond, half, half
        return torch.cat([uncond, cond]), cond, {"pooled_projections": torch.cat([uncond_pooled, pooled])}, half
    if negative_prompt is not None:
        raise UnbleedError("negative_prompt: FLUX.1 is guidance-distilled (no classifier-free guidance pass), so "
                           "there is no negative prompt: leave it out", field="negative_prompt")
    cond, pooled, text_ids = pipe.encode_prompt(prompt=prompt, prompt_2=None, device=device,
                                                num_images_per_prompt=batch,
                                                max_sequence_length=max_sequence_length(pipe))
    added = {"pooled_projections": pooled, "txt_ids": text_ids, "guidance": None}
    if pipe.transformer.config.guidance_embeds:
        added["guidance"] = torch.full([1], guidance_scale, device=device, dtype=torch.float32)
    return cond, cond, added, added


def uses_cfg(pipe, guidance_scale: float) -> bool:
    """SD3: classifier-free guidance when the scale is above 1 (diffusers' rule); FLUX: never (guidance-distilled;
    the scale goes to the guidance embedding)."""
    return family(pipe) == "sd3" and guidance_scale > 1.0


def predict(pipe, x: torch.Tensor, t, embeds: torch.Tensor, added: dict) -> torch.Tensor:
    """The transformer's prediction (the flow's velocity) for unpacked latents ``x`` ``[B, 16, h, w]``."""
    b = x.shape[0]
    if family(pipe) == "sd3":
        return pipe.transformer(hidden_states=x, timestep=t.expand(b), encoder_hidden_states=embeds,
                                pooled_projections=added["pooled_projections"], return_dict=False)[0]
    _, c, h, w = x.shape
    packed = pipe._pack_latents(x, b, c, h, w)
    img_ids = pipe._prepare_latent_image_ids(b, h // 2, w // 2, x.device, x.dtype)
    guidance = added.get("guidance")
    out = pipe.transformer(hidden_states=packed, timestep=t.expand(b).to(x.dtype) / 1000,
                           guidance=None if guidance is None else guidance.expand(b),
                           pooled_projections=added["pooled_projections"], encoder_hidden_states=embeds,
                           txt_ids=added["txt_ids"], img_ids=img_ids, return_dict=False)[0]
    f = pipe.vae_scale_factor
    return pipe._unpack_latents(out, h * f, w * f, f)


# --- latents, timesteps, decoding --------------------------------------------------------------------------------

def latent_channels(pipe) -> int:
    channels = pipe.transformer.config.in_channels
    return channels // 4 if family(pipe) == "flux" else channels


def prepare_latents(pipe, batch: int, height: int, width: int, dtype, device, generators) -> torch.Tensor:
    """The pipeline's own initial latents, unpacked (``[B, 16, h, w]``)."""
    latents = pipe.prepare_latents(batch, latent_channels(pipe), height, width, dtype, device, generators)
    if family(pipe) == "flux":
        latents = pipe._unpack_latents(latents[0], height, width, pipe.vae_scale_factor)
    return latents


def timesteps(pipe, num_steps: int, device, latent_hw: tuple[int, int]):
    """``retrieve_timesteps`` with the arguments the family's ``__call__`` passes."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

    config = pipe.scheduler.config
    seq = (latent_hw[0] // 2) * (latent_hw[1] // 2)
    kwargs = {}
    if family(pipe) == "flux":
        sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
        kwargs["sigmas"] = None if config.get("use_flow_sigmas", False) else sigmas
        kwargs["mu"] = calculate_shift(seq, config.get("base_image_seq_len", 256),
                                       config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                                       config.get("max_shift", 1.15))
    elif config.get("use_dynamic_shifting", None):
        kwargs["mu"] = calculate_shift(seq, config.get("base_image_seq_len", 256),
                                       config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                                       config.get("max_shift", 1.16))
    return retrieve_timesteps(pipe.scheduler, num_steps, device, **kwargs)


def input_scale(pipe, t) -> float:
    """``c = 1/sqrt((1 − σ)² + σ²)`` at timestep ``t`` (``σ = t / num_train_timesteps``): the factor that turns the
    flow-matching latent into the variance-preserving one (module docstring)."""
    sigma = float(t) / pipe.scheduler.config.num_train_timesteps
    return 1.0 / float(np.sqrt((1 - sigma) ** 2 + sigma**2))


def decode(pipe, latents: torch.Tensor) -> torch.Tensor:
    vae = pipe.vae
    latents = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
    return vae.decode(latents, return_dict=False)[0]


# --- token columns ------------------------------------------------------------------------------------------------

def _overlap(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return max(a[0], b[0]) < min(a[1], b[1])


def token_columns(pipe, prompt: str, columns: int = 77) -> torch.Tensor:
    """``[text tokens, 77]``: how the joint sequence's text columns add up to the 77 CLIP token columns the
    methods (and ``--tokens``, the parser) index.

    * SD3 — the sequence is CLIP's 77 positions, then T5's: CLIP column ``i`` is joint column ``i`` plus every T5
      piece whose characters overlap CLIP piece ``i`` (a T5 piece overlapping several CLIP pieces is shared
      equally); T5's ``</s>`` adds to CLIP's end-of-text column. T5's padding is left out, and so are all 256 T5
      positions of an SD3 run without T5 (``text_encoder_3=None``: diffusers fills them with zeros).
    * FLUX — the sequence is T5's only: CLIP word columns get their T5 pieces as above, end-of-text gets ``</s>``,
      and the start-of-text column (ELA's background map) gets T5's padding positions — the text positions that
      carry no prompt content, the nearest analogue of CLIP's start-of-text attention sink (a choice to check on
      real weights, docs/mmdit.md). CLIP's padding columns stay 0.

    Each row sums to at most 1, so the projected maps are still probability mass (normalised over all keys).
    """
    from ..text.prompt import token_offsets

    fam = family(pipe)
    n = max_sequence_length(pipe)
    if fam == "sd3" and pipe.text_encoder_3 is None:  # SD3 without T5: its 256 positions hold zeros, no prompt
        return torch.cat([torch.eye(columns), torch.zeros(n, columns)])
    _, clip_spans, _ = token_offsets(pipe.tokenizer, prompt)
    length = len(clip_spans)
    tok = t5_tokenizer(pipe)
    if not getattr(tok, "is_fast", False):
        raise UnbleedError(f"the model's T5 tokenizer ({type(tok).__name__}) reports no character offsets: load it "
                           f"as a fast tokenizer (tokenizer.json) so token groups can be placed on T5's pieces")
    enc = tok(prompt, padding="max_length", max_length=n, truncation=True, return_offsets_mapping=True)
    offset = columns if fam == "sd3" else 0
    m = torch.zeros(offset + n, columns)
    if fam == "sd3":
        m[:columns] = torch.eye(columns)
    for j, (tid, span, mask) in enumerate(zip(enc.input_ids, enc.offset_mapping, enc.attention_mask)):
        row = offset + j
        if not mask:
            if fam == "flux":
                m[row, 0] = 1.0
            continue
        if tid == tok.eos_token_id:
            m[row, length - 1] += 1.0
            continue
        hits = [i for i in range(1, length - 1) if _overlap(tuple(span), clip_spans[i])]
        for i in hits:
            m[row, i] += 1.0 / len(hits)
    return m
