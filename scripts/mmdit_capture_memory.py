"""Peak memory of one joint-attention layer's map capture, chunked (unbleed) against the full softmax, forward and
backward, at the full-size SD3-medium and FLUX.1 attention shapes (random q, k; batch 1; fp32; CPU RSS or CUDA).

    .venv/bin/python scripts/mmdit_capture_memory.py [--size 1024] [--device cpu]

Prints one line per model and capture: the peak memory above the start (MB) and the seconds (docs/mmdit.md).
"""

from __future__ import annotations

import argparse
import time

import torch

from unbleed.eval.speed import PeakMemory
from unbleed.guidance.joint_attention import naive_text_probs, text_probs

# heads, head_dim, text tokens (SD3: CLIP's 77 + T5's 256; FLUX: T5's 512), whether text comes first
SHAPES = {"sd3-medium": (24, 64, 77 + 256, False), "flux.1": (24, 128, 512, True)}


def measure(name: str, size: int, device: torch.device, naive: bool) -> tuple[float, float]:
    heads, dim, n_text, text_first = SHAPES[name]
    n_img = (size // 16) ** 2  # 8× VAE, 2×2 patches
    n = n_img + n_text
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, heads, n, dim, generator=g).to(device).requires_grad_(True)
    k = torch.randn(1, heads, n, dim, generator=g).to(device).requires_grad_(True)
    image, text = ((slice(n_text, n), slice(0, n_text)) if text_first else (slice(0, n_img), slice(n_img, n)))
    with PeakMemory(device) as mem:
        t0 = time.perf_counter()
        probs = (naive_text_probs if naive else text_probs)(q, k, image, text)
        probs.sum().backward()
        seconds = time.perf_counter() - t0
    return mem.peak_mb, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    for name in SHAPES:
        for naive in (False, True):
            peak, seconds = measure(name, args.size, device, naive)
            print(f"{name} {args.size}px {'naive full softmax' if naive else 'chunked (unbleed)'}: "
                  f"peak {peak:.0f} MB, {seconds:.1f} s")


if __name__ == "__main__":
    main()
