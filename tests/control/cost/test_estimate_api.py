"""POST /cost/estimate over HTTP: specs priced from the library's own facts, deployments from
their resources, bad input as 422s that say what to do. All in the rolled-back `client`."""

from __future__ import annotations

import hashlib
import math
import uuid
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from support import ADMIN, make_key, make_project

from converge.control.deployments.schemas import DeploymentSpecIn
from converge.models import Artifact, Deployment, DeploymentRevision, LibraryModel, ModelVersion

# What the GGUF inspector records for Llama-2-7B in F16 (13.5 GB: the file is not made here).
LLAMA2_7B_F16: dict[str, Any] = {
    "format": "gguf",
    "architecture": "llama",
    "parameter_count": 6_738_415_616,
    "quantization": "F16",
    "context_length": 4096,
    "memory_bytes": 13_478_104_576,
    "extra": {"block_count": 32, "head_count": 32, "head_count_kv": 32, "embedding_length": 4096},
}
GIB = 2**30


async def library_version(app, *, inspection: dict[str, Any], size: int = 13_478_104_576) -> dict[str, Any]:
    """A library version with these facts, as registration stores them (the inspector's output)."""
    sha = hashlib.sha256(uuid.uuid4().bytes).hexdigest()
    model = LibraryModel(name=f"m-{uuid.uuid4().hex[:8]}", created_by="test")
    async with app.state.converge.session_factory() as session, session.begin():
        session.add(Artifact(sha256=sha, size_bytes=size, filename="model.gguf"))
        session.add(model)
        await session.flush()
        version = ModelVersion(
            model_id=model.id,
            version="v1",
            state="approved",
            format=inspection.get("format", "unknown"),
            artifact_sha256=sha,
            inspection=inspection,
            submitted_by="test",
        )
        session.add(version)
        await session.flush()
        return {"model": model.name, "model_id": str(model.id), "version_id": str(version.id), "size": size}


async def deployment(
    app, *, project: dict[str, Any], version_id: str, replicas: int = 1, **resources: Any
) -> str:
    spec = DeploymentSpecIn(model_version_id=uuid.UUID(version_id), resources=resources).model_dump(
        mode="json"
    )
    async with app.state.converge.session_factory() as session, session.begin():
        row = Deployment(
            project_id=uuid.UUID(project["id"]),
            name=f"d-{uuid.uuid4().hex[:8]}",
            model_version_id=uuid.UUID(version_id),
            desired_replicas=replicas,
            created_by="test",
        )
        session.add(row)
        await session.flush()
        session.add(DeploymentRevision(deployment_id=row.id, revision=1, spec=spec, created_by="test"))
        return str(row.id)


async def estimate(
    client, body: dict[str, Any], headers: dict[str, str] = ADMIN, status: int = 200
) -> dict[str, Any]:
    resp = await client.post("/cost/estimate", json=body, headers=headers)
    assert resp.status_code == status, resp.text
    return resp.json()


async def test_a_7b_fp16_model_at_8k_and_16_requests_gets_a_gpu_that_holds_it_and_shows_the_maths(
    app, client
):
    version = await library_version(app, inspection=LLAMA2_7B_F16)
    body = await estimate(client, {"model": f"{version['model']}:v1", "context": 8192, "concurrency": 16})

    # The same numbers by hand: weights = parameters x 2 bytes (F16); KV = 2 x 32 layers x 32 KV
    # heads x 128 head dim (4096 / 32 heads) x 2 bytes x 8192 tokens x 16 requests; overhead =
    # 10 % of both + 1 GiB.
    weights = 6_738_415_616 * 2
    kv = 2 * 32 * 32 * 128 * 2 * 8192 * 16
    need = math.ceil((weights + kv) * 1.10) + GIB
    assert body["memory"] == {
        "weights_bytes": weights,
        "kv_cache_bytes": kv,
        "overhead_bytes": need - weights - kv,
        "need_bytes": need,
    }
    working = {step["name"]: step for step in body["working"]}
    assert [s["name"] for s in body["working"]] == [
        "weights",
        "kv_cache_per_token",
        "kv_cache",
        "overhead",
        "need",
        "fit",
    ]
    assert working["kv_cache"]["expression"] == (
        "524,288 bytes x 8,192 tokens of context x 16 concurrent requests"
    )
    gpu = body["per_replica"]["gpu"]
    assert gpu["device"] == "H200" and gpu["count"] == 1 and gpu["fits"] is True
    assert gpu["need_bytes_per_device"] == need <= gpu["memory_bytes"] == 141 * 10**9
    too_small = {c["device"] for c in body["candidates"] if c["fits"] is False}
    assert {"H100", "A100-80GB", "H100 7g.80gb"} <= too_small

    # Priced by hand at the seeded default zone: an H200-hour, a core-hour, 2 GiB-hours, and the
    # 13,478,104,576-byte artifact at 0.08 per GiB-month (730 hours).
    storage_month = 13_478_104_576 / GIB * 0.08
    hourly = 4.60 + 0.04 + 2 * 0.005 + storage_month / 730
    assert body["hourly"] == pytest.approx(hourly, abs=1e-6)
    assert body["monthly"] == pytest.approx(hourly * 730, abs=0.01)
    assert [line["unit"] for line in body["lines"]] == ["GPU-hour", "core-hour", "GiB-hour", "GiB-month"]
    assert body["subject"] == {
        "kind": "spec",
        "model": version["model"],
        "version": "v1",
        "model_version_id": version["version_id"],
        "deployment_id": None,
        "deployment": None,
        "project_id": None,
    }
    assert any(alt["device"] == "L40S" and alt["count"] == 2 for alt in body["alternatives"])


def tiny_llama_gguf(path: Path) -> Path:
    """A real GGUF: llama metadata (2 layers, 4 heads, 2 KV heads, width 64) and one F16 tensor."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(uuid.uuid4().hex)  # a digest of its own
    writer.add_file_type(1)  # MOSTLY_F16
    writer.add_context_length(512)
    writer.add_block_count(2)
    writer.add_embedding_length(64)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_license("apache-2.0")
    writer.add_tensor("token_embd.weight", np.zeros((16, 64), dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


async def test_an_uploaded_gguf_is_priced_from_what_the_inspector_read_in_it(client, tmp_path):
    name = f"tiny-{uuid.uuid4().hex[:8]}"
    model = (await client.post("/models", json={"name": name}, headers=ADMIN)).json()
    data = tiny_llama_gguf(tmp_path / "tiny.gguf").read_bytes()
    uploaded = await client.post(
        f"/models/{model['id']}/versions/upload",
        params={"version": "v1", "filename": "tiny.gguf"},
        content=data,
        headers=ADMIN | {"Content-Type": "application/octet-stream"},
    )
    assert uploaded.status_code == 201, uploaded.text
    body = await estimate(client, {"model": name, "concurrency": 2, "cpu_only": True})
    # 1024 F16 weights; KV 2 x 2 layers x 2 KV heads x 16 head dim (64 / 4) x 2 bytes per token,
    # at the file's own 512-token context x 2 requests.
    weights, kv = 16 * 64 * 2, 2 * 2 * 2 * 16 * 2 * 512 * 2
    assert body["context"] == 512
    assert body["memory"]["weights_bytes"] == weights and body["memory"]["kv_cache_bytes"] == kv
    need = math.ceil((weights + kv) * 1.10) + GIB
    assert body["per_replica"] == {"cpu": 1.0, "memory_bytes": math.ceil(need / GIB) * GIB, "gpu": None}
    assert body["lines"][-1]["quantity"] == pytest.approx(len(data) / GIB, abs=1e-6)


async def test_a_cpu_deployment_is_priced_from_its_own_resources(app, client):
    project = await make_project(client)
    version = await library_version(app, inspection={"format": "onnx"}, size=GIB)
    dep = await deployment(
        app, project=project, version_id=version["version_id"], replicas=3, cpu=2, memory_bytes=4 * GIB
    )
    viewer = await make_key(client, project["id"], "viewer")
    body = await estimate(client, {"deployment_id": dep}, headers=viewer)
    assert body["subject"]["kind"] == "deployment" and body["subject"]["project_id"] == project["id"]
    assert body["replicas"] == 3 and body["per_replica"]["gpu"] is None
    cpu, memory, storage = body["lines"]
    assert (cpu["quantity"], cpu["unit_price"]) == (6, 0.04)  # 2 cores x 3 replicas
    assert (memory["quantity"], memory["unit_price"]) == (12, 0.005)  # 4 GiB x 3 replicas
    assert storage["monthly"] == pytest.approx(0.08)
    assert body["hourly"] == pytest.approx(6 * 0.04 + 12 * 0.005 + 0.08 / 730, abs=1e-6)
    # Nothing to size a model by: priced anyway (it is never free), and the answer says so.
    assert body["memory"] is None and "inspection.parameter_count" in {m["fact"] for m in body["missing"]}
    assert "The deployment's zones (local) have no prices of their own" in " ".join(body["notes"])


async def test_a_mig_deployment_pays_its_share_of_the_gpu_by_its_nvml_name(app, client):
    project = await make_project(client)
    version = await library_version(app, inspection=LLAMA2_7B_F16)
    dep = await deployment(
        app,
        project=project,
        version_id=version["version_id"],
        gpu_type="NVIDIA H100 80GB HBM3",
        mig_profile="1g.20gb",
    )
    body = await estimate(client, {"deployment_id": dep, "context": 2048, "zone": "us-east", "spot": True})
    gpu_line = body["lines"][0]
    assert gpu_line["item"] == "GPU H100 1g.20gb (spot)"
    assert gpu_line["quantity"] == 0.25 and gpu_line["unit_price"] == 1.80  # us-east H100 spot
    assert body["per_replica"]["gpu"]["fits"] is True  # 17.08 GB in 20 GB


async def test_another_projects_deployment_is_404(app, client):
    mine, theirs = await make_project(client), await make_project(client)
    version = await library_version(app, inspection=LLAMA2_7B_F16)
    dep = await deployment(app, project=theirs, version_id=version["version_id"])
    outsider = await make_key(client, mine["id"], "owner")
    body = await estimate(client, {"deployment_id": dep}, headers=outsider, status=404)
    assert body["detail"] == f"Deployment {dep} not found"


async def test_a_spec_needing_the_maths_without_the_facts_is_a_422_listing_them(app, client):
    version = await library_version(app, inspection={"format": "gguf", "quantization": "F16", "extra": {}})
    body = await estimate(client, {"model_version_id": version["version_id"], "context": 1024}, status=422)
    facts = {m["fact"] for m in body["missing"]}
    assert "inspection.parameter_count" in facts and any("head_count_kv" in f for f in facts)
    assert "lacks what the memory maths needs" in body["detail"]


async def test_unknown_gpu_types_and_zones_are_422s_listing_the_known_ones(app, client):
    version = await library_version(app, inspection=LLAMA2_7B_F16)
    spec = {"model": version["model"], "context": 1024}
    gpu = await estimate(client, spec | {"gpu_type": "B200"}, status=422)
    assert gpu["field"] == "gpu_type" and {"H100", "H200", "L4"} <= set(gpu["known"])
    zone = await estimate(client, spec | {"zone": "mars"}, status=422)
    assert zone["field"] == "zone" and zone["known"] == ["default", "eu-west", "us-east"]
    not_here = await estimate(client, spec | {"zone": "eu-west", "gpu_type": "H200"}, status=422)
    assert "in zone 'eu-west'" in not_here["detail"] and "H200" not in not_here["known"]


async def test_bad_requests_name_the_field(client):
    both = await estimate(client, {"model": "x", "deployment_id": str(uuid.uuid4())}, status=422)
    assert "exactly one of model" in both["detail"]
    fixed = await estimate(client, {"deployment_id": str(uuid.uuid4()), "cpu": 4}, status=422)
    assert "cpu: not with deployment_id" in fixed["detail"]
    negative = await estimate(client, {"model": "x", "concurrency": 0}, status=422)
    assert negative["errors"][0]["field"] == "concurrency"
    missing = await estimate(client, {"model": f"nope-{uuid.uuid4().hex[:6]}"}, status=404)
    assert "not found in the library" in missing["detail"]


async def test_members_estimate_and_a_library_approver_does_not(app, client):
    version = await library_version(app, inspection=LLAMA2_7B_F16)
    project = await make_project(client)
    viewer = await make_key(client, project["id"], "viewer")
    await estimate(client, {"model": version["model"], "context": 1024}, headers=viewer)
    key = await client.post("/keys", json={"name": "approver", "role": "library-approver"}, headers=ADMIN)
    approver = {"Authorization": f"Bearer {key.json()['token']}"}
    denied = await estimate(client, {"model": version["model"]}, headers=approver, status=403)
    assert "cost:read" in denied["detail"]
