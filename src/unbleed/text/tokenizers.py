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
    """Only the tokenizer of a model: ``clip``/``tiny``/``tiny-xl``/``tiny-sd3``/``tiny-flux`` (the shipped CLIP BPE
    one: SD 1.x's, the first of the tiny SDXL's two, and the CLIP one whose indices token groups use on SD3/FLUX;
    SD 2.x shares its BPE, so prompt token indices are equal), a local diffusers folder, or a hub id."""
    if spec in ("clip", "tiny", "tiny-xl", "tiny-sd3", "tiny-flux"):
        return load_clip_tokenizer()
    path = Path(spec).expanduser()
    if path.is_dir():
        folder = path / "tokenizer" if (path / "tokenizer").is_dir() else path
        if not any((folder / f).is_file() for f in ("vocab.json", "tokenizer.json")):
            raise UnbleedError(f"--model {spec}: no tokenizer there (no tokenizer/vocab.json or tokenizer.json): "
                               f"pass a diffusers folder, a hub id, or --model clip")
    offline_fix = "offline, use --model clip (the SD 1.x/2.x CLIP vocabulary shipped with unbleed)"
    if not path.is_dir():
        if spec.startswith((".", "/", "~")) or spec.count("/") != 1:
            raise UnbleedError(f"--model {spec}: no such folder, and it is not a hub id of the form owner/name: "
                               f"pass a local diffusers folder, a hub id, or --model clip")
        from ..hub import resolve

        local = resolve(spec, "tokenizer/vocab.json", "--model", "a local diffusers folder or, " + offline_fix)
    from transformers import CLIPTokenizer  # (after the checks: a bad id answers before transformers loads)

    try:
        if path.is_dir():
            tokenizer = CLIPTokenizer.from_pretrained(folder)
        else:
            tokenizer = CLIPTokenizer.from_pretrained(spec, subfolder="tokenizer", local_files_only=local)
    except Exception as err:  # hub and file errors come as many types
        raise UnbleedError(f"--model {spec}: cannot load its tokenizer ({type(err).__name__}: {_first_line(err)}); "
                           f"{offline_fix}") from None
    if not _usable(tokenizer):  # transformers may hand back a tokenizer without a vocabulary (issue #25)
        raise UnbleedError(f"--model {spec}: its tokenizer came without a vocabulary (no tokenizer/vocab.json): "
                           f"pass a diffusers folder or hub id that has one, or {offline_fix}")
    return tokenizer


def _usable(tokenizer) -> bool:
    """Whether ``tokenizer`` has words beyond its special tokens and can encode a caption (an empty
    ``vocab.json`` loads, keeps ``<|endoftext|>`` as an added token, and fails only when it first encodes)."""
    if not set(tokenizer.get_vocab()) - set(tokenizer.all_special_tokens):
        return False
    try:
        tokenizer("a photo of a cat")
    except Exception:
        return False
    return True


def _first_line(err: BaseException) -> str:
    """The first line of an exception's message, at most 160 characters (as :mod:`unbleed.models` words it)."""
    text = str(err).strip().splitlines()
    line = text[0] if text else type(err).__name__
    return line if len(line) <= 160 else line[:157] + "..."
