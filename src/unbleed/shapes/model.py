"""The shapes model: a small text-to-image model in Stable Diffusion's own format, trained on the shapes world.

It is an ordinary diffusers :class:`~diffusers.StableDiffusionPipeline` folder — the real CLIP BPE tokenizer, a
small causal :class:`~transformers.CLIPTextModel`, a :class:`~diffusers.UNet2DConditionModel` with
cross-attention at two resolutions (16×16 and 8×8 latents, plus the 4×4 mid block), a small
:class:`~diffusers.AutoencoderKL` (4× down-sampling: 64 px images, 4×16×16 latents) and SD 1.x's noise schedule
with PNDM — so it loads through :func:`unbleed.models.load_model` like a hub checkpoint and runs every method
unchanged. The block layout is SD 1.x's in miniature (cross-attention in the first two down blocks and the last
two up blocks), so the papers' names (``up-1`` = 8×8, ``down-2`` = 8×8, ``down-1``/``up-2`` = 16×16) resolve.

The trained weights ship in the package (``unbleed/data/shapes_model``, fp16 safetensors) and load as
``--model shapes``; ``unbleed shapes train`` makes them (:mod:`unbleed.shapes.train`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

IMAGE_SIZE = 64  # pixels; the detector's scale
LATENT_SIZE = 16  # the shipped model's (4x VAE); Arch.latent_size in general


@dataclass(frozen=True)
class Arch:
    """Sizes of the three networks. ``default`` is the shipped model; ``test`` is a very small one for tests;
    ``sd32`` has SD's geometry (maps the papers read at 16×16)."""

    text_hidden: int = 64
    text_layers: int = 3
    text_heads: int = 4
    unet_channels: tuple[int, int, int] = (32, 64, 64)
    unet_heads: int = 1  # one head per layer: 3x faster on CPU than 4 (small head dims are slow in SDPA)
    vae_channels: tuple[int, ...] = (16, 32, 32)  # one VAE level per entry: n levels downsample 2**(n-1) times

    @property
    def latent_size(self) -> int:
        return IMAGE_SIZE // 2 ** (len(self.vae_channels) - 1)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Arch":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


ARCHS = {
    "default": Arch(),
    "test": Arch(text_hidden=16, text_layers=1, text_heads=2, unet_channels=(16, 16, 16), unet_heads=2,
                 vae_channels=(8, 8, 8)),
    # SD-like geometry for the positive control (issue 17): 32x32 latents (a 2x VAE), so that the blocks the
    # papers read (up-1, down-2) are 16x16 as in SD at 512 px; 4 heads; a deeper text encoder. Not trained yet.
    "sd32": Arch(text_hidden=64, text_layers=4, text_heads=4, unet_channels=(32, 64, 64), unet_heads=4,
                 vae_channels=(16, 32)),
}


def noise_schedule():
    """SD 1.x's training schedule (1000 steps, scaled-linear betas 0.00085–0.012)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, prediction_type="epsilon")


def build_components(arch: Arch, seed: int = 0) -> dict:
    """Freshly initialised (seeded) text encoder, UNet and VAE, plus the tokenizer and the PNDM scheduler."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ..text.tokenizers import load_clip_tokenizer

    tokenizer = load_clip_tokenizer()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=arch.text_hidden, intermediate_size=4 * arch.text_hidden,
        num_hidden_layers=arch.text_layers, num_attention_heads=arch.text_heads, max_position_embeddings=77,
        hidden_act="quick_gelu", projection_dim=arch.text_hidden,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    ))
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(
        sample_size=arch.latent_size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=arch.unet_channels, norm_num_groups=min(16, arch.unet_channels[0]),
        cross_attention_dim=arch.text_hidden, attention_head_dim=arch.unet_heads,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )
    torch.manual_seed(seed + 2)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
        norm_num_groups=min(16, arch.vae_channels[0]), block_out_channels=arch.vae_channels,
        down_block_types=("DownEncoderBlock2D",) * len(arch.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(arch.vae_channels),
        sample_size=IMAGE_SIZE,
    )
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)
    return {"tokenizer": tokenizer, "text_encoder": text_encoder, "unet": unet, "vae": vae, "scheduler": scheduler}


def make_pipeline(components: dict):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


__all__ = ["ARCHS", "Arch", "IMAGE_SIZE", "LATENT_SIZE", "build_components", "make_pipeline", "noise_schedule"]
