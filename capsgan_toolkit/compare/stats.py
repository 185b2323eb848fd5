"""Statistics over seeds: means, t-intervals, paired differences, bootstrap intervals, verdicts.

What is used where (docs/compare.md says the same):

- per arm and metric: mean, sample standard deviation (ddof=1) and a 95 % Student-t
  interval of the mean over seeds (n - 1 degrees of freedom);
- per arm against the baseline: the paired differences arm(seed k) - baseline(seed k) over
  the seeds both have, their mean, a 95 % Student-t interval of that mean (this one decides
  the verdict) and, beside it, a 95 % percentile bootstrap interval of the mean difference
  (numpy, 10 000 resamples of the seeds, generator seeded with 0; with few seeds it can only
  take a handful of values and is shown for reference, not used for the verdict);
- verdict: "better" / "worse" when the t-interval of the difference excludes 0 (the sign read
  with the metric's direction), else "not distinguishable with N seeds".

The t quantile is computed here (regularised incomplete beta, bisection), so the toolkit does
not need scipy at run time; the tests check it against scipy.
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np

from capsgan_toolkit import catalogue

CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0

METHODS = {
    "interval": "95% Student-t interval of the mean over seeds (n-1 degrees of freedom)",
    "paired": "paired differences arm(seed k) - baseline(seed k); 95% Student-t interval of their mean",
    "bootstrap": (f"95% percentile bootstrap interval of the mean paired difference, {BOOTSTRAP_RESAMPLES} "
                  f"resamples of the seeds, numpy default_rng({BOOTSTRAP_SEED}); shown for reference"),
    "verdict": "better/worse when the paired t-interval excludes 0, read with the metric's direction",
    "std": "sample standard deviation over seeds (ddof=1)",
}


# ------------------------------------------------------------------ the t quantile


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """Return P(T <= t) for Student's t with ``df`` degrees of freedom."""
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """Return the ``p`` quantile of Student's t with ``df`` degrees of freedom (to ~1e-12)."""
    if not 0.0 < p < 1.0 or df <= 0:
        raise ValueError("need 0 < p < 1 and df > 0")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-13 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


# ------------------------------------------------------------------ summaries


def _finite(values) -> np.ndarray:
    arr = np.asarray([v for v in values if v is not None], dtype=np.float64)
    return arr[np.isfinite(arr)]


def t_interval(values, confidence: float = CONFIDENCE) -> tuple[float, float] | None:
    """Return the Student-t interval of the mean of ``values``; ``None`` with fewer than two."""
    arr = _finite(values)
    if arr.size < 2:
        return None
    mean = float(arr.mean())
    half = t_quantile(0.5 + confidence / 2.0, arr.size - 1) * float(arr.std(ddof=1)) / math.sqrt(arr.size)
    return mean - half, mean + half


def bootstrap_interval(values, confidence: float = CONFIDENCE, resamples: int = BOOTSTRAP_RESAMPLES,
                       seed: int = BOOTSTRAP_SEED) -> tuple[float, float] | None:
    """Return the percentile bootstrap interval of the mean of ``values``; ``None`` with fewer than two."""
    arr = _finite(values)
    if arr.size < 2:
        return None
    rng = np.random.default_rng(seed)
    means = arr[rng.integers(0, arr.size, size=(resamples, arr.size))].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.percentile(means, [100 * alpha, 100 * (1 - alpha)])
    return float(lo), float(hi)


def summarize(values_by_seed: dict[Any, float]) -> dict[str, Any]:
    """Return n, mean, std (ddof=1) and the 95 % t-interval over the seeds' values."""
    values = {k: float(v) for k, v in values_by_seed.items() if v is not None and math.isfinite(float(v))}
    arr = np.asarray(list(values.values()), dtype=np.float64)
    ci = t_interval(arr)
    return {
        "n": int(arr.size),
        "values": values,
        "mean": float(arr.mean()) if arr.size else None,
        "std": float(arr.std(ddof=1)) if arr.size >= 2 else None,
        "ci95": list(ci) if ci else None,
    }


def verdict(interval: tuple[float, float] | None, direction: str | None, n: int) -> str:
    """Say whether an arm is better or worse than the baseline, from the interval of arm - baseline."""
    if interval is None or n < 2:
        return f"not distinguishable with {n} seed{'s' if n != 1 else ''}"
    lo, hi = interval
    if lo == 0.0 and hi == 0.0:
        return "equal on every seed"
    if lo > 0 or hi < 0:
        if direction is None:
            return "higher" if lo > 0 else "lower"
        up = lo > 0
        return "better" if up == (direction == "higher") else "worse"
    return f"not distinguishable with {n} seeds"


def paired(arm: dict[Any, float], baseline: dict[Any, float], direction: str | None) -> dict[str, Any]:
    """Compare an arm with the baseline seed by seed (the seeds both have)."""
    seeds = [s for s in arm if s in baseline and arm[s] is not None and baseline[s] is not None
             and math.isfinite(arm[s]) and math.isfinite(baseline[s])]
    diffs = {s: float(arm[s]) - float(baseline[s]) for s in seeds}
    arr = np.asarray(list(diffs.values()), dtype=np.float64)
    ci = t_interval(arr)
    boot = bootstrap_interval(arr)
    base_mean = float(np.mean([baseline[s] for s in seeds])) if seeds else None
    mean = float(arr.mean()) if arr.size else None
    return {
        "n": int(arr.size),
        "differences": diffs,
        "mean": mean,
        "std": float(arr.std(ddof=1)) if arr.size >= 2 else None,
        "ci95_t": list(ci) if ci else None,
        "ci95_bootstrap": list(boot) if boot else None,
        "relative": (mean / abs(base_mean)) if mean is not None and base_mean else None,
        "verdict": verdict(ci, direction, int(arr.size)),
    }


# ------------------------------------------------------------------ directions


def direction(key: str) -> str | None:
    """Return "lower" or "higher" (which is better) for a metric or cost key; ``None`` when unknown.

    The one table of directions is the metric catalogue (:func:`capsgan_toolkit.catalogue.direction`).
    """
    return catalogue.direction(key, None)
