"""Input drift of classic models: per-feature histograms and how far two of them differ.

Pure numpy, no I/O. A feature's histogram is counted over *inner* bin edges `e_1 < ... < e_k`:
bin 0 is `(-inf, e_1]`, bin i is `(e_i, e_{i+1}]`, bin k is `(e_k, inf)`, so a value outside the
reference's range still lands in a bin (the first or the last), and `k + 1` counts are kept.
The edges come from the reference: the quantiles of its values (`quantile_edges`, equal shares
per bin, as the population stability index is usually computed; a discrete feature gets a bin
per value) or numpy's histogram of the training data (`numpy_histogram`: its outer edges become
open; a value exactly on an inner edge counts in the lower bin, where numpy counts it in the
upper one).

Two measures compare a window with the reference:

- `psi`, the population stability index: sum over bins of `(a - e) * ln(a / e)` of the two
  shares, an empty bin's share floored at `PSI_FLOOR`. 0 for identical histograms, symmetric,
  never negative; by the usual rule of thumb < 0.1 is stable, 0.1-0.2 a moderate shift and
  > 0.2 (`DRIFTING_PSI`) a significant one.
- `ks_binned`, the two-sample Kolmogorov-Smirnov statistic over the bins: the largest gap
  between the two cumulative shares at the bin edges, in [0, 1]. It is the exact statistic
  (`ks_statistic`) evaluated at the edges only, so it never exceeds the exact one; the gateway
  keeps counts, not samples, and reports this one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

DEFAULT_BINS = 10
PSI_FLOOR = 1e-4  # the share an empty bin counts as: ln(0) would make any empty bin infinite
DRIFTING_PSI = 0.2
MAX_BINS = 100

Floats = npt.NDArray[np.float64]
Counts = npt.NDArray[np.int64]


def as_values(values: npt.ArrayLike) -> Floats:
    """A feature's values as a 1-D float array, without NaN or infinities."""
    array = np.asarray(values, dtype=np.float64).ravel()
    return array[np.isfinite(array)]


def quantile_edges(values: npt.ArrayLike, bins: int = DEFAULT_BINS) -> Floats:
    """Inner edges that split `values` into `bins` bins of (about) equal shares.

    The edges are sample values (the inverted CDF), so with the bins closed on the right each
    bin holds its share exactly. Repeated quantiles (a discrete or constant feature) are kept
    once, so fewer bins may come back; a constant feature gets one edge, its value."""
    array = as_values(values)
    if array.size == 0:
        raise ValueError("no finite values to take bin edges from")
    if not 2 <= bins <= MAX_BINS:
        raise ValueError(f"bins must be between 2 and {MAX_BINS}")
    # Sample values, not interpolations between them: exact, and no overflow near the float range's ends.
    quantiles = np.quantile(array, np.linspace(0.0, 1.0, bins + 1)[1:-1], method="inverted_cdf")
    return np.unique(quantiles)


def numpy_histogram(edges: npt.ArrayLike, counts: npt.ArrayLike) -> tuple[Floats, Counts]:
    """numpy.histogram's answer (`counts` of `len(edges) - 1` bins) as inner edges and counts:
    its first and last bins are opened to -inf and inf."""
    full = np.asarray(edges, dtype=np.float64)
    kept = np.asarray(counts, dtype=np.int64)
    if problem := histogram_problem(full, kept):
        raise ValueError(problem)
    return full[1:-1].copy(), kept.copy()


def histogram_problem(edges: npt.NDArray[np.float64], counts: npt.NDArray[np.int64]) -> str | None:
    """Why numpy-style `edges` and `counts` are no usable reference histogram, or None."""
    if edges.ndim != 1 or counts.ndim != 1:
        return "edges and counts must be flat lists"
    if not 3 <= edges.size <= MAX_BINS + 1:
        return f"edges must hold between 3 and {MAX_BINS + 1} values (2 to {MAX_BINS} bins)"
    if counts.size != edges.size - 1:
        return (
            f"counts must hold one number per bin: {edges.size - 1} for {edges.size} edges, not {counts.size}"
        )
    if not np.all(np.isfinite(edges)) or not np.all(edges[1:] > edges[:-1]):
        return "edges must be finite and strictly increasing"
    if np.any(counts < 0) or counts.sum(dtype=np.float64) <= 0:
        return "counts must not be negative, and at least one must be above 0"
    return None


def histogram(values: npt.ArrayLike, edges: npt.ArrayLike) -> Counts:
    """Counts of `values` in the `len(edges) + 1` bins the inner `edges` make."""
    inner = np.asarray(edges, dtype=np.float64)
    index = np.searchsorted(inner, as_values(values), side="left")
    return np.bincount(index, minlength=inner.size + 1).astype(np.int64)


def _shares(counts: npt.ArrayLike) -> Floats:
    array = np.asarray(counts, dtype=np.float64)
    total = float(array.sum())
    if array.ndim != 1 or array.size == 0 or not total > 0:
        raise ValueError("a histogram needs at least one count")
    shares: Floats = array / total
    return shares


def _same_bins(expected: Floats, actual: Floats) -> None:
    if expected.shape != actual.shape:
        raise ValueError(f"histograms over different bins ({expected.size} and {actual.size})")


def psi(expected: npt.ArrayLike, actual: npt.ArrayLike, *, floor: float = PSI_FLOOR) -> float:
    """Population stability index of two histograms over the same bins (>= 0, 0 when equal)."""
    e, a = _shares(expected), _shares(actual)
    _same_bins(e, a)
    e, a = np.maximum(e, floor), np.maximum(a, floor)
    # (a - e) * (ln a - ln e): both factors share a sign, so each term is >= 0, and swapping
    # the two histograms flips both signs exactly (the index is symmetric to the last bit).
    return float(np.sum((a - e) * (np.log(a) - np.log(e))))


def ks_binned(expected: npt.ArrayLike, actual: npt.ArrayLike) -> float:
    """The two-sample KS statistic of two histograms over the same bins, in [0, 1]."""
    e, a = _shares(expected), _shares(actual)
    _same_bins(e, a)
    gap = np.abs(np.cumsum(e) - np.cumsum(a))
    return float(min(1.0, gap.max()))


def ks_statistic(first: npt.ArrayLike, second: npt.ArrayLike) -> float:
    """The exact two-sample KS statistic of two samples: the largest gap between their
    empirical distribution functions, in [0, 1]."""
    x, y = np.sort(as_values(first)), np.sort(as_values(second))
    if x.size == 0 or y.size == 0:
        raise ValueError("both samples need at least one finite value")
    points = np.concatenate([x, y])
    gap = (
        np.searchsorted(x, points, side="right") / x.size - np.searchsorted(y, points, side="right") / y.size
    )
    return float(min(1.0, np.abs(gap).max()))


@dataclass(frozen=True, slots=True)
class Moments:
    """Count, mean and standard deviation of a feature's values (None where they overflow)."""

    count: int
    mean: float | None
    std: float | None

    @staticmethod
    def of(count: int, *, total: float, squares: float) -> Moments:
        """From running sums, as the gateway keeps them per window."""
        if count <= 0:
            return Moments(0, None, None)
        mean = total / count
        variance = max(squares / count - mean * mean, 0.0)
        std = float(np.sqrt(variance))
        return Moments(
            count,
            float(mean) if np.isfinite(mean) else None,
            std if np.isfinite(std) and np.isfinite(mean) else None,
        )


@dataclass(frozen=True, slots=True)
class Comparison:
    psi: float
    ks: float

    def drifting(self, threshold: float = DRIFTING_PSI) -> bool:
        return self.psi > threshold


def compare(reference: npt.ArrayLike, window: npt.ArrayLike) -> Comparison | None:
    """PSI and KS of a window against the reference, or None when either has no count."""
    ref, win = np.asarray(reference, dtype=np.float64), np.asarray(window, dtype=np.float64)
    if not (ref.sum() > 0 and win.sum() > 0):
        return None
    return Comparison(psi=psi(ref, win), ks=ks_binned(ref, win))


def reference_features(
    values: Mapping[str, npt.ArrayLike], *, bins: int = DEFAULT_BINS
) -> list[dict[str, Any]]:
    """A reference taken from data, feature by feature, in its stored form (models/drift.py):
    `{"name", "edges", "counts", "count", "mean", "std"}`, the edges `bins` quantiles. A feature
    without one finite value is left out."""
    features = []
    for name, column in values.items():
        finite = as_values(column)
        if finite.size == 0:
            continue
        edges = quantile_edges(finite, bins)
        with np.errstate(over="ignore", invalid="ignore"):
            moments = Moments.of(
                finite.size, total=float(finite.sum()), squares=float(np.dot(finite, finite))
            )
        features.append(
            {
                "name": name,
                "edges": edges.tolist(),
                "counts": histogram(finite, edges).tolist(),
                "count": moments.count,
                "mean": moments.mean,
                "std": moments.std,
            }
        )
    return features
