"""Seconds per diffusion-training step of shapes architectures, interleaved in one run (batch 64, as training).

    .venv/bin/python scripts/shapes_arch_cost.py --archs default,sd32 --repeats 2 [--device cuda]

Each repeat trains every architecture for 2 and for 12 diffusion steps (after one VAE step) from scratch; the
difference over 10 steps is the per-step cost, free of start-up. Ratios from one run are what to compare on a
noisy machine.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from unbleed.shapes.train import TrainConfig, train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", default="default,sd32")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    archs = args.archs.split(",")
    times: dict[tuple[str, int], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            for arch in archs:
                for steps in (2, 12):
                    cfg = TrainConfig(arch=arch, vae_steps=1, steps=steps, batch=64, vae_batch=16, warmup=2,
                                      checkpoint_every=10_000)
                    t0 = time.perf_counter()
                    train(Path(tmp) / f"{arch}-{steps}-{rep}", cfg, device=args.device)
                    times.setdefault((arch, steps), []).append(time.perf_counter() - t0)
    for arch in archs:
        per = [(b - a) / 10 for a, b in zip(times[(arch, 2)], times[(arch, 12)])]
        print(f"{arch}: s/step {', '.join(f'{x:.2f}' for x in per)}")


if __name__ == "__main__":
    main()
