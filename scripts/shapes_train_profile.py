"""Where one ``unbleed shapes train`` diffusion step spends its time, on this machine.

    OMP_NUM_THREADS=2 .venv/bin/python scripts/shapes_train_profile.py --steps 8 [--clean-pads] [--arch default]

Times each part of :meth:`unbleed.shapes.train.Trainer.diffusion_update` in isolation on the same batches —
rendering the scenes, the VAE encode, the text encoder (with the clean-pads encoding of the empty caption when
``--clean-pads``), the UNet forward and backward, the optimiser step and the EMA — then whole steps, and prints the
median seconds of each with its share of a step. The parts are timed one after another (``time.perf_counter``
around each, no overlap), so their sum is close to a whole step; a part that is not the UNet's own work (render,
encode) is what a background worker could hide. Nothing is written; the weights are random (the cost does not
depend on them).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from unbleed.shapes.train import Trainer, TrainConfig, scene_batch, token_ids


def _timed(fn, times: list[float]):
    start = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - start)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8, help="steps to time (after 2 warm-up steps)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--arch", default="default")
    ap.add_argument("--clean-pads", action="store_true")
    args = ap.parse_args()
    cfg = TrainConfig(steps=10**6, batch=args.batch, arch=args.arch, clean_pads=args.clean_pads)
    tr = Trainer("/nonexistent-not-written", cfg, torch.device("cpu"))
    tr.scaled = True
    tr.vae.requires_grad_(False)
    parts: dict[str, list[float]] = {k: [] for k in ("render", "vae encode", "text encoder", "unet forward",
                                                      "backward", "optimiser", "ema", "whole step")}
    for k in range(args.steps + 2):
        keep = k >= 2
        t = {name: [] for name in parts}
        x, texts = _timed(lambda: scene_batch(cfg, "diffusion", k, cfg.batch), t["render"])
        with torch.no_grad():
            z = _timed(lambda: tr.vae.encode(x).latent_dist.mean * tr.vae.config.scaling_factor, t["vae encode"])
        ids = token_ids(tr.tokenizer, texts)
        noise = torch.randn(z.shape, generator=tr.gen)
        steps = torch.randint(0, 1000, (z.shape[0],), generator=tr.gen)
        a = tr.alphas_cumprod[steps].view(-1, 1, 1, 1)
        noisy = a.sqrt() * z + (1 - a).sqrt() * noise

        def encode():
            cond = tr.text_encoder(ids)[0]
            return tr.with_clean_pads(ids, cond) if cfg.clean_pads else (cond, None)

        cond, pad_loss = _timed(encode, t["text encoder"])
        pred = _timed(lambda: tr.unet(noisy, steps, cond).sample, t["unet forward"])
        loss = (pred - noise).pow(2).mean() + (0 if pad_loss is None else pad_loss)
        tr.opt.zero_grad(set_to_none=True)
        _timed(loss.backward, t["backward"])
        _timed(tr.opt.step, t["optimiser"])

        def ema():
            with torch.no_grad():
                for name, p in tr._diffusion_params():
                    tr.ema[name].lerp_(p.detach(), 1e-3)

        _timed(ema, t["ema"])
        tr.step = 10**5  # past the warm-up: the step's learning rate is the full one
        _timed(tr.diffusion_update, t["whole step"])
        if keep:
            for name in parts:
                parts[name] += t[name]
    whole = statistics.median(parts["whole step"])
    print(f"{args.steps} steps, batch {args.batch}, arch {args.arch}, clean pads {args.clean_pads}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'part':<14} {'median s':>9} {'share of a step':>16}")
    for name, values in parts.items():
        med = statistics.median(values)
        print(f"{name:<14} {med:>9.3f} {med / whole:>15.0%}")


if __name__ == "__main__":
    main()
