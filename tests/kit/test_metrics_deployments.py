"""The deployment metrics move when the thing happens: the controller's replicas by phase, restarts,
engine slots and KV cache, reconcile duration and errors (against the in-memory runtime), and a
deny policy's denials."""

from __future__ import annotations

import os
import time
import uuid
from datetime import datetime
from typing import Any

import httpx
import pytest
from support import ADMIN, make_project

from converge.control.builds.schemas import BuildState
from converge.kit.observability import Metrics
from converge.models import Build
from converge.runtime.base import EngineStats
from converge.runtime.fake import FakeBackend
from converge.workers.controller import Controller


async def deployable_version(app: Any, client: httpx.AsyncClient) -> tuple[dict[str, Any], dict[str, Any]]:
    """(project, version): an approved version the project may deploy."""
    project = await make_project(client)
    model = (await client.post("/models", json={"name": f"m-{uuid.uuid4().hex[:8]}"}, headers=ADMIN)).json()
    version = (
        await client.post(
            f"/models/{model['id']}/versions/upload",
            params={"version": "v1", "filename": "weights.bin"},
            # Random bytes that start like a pickle (0x80) would be scanned as one: never let them.
            content=b"weights " + os.urandom(248),
            headers={**ADMIN, "content-type": "application/octet-stream"},
        )
    ).json()
    made = await client.post("/keys", json={"name": "approver", "role": "library-approver"}, headers=ADMIN)
    approver = {"Authorization": f"Bearer {made.json()['token']}"}
    approved = await client.post(
        f"/models/{model['id']}/versions/{version['id']}/approve", json={}, headers=approver
    )
    assert approved.status_code == 200, approved.text
    async with app.state.converge.session_factory() as session, session.begin():
        session.add(
            Build(
                project_id=uuid.UUID(project["id"]),
                model_version_id=uuid.UUID(version["id"]),
                profile="cpu",
                server="llama-cpp",
                state=BuildState.SUCCEEDED,
                results={"tokens_per_s": 42.0},
                created_by="test",
            )
        )
    return project, approved.json()


def spec(version_id: str, **overrides: Any) -> dict[str, Any]:
    return {
        "name": f"d-{uuid.uuid4().hex[:8]}",
        "model_version_id": version_id,
        "server": "llama-cpp",
        "resources": {"cpu": 1, "memory_bytes": 1 << 30},
        **overrides,
    }


def controller(app: Any, backend: FakeBackend, metrics: Metrics) -> Controller:
    state = app.state.converge
    return Controller(
        sessions=state.session_factory,
        settings=state.settings,
        store=state.artifacts,
        runtime=backend,
        conninfo="unused",
        metrics=metrics,
    )


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


async def two_replicas(
    app: Any, client: httpx.AsyncClient
) -> tuple[dict[str, Any], str, FakeBackend, Metrics, Controller]:
    """A deployment of two replicas and a controller of its own on the in-memory runtime:
    (deployment, its metrics label as the gateway labels it, runtime, metrics, controller)."""
    project, version = await deployable_version(app, client)
    created = await client.post(
        "/deployments",
        params={"project": project["id"]},
        json=spec(version["id"], replicas={"min": 2, "max": 2}),
        headers=ADMIN,
    )
    d = created.json()
    backend, metrics = FakeBackend(), Metrics()
    return d, f"{project['name']}/{d['name']}", backend, metrics, controller(app, backend, metrics)


async def test_replicas_by_phase_and_restarts_follow_what_the_runtime_observes(app, client):
    d, label, backend, metrics, ctl = await two_replicas(app, client)
    await ctl.reconcile(uuid.UUID(d["id"]))
    await ctl.reconcile(uuid.UUID(d["id"]))
    assert sample(metrics, "converge_replicas", deployment=label, phase="ready") == 2
    assert sample(metrics, "converge_replicas", deployment=label, phase="backoff") == 0
    assert sample(metrics, "converge_replica_restarts_total", deployment=label) == 0  # exists, at 0

    replicas = (await client.get(f"/deployments/{d['id']}", headers=ADMIN)).json()["status"]["replicas"]
    backend.crash(replicas[0]["id"])
    await ctl.reconcile(uuid.UUID(d["id"]))  # observed: restarted once
    assert sample(metrics, "converge_replica_restarts_total", deployment=label) == 1
    backend.crash(replicas[0]["id"])
    backend.crash(replicas[1]["id"])
    await ctl.reconcile(uuid.UUID(d["id"]))
    assert sample(metrics, "converge_replica_restarts_total", deployment=label) == 3
    await ctl.reconcile(uuid.UUID(d["id"]))  # nothing new crashed: the count stays
    assert sample(metrics, "converge_replica_restarts_total", deployment=label) == 3

    assert (await client.delete(f"/deployments/{d['id']}", headers=ADMIN)).status_code in (200, 202, 204)
    await ctl.reconcile(uuid.UUID(d["id"]))  # deleted: its series go with it
    assert sample(metrics, "converge_replicas", deployment=label, phase="ready") is None
    assert sample(metrics, "converge_replica_restarts_total", deployment=label) is None


async def test_engine_slots_and_kv_cache_are_series_where_the_engine_reports_them(app, client):
    d, label, backend, metrics, ctl = await two_replicas(app, client)
    await ctl.reconcile(uuid.UUID(d["id"]))
    await ctl.reconcile(uuid.UUID(d["id"]))
    # Nothing reported yet (an engine without slots, e.g. the embeddings server): absent, not 0.
    assert sample(metrics, "converge_engine_slots", deployment=label, state="total") is None
    assert sample(metrics, "converge_engine_kv_cache_usage_ratio", deployment=label) is None

    first, second = (await client.get(f"/deployments/{d['id']}", headers=ADMIN)).json()["status"]["replicas"]

    def engine(busy: int, kv: float, generated: int, cached: int) -> EngineStats:
        return EngineStats(
            slots_busy=busy,
            slots_total=4,
            kv_cache_usage_ratio=kv,
            tokens_generated_total=generated,
            prompt_tokens_total=2 * generated,
            prompt_tokens_cached_total=cached,
        )

    backend.set_load(first["id"], in_flight=3, engine=engine(3, 0.5, generated=100, cached=10))
    backend.set_load(second["id"], in_flight=1, engine=engine(1, 0.125, generated=40, cached=0))
    await ctl.reconcile(uuid.UUID(d["id"]))
    assert sample(metrics, "converge_engine_slots", deployment=label, state="busy") == 4
    assert sample(metrics, "converge_engine_slots", deployment=label, state="total") == 8
    assert sample(metrics, "converge_engine_kv_cache_usage_ratio", deployment=label) == 0.5  # the fullest

    def tokens(kind: str) -> float | None:
        return sample(metrics, "converge_engine_tokens_total", deployment=label, kind=kind)

    assert tokens("generated") == 0  # first sight: the baseline, not a spike of what came before
    backend.set_load(first["id"], engine=engine(2, 0.5, generated=164, cached=30))
    backend.set_load(second["id"], engine=engine(0, 0.0, generated=8, cached=4))  # restarted: from 0
    await ctl.reconcile(uuid.UUID(d["id"]))
    assert tokens("generated") == 64 + 8
    assert tokens("prompt") == 128 + 16
    assert tokens("prompt_cached") == 20 + 4

    assert (await client.delete(f"/deployments/{d['id']}", headers=ADMIN)).status_code in (200, 202, 204)
    await ctl.reconcile(uuid.UUID(d["id"]))
    assert sample(metrics, "converge_engine_slots", deployment=label, state="busy") is None


async def test_the_soonest_live_key_expiry_of_each_project_is_a_series_for_the_expiry_alert(app, client):
    project = await make_project(client)
    keys = f"/projects/{project['id']}/keys"
    soon = (await client.post(keys, json={"name": "soon", "expires_in_days": 3}, headers=ADMIN)).json()
    await client.post(keys, json={"name": "later", "expires_in_days": 30}, headers=ADMIN)
    await client.post(keys, json={"name": "never", "expires_in_days": None}, headers=ADMIN)
    metrics = Metrics()
    ctl = controller(app, FakeBackend(), metrics)

    def expiry() -> float | None:
        return sample(metrics, "converge_api_key_next_expiry_timestamp_seconds", project=project["name"])

    await ctl.key_expiry()
    assert expiry() == pytest.approx(datetime.fromisoformat(soon["expires_at"]).timestamp(), abs=1e-3)
    revoked = await client.delete(f"{keys}/{soon['id']}", headers=ADMIN)
    assert revoked.status_code in (200, 204), revoked.text
    await ctl.key_expiry()
    assert expiry() == pytest.approx(time.time() + 30 * 86400, abs=120)  # a revoked key is no warning
    for key in (await client.get(keys, headers=ADMIN)).json()["items"]:
        await client.delete(f"{keys}/{key['id']}", headers=ADMIN)
    await ctl.key_expiry()
    assert expiry() is None  # nothing live left to expire: no series


def test_engine_stats_take_only_the_figures_an_engine_really_reports() -> None:
    llama = {
        "in_flight": 2,
        "slots_busy": 2,
        "slots_total": 4,
        "kv_cache_usage_ratio": 0.25,
        "kv_cache_tokens": 9,
    }
    assert EngineStats.of(llama) == EngineStats(slots_busy=2, slots_total=4, kv_cache_usage_ratio=0.25)
    assert EngineStats.of({"in_flight": 0, "queue_depth": 0}) is None  # the embeddings server
    odd = {"slots_busy": "2", "slots_total": True, "kv_cache_usage_ratio": -1}
    assert EngineStats.of(odd) is None  # nothing a broken replica says is taken as a figure


class _Unreachable(FakeBackend):
    """A runtime that refuses everything, as a cluster API that is away."""

    def artifact_path(self, *, sha256: str) -> str | None:
        raise RuntimeError("the runtime is away")

    async def delete(self, *, deployment_id: uuid.UUID) -> None:
        raise RuntimeError("the runtime is away")


async def test_a_pass_counts_each_failed_reconcile_and_times_every_one(app, client):
    project, version = await deployable_version(app, client)
    await client.post(
        "/deployments", params={"project": project["id"]}, json=spec(version["id"]), headers=ADMIN
    )
    metrics = Metrics()
    good = controller(app, FakeBackend(), metrics)
    await good.reconcile_all()
    reconciled = sample(metrics, "converge_reconcile_duration_seconds_count")
    assert reconciled is not None and reconciled >= 1
    # The database is shared with tests running beside this one: their deployments are in these
    # passes too (one of theirs may fail on this fresh backend), so the test counts differences.
    errors = sample(metrics, "converge_reconcile_errors_total")
    assert errors is not None and errors < reconciled  # ours reconciled

    await controller(app, _Unreachable(), metrics).reconcile_all()
    second_pass = sample(metrics, "converge_reconcile_duration_seconds_count") - reconciled
    assert second_pass >= 1  # ours, at least
    assert sample(metrics, "converge_reconcile_errors_total") - errors == second_pass  # every one failed


async def test_a_deny_policy_counts_its_denial_by_name(app, client):
    project, version = await deployable_version(app, client)
    name = f"no-deploys-{uuid.uuid4().hex[:8]}"
    policy = await client.post(
        "/policies",
        json={
            "name": name,
            "expression": "false",
            "message": "deployments are frozen",
            "effect": "deny",
            "scope": "deployment",
        },
        headers=ADMIN,
    )
    assert policy.status_code == 201, policy.text
    metrics = app.state.converge.metrics
    before = sample(metrics, "converge_policy_denials_total", scope="deployment", policy=name) or 0
    for _ in range(2):
        refused = await client.post(
            "/deployments", params={"project": project["id"]}, json=spec(version["id"]), headers=ADMIN
        )
        assert refused.status_code == 409, refused.text
    assert sample(metrics, "converge_policy_denials_total", scope="deployment", policy=name) == before + 2
    scrape = (await client.get("/metrics")).text
    assert f'converge_policy_denials_total{{policy="{name}",scope="deployment"}} 2.0' in scrape
