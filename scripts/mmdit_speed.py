"""Per-step seconds of plain sampling against one guided method, and the joint-attention capture's peak memory
against a naive full-matrix capture, on the full-size SD3-medium architecture with random weights (docs/mmdit.md,
"Speed").

    nice -n 15 env OMP_NUM_THREADS=1 .venv/bin/python scripts/mmdit_speed.py [--steps 2] [--size 256]

The pipeline is ``StableDiffusion3Pipeline`` with SD3-medium's transformer (24 joint blocks, 24 heads × 64, joint
attention dim 4096, pooled 2048: the ``transformer/config.json`` of ``stabilityai/stable-diffusion-3-medium-
diffusers``), SD3's 16-channel VAE and full-size CLIP-L/CLIP-G text encoders, all seeded random fp32 weights, and
no T5 (``text_encoder_3=None``: diffusers fills T5's 256 positions with zeros). No weights are downloaded; the
images are not decoded (``output_type="latent"``).

Printed: the build's time and memory; the per-step wall and CPU seconds of ``sd`` and of the guided method (from
the first transformer call to the end of each step, so text encoding is left out; every step guided, none refined,
CFG on) and their ratios; the peak memory of one capture (forward and backward through the transformer up to the
last block read, as a guided step's gradient) with the chunked capture
(:func:`unbleed.guidance.joint_attention.text_probs`) and with the full ``N × N`` softmax
(:func:`~unbleed.guidance.joint_attention.naive_text_probs`).
"""

from __future__ import annotations

import argparse
import statistics
import time
from unittest import mock

import torch

from unbleed import generate, make_method, token_groups
from unbleed.eval.speed import PeakMemory, _proc_status
from unbleed.guidance import conditioning, joint_attention, mmdit
from unbleed.guidance.attention import attention_store
from unbleed.guidance.schedule import Schedule
from unbleed.text.tokenizers import load_clip_tokenizer

# stabilityai/stable-diffusion-3-medium-diffusers: transformer/config.json, vae/config.json, scheduler
SD3_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                  num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                  pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192)
SD3_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
               down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
               layers_per_block=2, norm_num_groups=32, scaling_factor=1.5305, shift_factor=0.0609,
               use_quant_conv=False, use_post_quant_conv=False)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              projection_dim=768, hidden_act="quick_gelu")
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              projection_dim=1280, hidden_act="gelu")


def rss_mb() -> float:
    return _proc_status("VmRSS") / 2**20


def build(seed: int = 0):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, \
        StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    tok = load_clip_tokenizer()
    ids = dict(vocab_size=tok.vocab_size, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
               pad_token_id=49407)
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(**SD3_MEDIUM).eval().requires_grad_(False)
    text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(**ids, **CLIP_L)).eval().requires_grad_(False)
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**ids, **CLIP_G)).eval().requires_grad_(False)
    vae = AutoencoderKL(**SD3_VAE).eval().requires_grad_(False)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=vae, text_encoder=text_encoder, tokenizer=tok, text_encoder_2=text_encoder_2,
                                    tokenizer_2=load_clip_tokenizer(), text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def per_step(pipe, prompt, steps, size, method=None, groups=None, schedule=None) -> tuple[list[float], list[float]]:
    """Each step's wall and CPU seconds (``time.process_time``: on a shared machine the CPU seconds of a
    1-thread run are the stable measure): from the first transformer call (the start of step 0, after text
    encoding) to the end of each step (the sampler's callback)."""
    wall, cpu = [], []

    def stamp(i=None):
        wall.append(time.perf_counter())
        cpu.append(time.process_time())
        if i is not None:
            print(f"    step {i}: {wall[-1] - wall[-2]:.1f} s wall, {cpu[-1] - cpu[-2]:.1f} s CPU", flush=True)

    hook = pipe.transformer.register_forward_pre_hook(lambda *a: None if wall else stamp())
    try:
        res = generate(pipe, prompt, method=method, groups=groups, schedule=schedule, seeds=[0],
                       num_inference_steps=steps, height=size, width=size, output_type="latent",
                       callback=lambda i, n, rec: stamp(i))
    finally:
        hook.remove()
    print(f"    latents finite: {bool(torch.isfinite(res.latents).all())}", flush=True)
    return [b - a for a, b in zip(wall, wall[1:])], [b - a for a, b in zip(cpu, cpu[1:])]


def capture_peak(pipe, prompt, size, method, naive: bool) -> tuple[float, float]:
    """Peak MiB above the start and seconds of one capture of ``method``'s maps with its gradient w.r.t. the latent
    (conditional pass, batch 1, stopped after the last block read)."""
    text = conditioning.encode(pipe, prompt, "cpu", 1, False)
    hw = (size // 8, size // 8)
    z = torch.randn(1, 16, *hw, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    t = conditioning.timesteps(pipe, 50, "cpu", hw)[0][0]
    cols = mmdit.token_columns(pipe, prompt)
    full = lambda q, k, image, text, chunk=None: joint_attention.naive_text_probs(q, k, image, text)  # noqa: E731
    with mock.patch.object(joint_attention, "text_probs", full if naive else joint_attention.text_probs):
        with attention_store(pipe.transformer) as store, PeakMemory(torch.device("cpu")) as mem:
            t0 = time.perf_counter()
            store.columns = cols
            req = method.map_requests(pipe.transformer)
            with torch.enable_grad(), store.capture(req, hw, truncate=True):
                conditioning.predict(pipe, z, t, text.cond, text.added_cond)
            with torch.enable_grad():
                maps = store.maps(req[0])
                (grad,) = torch.autograd.grad(maps[:, 1:10].sum(), z)
            seconds = time.perf_counter() - t0
    print(f"    gradient finite: {bool(torch.isfinite(grad).all())}", flush=True)
    return mem.peak_mb, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--method", default="attend-excite")
    parser.add_argument("--prompt", default="a cat and a frog")
    parser.add_argument("--tiny", action="store_true", help="tiny-sd3 without T5 instead (a smoke test)")
    args = parser.parse_args()
    start = rss_mb()
    t0 = time.perf_counter()
    if args.tiny:
        from unbleed.models import load_model

        pipe = load_model("tiny-sd3")
        pipe.text_encoder_3 = pipe.tokenizer_3 = None
    else:
        pipe = build()
    params = sum(p.numel() for p in pipe.transformer.parameters())
    print(f"built in {time.perf_counter() - t0:.0f} s: transformer {params / 1e9:.2f} B parameters, "
          f"process RSS {rss_mb():.0f} MiB (+{rss_mb() - start:.0f} MiB)", flush=True)
    method = make_method(args.method)
    groups = token_groups(pipe.tokenizer, args.prompt, None)
    schedule = Schedule(window=(0, args.steps), refine={}, step_size=method.default_schedule(args.steps).step_size)
    print(f"{args.size} px, {args.steps} steps, CFG 7.5, prompt {args.prompt!r}", flush=True)
    plain = per_step(pipe, args.prompt, args.steps, args.size)
    guided = per_step(pipe, args.prompt, args.steps, args.size, method, groups, schedule)
    for name, (wall, cpu) in (("sd", plain), (args.method, guided)):
        print(f"  {name}: {statistics.mean(wall):.1f} s/step wall, {statistics.mean(cpu):.1f} s/step CPU", flush=True)
    print(f"  ratio {args.method} / sd: {statistics.mean(guided[0]) / statistics.mean(plain[0]):.2f} wall, "
          f"{statistics.mean(guided[1]) / statistics.mean(plain[1]):.2f} CPU", flush=True)
    for naive in (False, True):
        peak, seconds = capture_peak(pipe, args.prompt, args.size, method, naive)
        print(f"  capture with gradient, {'naive full softmax' if naive else 'chunked (unbleed)'}: "
              f"peak {peak:.0f} MiB above the start, {seconds:.1f} s", flush=True)


if __name__ == "__main__":
    main()
