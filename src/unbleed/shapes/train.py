"""``unbleed shapes train``: train the shapes model from scratch, seeded, checkpointed and resumable.

Recipe (two phases, one command):

1. **VAE** (``vae_steps``): the :class:`~diffusers.AutoencoderKL` learns to reconstruct rendered scenes
   (L1 + MSE with object pixels weighted 10× the background, KL weight 1e-6 as in latent-diffusion
   autoencoders). Its latents' standard deviation then sets
   ``scaling_factor`` (SD's convention: unit-variance latents for the UNet).
2. **Diffusion** (``steps``): text encoder and UNet trained jointly from scratch on the frozen VAE's latents,
   SD 1.x's objective (ε-prediction, the scaled-linear 1000-step schedule), Min-SNR-γ loss weights (Hang et al.
   2023, γ = 5), AdamW with linear warm-up then a constant (``lr_decay="constant"``) or cosine-annealed
   learning rate (the shipped model: constant to step 4,000, then cosine to 0 at 10,000), gradient clipping at 1,
   an EMA of the weights (the EMA is what gets exported), and 10 % of captions dropped to "" for classifier-free
   guidance. Optional, off by default and for the shipped model: ``clean_pads`` (the UNet sees the empty caption's
   end-of-text and padding outputs, and an auxiliary loss teaches the encoder to produce them:
   :meth:`Trainer.with_clean_pads`) and ``p_words_only`` (:meth:`Trainer.words_only_mask`), which make the words
   the only road by which the caption reaches the UNet.

Data come from the world (:mod:`unbleed.shapes.world`, split ``train``: held-out colour–shape pairs never
appear) rendered on the fly: step ``k``'s batch is a pure function of ``(seed, phase, k)``, and the noise comes
from a torch generator whose state is checkpointed, so a resumed run continues exactly where it stopped.
The caption distribution is ``p_objects`` (1, 2, 3 objects; default mostly single objects), which is what makes
plain sampling good at one object and unreliable at two.

A checkpoint (every ``checkpoint_every`` steps, and at the end) is ``OUT/checkpoint/`` — ``state.safetensors``
(weights, EMA, optimiser moments, generator state) and ``state.json`` (step counters, config) — replaced
atomically, so a run killed at any moment resumes from the last complete one; and ``OUT/pipeline/``, the EMA
weights as an SD pipeline folder (fp16 safetensors) that ``--model OUT/pipeline`` loads.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from dataclasses import dataclass, fields
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from .. import checks
from ..errors import UnbleedError
from .model import ARCHS, Arch, IMAGE_SIZE, build_components, make_pipeline, noise_schedule
from .render import render
from .world import BACKGROUND, COLOURS, SHAPES, caption, sample_scene


LR_DECAYS = ("constant", "cosine")


@dataclass
class TrainConfig:
    steps: int = 4000  # diffusion steps (total, including those already done when resuming)
    vae_steps: int = 1500
    batch: int = 64
    vae_batch: int = 16
    lr: float = 1e-3
    vae_lr: float = 2e-3
    warmup: int = 200
    lr_decay: str = "constant"  # "constant" after warm-up, or "cosine" from the warm-up's start down to 0 at ``steps``
    ema: float = 0.999
    p_objects: tuple[float, float, float] = (0.5, 0.4, 0.1)
    p_uncond: float = 0.1
    p_words_only: float = 0.0  # captioned samples whose cross-attention sees only start-of-text and the words
    clean_pads: bool = False  # end-of-text + padding: the empty caption's, and the text encoder learns to produce it
    keep_eot: bool = False  # with clean_pads: the end-of-text column stays the caption's; only the padding is cleaned
    count_eot: bool = False  # with clean_pads: end-of-text = the caption template's (the count, no identities)
    pad_caption: str = ""  # with clean_pads: a captioned sample's clean columns are this caption's, not the empty one's
    min_snr: float = 5.0
    seed: int = 0
    arch: str = "default"
    checkpoint_every: int = 250

    # settings that may change when a run is resumed (the rest must match the checkpoint; a changed ``lr_decay``
    # applies from the resumed step on, on the same curve as if it had been set from the start; so does a changed
    # ``pad_caption``, a new target for the clean columns); ``vae_steps`` only while the VAE phase is running and not
    # below the steps it has done
    RESUMABLE = ("steps", "checkpoint_every", "vae_steps", "lr_decay", "pad_caption")

    def validate(self) -> "TrainConfig":
        if self.arch not in ARCHS:
            raise UnbleedError(f"--arch {self.arch!r} is unknown: use one of {', '.join(ARCHS)}")
        # every number through the one validation layer (whole, finite, in range), named by its flag
        self.steps = checks.whole(self.steps, "--steps", 1, fix=": the diffusion phase makes the model "
                                                                "(OUT/pipeline); raise it to train on")
        for name, low in (("vae_steps", 0), ("batch", 1), ("vae_batch", 1), ("checkpoint_every", 1), ("warmup", 0),
                          ("seed", 0)):
            setattr(self, name, checks.whole(getattr(self, name), f"--{name.replace('_', '-')}", low))
        for name in ("lr", "vae_lr", "min_snr"):
            setattr(self, name, checks.real(getattr(self, name), f"--{name.replace('_', '-')}", 0, low_open=True))
        self.ema = checks.real(self.ema, "--ema", 0, 1, high_open=True, fix=" (the EMA decay, e.g. 0.999)")
        p = self.p_objects
        if len(p) != 3 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in p) or min(p) < 0 \
                or abs(sum(p) - 1) > 1e-6:
            raise UnbleedError(f"--p-objects {','.join(map(str, p))}: give three probabilities (1, 2, 3 objects) "
                               f"that sum to 1")
        if self.lr_decay not in LR_DECAYS:
            raise UnbleedError(f"--lr-decay {self.lr_decay!r}: use one of {', '.join(LR_DECAYS)}")
        self.p_uncond = checks.real(self.p_uncond, "--p-uncond", 0, 1, high_open=True, fix=" (a probability)")
        self.p_words_only = checks.real(self.p_words_only, "--p-words-only", 0, 1, fix=" (a probability)")
        if self.keep_eot and not self.clean_pads:
            raise UnbleedError("--keep-eot keeps the end-of-text column when --clean-pads cleans the padding: add "
                               "--clean-pads, or drop --keep-eot")
        if self.count_eot and (self.keep_eot or not self.clean_pads):
            raise UnbleedError("--count-eot sets the end-of-text column when --clean-pads cleans it: use it with "
                               "--clean-pads and without --keep-eot")
        if not isinstance(self.pad_caption, str):
            raise UnbleedError(f"--pad-caption {self.pad_caption!r}: give a short text, e.g. 'a'")
        self.pad_caption = " ".join(self.pad_caption.split())
        if self.pad_caption and (not self.clean_pads or self.count_eot):
            raise UnbleedError("--pad-caption sets what --clean-pads puts in the end-of-text and padding columns: "
                               "use it with --clean-pads and without --count-eot")
        if len(self.pad_caption.split()) > 2 or set(self.pad_caption.lower().split()) & (set(COLOURS) | set(SHAPES)):
            raise UnbleedError(f"--pad-caption {self.pad_caption!r}: use at most two words and no colour or shape "
                               f"(e.g. 'a'): its end-of-text must come before every caption's, and it must name "
                               f"nothing the captions name")
        return self

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


DEFAULTS = {f.name: f.default for f in fields(TrainConfig)}  # a checkpoint older than a setting has its default

# ------------------------------------------------------------------------------------------------ data

PHASES = {"vae": 0, "diffusion": 1, "scale": 2}

def scene_batch(cfg: TrainConfig, phase: str, step: int, n: int) -> tuple[torch.Tensor, list[str]]:
    """Step ``step``'s batch of ``phase`` ("vae" | "diffusion"): images in [-1, 1] and captions (some ""),
    a pure function of ``(cfg.seed, phase, step)``."""
    rng = np.random.default_rng([cfg.seed, PHASES[phase], step])
    images, texts = [], []
    for _ in range(n):
        k = int(rng.choice(3, p=cfg.p_objects)) + 1
        scene = sample_scene(rng, n_objects=k, size=IMAGE_SIZE, split="train")
        images.append(np.asarray(render(scene)))
        text = caption(scene, rng)
        texts.append("" if rng.random() < cfg.p_uncond else text)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return x, texts


@lru_cache(maxsize=4096)
def _token_ids(tokenizer, text: str) -> tuple[int, ...]:
    return tuple(tokenizer(text, padding="max_length", max_length=tokenizer.model_max_length,
                           truncation=True).input_ids)


def token_ids(tokenizer, texts: list[str]) -> torch.Tensor:
    return torch.tensor([_token_ids(tokenizer, t) for t in texts])


PLACEHOLDER = "thing"
_IDENTITY_RE = re.compile(r"\b(" + "|".join([*COLOURS, *SHAPES]) + r")\b", re.IGNORECASE)
_AN_RE = re.compile(r"\ban\b", re.IGNORECASE)


def template(text: str) -> str:
    """A caption with every colour and shape word replaced by one placeholder (and "an" by "a", which would tell a
    vowel-initial colour): what it says of how many objects and where, without which. ``count_eot`` teaches the
    end-of-text column to carry the template's encoding."""
    return _AN_RE.sub("a", _IDENTITY_RE.sub(PLACEHOLDER, text))


def eot_positions(ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """``[B]``: each row's end-of-text column (its first ``eos_token_id``)."""
    return (ids == eos_token_id).int().argmax(1)


def summary_columns(ids: torch.Tensor, eos_token_id: int, keep_eot: bool = False) -> torch.Tensor:
    """``[B, L]`` bool: True at each row's end-of-text (its first ``eos_token_id``) and at the padding after it;
    with ``keep_eot``, at the padding after the end-of-text only."""
    first = eot_positions(ids, eos_token_id) + int(keep_eot)
    return torch.arange(ids.shape[1], device=ids.device)[None, :] >= first[:, None]


# ------------------------------------------------------------------------------------------------ state

class Trainer:
    """Holds the networks, optimisers and counters; :meth:`run` trains up to ``cfg.steps``."""

    def __init__(self, out: str | os.PathLike, cfg: TrainConfig, device: torch.device):
        self.out = Path(out)
        self.cfg = cfg.validate()
        self.device = device
        parts = build_components(ARCHS[cfg.arch], seed=cfg.seed)
        self.tokenizer, self.scheduler = parts["tokenizer"], parts["scheduler"]
        self.text_encoder, self.unet, self.vae = (parts[k].to(device) for k in ("text_encoder", "unet", "vae"))
        self.ema = {k: v.detach().clone() for k, v in self._diffusion_params()}
        self.vae_opt = torch.optim.AdamW(self.vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
        self.opt = torch.optim.AdamW([p for _, p in self._diffusion_params()], lr=cfg.lr, weight_decay=0.0)
        self.gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
        self.vae_step = 0
        self.step = 0
        self.scaled = False  # scaling_factor measured on the trained VAE
        self.warmup_from = 0  # the step the learning-rate warm-up starts at (a warm start restarts it)
        self.noise = noise_schedule()
        self.alphas_cumprod = self.noise.alphas_cumprod.to(device)

    def _diffusion_params(self):
        for prefix, module in (("text_encoder", self.text_encoder), ("unet", self.unet)):
            for name, p in module.named_parameters():
                yield f"{prefix}.{name}", p

    # --- checkpoints

    @property
    def ckpt_dir(self) -> Path:
        return self.out / "checkpoint"

    def save(self) -> None:
        """Write the checkpoint atomically (new folder, then rename) and export the EMA pipeline."""
        from safetensors.torch import save_file

        tensors: dict[str, torch.Tensor] = {}
        for prefix, module in (("text_encoder", self.text_encoder), ("unet", self.unet), ("vae", self.vae)):
            for k, v in module.state_dict().items():
                tensors[f"model.{prefix}.{k}"] = v
        for k, v in self.ema.items():
            tensors[f"ema.{k}"] = v
        groups = {}
        for name, opt in (("opt", self.opt), ("vae_opt", self.vae_opt)):
            sd = opt.state_dict()
            for idx, st in sd["state"].items():
                for k, v in st.items():
                    tensors[f"{name}.{idx}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
            groups[name] = sd["param_groups"]
        tensors["rng.torch"] = self.gen.get_state()
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        meta = {"step": self.step, "vae_step": self.vae_step, "scaled": self.scaled,
                "warmup_from": self.warmup_from, "config": self.cfg.to_dict(),
                "arch": ARCHS[self.cfg.arch].to_dict(), "param_groups": groups,
                "scaling_factor": float(self.vae.config.scaling_factor)}
        tmp = self.out / "checkpoint.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(tensors, str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps(meta, indent=1))
        old = self.out / "checkpoint.old"
        shutil.rmtree(old, ignore_errors=True)
        if self.ckpt_dir.exists():
            self.ckpt_dir.rename(old)
        tmp.rename(self.ckpt_dir)
        shutil.rmtree(old, ignore_errors=True)
        self.export(self.out / "pipeline")

    def load(self) -> bool:
        """Resume from ``OUT/checkpoint`` (or the previous one, if a save was interrupted); False when none."""
        from safetensors.torch import load_file

        folder = self.ckpt_dir if (self.ckpt_dir / "state.json").is_file() else self.out / "checkpoint.old"
        if not (folder / "state.json").is_file():
            return False
        meta = json.loads((folder / "state.json").read_text())
        saved = meta["config"]
        for k, v in self.cfg.to_dict().items():
            if k in TrainConfig.RESUMABLE:
                continue
            if (list(v) if isinstance(v, tuple) else v) != saved.get(k, DEFAULTS.get(k)):
                raise UnbleedError(f"{self.out}: the checkpoint was trained with {k}={saved.get(k)!r}, not {v!r}: "
                                   f"resume with the same settings (only --steps may change), or use a new --out")
        if self.cfg.vae_steps != saved["vae_steps"] and (meta["scaled"] or meta["vae_step"] > self.cfg.vae_steps):
            raise UnbleedError(f"{self.out}: --vae-steps {self.cfg.vae_steps}: the VAE phase of this run "
                               f"{'is over' if meta['scaled'] else 'is past it'} ({meta['vae_step']} steps done): "
                               f"resume with --vae-steps {saved['vae_steps']}")
        tensors = load_file(str(folder / "state.safetensors"))
        for prefix, module in (("text_encoder", self.text_encoder), ("unet", self.unet), ("vae", self.vae)):
            module.load_state_dict({k[len(f"model.{prefix}."):]: v for k, v in tensors.items()
                                    if k.startswith(f"model.{prefix}.")})
        self.ema = {k[4:]: v.to(self.device) for k, v in tensors.items() if k.startswith("ema.")}
        for name, opt in (("opt", self.opt), ("vae_opt", self.vae_opt)):
            state: dict[int, dict] = {}
            for k, v in tensors.items():
                if k.startswith(name + "."):
                    _, idx, key = k.split(".", 2)
                    state.setdefault(int(idx), {})[key] = v.to(self.device) if key != "step" else v
            opt.load_state_dict({"state": state, "param_groups": meta["param_groups"][name]})
        self.gen.set_state(tensors["rng.torch"])
        self.step, self.vae_step, self.scaled = meta["step"], meta["vae_step"], meta["scaled"]
        self.warmup_from = meta.get("warmup_from", 0)
        self.vae.register_to_config(scaling_factor=meta["scaling_factor"])
        return True

    def export(self, path: Path, dtype: torch.dtype = torch.float16) -> Path:
        """The EMA weights as an SD pipeline folder (safetensors in ``dtype``)."""
        import copy

        text_encoder, unet = copy.deepcopy(self.text_encoder), copy.deepcopy(self.unet)
        own = dict(text_encoder=text_encoder, unet=unet)
        with torch.no_grad():
            for key, v in self.ema.items():
                prefix, name = key.split(".", 1)
                own[prefix].get_parameter(name).copy_(v)
        pipe = make_pipeline({"tokenizer": self.tokenizer, "text_encoder": text_encoder, "unet": unet,
                              "vae": copy.deepcopy(self.vae), "scheduler": self.scheduler})
        pipe.to(dtype=dtype)
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / "unbleed_shapes.json").write_text(json.dumps(
            {"step": self.step, "vae_step": self.vae_step, "config": self.cfg.to_dict(),
             "arch": ARCHS[self.cfg.arch].to_dict()}, indent=1))
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
        return path

    # --- training

    def vae_update(self) -> float:
        cfg = self.cfg
        x, _ = scene_batch(cfg, "vae", self.vae_step, cfg.vae_batch)
        x = x.to(self.device)
        lr = cfg.vae_lr * min(1.0, (self.vae_step + 1) / max(1, cfg.warmup))  # never warm-started
        for g in self.vae_opt.param_groups:
            g["lr"] = lr
        post = self.vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=self.gen).to(self.device)
        rec = self.vae.decode(z).sample
        # object pixels weigh 10x the background: they are ~15 % of the image and all that matters
        bg = torch.tensor(BACKGROUND, device=x.device).view(1, 3, 1, 1) / 127.5 - 1
        w = 1 + 9 * ((x - bg).abs().amax(1, keepdim=True) > 0.02).float()
        err = rec - x
        loss = ((w * (err.abs() + err.pow(2))).sum() / (3 * w.sum()) + 1e-6 * post.kl().mean())
        self.vae_opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.vae.parameters(), 1.0)
        self.vae_opt.step()
        self.vae_step += 1
        return loss.item()

    @torch.no_grad()
    def set_scaling_factor(self, n: int = 256) -> float:
        """SD's convention: ``scaling_factor = 1 / std`` of the VAE's latents (measured on ``n`` scenes)."""
        x, _ = scene_batch(self.cfg, "scale", 0, n)
        std = float(self.vae.encode(x.to(self.device)).latent_dist.mean.std())
        self.vae.register_to_config(scaling_factor=1.0 / std)
        self.scaled = True
        return 1.0 / std

    def diffusion_update(self) -> float:
        cfg = self.cfg
        x, texts = scene_batch(cfg, "diffusion", self.step, cfg.batch)
        x = x.to(self.device)
        with torch.no_grad():
            post = self.vae.encode(x).latent_dist
            z = (post.mean + post.std * torch.randn(post.mean.shape, generator=self.gen).to(self.device))
            z = z * self.vae.config.scaling_factor
        noise = torch.randn(z.shape, generator=self.gen).to(self.device)
        t = torch.randint(0, self.noise.config.num_train_timesteps, (z.shape[0],), generator=self.gen).to(self.device)
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * z + (1 - a).sqrt() * noise
        ids = token_ids(self.tokenizer, texts).to(self.device)
        lr = self._lr(cfg.lr, self.step)
        for g in self.opt.param_groups:
            g["lr"] = lr
        cond = self.text_encoder(ids)[0]
        pad_loss = None
        if cfg.clean_pads:
            cond, pad_loss = self.with_clean_pads(ids, cond, texts)
        pred = self.unet(noisy, t, cond, encoder_attention_mask=self.words_only_mask(ids, texts)).sample
        snr = a.view(-1) / (1 - a.view(-1))
        weight = torch.clamp(snr, max=cfg.min_snr) / snr  # Min-SNR-γ for ε-prediction
        loss = (weight * (pred - noise).pow(2).mean(dim=(1, 2, 3))).mean()
        self.opt.zero_grad(set_to_none=True)
        (loss if pad_loss is None else loss + pad_loss).backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in self._diffusion_params()], 1.0)
        self.opt.step()
        self.step += 1
        decay = min(cfg.ema, (1 + self.step) / (10 + self.step))
        with torch.no_grad():
            for k, p in self._diffusion_params():
                self.ema[k].lerp_(p.detach(), 1 - decay)
        return loss.item()

    def words_only_mask(self, ids: torch.Tensor, texts: list[str]) -> torch.Tensor | None:
        """``[B, 77]`` key mask for the UNet's cross-attention (1 = visible), or None when ``p_words_only`` is 0:
        each captioned sample, with probability ``p_words_only`` (drawn from the run's generator, so resumable),
        has its end-of-text and padding columns hidden. A causal text encoder trained jointly with the UNet
        otherwise writes the whole caption into those ~60 summary columns too, and the UNet draws an object from its
        words *or* from them — then a word's attention map is not a lever on what is drawn (docs/shapes.md, "Why
        the control fails"). Weaker than ``clean_pads``: the summary stays visible in the other samples."""
        if not self.cfg.p_words_only:
            return None
        hide = torch.rand(len(texts), generator=self.gen) < self.cfg.p_words_only
        hide &= torch.tensor([bool(t) for t in texts])
        return (~(summary_columns(ids, self.tokenizer.eos_token_id) & hide[:, None].to(ids.device))).float()

    def with_clean_pads(self, ids: torch.Tensor, cond: torch.Tensor,
                        texts: list[str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``clean_pads``: the text encoder's outputs with the end-of-text column and every padding column after it
        replaced by the empty caption's output at that position ("clean pads", Toker et al., *Padding Tone*,
        NAACL 2025), and the mean squared distance of the encoder's own outputs there from those (detached) clean
        ones (empty captions are clean already and add 0) — a loss that teaches the encoder to put nothing of the
        caption in those columns. A causal encoder trained jointly with the UNet otherwise writes the whole caption
        into them, and the UNet draws an object from its words *or* from them (docs/shapes.md, "Why the control
        fails"); a frozen CLIP's padding, by contrast, carries nothing SD uses (Toker et al.). So, in an ordinary
        SD pipeline at inference, the caption reaches the UNet only through its words. The training log's loss is
        the diffusion loss alone. With ``keep_eot`` the end-of-text column is left as the encoder writes it (as a
        frozen CLIP's end-of-text, which does carry the caption) and only the padding after it is cleaned: one
        summary column, from which the UNet can read how many objects the caption names. With ``count_eot`` (which
        needs ``texts``, the captions of ``ids``) the end-of-text column's clean value is the encoder's (detached)
        end-of-text output for the caption's :func:`template` instead: a summary of how many objects, never which
        (tried in session 9: more duplicates, and the control failed; docs/shapes.md). With ``pad_caption`` (e.g.
        "a": no colour, no shape) a *captioned* sample's clean columns are the encoder's (detached) outputs for that
        caption at the same positions, its padding, while an empty caption keeps its own: the columns then carry one
        bit, captioned or not, and nothing of which caption. Without it a captioned sample's padding equals the
        unconditional sample's column for column, so a pixel that attends to the padding reads "any scene" —
        session 11's reading of the duplicates that clean pads add to single objects (docs/shapes.md). Measured
        there, it does not do what it says: the target comes from the encoder being trained, whose post-end-of-text
        outputs the clean-pads loss makes nearly caption-independent, so after 3,400 steps the encoder's padding
        for "a" and for "" were a squared distance 0.004 apart (its words: 22 from the empty caption's); even the
        shipped encoder puts them only 0.03 apart (a caption's padding: 16.7;
        ``scripts/shapes_pad_distance.py --versus a``). The bit is not there; a
        fixed target that is not the encoder's output would be the real test."""
        empty = token_ids(self.tokenizer, [""]).to(ids.device)
        clean = self.text_encoder(empty)[0].detach()[0].expand_as(cond)
        pad = summary_columns(ids, self.tokenizer.eos_token_id, keep_eot=self.cfg.keep_eot)
        if self.cfg.pad_caption:
            pad_ids = token_ids(self.tokenizer, [self.cfg.pad_caption]).to(ids.device)
            neutral = self.text_encoder(pad_ids)[0].detach()
            eot = eot_positions(ids, self.tokenizer.eos_token_id)
            uncond = (eot == 1)[:, None, None]  # the empty caption: its end-of-text right after start-of-text
            own = int(eot_positions(pad_ids, self.tokenizer.eos_token_id))
            if bool((eot[~uncond.view(-1)] <= own).any()):
                raise UnbleedError(f"--pad-caption {self.cfg.pad_caption!r} is as long as a caption it would clean "
                                   f"({own - 1} tokens): use a shorter one, e.g. 'a'")
            clean = torch.where(uncond, clean, neutral[0].expand_as(cond))
        if self.cfg.count_eot:
            if texts is None or len(texts) != len(ids):
                raise UnbleedError("count_eot needs the captions of the token ids (texts)")
            t_ids = token_ids(self.tokenizer, [template(t) for t in texts]).to(ids.device)
            rows = torch.arange(len(ids), device=ids.device)
            with torch.no_grad():
                summary = self.text_encoder(t_ids)[0][rows, eot_positions(t_ids, self.tokenizer.eos_token_id)]
            clean = clean.clone()
            clean[rows, eot_positions(ids, self.tokenizer.eos_token_id)] = summary
        loss = ((cond - clean).pow(2).mean(-1) * pad).sum() / pad.sum().clamp(min=1)
        return torch.where(pad[..., None], clean, cond), loss

    def run(self, progress=None, log=None) -> dict:
        """Train both phases up to the configured step counts, checkpointing as it goes.

        ``progress(phase, done, total, loss)`` is called after every step; ``log`` is a file for JSON lines."""
        cfg = self.cfg
        started = time.time()
        phases = (("vae", cfg.vae_steps, self.vae_update), ("diffusion", cfg.steps, self.diffusion_update))
        for phase, total, update in phases:
            counter = "vae_step" if phase == "vae" else "step"
            if phase == "diffusion" and not self.scaled:
                self.set_scaling_factor()
            self.vae.requires_grad_(phase == "vae")
            running = None
            while getattr(self, counter) < total:
                loss = update()
                running = loss if running is None else 0.98 * running + 0.02 * loss
                done = getattr(self, counter)
                if progress:
                    progress(phase, done, total, running)
                if log and (done % 50 == 0 or done == total):
                    log.write(json.dumps({"phase": phase, "step": done, "loss": round(running, 5),
                                          "seconds": round(time.time() - started, 1)}) + "\n")
                    log.flush()
                if done % cfg.checkpoint_every == 0 or done == total:
                    self.save()
        return {"step": self.step, "vae_step": self.vae_step, "seconds": time.time() - started,
                "scaling_factor": float(self.vae.config.scaling_factor)}


    def warm_start(self, folder: str | os.PathLike) -> None:
        """Start from an exported pipeline's weights (e.g. the shipped model) instead of a random init.

        Weights, EMA, the VAE's scaling factor and the step counters come from the folder; the optimiser moments
        and the generator do not (an export has none), so this continues training but is not an exact resume —
        the learning-rate warm-up restarts to protect the fresh moments."""
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel

        folder = Path(folder)
        try:
            info = json.loads((folder / "unbleed_shapes.json").read_text())
            same = Arch.from_dict(info["arch"]) == ARCHS[self.cfg.arch]
            parts = {"text_encoder": CLIPTextModel.from_pretrained(folder / "text_encoder", use_safetensors=True),
                     "unet": UNet2DConditionModel.from_pretrained(folder / "unet", use_safetensors=True),
                     "vae": AutoencoderKL.from_pretrained(folder / "vae", use_safetensors=True)}
        except (OSError, KeyError, ValueError) as err:
            raise UnbleedError(f"--init-from {folder}: not a pipeline exported by 'unbleed shapes train' "
                               f"({type(err).__name__})") from None
        if not same:
            raise UnbleedError(f"--init-from {folder}: it has another architecture than --arch {self.cfg.arch}")
        for name, module in (("text_encoder", self.text_encoder), ("unet", self.unet), ("vae", self.vae)):
            module.load_state_dict({k: v.float() for k, v in parts[name].state_dict().items()})
        self.vae.register_to_config(scaling_factor=parts["vae"].config.scaling_factor)
        self.ema = {k: v.detach().clone() for k, v in self._diffusion_params()}
        self.vae_step, self.step, self.scaled = self.cfg.vae_steps, int(info["step"]), True
        self.warmup_from = self.step

    def _lr(self, base: float, step: int) -> float:
        """Linear warm-up over ``warmup`` steps from ``warmup_from``, then constant or (``lr_decay="cosine"``)
        half a cosine from ``warmup_from`` to 0 at ``steps``, so a warm start anneals over its own steps."""
        lr = base * min(1.0, (step - self.warmup_from + 1) / max(1, self.cfg.warmup))
        if self.cfg.lr_decay == "cosine":
            span = max(1, self.cfg.steps - self.warmup_from)
            lr *= 0.5 * (1 + math.cos(math.pi * min(1.0, (step - self.warmup_from) / span)))
        return lr


def train(out: str | os.PathLike, cfg: TrainConfig, device: str | None = "auto", progress=None,
          init_from: str | os.PathLike | None = None) -> dict:
    """Train (or resume) into ``out``; returns the final counters. See the module docstring for the recipe.

    ``init_from``: a fresh run starts from that exported pipeline's weights (:meth:`Trainer.warm_start`)."""
    from ..models import resolve_device

    trainer = Trainer(out, cfg, resolve_device(device))
    resumed = trainer.load()
    if init_from is not None and not resumed:
        trainer.warm_start(init_from)
    trainer.out.mkdir(parents=True, exist_ok=True)
    with open(trainer.out / "log.jsonl", "a") as log:
        result = trainer.run(progress=progress, log=log)
    result["resumed"] = resumed
    return result


__all__ = ["TrainConfig", "Trainer", "scene_batch", "summary_columns", "token_ids", "train"]
