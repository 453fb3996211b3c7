"""Tokenizers without their models: the CLIP BPE tokenizer shipped with the package, or a model's own.

Token indices (``--tokens``, the prompt parser) need only the tokenizer, so these load it without the text encoder,
UNet or VAE. SD 1.x and 2.x share CLIP's BPE, so the shipped one gives their indices offline.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from ..errors import UnbleedError


def clip_tokenizer_path() -> Path:
    """The real CLIP BPE tokenizer shipped with the package (derived by ``scripts/make_clip_vocab.py``)."""
    return Path(str(resources.files("unbleed") / "data" / "clip_tokenizer"))


def load_clip_tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(clip_tokenizer_path())


def load_tokenizer(spec: str = "clip"):
    """Only the tokenizer of a model: ``clip``/``tiny``/``tiny-xl`` (the shipped CLIP BPE one: SD 1.x's, and the
    first of the tiny SDXL's two; SD 2.x shares its BPE, so prompt token indices are equal), a local diffusers
    folder, or a hub id."""
    if spec in ("clip", "tiny", "tiny-xl"):
        return load_clip_tokenizer()
    from transformers import CLIPTokenizer

    path = Path(spec).expanduser()
    if path.is_dir():
        folder = path / "tokenizer" if (path / "tokenizer").is_dir() else path
        if not any((folder / f).is_file() for f in ("vocab.json", "tokenizer.json")):
            raise UnbleedError(f"--model {spec}: no tokenizer there (no tokenizer/vocab.json or tokenizer.json): "
                               f"pass a diffusers folder, a hub id, or --model clip")
    try:
        if path.is_dir():
            return CLIPTokenizer.from_pretrained(folder)
        return CLIPTokenizer.from_pretrained(spec, subfolder="tokenizer")
    except Exception as err:  # hub and file errors come as many types
        raise UnbleedError(f"--model {spec}: cannot load its tokenizer ({type(err).__name__}: {_first_line(err)}); "
                           f"offline, use --model clip (the SD 1.x/2.x CLIP vocabulary shipped with unbleed)") from None


def _first_line(err: BaseException) -> str:
    """The first line of an exception's message, at most 160 characters (as :mod:`unbleed.models` words it)."""
    text = str(err).strip().splitlines()
    line = text[0] if text else type(err).__name__
    return line if len(line) <= 160 else line[:157] + "..."
