"""Map preprocessing shared by several methods: a word's map from its pieces, Attend-and-Excite's token softmax
and Gaussian smoothing (also used by Divide & Bind, A-STAR, InitNO and CONFORM), Attend-and-Excite's loss (also
InitNO's cross-attention response score), Otsu's threshold (ELA, A-STAR, InitNO), and :class:`MapOptions`, the
preprocessing's options as one mixin for every method that uses it."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import UnbleedError

EPS = 1e-8


def check_kernel(size: int) -> None:
    """The smoothing kernel's size (``-o kernel_size=…``): odd and ≥ 1 (1 = no smoothing), as :func:`smooth` needs."""
    if size < 1 or size % 2 == 0:
        raise UnbleedError(f"-o kernel_size={size}: must be an odd number ≥ 1 (1 = no smoothing)", field="options")


def group_map(maps: torch.Tensor, indices: tuple[int, ...]) -> torch.Tensor:
    """A word's map: the mean over its token pieces (the default pooling for multi-piece words)."""
    return maps[:, list(indices)].mean(dim=1)


def gaussian_kernel(size: int = 3, sigma: float = 0.5) -> torch.Tensor:
    """The official A&E smoothing kernel: a product of ``exp(−((x − μ)/(2σ))²)`` per axis, normalised to sum 1."""
    grid = torch.arange(size, dtype=torch.float32)
    mean = (size - 1) / 2
    g = torch.exp(-(((grid - mean) / (2 * sigma)) ** 2))
    k = g[:, None] * g[None, :]
    return k / k.sum()


def smooth(x: torch.Tensor, size: int = 3, sigma: float = 0.5) -> torch.Tensor:
    """Smooth every ``[h, w]`` map of ``x`` ``[..., h, w]`` with :func:`gaussian_kernel` and reflect padding (as the
    official code; replicate padding where a side is too short to reflect). ``size=1`` is the identity."""
    if size <= 1:
        return x
    pad = size // 2
    h, w = x.shape[-2:]
    flat = F.pad(x.reshape(-1, 1, h, w), (pad, pad, pad, pad), mode="reflect" if min(h, w) > pad else "replicate")
    return F.conv2d(flat, gaussian_kernel(size, sigma).to(x)[None, None]).reshape(x.shape)


def token_probs(maps: torch.Tensor, last: int, temperature: float = 100.0) -> torch.Tensor:
    """``[B, tokens, h, w]`` → ``[B, last − 1, h, w]``: columns ``1…last−1``, ×temperature, softmax over them.
    Token ``i`` is column ``i − 1`` of the result (A&E sec. 3.1)."""
    return torch.softmax(maps[:, 1:last] * temperature, dim=1)


def subject_maps(maps: torch.Tensor, subjects: list[tuple[int, ...]], last: int, temperature: float = 100.0,
                 kernel_size: int = 3, sigma: float = 0.5) -> torch.Tensor:
    """A&E's map preprocessing: ``[B, 77, h, w]`` raw probabilities → ``[B, len(subjects), h, w]``:
    :func:`token_probs`, each subject the mean of its pieces' columns, smoothed (``kernel_size=1``: not
    smoothed)."""
    probs = token_probs(maps, last, temperature)
    out = torch.stack([probs[:, [i - 1 for i in idx]].mean(1) for idx in subjects], 1)
    return smooth(out, kernel_size, sigma)


@dataclass
class MapOptions:
    """Attend-and-Excite's map preprocessing as options (``-o key=value``), declared once for every method that
    uses it (Attend-and-Excite, Divide & Bind, A-STAR, InitNO, CONFORM): ``map_scale`` (the ×100 before the token
    softmax), ``smooth``, ``kernel_size`` and ``sigma`` (the Gaussian smoothing; ``smooth=false`` or
    ``kernel_size=1``: none). Defaults are the official codes' (the same in all five).

    A method lists it first among its bases, calls :meth:`check_maps` from its ``check`` and preprocesses with
    :meth:`preprocess` / :meth:`smoothed`. Which softmax columns enter (``exclude_padding``) stays each method's
    own option: the official codes' defaults differ (A&E per model family, Divide & Bind and InitNO ``1:-1``)."""

    map_scale: float = 100.0
    smooth: bool = True
    kernel_size: int = 3
    sigma: float = 0.5

    def check_maps(self) -> None:
        """One line naming the bad option: ``map_scale`` and ``sigma`` finite and > 0, ``kernel_size`` odd ≥ 1."""
        for name in ("map_scale", "sigma"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise UnbleedError(f"-o {name}={value}: must be a finite number > 0", field="options")
        check_kernel(self.kernel_size)

    @property
    def smoothing_kernel(self) -> int:
        """The kernel size :func:`smooth` gets: ``kernel_size``, or 1 (no smoothing) with ``smooth=false``."""
        return self.kernel_size if self.smooth else 1

    def smoothed(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[..., h, w]`` smoothed as these options say."""
        return smooth(x, self.smoothing_kernel, self.sigma)

    def preprocess(self, maps: torch.Tensor, subjects: list[tuple[int, ...]], last: int) -> torch.Tensor:
        """:func:`subject_maps` with these options: ``[B, 77, h, w]`` → ``[B, len(subjects), h, w]``."""
        return subject_maps(maps, subjects, last, self.map_scale, self.smoothing_kernel, self.sigma)


def excite_loss(max_attention: torch.Tensor) -> torch.Tensor:
    """Attend-and-Excite's Eq. 1, ``max_s max(0, 1 − max A_s)`` per sample; ``max_attention`` is ``[B, subjects]``.
    It is also InitNO's cross-attention response score (``fn_compute_loss``'s ``cross_attn_loss``)."""
    return (1 - max_attention).clamp_min(0).amax(-1)


def otsu_threshold(x: torch.Tensor, bins: int = 256) -> torch.Tensor:
    """Otsu's threshold for each map of ``x`` ``[..., h, w]``; returns ``[...]`` in the units of ``x``.

    Pixels strictly above the threshold form the foreground. A constant map gets its own value as threshold
    (so nothing is foreground).
    """
    flat = x.flatten(-2).float()
    lo, hi = flat.min(-1, keepdim=True).values, flat.max(-1, keepdim=True).values
    span = (hi - lo).clamp_min(EPS)
    idx = ((flat - lo) / span * (bins - 1)).round().long().clamp(0, bins - 1)
    hist = torch.zeros(*flat.shape[:-1], bins, device=x.device).scatter_add_(-1, idx, torch.ones_like(flat))
    p = hist / flat.shape[-1]
    levels = torch.arange(bins, device=x.device, dtype=torch.float32)
    w0 = p.cumsum(-1)
    mu = (p * levels).cumsum(-1)
    mu_t = mu[..., -1:]
    between = (mu_t * w0 - mu) ** 2 / (w0 * (1 - w0)).clamp_min(EPS)
    between = torch.where((w0 > 0) & (w0 < 1), between, torch.full_like(between, -1.0))
    t = between.argmax(-1, keepdim=True).float()  # class 0 = bins 0..t
    thr = lo + (t + 0.5) / (bins - 1) * span
    constant = (hi - lo) <= EPS
    return torch.where(constant, hi, thr).squeeze(-1)


def binarize(x: torch.Tensor, how: str = "otsu") -> torch.Tensor:
    """``B(x)``: a float {0, 1} mask per map of ``x`` ``[..., h, w]``: ``otsu`` (Otsu's threshold), ``mean`` (above
    the map's mean) or ``norm:τ`` (min–max normalised, above τ)."""
    if how == "otsu":
        thr = otsu_threshold(x)
    elif how == "mean":
        thr = x.flatten(-2).mean(-1)
    elif how.startswith("norm"):
        tau = float(how.split(":", 1)[1]) if ":" in how else 0.5
        flat = x.flatten(-2)
        lo, hi = flat.min(-1).values, flat.max(-1).values
        thr = lo + tau * (hi - lo)
        return ((x > thr[..., None, None]) & ((hi - lo) > EPS)[..., None, None]).float()
    else:
        raise UnbleedError(f"-o binarize={how}: unknown; use otsu, mean or norm:TAU (e.g. norm:0.5)",
                           field="options")
    return (x > thr[..., None, None]).float()
