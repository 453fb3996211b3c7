"""Derive the CLIP BPE tokenizer files shipped in ``src/unbleed/data/clip_tokenizer``.

The source is ``bpe_simple_vocab_16e6.txt.gz`` from the ``open_clip_torch`` wheel (the same file OpenAI's CLIP
repository ships). We do not depend on open_clip_torch; fetch the wheel once and run this script:

    pip download --no-deps open_clip_torch -d /tmp/oc
    python scripts/make_clip_vocab.py /tmp/oc/open_clip_torch-*.whl

The construction follows CLIP's ``SimpleTokenizer``: the 256 byte-level symbols, the same with ``</w>``,
the first 48,894 merges (49152 - 256 - 2), and the two special tokens — 49,408 entries, the vocabulary of
every SD 1.x text encoder (openai/clip-vit-large-patch14) and of SD 2.x's OpenCLIP ViT-H.
"""

from __future__ import annotations

import gzip
import json
import sys
import zipfile
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "src" / "unbleed" / "data" / "clip_tokenizer"


def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible byte → printable unicode table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def main(wheel: str) -> None:
    with zipfile.ZipFile(wheel) as zf:
        raw = zf.read("open_clip/bpe_simple_vocab_16e6.txt.gz")
    lines = gzip.decompress(raw).decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    vocab = list(bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408, len(vocab)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    (OUT / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "do_lower_case": True,
    }
    (OUT / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special = {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    (OUT / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    print(f"wrote {OUT} ({len(vocab)} tokens, {len(merges)} merges)")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python scripts/make_clip_vocab.py PATH/TO/open_clip_torch-*.whl")
    main(sys.argv[1])
