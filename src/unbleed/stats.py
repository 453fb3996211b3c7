"""Paired comparisons with confidence intervals, for benchmarks that score images as pass / fail.

Every comparison of a method with a baseline is *paired*: the same prompts and seeds, run once. Two tools:

* :func:`paired_bootstrap` — the difference of two rates with a 95 % percentile interval from a bootstrap over
  **prompts** (a cluster bootstrap: a resampled prompt brings all its seeds, for both methods). Images of one
  prompt are correlated (the prompt decides much of what fails), so resampling images as if independent would give
  intervals that are too narrow; resampling prompts keeps that correlation. This is the interval the benchmark
  reports.
* :func:`mcnemar_exact` — the exact (binomial) McNemar test on the image pairs, a p-value to go with it. It treats
  images as independent, so it is the more liberal of the two; the interval decides.

Conventions: outcomes are ``0/1`` arrays of shape ``[prompts, seeds]``; a difference is ``method − baseline``; an
interval that excludes 0 is a measured difference, one that contains 0 is "no measured difference".
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .errors import UnbleedError

RESAMPLES = 10_000
LEVEL = 0.95


def _as_matrix(x, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2 or a.size == 0:
        raise UnbleedError(f"{name}: expected outcomes of shape [prompts, seeds], got {tuple(np.shape(x))}")
    return a


def rate_interval(outcomes, *, resamples: int = RESAMPLES, level: float = LEVEL, seed: int = 0) -> dict[str, Any]:
    """A rate (mean of ``outcomes``) and its percentile interval from a bootstrap over prompts (rows)."""
    a = _as_matrix(outcomes, "outcomes")
    per_prompt = a.mean(1)
    lo, hi = _bootstrap_mean(per_prompt, resamples, level, seed)
    return {"rate": float(a.mean()), "ci": [lo, hi], "n": int(a.size)}


def paired_bootstrap(method, baseline, *, resamples: int = RESAMPLES, level: float = LEVEL,
                     seed: int = 0) -> dict[str, Any]:
    """``method − baseline`` rate difference with its ``level`` interval from a paired bootstrap over prompts.

    ``method`` and ``baseline`` are ``[prompts, seeds]`` outcomes of the same prompts and seeds. Each resample
    draws prompts with replacement and takes the mean of the per-image differences over the drawn prompts (all
    prompts have the same number of seeds, so this is the difference of the two rates on the resample). Returns
    ``{"diff", "ci": [lo, hi], "excludes_zero", "prompts", "images"}``."""
    m, b = _as_matrix(method, "method"), _as_matrix(baseline, "baseline")
    if m.shape != b.shape:
        raise UnbleedError(f"paired_bootstrap: method outcomes {m.shape} and baseline {b.shape} are not paired "
                           f"(same prompts × seeds)")
    per_prompt = (m - b).mean(1)
    lo, hi = _bootstrap_mean(per_prompt, resamples, level, seed)
    return {"diff": float((m - b).mean()), "ci": [lo, hi], "excludes_zero": bool(lo > 0 or hi < 0),
            "prompts": int(m.shape[0]), "images": int(m.size)}


def _bootstrap_mean(per_prompt: np.ndarray, resamples: int, level: float, seed: int) -> tuple[float, float]:
    if not 0 < level < 1:
        raise UnbleedError(f"level {level}: give a confidence level between 0 and 1, e.g. 0.95")
    if resamples < 100:
        raise UnbleedError(f"resamples {resamples}: use at least 100 (10,000 is the default)")
    n = len(per_prompt)
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    chunk = max(1, 2_000_000 // max(n, 1))  # keep the index matrix small
    for start in range(0, resamples, chunk):
        k = min(chunk, resamples - start)
        means[start:start + k] = per_prompt[rng.integers(0, n, size=(k, n))].mean(1)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha])
    return float(lo), float(hi)


def mcnemar_exact(method, baseline) -> dict[str, Any]:
    """Exact two-sided McNemar test on paired image outcomes: ``b`` = images where only ``method`` passes, ``c`` =
    only ``baseline``; under the null each discordant pair is a fair coin, ``p = min(1, 2·P[Bin(b+c, ½) ≤ min(b,
    c)])``."""
    m = np.asarray(method, dtype=bool).ravel()
    base = np.asarray(baseline, dtype=bool).ravel()
    if m.shape != base.shape:
        raise UnbleedError(f"mcnemar_exact: {m.size} and {base.size} outcomes are not paired")
    b = int((m & ~base).sum())
    c = int((~m & base).sum())
    n = b + c
    if n == 0:
        return {"only_method": 0, "only_baseline": 0, "p": 1.0}
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return {"only_method": b, "only_baseline": c, "p": min(1.0, 2 * tail)}


def compare(outcomes: dict[str, np.ndarray], baseline: str, *, resamples: int = RESAMPLES, level: float = LEVEL,
            seed: int = 0) -> dict[str, dict[str, Any]]:
    """Every contender against ``baseline``: ``{name: paired_bootstrap(...) | {"p": mcnemar p}}`` (the baseline
    itself is left out)."""
    if baseline not in outcomes:
        raise UnbleedError(f"baseline {baseline!r} is not among {', '.join(outcomes)}")
    out = {}
    for name, o in outcomes.items():
        if name == baseline:
            continue
        out[name] = {**paired_bootstrap(o, outcomes[baseline], resamples=resamples, level=level, seed=seed),
                     "p_mcnemar": mcnemar_exact(o, outcomes[baseline])["p"]}
    return out


__all__ = ["RESAMPLES", "LEVEL", "rate_interval", "paired_bootstrap", "mcnemar_exact", "compare"]
