"""Statistics over seeds: a mean with its confidence interval, a paired difference, and a
robust view beside them.

Every accuracy is a mean over seeds with its 95% confidence interval (Student's t with
n − 1 degrees of freedom). A comparison between two kinds of student is **paired**: the
difference is taken seed by seed, and the interval is that of the mean difference. One
collapsed seed drags a mean and widens its interval, so beside each is the median with a
rank-based (distribution-free) interval, and every seed far from the others is named.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable

import numpy as np
from scipy import stats

CONFIDENCE = 0.95


@dataclasses.dataclass(frozen=True)
class Interval:
    """The mean of ``n`` values, their standard deviation and the ``CONFIDENCE`` interval
    of the mean; ``p`` is the two-sided p-value of "the mean is 0" (for differences).
    With one value the spread and the interval are NaN."""

    n: int
    mean: float
    std: float
    low: float
    high: float
    p: float

    @property
    def within_noise(self) -> bool:
        return not (self.low > 0 or self.high < 0)


def interval(values: Iterable[float], confidence: float = CONFIDENCE) -> Interval:
    """mean ± t_{(1+c)/2, n−1} · s / √n, with s the sample standard deviation (ddof 1)."""
    x = np.asarray(list(values), dtype=float)
    n = len(x)
    if n == 0:
        return Interval(0, math.nan, math.nan, math.nan, math.nan, math.nan)
    mean = float(x.mean())
    if n == 1:
        return Interval(1, mean, math.nan, math.nan, math.nan, math.nan)
    std = float(x.std(ddof=1))
    se = std / math.sqrt(n)
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * se
    if se == 0:  # every value equal: no spread, the mean is exact
        p = 1.0 if mean == 0 else 0.0
    else:
        p = float(2 * stats.t.sf(abs(mean) / se, n - 1))
    return Interval(n, mean, std, mean - half, mean + half, p)


def paired(a: dict[int, float], b: dict[int, float]) -> Interval:
    """The interval of mean(a − b) over the seeds both have (a paired t interval)."""
    common = sorted(set(a) & set(b))
    return interval(a[s] - b[s] for s in common)


OUTLIER_Z = 3.5        # a seed this many robust standard deviations (1.4826 MAD) from the median is far off,
OUTLIER_MIN_PP = 2.0   # and at least this far in percentage points: when most seeds tie, MAD is 0


@dataclasses.dataclass(frozen=True)
class Robust:
    """The median of ``n`` values and a distribution-free interval for it: the order statistics
    ``(x_(k), x_(n+1-k))`` with the largest ``k`` whose coverage, from the binomial
    distribution, is at least ``CONFIDENCE``; ``level`` is the coverage it reaches (below
    ``CONFIDENCE`` with fewer than 6 values, where even the whole range covers less)."""

    median: float
    low: float
    high: float
    n: int
    level: float

    def excludes_zero(self) -> bool:
        return self.n > 1 and not (self.low <= 0 <= self.high)


def robust(values: Iterable[float], confidence: float = CONFIDENCE) -> Robust:
    xs = sorted(float(v) for v in values)
    n = len(xs)
    if n == 0:
        return Robust(math.nan, math.nan, math.nan, 0, math.nan)
    median = float(np.median(xs))
    if n == 1:
        return Robust(median, math.nan, math.nan, 1, math.nan)
    k = 1
    while k < n // 2 and 1 - 2 * stats.binom.cdf(k, n, 0.5) >= confidence:
        k += 1
    return Robust(median, xs[k - 1], xs[n - k], n, float(1 - 2 * stats.binom.cdf(k - 1, n, 0.5)))


def paired_robust(a: dict[int, float], b: dict[int, float]) -> Robust:
    """The median of the seed-by-seed differences ``a - b`` and its rank interval."""
    return robust(a[s] - b[s] for s in a.keys() & b.keys())


def outliers(values: dict[int, float]) -> dict[int, float]:
    """The seeds (of 3 or more) whose value lies far from the others': further from the median
    than ``OUTLIER_Z`` times the scaled median absolute deviation, and than ``OUTLIER_MIN_PP``
    (Iglewicz and Hoaglin's modified z-score). A collapsed run, not a slightly weaker seed."""
    if len(values) < 3:
        return {}
    median = float(np.median(list(values.values())))
    scale = 1.4826 * float(np.median([abs(v - median) for v in values.values()]))
    return {s: v for s, v in values.items() if abs(v - median) > max(OUTLIER_Z * scale, OUTLIER_MIN_PP)}
