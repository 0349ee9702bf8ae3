"""Statistics over seeds: a mean with its confidence interval, and a paired difference.

Every accuracy is a mean over seeds with its 95% confidence interval (Student's t with
n − 1 degrees of freedom). A comparison between two kinds of student is **paired**: the
difference is taken seed by seed, and the interval is that of the mean difference.
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
