"""Model loading: hub id, local diffusers folder, ``shapes``, ``tiny`` or ``tiny-xl`` (built in-process with
seeded random weights by :func:`unbleed.testing.build_tiny_pipeline` / :func:`~unbleed.testing.build_tiny_xl_pipeline`).

Every model is a diffusers :class:`~diffusers.StableDiffusionPipeline` (SD 1.x / 2.x) or
:class:`~diffusers.StableDiffusionXLPipeline` (SDXL: a folder or hub repository whose ``model_index.json`` names
an SDXL pipeline class, e.g. ``stabilityai/stable-diffusion-xl-base-1.0``). The sampler only uses the components
(tokenizers, text encoders, UNet, VAE, scheduler) and the pipeline's own helpers (``encode_prompt``,
``prepare_latents``, SDXL's ``_get_add_time_ids``…) through :mod:`unbleed.guidance.conditioning`, so anything that
loads as either pipeline runs every method unchanged.

Safety: weights load from ``safetensors`` only. Pickled ``.bin``/``.ckpt`` weights run arbitrary code when
loaded, so they are accepted only with ``allow_pickle=True`` (CLI ``--allow-pickle``).
"""

from __future__ import annotations

import json
import warnings
from importlib import resources
from pathlib import Path

import torch

from . import checks, hub
from .checks import SCHEDULERS  # noqa: F401  (the --scheduler names, here since the module began)
from .errors import UnbleedError
from .text.tokenizers import load_clip_tokenizer

DEFAULT_MODEL = "CompVis/stable-diffusion-v1-4"  # the ELA paper's model
OFFLINE_MODELS = ("tiny", "tiny-xl", "tiny-sd3", "tiny-flux", "shapes")
SDXL_MODEL = "stabilityai/stable-diffusion-xl-base-1.0"


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UnbleedError(f"--device {device!r} is not a torch device: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UnbleedError(f"--device {device} asked for CUDA but torch sees no GPU here: use --device cpu")
    return dev


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    table = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
             "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
    if dtype in (None, "auto"):
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in table:
        raise UnbleedError(f"--dtype {dtype!r} is unknown: use auto, fp32, fp16 or bf16")
    return table[dtype]


def set_scheduler(pipe, name: str | None) -> None:
    """Swap the pipeline's scheduler for one of :data:`SCHEDULERS`, keeping the model's noise schedule."""
    if checks.scheduler(name) in (None, "default"):
        return
    import diffusers

    cls = getattr(diffusers, SCHEDULERS[name])
    # Latent-diffusion samples must not be clipped to [-1, 1]: SD's own configs say clip_sample=False, DDIM's
    # default is True, so a config that does not say (PNDM's) gets False.
    extra = {} if "clip_sample" in pipe.scheduler.config else {"clip_sample": False}
    try:
        pipe.scheduler = cls.from_config(pipe.scheduler.config, **extra)
    except ImportError as err:
        raise UnbleedError(f"--scheduler {name} needs a package that is not installed ({_first_line(err)})") from None


def shipped_model_path() -> Path:
    """Where the trained shapes-world model lives inside the package (``unbleed shapes train`` makes it)."""
    return Path(str(resources.files("unbleed") / "data" / "shapes_model"))


def _shapes_folder() -> Path:
    """The shipped shapes model's folder, or one line naming the fix when it is missing."""
    path = shipped_model_path()
    if not (path / "model_index.json").is_file():
        raise UnbleedError(f"--model shapes: the trained shapes model is missing from the package ({path}): "
                           f"train one with 'unbleed shapes train --out RUN' and pass --model RUN/pipeline")
    return path


def _names_component(folder: Path, name: str) -> bool:
    """Whether ``folder``'s ``model_index.json`` lists a ``name`` component (not ``[null, null]``)."""
    try:
        entry = json.loads((folder / "model_index.json").read_text()).get(name)
    except (OSError, ValueError):
        return False
    return isinstance(entry, list) and any(entry)


def _has_weights(folder: Path, suffixes: tuple[str, ...]) -> bool:
    return any(p.suffix in suffixes for p in folder.rglob("*") if p.is_file())


def load_model(spec: str = DEFAULT_MODEL, device: str | None = "auto", dtype: str | None = "auto",
               allow_pickle: bool = False, scheduler: str | None = None, seed: int = 0):
    """Load a model as a ``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline`` on ``device``; inference only
    (weights frozen).

    ``spec`` is ``tiny``, ``tiny-xl`` (SDXL in miniature), ``shapes`` (the shipped shapes-world model), a local
    diffusers folder, or a hub id (resolved from the local cache first).
    Raises :class:`UnbleedError` with one line naming the fix when the model cannot be had.
    """
    if not str(spec).strip():
        raise UnbleedError("--model is empty: name a model, e.g. --model tiny, --model shapes or a folder",
                           field="model")
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    if spec == "tiny":
        from .testing import build_tiny_pipeline

        pipe = build_tiny_pipeline(seed=seed)
    elif spec == "tiny-xl":
        from .testing import build_tiny_xl_pipeline

        pipe = build_tiny_xl_pipeline(seed=seed)
    elif spec in ("tiny-sd3", "tiny-flux"):  # SD3 / FLUX.1 in miniature (docs/mmdit.md)
        from .testing import build_tiny_flux_pipeline, build_tiny_sd3_pipeline

        pipe = (build_tiny_sd3_pipeline if spec == "tiny-sd3" else build_tiny_flux_pipeline)(seed=seed)
    elif spec == "shapes":
        # the folder ships without a tokenizer: it is the package's CLIP one (no second copy of the vocabulary)
        pipe = _load_pretrained(str(_shapes_folder()), torch_dtype, allow_pickle=False,
                                tokenizer=load_clip_tokenizer())
    else:
        pipe = _load_pretrained(spec, torch_dtype, allow_pickle)
    pipe.to(device=dev)
    net = getattr(pipe, "unet", None) or pipe.transformer
    if net.dtype != torch_dtype:
        pipe.to(dtype=torch_dtype)
    for module in (net, pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None),
                   getattr(pipe, "text_encoder_3", None)):
        if module is None:
            continue
        module.requires_grad_(False)
        module.eval()
    pipe.set_progress_bar_config(disable=True)
    set_scheduler(pipe, scheduler)
    return pipe


def _load_pretrained(spec: str, torch_dtype: torch.dtype, allow_pickle: bool, **components):
    kwargs = dict(torch_dtype=torch_dtype, use_safetensors=None if allow_pickle else True, **components)
    path = Path(spec).expanduser()
    if path.is_file():
        raise UnbleedError(f"--model {spec}: single-file checkpoints are not supported; convert it to a diffusers "
                           f"folder (diffusers' convert_original_stable_diffusion_to_diffusers.py) and pass the folder")
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise UnbleedError(f"--model {spec}: the folder has no model_index.json, so it is not a diffusers "
                               f"pipeline folder (save one with StableDiffusionPipeline.save_pretrained)")
        pickled = [d.name for d in sorted(path.iterdir()) if d.is_dir() and _has_weights(d, (".bin", ".ckpt", ".pt"))
                   and not _has_weights(d, (".safetensors",))]
        if pickled and not allow_pickle:
            raise UnbleedError(f"--model {spec}: {', '.join(pickled)} hold(s) only pickled weights (.bin), which "
                               f"can run code when loaded: convert them to safetensors, or pass --allow-pickle if "
                               f"you trust them")
        if "tokenizer" not in kwargs and not (path / "tokenizer").is_dir() and _names_component(path, "tokenizer"):
            if not (path / "unbleed_shapes.json").is_file():
                raise UnbleedError(f"--model {spec}: the folder has no tokenizer/ although its model_index.json names "
                                   f"one: copy the model's tokenizer folder there")
            # a shapes-world export without its tokenizer (the shipped model or a copy of it): the package's CLIP one
            kwargs["tokenizer"] = load_clip_tokenizer()
        try:
            return _from_pretrained(str(path), kwargs)
        except UnbleedError:
            raise
        except (OSError, ValueError) as err:
            raise UnbleedError(f"--model {spec}: could not load the folder as a Stable Diffusion (or SDXL) "
                               f"pipeline ({_first_line(err)})") from None
    if spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise UnbleedError(f"--model {spec}: no such folder, and it is not a hub id of the form owner/name: "
                           f"pass a local diffusers folder, a hub id, or one of: {', '.join(OFFLINE_MODELS)}")
    what = "a local diffusers folder (--model /path/to/folder) or, offline, --model tiny (or tiny-xl, shapes)"
    kwargs["local_files_only"] = hub.resolve(spec, "model_index.json", "--model", what)  # fast, one line
    try:
        return _from_pretrained(spec, kwargs)
    except UnbleedError:
        raise
    except Exception as err:  # hub errors come as many types (OSError, HTTP, connection, offline-mode)
        text = _first_line(err)
        if not allow_pickle and "safetensors" in text.lower():
            raise UnbleedError(f"--model {spec}: no safetensors weights in this repository; pass --allow-pickle "
                               f"to load its pickled .bin weights if you trust it") from None
        where = "the local cache" if kwargs["local_files_only"] else "the Hugging Face Hub"
        raise UnbleedError(f"--model {spec}: could not load it from {where} as a Stable Diffusion (or SDXL) "
                           f"pipeline ({type(err).__name__}: {text}); pass {what}") from None


def pipeline_class(name: str, local_files_only: bool = False):
    """The pipeline class for a folder or hub id, from its ``model_index.json``: ``StableDiffusionXLPipeline`` when
    it names an SDXL text-to-image pipeline, else ``StableDiffusionPipeline`` (SD 1.x / 2.x and their kin)."""
    from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    with warnings.catch_warnings():  # huggingface_hub's deprecation notes about diffusers' own download arguments
        warnings.simplefilter("ignore")
        class_name = str(DiffusionPipeline.load_config(name, local_files_only=local_files_only)
                         .get("_class_name", ""))
    if class_name in ("StableDiffusion3Pipeline", "FluxPipeline"):  # SD3/SD3.5 and FLUX.1 (docs/mmdit.md)
        import diffusers

        return getattr(diffusers, class_name)
    if class_name.startswith(("StableDiffusion3", "Flux")):
        raise UnbleedError(f"--model {name}: a {class_name}; unbleed samples text-to-image, so an SD3 or FLUX model "
                           f"must be a StableDiffusion3Pipeline or FluxPipeline")
    if "XL" not in class_name:
        return StableDiffusionPipeline
    if class_name != "StableDiffusionXLPipeline":
        raise UnbleedError(f"--model {name}: a {class_name}; unbleed samples text-to-image, so an SDXL model must "
                           f"be a StableDiffusionXLPipeline (e.g. {SDXL_MODEL}; the refiner is not one)")
    return StableDiffusionXLPipeline


def _from_pretrained(name: str, kwargs: dict):
    from diffusers import StableDiffusionPipeline

    cls = pipeline_class(name, kwargs.get("local_files_only", False))
    if cls is StableDiffusionPipeline:
        kwargs = dict(kwargs, safety_checker=None, requires_safety_checker=False)
    with warnings.catch_warnings():  # diffusers 0.42 renames torch_dtype to dtype; the old name works up to 1.0
        warnings.simplefilter("ignore", FutureWarning)
        return cls.from_pretrained(name, **kwargs)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    line = text[0] if text else type(err).__name__
    return line if len(line) <= 160 else line[:157] + "..."
