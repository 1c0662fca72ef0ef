"""GET /cost/recommendations: a cheaper device the memory fit allows, scale to zero for mostly
idle deployments, each with the numbers (checked here against the estimate and by hand)."""

from __future__ import annotations

import hashlib
import uuid
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select
from support import ADMIN, make_key, make_project
from test_estimate_api import LLAMA2_7B_F16, deployment, library_version
from test_report import CPU_2_4, replica_time, today, usage

from converge.models import Artifact, DeploymentRevision, ModelVersion


async def recommendations(client: Any, project: dict[str, Any], headers: dict[str, str] = ADMIN) -> Any:
    resp = await client.get("/cost/recommendations", params={"project": project["id"]}, headers=headers)
    return resp


def as_deployment(project: dict[str, Any], deployment_id: str, name: str = "") -> dict[str, Any]:
    return {"id": uuid.UUID(deployment_id), "project_id": uuid.UUID(project["id"]), "name": name or "d"}


async def test_a_gpu_larger_than_the_fit_needs_is_right_sized(app, client):
    project = await make_project(client)
    version = await library_version(app, inspection=LLAMA2_7B_F16)
    d = await deployment(app, project=project, version_id=version["version_id"], gpus=1, gpu_type="H200")
    body = (await recommendations(client, project)).json()
    (advice,) = [r for r in body["data"] if r["kind"] == "right_size"]
    assert advice["deployment_id"] == d and advice["proposed_hourly"] < advice["current_hourly"]
    # The same fit the estimate shows for this model at the in-flight target (4 per replica).
    spec = await client.post(
        "/cost/estimate", json={"model": f"{version['model']}:v1", "concurrency": 4}, headers=ADMIN
    )
    assert advice["numbers"]["need_bytes"] == spec.json()["memory"]["need_bytes"]
    assert advice["numbers"]["current_device"] == "1 x H200"
    # No replica time measured yet: one replica (its target), all month.
    hours = (await client.get("/cost/prices", headers=ADMIN)).json()["catalogue"]["hours_per_month"]
    saving = (advice["current_hourly"] - advice["proposed_hourly"]) * hours
    assert advice["monthly_savings"] == pytest.approx(saving, abs=0.01)
    assert "GB" in advice["why"] and advice["numbers"]["proposed_device"] in advice["why"]


async def test_a_mostly_idle_deployment_is_told_to_scale_to_zero(app, client):
    project = await make_project(client)
    version = await library_version(app, inspection={})
    idle = await deployment(
        app, project=project, version_id=version["version_id"], cpu=2, memory_bytes=4 << 30
    )
    d = as_deployment(project, idle)
    for back in range(3):
        await replica_time(app, d, day=today() - timedelta(days=back), seconds=86400, resources=CPU_2_4)
    await usage(app, d, day=today(), tokens=[(10, 10, 200)])  # at 12:00: one active hour in 72
    body = (await recommendations(client, project)).json()
    (advice,) = [r for r in body["data"] if r["kind"] == "scale_to_zero"]
    assert advice["numbers"]["active_hours"] == 1 and advice["numbers"]["hours_ran"] == 72
    cost = advice["numbers"]["cost"]
    assert cost == pytest.approx(3 * 24 * advice["current_hourly"], rel=1e-6)
    assert advice["monthly_savings"] == pytest.approx(cost * (1 - 1 / 72) * 30 / 3, abs=0.01)
    assert not [r for r in body["data"] if r["kind"] == "spot"]  # a production project


async def test_a_development_projects_deployment_is_advised_spot_with_the_prices_by_hand(app, client):
    dev, prod = await make_project(client), await make_project(client)
    marked = await client.patch(f"/projects/{dev['id']}", json={"environment": "development"}, headers=ADMIN)
    assert marked.status_code == 200 and marked.json()["environment"] == "development", marked.text
    assert prod["environment"] == "production"  # the default
    version = await library_version(app, inspection={})
    on_dev = await deployment(app, project=dev, version_id=version["version_id"], cpu=2, memory_bytes=4 << 30)
    await deployment(app, project=prod, version_id=version["version_id"], cpu=2, memory_bytes=4 << 30)

    catalogue = (await client.get("/cost/prices", headers=ADMIN)).json()["catalogue"]
    zone = catalogue["zones"][catalogue["default_zone"]]
    on_demand = 2 * zone["cpu_core_hour"]["on_demand"] + 4 * zone["memory_gib_hour"]["on_demand"]
    spot = 2 * zone["cpu_core_hour"]["spot"] + 4 * zone["memory_gib_hour"]["spot"]
    (advice,) = [r for r in (await recommendations(client, dev)).json()["data"] if r["kind"] == "spot"]
    assert advice["deployment_id"] == on_dev
    assert advice["current_hourly"] == pytest.approx(on_demand, abs=1e-6)
    assert advice["proposed_hourly"] == pytest.approx(spot, abs=1e-6)
    # No replica time measured yet: its one replica, all month.
    saving = (on_demand - spot) * catalogue["hours_per_month"]
    assert advice["monthly_savings"] == pytest.approx(saving, abs=0.01)
    assert "development" in advice["why"] and f"{spot:.4f}" in advice["why"]
    assert not [r for r in (await recommendations(client, prod)).json()["data"] if r["kind"] == "spot"]

    bad = await client.patch(f"/projects/{dev['id']}", json={"environment": "dev"}, headers=ADMIN)
    assert bad.status_code == 422 and "environment" in bad.text


async def test_a_deployment_that_already_scales_to_zero_is_left_alone(app, client):
    project = await make_project(client)
    version = await library_version(app, inspection={})
    quiet = await deployment(app, project=project, version_id=version["version_id"])
    d = as_deployment(project, quiet)
    await replica_time(app, d, day=today(), seconds=86400)
    await usage(app, d, day=today(), tokens=[(1, 1, 200)])  # one active hour of 24
    assert [r["kind"] for r in (await recommendations(client, project)).json()["data"]] == ["scale_to_zero"]
    async with app.state.converge.session_factory() as session, session.begin():
        rev = await session.scalar(
            select(DeploymentRevision).where(DeploymentRevision.deployment_id == uuid.UUID(quiet))
        )
        assert rev is not None
        rev.spec = {**rev.spec, "autoscaling": {**rev.spec["autoscaling"], "scale_to_zero_after_s": 300}}
    assert (await recommendations(client, project)).json()["data"] == []


async def test_another_projects_recommendations_are_invisible(app, client):
    mine, theirs = await make_project(client), await make_project(client)
    developer = await make_key(client, mine["id"], "developer")
    assert (await recommendations(client, theirs, developer)).status_code == 404
    assert (await recommendations(client, mine, developer)).status_code == 200


async def add_version(
    app, model_id: str, *, version: str, inspection: dict[str, Any], state: str = "approved"
) -> str:
    """Another version of the same library model (a quantised build of it, say)."""
    sha = hashlib.sha256(uuid.uuid4().bytes).hexdigest()
    async with app.state.converge.session_factory() as session, session.begin():
        session.add(
            Artifact(sha256=sha, size_bytes=int(inspection.get("memory_bytes") or 1), filename="m.gguf")
        )
        row = ModelVersion(model_id=uuid.UUID(model_id), version=version, state=state, format="gguf",
                           artifact_sha256=sha, inspection=inspection, submitted_by="test")  # fmt: skip
        session.add(row)
        await session.flush()
        return str(row.id)


Q8_0 = {**LLAMA2_7B_F16, "quantization": "Q8_0", "memory_bytes": 7_161_089_728}


async def test_an_approved_quantised_version_that_fits_a_cheaper_gpu_is_advised(app, client):
    project = await make_project(client)
    version = await library_version(app, inspection=LLAMA2_7B_F16)
    d = await deployment(app, project=project, version_id=version["version_id"], gpus=1, gpu_type="H100")
    pending = await add_version(
        app, version["model_id"], version="v3-pending", inspection=Q8_0, state="pending"
    )
    body = (await recommendations(client, project)).json()
    assert [r for r in body["data"] if r["kind"] == "quantised_variant"] == []  # not approved: not offered
    async with app.state.converge.session_factory() as session, session.begin():
        row = await session.get(ModelVersion, uuid.UUID(pending))
        assert row is not None
        row.state, row.version = "approved", "v2"
    body = (await recommendations(client, project)).json()
    (advice,) = [r for r in body["data"] if r["kind"] == "quantised_variant"]
    assert advice["deployment_id"] == d and advice["numbers"]["proposed_version"] == "v2"
    assert (
        advice["numbers"]["quantization"] == "Q8_0" and advice["proposed_hourly"] < advice["current_hourly"]
    )
    # The same memory fit the estimate shows for the quantised version at the in-flight target.
    q8 = (await client.post("/cost/estimate", json={"model": f"{version['model']}:v2", "concurrency": 4},
                            headers=ADMIN)).json()  # fmt: skip
    f16 = (await client.post("/cost/estimate", json={"model": f"{version['model']}:v1", "concurrency": 4},
                             headers=ADMIN)).json()  # fmt: skip
    assert advice["numbers"]["need_bytes"] == q8["memory"]["need_bytes"] < f16["memory"]["need_bytes"]
    hours = (await client.get("/cost/prices", headers=ADMIN)).json()["catalogue"]["hours_per_month"]
    saving = (advice["current_hourly"] - advice["proposed_hourly"]) * hours
    assert advice["monthly_savings"] == pytest.approx(saving, abs=0.01)
    assert "Q8_0" in advice["why"] and advice["numbers"]["proposed_device"] in advice["why"]


async def test_small_models_each_on_a_whole_gpu_are_advised_to_share_one(app, client):
    project = await make_project(client)
    small = {**LLAMA2_7B_F16, "parameter_count": 1_100_000_000, "memory_bytes": 2_200_000_000,
             "context_length": 2048, "extra": {"block_count": 22, "head_count": 32, "head_count_kv": 4,
                                               "embedding_length": 2048}}  # fmt: skip
    names = []
    for _ in range(2):
        v = await library_version(app, inspection=small)
        names.append(
            await deployment(app, project=project, version_id=v["version_id"], gpus=1, gpu_type="H100")
        )
    body = (await recommendations(client, project)).json()
    (advice,) = [r for r in body["data"] if r["kind"] == "consolidate"]
    n = advice["numbers"]
    assert (n["replicas"], n["gpus_now"], n["gpus_shared"]) == (2, 2, 1)
    assert n["need_bytes"] <= n["gpu_memory_bytes"]  # both fit in one GPU's memory
    prices = (await client.get("/cost/prices", headers=ADMIN)).json()["catalogue"]
    one_gpu = advice["current_hourly"] / 2
    assert advice["proposed_hourly"] == pytest.approx(one_gpu)
    assert advice["monthly_savings"] == pytest.approx(one_gpu * prices["hours_per_month"], abs=0.01)
    assert advice["deployment_id"] in names and "H100" in advice["why"]
