"""How much of the caption a shapes model's text encoder writes into its end-of-text and padding columns.

For each model (``shapes``, or a pipeline folder from ``unbleed shapes train``): the squared distance, averaged
over the columns and over 40 held-out two-object captions, of the encoder's outputs from the empty caption's
outputs at the same positions ("clean pads"), at end-of-text and padding, and at the words (start-of-text
excluded: it is the same for every caption) for scale. ``--clean-pads`` training drives the first towards 0.
With ``--versus TEXT`` (e.g. ``a``, a ``--pad-caption``): also the end-of-text + padding distance from that
caption's outputs, and how far that caption's own padding lies from the empty caption's (positions from the
shortest prompt's end-of-text on) — the bit a ``--pad-caption`` target can carry.

    .venv/bin/python scripts/shapes_pad_distance.py shapes runs/cp2/pipeline [--versus a]
"""

from __future__ import annotations

import argparse

import torch

from unbleed.models import load_model
from unbleed.shapes.train import eot_positions, summary_columns, token_ids
from unbleed.shapes.world import unseen_prompts


def pad_distance(pipe, prompts: list[str], versus: str | None = None) -> dict[str, float]:
    tok, encoder = pipe.tokenizer, pipe.text_encoder

    def encode(texts):
        with torch.no_grad():
            return encoder(token_ids(tok, texts).to(pipe.device))[0].float()

    ids = token_ids(tok, prompts).to(pipe.device)
    out, clean = encode(prompts), encode([""])[0]
    summary = summary_columns(ids, tok.eos_token_id)
    words = ~summary
    words[:, 0] = False  # start-of-text: the same for every caption

    def mean_over(dist, mask):
        return float((dist * mask).sum() / mask.sum())

    d = {"summary": mean_over((out - clean).pow(2).sum(-1), summary),
         "words": mean_over((out - clean).pow(2).sum(-1), words)}
    if versus is not None:
        other = encode([versus])[0]
        d["summary_vs"] = mean_over((out - other).pow(2).sum(-1), summary)
        first = int(eot_positions(ids, tok.eos_token_id).min())
        d["versus_vs_empty"] = float((other[first:] - clean[first:]).pow(2).sum(-1).mean())
    return d


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="shapes, or pipeline folders")
    parser.add_argument("--prompts", type=int, default=40)
    parser.add_argument("--versus", help="also the distances from this caption's outputs (e.g. a --pad-caption)")
    args = parser.parse_args()
    prompts = unseen_prompts(args.prompts)
    for model in args.models:
        d = pad_distance(load_model(model), prompts, args.versus)
        line = f"{model}: end-of-text + padding {d['summary']:.4f}; words {d['words']:.2f}"
        if args.versus is not None:
            line += (f"; end-of-text + padding vs {args.versus!r}'s {d['summary_vs']:.4f}; {args.versus!r}'s padding "
                     f"vs the empty caption's {d['versus_vs_empty']:.4f}")
        print(line)


if __name__ == "__main__":
    main()
