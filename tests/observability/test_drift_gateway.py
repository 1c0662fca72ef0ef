"""The gateway's input-drift counters (gateway/drift.py) without a database: what a request's
features are called, when a reference is taken and a window closes, what a new revision resets,
the bounds, and the gauges a scrape shows."""

from __future__ import annotations

import uuid
from typing import Any

import numpy as np
import orjson
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from converge.config import DriftSettings
from converge.gateway.dataplane import Route
from converge.gateway.drift import InputDrift, Reference, Tracker, blocks_of, features_of

CONFIG = DriftSettings(window_rows=200, window_min_s=0, bins=10, max_deployments=2, max_pending_bytes=1 << 20)


def route(name: str = "iris", *, revision: int = 1) -> Route:
    return Route(
        deployment_id=uuid.uuid5(uuid.NAMESPACE_DNS, name),
        project_id=uuid.uuid4(),
        name=name,
        label=f"p/{name}",
        server="v2",
        model_name=name,
        aliases=(),
        phase="Ready",
        endpoints=("http://127.0.0.1:1",),
        desired_replicas=1,
        created=0,
        revision=revision,
    )


def body(rows: np.ndarray, *, name: str = "input-0") -> bytes:
    tensor = {"name": name, "shape": list(rows.shape), "datatype": "FP64", "data": rows.tolist()}
    return orjson.dumps({"inputs": [tensor]})


def rows(rng: np.random.Generator, n: int, *, shift: float = 0.0) -> np.ndarray:
    return rng.normal(loc=[5.0, 3.0, 1.5], scale=0.5, size=(n, 3)) + [0.0, 0.0, shift]


def absorb(drift: InputDrift, *, now: float) -> None:
    """What a flush round does first: take the bodies recorded so far and count them."""
    batch, drift.pending, drift.pending_bytes = drift.pending, [], 0
    drift._absorb(batch, now)


def scrape(registry: CollectorRegistry) -> dict[tuple[str, str, str], float]:
    found = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            if sample.name.startswith("converge_drift_"):
                labels: dict[str, Any] = sample.labels
                found[
                    (
                        sample.name,
                        labels.get("deployment", ""),
                        labels.get("feature", labels.get("reason", "")),
                    )
                ] = sample.value
    return found


def test_features_are_the_columns_of_one_tensor_or_the_names_of_several() -> None:
    one = {"inputs": [{"name": "x", "shape": [2, 3], "datatype": "FP32", "data": [1, 2, 3, 4, 5, 6]}]}
    assert [(n, v.tolist()) for n, v in features_of(one, limit=64)] == [
        ("0", [1.0, 4.0]),
        ("1", [2.0, 5.0]),
        ("2", [3.0, 6.0]),
    ]
    several = {
        "inputs": [
            {"name": "age", "shape": [2], "datatype": "INT64", "data": [30, 40]},
            {"name": "x", "shape": [2, 2], "datatype": "FP64", "data": [[1, 2], [3, 4]]},
            {"name": "text", "shape": [2], "datatype": "BYTES", "data": ["a", "b"]},  # not numeric
            {"name": "bad", "shape": [2, 2], "datatype": "FP64", "data": [1, 2, 3]},  # does not fit
        ]
    }
    assert [n for n, _ in features_of(several, limit=64)] == ["age", "x[0]", "x[1]"]
    assert [n for n, _ in features_of(several, limit=2)] == ["age", "x[0]"]  # bounded
    odd = [{"shape": "2", "datatype": "FP64", "data": []}, {"shape": [1], "datatype": ["FP64"], "data": [1]}]
    for nothing in (None, [], {"inputs": "x"}, {"inputs": odd}):
        assert features_of(nothing, limit=64) == []


def test_the_first_full_window_becomes_the_reference_and_a_shift_shows_in_the_next() -> None:
    rng = np.random.default_rng(5)
    tracker = Tracker(uuid.uuid4(), label="p/iris", revision=1)
    like_training = [blocks_of(orjson.loads(body(rows(rng, 100))), limit=64) for _ in range(2)]
    tracker.absorb(like_training[:1], config=CONFIG, now=1.0)
    assert tracker.reference is None and tracker.collected_rows == 100  # still collecting
    tracker.absorb(like_training[1:], config=CONFIG, now=2.0)
    reference = tracker.reference
    assert reference is not None and tracker.taken is reference  # taken here, to be written
    assert reference.source == "first_window" and reference.rows == 200 and reference.names == ("0", "1", "2")
    assert [int(c.sum()) for c in reference.counts] == [200, 200, 200]

    tracker.absorb([blocks_of(orjson.loads(body(rows(rng, 150))), limit=64)], config=CONFIG, now=3.0)
    tracker.close_if_due(CONFIG, now=3.0)
    assert tracker.last == () and tracker.window is not None and tracker.window.rows == 150  # not full yet
    shifted = blocks_of(orjson.loads(body(rows(rng, 100, shift=2.0))), limit=64)
    tracker.absorb([shifted], config=CONFIG, now=4.0)
    tracker.close_if_due(CONFIG, now=4.0)
    last = dict(tracker.last)
    assert set(last) == {"0", "1", "2"}
    # 100 of this window's 250 rows have feature 2 shifted by 4 standard deviations
    assert last["2"].psi > 0.2 and last["0"].psi < 0.2 and last["1"].psi < 0.2
    window, summary = tracker.closed[-1]
    assert window.rows == 250 and [f["count"] for f in summary] == [250, 250, 250]
    assert summary[2]["psi"] == last["2"].psi
    assert summary[2]["mean"] == pytest.approx(1.5 + 2.0 * 100 / 250, abs=0.1)
    assert tracker.window is not None and tracker.window.rows == 0  # the next window


def test_a_window_closes_after_window_max_s_with_min_rows_and_not_before() -> None:
    config = CONFIG.model_copy(update={"window_rows": 1000, "window_max_s": 60.0, "min_rows": 50})
    tracker = Tracker(uuid.uuid4(), label="p/iris", revision=1)
    reference = Reference(
        version=uuid.uuid4(),
        source="training",
        revision=None,
        rows=100,
        features=[{"name": "0", "edges": [0.0, 1.0], "counts": [10, 80, 10]}],
        created_at=0.0,
    )
    tracker.adopt(reference, 0.0)
    tracker.absorb([[(("0",), np.full((40, 1), 0.5))]], config=config, now=70.0)
    tracker.close_if_due(config, now=70.0)
    assert tracker.closed == []  # old enough, too few rows
    tracker.absorb([[(("0",), np.full((20, 1), 5.0))]], config=config, now=80.0)
    tracker.close_if_due(config, now=80.0)
    ((window, summary),) = tracker.closed
    assert summary[0]["counts"] == [0, 40, 20] and summary[0]["psi"] > 0.2


def test_a_new_revision_retakes_a_first_window_but_keeps_a_training_reference() -> None:
    rng = np.random.default_rng(6)
    tracker = Tracker(uuid.uuid4(), label="p/iris", revision=1)
    tracker.absorb([blocks_of(orjson.loads(body(rows(rng, 200))), limit=64)], config=CONFIG, now=1.0)
    assert tracker.reference is not None
    tracker.redeployed(2, now=2.0)
    assert tracker.reference is None and tracker.window is None and tracker.revision == 2
    training = Reference(
        version=uuid.uuid4(),
        source="training",
        revision=None,
        rows=10,
        features=[{"name": "0", "edges": [5.0], "counts": [5, 5]}],
        created_at=0.0,
    )
    tracker.adopt(training, 3.0)
    tracker.redeployed(3, now=4.0)
    assert tracker.reference is training and tracker.window is not None and tracker.window.rows == 0


def test_recording_is_bounded_and_the_gauges_show_the_last_closed_window() -> None:
    registry = CollectorRegistry()
    config = CONFIG.model_copy(update={"window_rows": 1000})
    drift = InputDrift(config, conninfo="", gateway_id="gw-test", routes=dict, registry=registry)
    rng = np.random.default_rng(7)
    iris, wine, third = route("iris"), route("wine"), route("third")
    for _ in range(2):
        drift.record(iris, body(rows(rng, 500)))
    drift.record(wine, body(rows(rng, 10)))
    absorb(drift, now=1.0)
    assert set(drift.trackers) == {iris.deployment_id, wine.deployment_id}
    drift.record(third, body(rows(rng, 10)))  # a third deployment: over max_deployments
    drift.record(iris, b"x" * (config.max_pending_bytes + 1))  # over the backlog's bound
    assert drift.pending == []
    drift.record(iris, body(rows(rng, 1000, shift=3.0)))
    absorb(drift, now=2.0)
    drift.trackers[iris.deployment_id].close_if_due(config, now=2.0)
    seen = scrape(registry)
    assert seen[("converge_drift_psi", "p/iris", "2")] > 0.2 > seen[("converge_drift_psi", "p/iris", "0")]
    assert 0.5 < seen[("converge_drift_ks", "p/iris", "2")] <= 1
    assert not any(key[1] == "p/wine" for key in seen)  # collecting its reference: nothing to show
    assert seen[("converge_drift_dropped_total", "", "deployments")] == 1
    assert seen[("converge_drift_dropped_total", "", "backlog")] == 1
