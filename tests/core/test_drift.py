"""Input-drift maths (core/drift): PSI and KS properties, bins, histograms, moments."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from converge.core.drift import (
    DRIFTING_PSI,
    Moments,
    compare,
    histogram,
    histogram_problem,
    ks_binned,
    ks_statistic,
    numpy_histogram,
    psi,
    quantile_edges,
    reference_features,
)


@st.composite
def two_histograms(draw: st.DrawFn) -> tuple[list[int], list[int]]:
    """Two histograms over the same bins, each with at least one count."""
    bins = draw(st.integers(min_value=2, max_value=20))
    counts = st.lists(st.integers(min_value=0, max_value=10_000), min_size=bins, max_size=bins)
    first = draw(counts.filter(lambda c: sum(c) > 0))
    second = draw(counts.filter(lambda c: sum(c) > 0))
    return first, second


samples = st.lists(
    st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False), min_size=1, max_size=200
)


@settings(max_examples=50)
@given(two_histograms())
def test_psi_is_never_negative_and_symmetric(pair: tuple[list[int], list[int]]) -> None:
    first, second = pair
    assert psi(first, second) >= 0
    assert psi(first, second) == psi(second, first)


@settings(max_examples=50)
@given(two_histograms(), st.integers(min_value=1, max_value=50))
def test_psi_is_zero_for_the_same_distribution_at_any_size(pair: tuple[list[int], list[int]], k: int) -> None:
    first, _ = pair
    assert psi(first, first) == 0
    assert psi(first, [c * k for c in first]) == pytest.approx(0, abs=1e-12)


@settings(max_examples=50)
@given(two_histograms())
def test_binned_ks_lies_in_0_1_is_symmetric_and_zero_for_the_same(pair: tuple[list[int], list[int]]) -> None:
    first, second = pair
    assert 0 <= ks_binned(first, second) <= 1
    assert ks_binned(first, second) == ks_binned(second, first)
    assert ks_binned(first, first) == 0


@given(samples, samples)
def test_exact_ks_lies_in_0_1_is_symmetric_and_zero_for_the_same(
    first: list[float], second: list[float]
) -> None:
    assert 0 <= ks_statistic(first, second) <= 1
    assert ks_statistic(first, second) == ks_statistic(second, first)
    assert ks_statistic(first, first) == 0


@given(samples, st.floats(min_value=0, max_value=1e3), st.floats(min_value=0, max_value=1e3))
def test_exact_ks_never_falls_as_the_shift_grows(values: list[float], d1: float, d2: float) -> None:
    x = np.asarray(values)
    small, large = sorted((d1, d2))
    assert ks_statistic(x, x + small) <= ks_statistic(x, x + large)


@settings(max_examples=50)
@given(samples, samples, st.integers(min_value=2, max_value=30))
def test_binned_ks_is_the_exact_one_at_the_edges_so_never_more(
    first: list[float], second: list[float], bins: int
) -> None:
    edges = quantile_edges(first + second, bins)
    binned = ks_binned(histogram(first, edges), histogram(second, edges))
    assert binned <= ks_statistic(first, second) + 1e-12


@settings(max_examples=25, deadline=None)
@given(st.integers(min_value=0, max_value=2**32 - 1))
def test_psi_and_ks_rise_with_the_shift_and_cross_the_threshold(seed: int) -> None:
    rng = np.random.default_rng(seed)
    reference = rng.normal(size=2000)
    edges = quantile_edges(reference, 10)
    expected = histogram(reference, edges)
    measured = []
    for shift in (0.0, 0.25, 1.0, 3.0):  # in standard deviations; a fresh sample each time
        window = histogram(rng.normal(loc=shift, size=2000), edges)
        measured.append((psi(expected, window), ks_binned(expected, window)))
    psis, kss = zip(*measured, strict=True)
    assert list(psis) == sorted(psis) and list(kss) == sorted(kss)
    assert psis[0] < 0.05 < DRIFTING_PSI < psis[2]  # the same distribution is stable, 1 sd is not
    assert kss[0] < 0.1 and kss[3] > 0.8


def test_quantile_edges_split_the_reference_into_equal_shares() -> None:
    values = np.random.default_rng(1).uniform(size=10_000)
    assert histogram(values, quantile_edges(values, 4)).tolist() == [2500] * 4  # quarters are exact floats
    edges = quantile_edges(values, 10)
    assert edges.size == 9 and np.all(np.diff(edges) > 0)
    assert all(abs(c - 1000) <= 1 for c in histogram(values, edges))  # 0.3 is not: one row either way
    # a constant feature: one edge, its value (bins are closed on the right)
    assert quantile_edges([3.0] * 50, 10).tolist() == [3.0]
    assert histogram([3.0] * 50, [3.0]).tolist() == [50, 0]
    # a discrete feature: a bin per value
    assert histogram([0, 1, 1, 2, 3, 3, 3], quantile_edges([0, 1, 1, 2, 3, 3, 3], 10)).tolist() == [
        1,
        2,
        1,
        3,
        0,
    ]
    # values outside the reference's range fall into the open outer bins
    assert histogram([-1e9, 0.55, 1e9], edges).tolist() == [1] + [0] * 4 + [1] + [0] * 3 + [1]
    with pytest.raises(ValueError, match="no finite values"):
        quantile_edges([float("nan")])


def test_numpy_histograms_become_inner_edges_that_count_the_same() -> None:
    values = np.random.default_rng(2).normal(size=500)
    counts, edges = np.histogram(values, bins=8)
    inner, kept = numpy_histogram(edges, counts)
    assert inner.tolist() == edges[1:-1].tolist()
    assert histogram(values, inner).tolist() == kept.tolist() == counts.tolist()


@pytest.mark.parametrize(
    ("edges", "counts", "message"),
    [
        ([0, 1], [5], "between 3 and"),
        ([0, 1, 2], [5], "one number per bin"),
        ([0, 2, 1], [1, 1], "strictly increasing"),
        ([0, 1, float("inf")], [1, 1], "finite"),
        ([0, 1, 2], [0, 0], "at least one must be above 0"),
        ([0, 1, 2], [-1, 3], "must not be negative"),
    ],
)
def test_a_bad_histogram_says_what_is_wrong(edges: list[float], counts: list[int], message: str) -> None:
    assert message in (histogram_problem(np.asarray(edges, dtype=float), np.asarray(counts)) or "")
    with pytest.raises(ValueError, match=message):
        numpy_histogram(edges, counts)


def test_histograms_over_different_bins_or_without_counts_are_refused() -> None:
    with pytest.raises(ValueError, match="different bins"):
        psi([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="at least one count"):
        ks_binned([0, 0], [1, 1])
    assert compare([1, 2, 3], [0, 0, 0]) is None
    found = compare([10, 10], [20, 0])
    assert found is not None and found.ks == 0.5 and found.drifting()


def test_moments_from_running_sums_match_numpy() -> None:
    values = np.random.default_rng(3).normal(loc=4, scale=2, size=1000)
    moments = Moments.of(values.size, total=float(values.sum()), squares=float(np.dot(values, values)))
    assert moments.count == 1000
    assert moments.mean == pytest.approx(values.mean())
    assert moments.std == pytest.approx(values.std())
    assert Moments.of(0, total=0.0, squares=0.0) == Moments(0, None, None)
    assert Moments.of(2, total=float("inf"), squares=float("inf")).mean is None


def test_a_reference_from_rows_holds_edges_counts_and_moments_per_feature() -> None:
    rng = np.random.default_rng(4)
    features = reference_features(
        {"a": rng.normal(size=100), "b": [np.nan] * 5, "c": np.arange(100.0)}, bins=4
    )
    assert [f["name"] for f in features] == ["a", "c"]  # no finite value: no feature
    c = features[1]
    assert c["edges"] == [24.0, 49.0, 74.0] and c["counts"] == [25, 25, 25, 25]
    assert c["count"] == 100 and c["mean"] == pytest.approx(49.5)
