"""Plot a shapes training run's ``log.jsonl`` (VAE and diffusion loss against step) to a PNG.

    .venv/bin/python scripts/shapes_loss_plot.py docs/data/shapes_train_log.jsonl docs/img/shapes_training_loss.png
"""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(log: str, png: str) -> None:
    rows = [json.loads(line) for line in open(log) if line.strip()]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, phase in zip(axes, ("vae", "diffusion")):
        pts = [(r["step"], r["loss"]) for r in rows if r["phase"] == phase]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1.2)
        ax.set_title(f"{phase} loss (running mean)")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if phase == "diffusion":
            ax.set_yscale("log")  # the tail matters, not the first 200 steps
    fig.tight_layout()
    fig.savefig(png, dpi=110)


if __name__ == "__main__":
    main(*sys.argv[1:3])
