"""Builders of tiny or random-weight models for tests and benchmarks; nothing is downloaded.

``build_tiny_pipeline`` makes the in-process ``tiny`` model of :func:`unbleed.models.load_model`,
``build_tiny_xl_pipeline`` its SDXL counterpart ``tiny-xl``; ``save_random_sd`` writes a full-size SD 1.x or
SDXL folder with random weights for speed work.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .errors import UnbleedError
from .text.tokenizers import load_clip_tokenizer


def build_tiny_pipeline(seed: int = 0):
    """A tiny SD-format pipeline with seeded random weights and the real CLIP tokenizer.

    It mirrors SD 1.x's layout in miniature — three UNet levels, cross-attention in the first two down blocks and
    the last two up blocks, an 8× VAE, the SD 1.x noise schedule with PNDM — so that block names ("up-1",
    "down-2"), token indices and the sampler's code paths are the real ones. Images are noise-like.
    """
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = load_clip_tokenizer()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
        pad_token_id=49407, projection_dim=32,
    ))
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64, 64), norm_num_groups=16, cross_attention_dim=32, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )
    torch.manual_seed(seed + 2)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8, block_out_channels=(8, 16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=128,
    )
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    return pipe


# SDXL base 1.0's scheduler config (scheduler/scheduler_config.json of stabilityai/stable-diffusion-xl-base-1.0)
SDXL_SCHEDULER = {
    "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "clip_sample": False,
    "interpolation_type": "linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
    "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False,
}
SDXL_VAE_SCALING = 0.13025  # SDXL's VAE latent scale (SD 1.x: 0.18215)


def sdxl_tokenizers():
    """SDXL's two tokenizers: CLIP ViT-L's (padding with end-of-text) and OpenCLIP bigG's, the same BPE padding
    with ``!`` (id 0) — the shipped CLIP BPE both times, with SDXL's pad tokens."""
    from transformers import CLIPTokenizer

    from .text.tokenizers import clip_tokenizer_path

    return load_clip_tokenizer(), CLIPTokenizer.from_pretrained(clip_tokenizer_path(), pad_token="!")


def _sdxl_pipeline(text_encoder, text_encoder_2, unet, vae, tokenizers=None):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    tokenizer, tokenizer_2 = tokenizers or sdxl_tokenizers()
    return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet,
                                     scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER),
                                     force_zeros_for_empty_prompt=True, add_watermarker=False)


def build_tiny_xl_pipeline(seed: int = 0):
    """A tiny SDXL-format pipeline (``--model tiny-xl``) with seeded random weights and SDXL's two tokenizers.

    It mirrors SDXL base's layout in miniature: two text encoders (a CLIPTextModel and a
    CLIPTextModelWithProjection whose pooled output feeds the UNet), their penultimate hidden states concatenated
    (32 + 48 = 80 channels); a three-level UNet with no cross-attention in the first down block and the last up
    block, more transformer layers at the coarsest level (``transformer_layers_per_block=(1, 1, 2)``, SDXL's
    (1, 2, 10)), linear projections and the "text_time" added embedding (pooled text + six time ids); an 8× VAE
    with SDXL's scaling factor and ``force_upcast``; SDXL's Euler scheduler config. Default size 256 px (32×32
    latents: ``up-1`` maps 8×8, the finer level 16×16 — SDXL's 32×32 and 64×64 at 1024 px, scaled by 1/4).
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizers = sdxl_tokenizers()
    common = dict(vocab_size=tokenizers[0].vocab_size, max_position_embeddings=77, bos_token_id=49406,
                  eos_token_id=49407, pad_token_id=49407)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                num_attention_heads=4, projection_dim=32, **common))
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(
        hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, projection_dim=32,
        hidden_act="gelu", **common))
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64, 64),
        norm_num_groups=16, cross_attention_dim=32 + 48, attention_head_dim=(2, 4, 4),
        transformer_layers_per_block=(1, 1, 2), use_linear_projection=True,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=8 * 6 + 32,
    )
    torch.manual_seed(seed + 2)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8, block_out_channels=(8, 16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=256,
        scaling_factor=SDXL_VAE_SCALING, force_upcast=True,
    )
    return _sdxl_pipeline(text_encoder, text_encoder_2, unet, vae, tokenizers)


def save_random_sd(path: str | os.PathLike, arch: str = "sd1", seed: int = 0, dtype: torch.dtype = torch.float16):
    """Write a local diffusers folder with a full-size architecture and random weights (for speed work).

    ``arch="sd1"``: SD 1.4's configs (CLIP ViT-L/14 text encoder, 860M-parameter UNet, the KL-f8 VAE).
    ``arch="sdxl"``: SDXL base 1.0's (:func:`save_random_sdxl`). The tokenizers are the real CLIP BPE. Weights are
    seeded random in ``dtype`` and saved as safetensors.
    """
    if arch == "sdxl":
        return save_random_sdxl(path, seed=seed, dtype=dtype)
    if arch != "sd1":
        raise UnbleedError(f"save_random_sd: arch {arch!r} is not supported: use sd1 or sdxl")
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=1,
    ))
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
        layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512,
    )
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=load_clip_tokenizer(),
                                   unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.to(dtype=dtype)
    pipe.save_pretrained(path, safe_serialization=True)
    return Path(path)


def save_random_sdxl(path: str | os.PathLike, seed: int = 0, dtype: torch.dtype = torch.float16):
    """A full-size SDXL base 1.0 architecture with random weights, saved as a diffusers folder (about 7 GB in fp16).

    Configs are SDXL base's: CLIP ViT-L/14 (768) and OpenCLIP bigG/14 (1280, with projection) text encoders, the
    2.6B-parameter UNet (320/640/1280 channels, transformer depths 1/2/10, no cross-attention at the finest level,
    "text_time" added embedding of 6×256 + 1280), the KL-f8 VAE with scale 0.13025 and ``force_upcast``, Euler.
    Each component is cast to ``dtype`` as soon as it is built, so the peak memory stays near the UNet's fp32 size
    (about 10 GB).
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    common = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                  pad_token_id=49407)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        hidden_act="quick_gelu", projection_dim=768, **common)).to(dtype)
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(
        hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20, hidden_act="gelu",
        projection_dim=1280, **common)).to(dtype)
    unet = UNet2DConditionModel(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    ).to(dtype)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
        layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        sample_size=1024, scaling_factor=SDXL_VAE_SCALING, force_upcast=True,
    ).to(dtype)
    pipe = _sdxl_pipeline(text_encoder, text_encoder_2, unet, vae)
    pipe.save_pretrained(path, safe_serialization=True)
    return Path(path)


# --- MMDiT: SD3 and FLUX in miniature (docs/mmdit.md) ---------------------------------------------------------

TINY_T5_WORDS = (
    "a an the and with of on in at to is photo picture red blue green yellow black white brown pink purple orange "
    "golden cat dog frog bird bear horse lion mouse turtle rabbit elephant monkey crown clock bag car bench bowl "
    "apple chair ball box book cup glasses teddy flower tree house kitchen table teacup"
).split()
# "strawberry" is two T5 pieces and one CLIP piece; "teacup" one T5 piece and two CLIP pieces (te, acup)
TINY_T5_PIECES = ("straw", "berry", "ber", "ry", "s", "ed", "ing")
# SD3 medium's and FLUX.1-dev's scheduler configs (scheduler/scheduler_config.json of their hub repositories)
SD3_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0}
FLUX_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5,
                  "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096}


def tiny_t5_tokenizer():
    """A small T5 (SentencePiece-Unigram) tokenizer built in-process: T5's special tokens (``<pad>`` 0, ``</s>`` 1,
    ``<unk>`` 2), its ``▁`` word-start pieces and Metaspace pre-tokenizer, and a vocabulary of a few common words,
    sub-word pieces and every printable ASCII character — so every prompt tokenizes, words outside the list split
    into pieces that differ from CLIP's BPE (as the real T5's do), and offsets are reported (a fast tokenizer).
    No real T5 vocabulary ships in an installed package; the real models' tokenizers load from their folders."""
    import string

    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(f"▁{w}", -5.0) for w in TINY_T5_WORDS]
    vocab += [(f"▁{p}", -6.0) for p in TINY_T5_PIECES] + [(p, -6.0) for p in TINY_T5_PIECES]
    chars = string.ascii_letters + string.digits + string.punctuation
    vocab += [(f"▁{c}", -9.0) for c in chars] + [(c, -10.0) for c in chars]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)


def _tiny_t5(tokenizer, d_model: int, seed: int):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    return T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=2 * d_model,
                                   num_layers=2, num_heads=4, pad_token_id=0, eos_token_id=1,
                                   decoder_start_token_id=0))


def _tiny_vae16(seed: int, scaling: float, shift: float):
    """An 8× VAE with 16 latent channels (SD3's and FLUX's), their scaling and shift factors."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, norm_num_groups=8, block_out_channels=(8, 16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=256,
        scaling_factor=scaling, shift_factor=shift, use_quant_conv=False, use_post_quant_conv=False,
    )


def build_tiny_sd3_pipeline(seed: int = 0):
    """A tiny SD3-format pipeline (``--model tiny-sd3``) with seeded random weights.

    SD3's layout in miniature: CLIP-L and CLIP-G text encoders with projections (the shipped CLIP BPE for both;
    hidden 32 + 32, their penultimate states concatenated, the pooled projections 32 + 32 = 64 feed the
    transformer), a T5 encoder (:func:`tiny_t5_tokenizer`, d_model 64) whose 256 tokens follow CLIP's 77 in the
    joint sequence; an ``SD3Transformer2DModel`` with 4 joint blocks (the last ``context_pre_only``, as SD3's), 2×2
    patches, 16 latent channels; a 16-channel 8× VAE with SD3's scaling/shift; SD3's flow-matching Euler
    scheduler (shift 3). Default size 256 px (32×32 latents, a 16×16 token grid).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    clip = load_clip_tokenizer()
    common = dict(vocab_size=clip.vocab_size, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                  pad_token_id=49407, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, projection_dim=32)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(**common))
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**common, hidden_act="gelu"))
    t5_tokenizer = tiny_t5_tokenizer()
    text_encoder_3 = _tiny_t5(t5_tokenizer, 64, seed + 4)
    torch.manual_seed(seed + 1)
    transformer = SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=16, num_layers=4, attention_head_dim=8, num_attention_heads=4,
        joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64, out_channels=16,
        pos_embed_max_size=32)
    vae = _tiny_vae16(seed + 2, 1.5305, 0.0609)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER), vae=vae,
        text_encoder=text_encoder, tokenizer=clip, text_encoder_2=text_encoder_2, tokenizer_2=load_clip_tokenizer(),
        text_encoder_3=text_encoder_3, tokenizer_3=t5_tokenizer)


def build_tiny_flux_pipeline(seed: int = 0):
    """A tiny FLUX.1-format pipeline (``--model tiny-flux``) with seeded random weights.

    FLUX.1-dev's layout in miniature: a CLIP-L text encoder (the shipped CLIP BPE; only its pooled output is used)
    and a T5 encoder (:func:`tiny_t5_tokenizer`, d_model 32) whose 512 tokens are the whole text side of the joint
    sequence; a ``FluxTransformer2DModel`` with 2 double-stream and 2 single-stream blocks, the guidance
    embedding (guidance-distilled, as dev), rotary axes (2, 2, 4), 2×2-packed 16-channel latents; a 16-channel 8×
    VAE with FLUX's scaling/shift; FLUX's flow-matching Euler scheduler (dynamic shift). Default size 256 px.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel

    clip = load_clip_tokenizer()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=clip.vocab_size, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
        pad_token_id=49407, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        projection_dim=32))
    t5_tokenizer = tiny_t5_tokenizer()
    text_encoder_2 = _tiny_t5(t5_tokenizer, 32, seed + 4)
    torch.manual_seed(seed + 1)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
        axes_dims_rope=(2, 2, 4))
    vae = _tiny_vae16(seed + 2, 0.3611, 0.1159)
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER), vae=vae,
                        text_encoder=text_encoder, tokenizer=clip, text_encoder_2=text_encoder_2,
                        tokenizer_2=t5_tokenizer, transformer=transformer)
    pipe.default_sample_size = 32  # 256 px (FLUX's own default, 128, is 1024 px)
    return pipe
