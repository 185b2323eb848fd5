"""Statistics over seeds: means, t-intervals, paired differences, bootstrap intervals, verdicts.

What is used where (docs/compare.md says the same):

- per arm and metric: mean, sample standard deviation (ddof=1) and a 95 % Student-t
  interval of the mean over seeds (n - 1 degrees of freedom), intersected with the metric's
  range (:func:`bounds`: [0, 1] for a proportion, [0, inf) for FID, KID and costs): the true
  mean lies in the range, so the part cut off cannot hold it and the coverage is unchanged;
- per contrast (a, b): the paired differences a(seed k) - b(seed k) over the seeds both
  have, their mean, a 95 % Student-t interval of that mean and the paired t-test's p-value
  (these decide the verdict) and, beside them, a 95 % percentile bootstrap interval of the mean difference
  (scipy.stats.bootstrap, 10 000 resamples of the seeds, generator seeded with 0; with few seeds it can only
  take a handful of values and is shown for reference, not used for the verdict);
- verdict: "better" / "worse" when the t-interval of the difference excludes 0 (the sign read
  with the metric's direction), else "not distinguishable with N seeds". No verdict is read
  from fewer than :data:`MIN_SEEDS` paired seeds, from an interval of zero width (seeds whose
  differences agree to the last digit say nothing about the spread), or from a mean
  difference within the metric's resolution (1/num_images for a proportion); such a cell says
  "too few seeds" with :func:`seeds_needed`'s estimate of how many the observed spread needs
  (a t-refined sample size, so 3 seeds are not promised where t(0.975, 2) = 4.3);
- Holm's step-down adjustment (:func:`holm`) of the p-values of every contrast and metric of
  one report; :func:`final_verdict` keeps a better/worse only where the adjusted p-value is
  under 0.05.

Student's t (its CDF and quantiles), the one-sample t-test and the bootstrap come from
``scipy.stats`` (``t``, ``ttest_1samp``, ``bootstrap``); Holm's adjustment and the seed estimate
are the few lines below, checked against hand computations in the tests.
"""

from __future__ import annotations

import math
import warnings
from statistics import NormalDist
from typing import Any

import numpy as np
from scipy import stats as scipy_stats

from capsgan_toolkit import catalogue

CONFIDENCE = 0.95
ALPHA = 1.0 - CONFIDENCE
"""The family-wise error rate Holm's adjustment holds a report's verdicts to."""
MIN_SEEDS = 3
"""Fewest paired seeds a verdict is read from."""
POWER = 0.8
"""The power :func:`seeds_needed` plans for."""
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0

METHODS = {
    "interval": ("95% Student-t interval of the mean over seeds (n-1 degrees of freedom), intersected with the "
                 "metric's range ([0, 1] for a proportion, >= 0 for FID, KID and costs)"),
    "paired": "paired differences a(seed k) - b(seed k) over the seeds both arms have; 95% Student-t interval of "
              "their mean",
    "bootstrap": (f"95% percentile bootstrap interval of the mean paired difference, {BOOTSTRAP_RESAMPLES} "
                  f"resamples of the seeds (scipy.stats.bootstrap, percentile method, numpy default_rng({BOOTSTRAP_SEED})); "
                  "shown for reference"),
    "verdict": (f"better/worse when the paired t-interval excludes 0 (read with the metric's direction) and the "
                f"Holm-adjusted p-value is under {ALPHA:.2f}; none from fewer than {MIN_SEEDS} paired seeds, a "
                "zero-width interval, a difference within the metric's resolution, or an arm that did not learn"),
    "seeds_needed": (f"paired seeds a two-sided t-test would need for {int(POWER * 100)}% power against the observed "
                     f"mean difference and spread, at the Bonferroni level {ALPHA:.2f}/m of the report's m tests: "
                     "smallest n with n >= ((t(1-level/2, n-1) + t(power, n-1)) sd / |mean|)^2, at least the "
                     "resolution as spread"),
    "holm": "Holm's step-down adjustment of the paired t-tests' p-values over every contrast and quality metric of "
            "the report (m tests); arms that did not learn are left out of the family",
    "std": "sample standard deviation over seeds (ddof=1)",
}


# ------------------------------------------------------------------ Student's t (scipy.stats)


def t_cdf(t: float, df: float) -> float:
    """Return P(T <= t) for Student's t with ``df`` degrees of freedom (``scipy.stats.t.cdf``)."""
    return float(scipy_stats.t.cdf(t, df))


def t_quantile(p: float, df: float) -> float:
    """Return the ``p`` quantile of Student's t with ``df`` degrees of freedom (``scipy.stats.t.ppf``)."""
    if not 0.0 < p < 1.0 or df <= 0:
        raise ValueError("need 0 < p < 1 and df > 0")
    return float(scipy_stats.t.ppf(p, df))


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
    if float(arr.std()) == 0.0:  # every resample has the same mean
        return float(arr[0]), float(arr[0])
    result = scipy_stats.bootstrap((arr,), np.mean, confidence_level=confidence, n_resamples=resamples,
                                   method="percentile", vectorized=True, rng=np.random.default_rng(seed))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


UNBOUNDED = (-math.inf, math.inf)
_BOUNDS: dict[str, tuple[float, float]] = {
    "gen_fid": (0.0, math.inf), "rec_fid": (0.0, math.inf),  # a squared distance
    "gen_kid": (0.0, math.inf), "rec_kid": (0.0, math.inf),  # a squared MMD (one estimate can dip below 0; the mean cannot)
    "rec_mse": (0.0, 1.0), "test_rec_mse01": (0.0, 1.0),  # pixels in [0, 1]
    "rec_psnr": (0.0, 100.0),  # MSE <= 1, floored at 1e-10
    "rec_ssim": (-1.0, 1.0),
    "gen_is": (1.0, math.inf),
}


def bounds(key: str) -> tuple[float, float]:
    """The range a metric's true mean lies in: [0, 1] for a proportion (its catalogue unit), [0, inf) for FID, KID
    and every cost, the unit's range for the others; ``(-inf, inf)`` for a key the catalogue does not know."""
    if catalogue.resolution(key, 1) > 0:  # "fraction of images, 0 to 1"
        return (0.0, 1.0)
    parsed = catalogue.parse(key)
    stem = parsed.key.stem if parsed is not None else key
    if stem in _BOUNDS:
        return _BOUNDS[stem]
    if stem in catalogue.COST_KEYS:
        return (0.0, math.inf)
    return UNBOUNDED


def difference_bounds(key: str) -> tuple[float, float]:
    """The range of a difference of two means of ``key`` (``[-1, 1]`` for a proportion)."""
    lo, hi = bounds(key)
    return (lo - hi, hi - lo)


def clip(interval: tuple[float, float] | list[float] | None,
         limits: tuple[float, float] = UNBOUNDED) -> tuple[float, float] | None:
    """Intersect an interval with a metric's range (the mean lies in it, so no coverage is lost)."""
    if interval is None:
        return None
    lo, hi = float(interval[0]), float(interval[1])
    return (min(max(lo, limits[0]), limits[1]), max(min(hi, limits[1]), limits[0]))


def summarize(values_by_seed: dict[Any, float], limits: tuple[float, float] = UNBOUNDED) -> dict[str, Any]:
    """Return n, mean, std (ddof=1) and the 95 % t-interval over the seeds' values, within ``limits``.

    ``clipped`` says whether the range cut the t-interval (the outputs then show ``[lo, hi]``, not ``±``).
    """
    values = {k: float(v) for k, v in values_by_seed.items() if v is not None and math.isfinite(float(v))}
    arr = np.asarray(list(values.values()), dtype=np.float64)
    raw = t_interval(arr)
    ci = clip(raw, limits)
    return {
        "n": int(arr.size),
        "values": values,
        "mean": float(arr.mean()) if arr.size else None,
        "std": float(arr.std(ddof=1)) if arr.size >= 2 else None,
        "ci95": list(ci) if ci else None,
        "clipped": bool(raw and ci and tuple(raw) != tuple(ci)),
    }


def seeds_needed(differences, resolution: float = 0.0, confidence: float = CONFIDENCE,
                 power: float = POWER) -> int | None:
    """Paired seeds needed to tell the observed mean difference from 0 (``None``: the mean is 0).

    The smallest ``n >= MIN_SEEDS`` with ``n >= ((t_{1-a/2, n-1} + t_{power, n-1}) * sd / |mean|)^2``
    (the usual t-refinement of the normal-approximation sample size; Student t, so 3 seeds are not
    promised where their t quantile is 4.3), with the observed sample spread, or the metric's
    resolution where the seeds agree exactly (a zero spread is not evidence of none). The search
    starts at the normal approximation (t quantiles exceed z ones, so it is a lower bound); past
    1,000 seeds the normal approximation is returned as it is.
    """
    arr = _finite(differences)
    if arr.size == 0 or float(arr.mean()) == 0.0:
        return None
    spread = float(arr.std(ddof=1)) if arr.size >= 2 else 0.0
    spread = max(spread, resolution)
    if spread == 0.0:
        return MIN_SEEDS
    ratio = spread / abs(float(arr.mean()))
    z = NormalDist().inv_cdf
    n = max(MIN_SEEDS, math.ceil(((z(0.5 + confidence / 2.0) + z(power)) * ratio) ** 2))
    while n <= 1000:
        if n >= ((t_quantile(0.5 + confidence / 2.0, n - 1) + t_quantile(power, n - 1)) * ratio) ** 2:
            return n
        n += 1
    return n


def _too_few(n: int, needed: int | None, why: str = "") -> str:
    about = f"about {needed} needed" if needed is not None else f"at least {MIN_SEEDS} needed"
    return f"too few seeds ({n}{why}; {about})"


def verdict(interval: tuple[float, float] | None, direction: str | None, n: int, *, mean: float | None = None,
            resolution: float = 0.0, needed: int | None = None) -> str:
    """Say whether an arm is better or worse than the baseline, from the interval of arm - baseline.

    Args:
        interval: the 95 % t-interval of the mean paired difference (``None`` with under two seeds).
        direction: ``"lower"`` / ``"higher"`` is better (``None``: say higher/lower).
        n: paired seeds.
        mean: the mean difference (compared with ``resolution``).
        resolution: the metric's smallest step (``1 / num_images`` for a proportion; 0: none).
        needed: seeds the observed spread would need (:func:`seeds_needed`), for the message.
    """
    if interval is None or n < MIN_SEEDS:
        return _too_few(n, needed)
    lo, hi = interval
    if hi - lo <= 0.0:
        return _too_few(n, needed, ", identical differences: no spread to judge")
    if mean is not None and abs(mean) <= resolution:
        return f"not distinguishable with {n} seeds (within the metric's resolution {resolution:g})"
    if lo > 0 or hi < 0:
        if direction is None:
            return "higher" if lo > 0 else "lower"
        up = lo > 0
        return "better" if up == (direction == "higher") else "worse"
    return f"not distinguishable with {n} seeds" + (f" (about {needed} needed)" if needed is not None else "")


def has_verdict(text: str) -> bool:
    """Whether a verdict string says better/worse (or higher/lower), as opposed to no verdict."""
    return text in ("better", "worse", "higher", "lower")


def t_test_p(differences) -> float | None:
    """Two-sided p-value of the one-sample t-test of the mean difference against 0 (``None``: no spread or n < 2)."""
    arr = _finite(differences)
    if arr.size < 2:
        return None
    sd = float(arr.std(ddof=1))
    if sd == 0.0:
        return None
    with warnings.catch_warnings():  # nearly equal differences: scipy warns of precision loss, the p-value stands
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(scipy_stats.ttest_1samp(arr, 0.0).pvalue)


def holm(p_values: dict[Any, float | None]) -> dict[Any, float | None]:
    """Holm's step-down adjusted p-values (a ``None`` stays ``None`` and does not count as a test).

    Sorted ascending, the k-th smallest of m p-values becomes ``max over j <= k of min(1, (m - j + 1) p_(j))``.
    """
    tested = sorted(((p, key) for key, p in p_values.items() if p is not None), key=lambda item: item[0])
    out: dict[Any, float | None] = {key: None for key in p_values}
    m, running = len(tested), 0.0
    for rank, (p, key) in enumerate(tested):
        running = max(running, min(1.0, (m - rank) * p))
        out[key] = running
    return out


def final_verdict(cmp: dict[str, Any], direction: str | None, *, resolution: float = 0.0, p_holm: float | None,
                  tests: int, alpha: float = ALPHA) -> str:
    """The verdict a report shows for one paired test of a family of ``tests`` (Holm-adjusted ``p_holm``).

    The rules of :func:`verdict`, with the seeds needed planned at the Bonferroni level
    ``alpha / tests``; a better/worse whose adjusted p-value is not under ``alpha`` becomes
    "not distinguishable ... after Holm's correction".
    """
    diffs = list(cmp["differences"].values())
    n = int(cmp["n"])
    needed = seeds_needed(diffs, resolution, confidence=1.0 - alpha / max(1, tests))
    interval = tuple(cmp["ci95_t"]) if cmp.get("ci95_t") else None
    text = verdict(interval, direction, n, mean=cmp.get("mean"), resolution=resolution, needed=needed)
    if has_verdict(text) and (p_holm is None or p_holm >= alpha):
        adjusted = f", adjusted {p_holm:.2g}" if p_holm is not None else ""
        about = f"; about {needed} needed" if needed is not None else ""
        text = (f"not distinguishable with {n} seeds after Holm's correction over {tests} tests "
                f"(p {cmp.get('p_value') or 0:.2g}{adjusted}{about})")
    return text


def paired(arm: dict[Any, float], baseline: dict[Any, float], direction: str | None,
           resolution: float = 0.0, limits: tuple[float, float] = UNBOUNDED) -> dict[str, Any]:
    """Compare an arm with the baseline seed by seed (the seeds both have); see :func:`verdict` for ``resolution``.

    ``limits`` is the range of a difference (:func:`difference_bounds`); the intervals are intersected with it.
    """
    seeds = [s for s in arm if s in baseline and arm[s] is not None and baseline[s] is not None
             and math.isfinite(arm[s]) and math.isfinite(baseline[s])]
    diffs = {s: float(arm[s]) - float(baseline[s]) for s in seeds}
    arr = np.asarray(list(diffs.values()), dtype=np.float64)
    ci = clip(t_interval(arr), limits)
    boot = clip(bootstrap_interval(arr), limits)
    base_mean = float(np.mean([baseline[s] for s in seeds])) if seeds else None
    mean = float(arr.mean()) if arr.size else None
    needed = seeds_needed(arr, resolution)
    return {
        "n": int(arr.size),
        "differences": diffs,
        "mean": mean,
        "std": float(arr.std(ddof=1)) if arr.size >= 2 else None,
        "ci95_t": list(ci) if ci else None,
        "ci95_bootstrap": list(boot) if boot else None,
        "relative": (mean / abs(base_mean)) if mean is not None and base_mean else None,
        "p_value": t_test_p(arr),
        "seeds_needed": needed,
        "verdict": verdict(ci, direction, int(arr.size), mean=mean, resolution=resolution, needed=needed),
    }


# ------------------------------------------------------------------ directions


def direction(key: str) -> str | None:
    """Return "lower" or "higher" (which is better) for a metric or cost key; ``None`` when unknown.

    The one table of directions is the metric catalogue (:func:`capsgan_toolkit.catalogue.direction`).
    """
    return catalogue.direction(key, None)
