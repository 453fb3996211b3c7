"""How much of the caption a shapes model's text encoder writes into its end-of-text and padding columns.

For each model (``shapes``, or a pipeline folder from ``unbleed shapes train``): the squared distance, averaged
over the columns and over 40 held-out two-object captions, of the encoder's outputs from the empty caption's
outputs at the same positions ("clean pads"), at end-of-text and padding, and at the words (start-of-text
excluded: it is the same for every caption) for scale. ``--clean-pads`` training drives the first towards 0.

    .venv/bin/python scripts/shapes_pad_distance.py shapes runs/cp2/pipeline
"""

from __future__ import annotations

import argparse

import torch

from unbleed.models import load_model
from unbleed.shapes.train import summary_columns, token_ids
from unbleed.shapes.world import unseen_prompts


def pad_distance(pipe, prompts: list[str]) -> dict[str, float]:
    tok, encoder = pipe.tokenizer, pipe.text_encoder
    with torch.no_grad():
        ids = token_ids(tok, prompts).to(pipe.device)
        out = encoder(ids)[0].float()
        clean = encoder(token_ids(tok, [""]).to(pipe.device))[0][0].float()
    dist = (out - clean).pow(2).sum(-1)
    summary = summary_columns(ids, tok.eos_token_id)
    words = ~summary
    words[:, 0] = False  # start-of-text: the same for every caption
    return {"summary": float((dist * summary).sum() / summary.sum()),
            "words": float((dist * words).sum() / words.sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="shapes, or pipeline folders")
    parser.add_argument("--prompts", type=int, default=40)
    args = parser.parse_args()
    prompts = unseen_prompts(args.prompts)
    for model in args.models:
        d = pad_distance(load_model(model), prompts)
        print(f"{model}: end-of-text + padding {d['summary']:.2f}; words {d['words']:.2f}")


if __name__ == "__main__":
    main()
