"""`converge deploy` and `converge deployments ...` against a real server whose controller runs
the in-memory runtime backend (the session app)."""

from __future__ import annotations

import os
import uuid
from typing import Any

from cli_support import Cli
from support import ADMIN

from converge.control.builds.schemas import BuildState
from converge.models import Build


async def _built_model(app: Any, client: Any) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    project = (
        await client.post("/projects", json={"name": f"d-{uuid.uuid4().hex[:8]}"}, headers=ADMIN)
    ).json()
    model = (await client.post("/models", json={"name": f"m-{uuid.uuid4().hex[:8]}"}, headers=ADMIN)).json()
    version = (
        await client.post(
            f"/models/{model['id']}/versions/upload",
            params={"version": "v1", "filename": "w.bin"},
            content=b"weights " + os.urandom(120),  # never starts like a pickle
            headers={**ADMIN, "content-type": "application/octet-stream"},
        )
    ).json()
    approver = await client.post(
        "/keys", json={"name": "approver", "role": "library-approver"}, headers=ADMIN
    )
    approved = await client.post(
        f"/models/{model['id']}/versions/{version['id']}/approve",
        json={},
        headers={"Authorization": f"Bearer {approver.json()['token']}"},
    )
    assert approved.json()["state"] == "approved", approved.text
    async with app.state.converge.sessions() as session, session.begin():
        session.add(
            Build(
                project_id=uuid.UUID(project["id"]),
                model_version_id=uuid.UUID(version["id"]),
                profile="cpu",
                server="llama-cpp",
                state=BuildState.SUCCEEDED,
                results={},
                created_by="test",
            )
        )
    return project, model, version


async def test_deploy_rolls_out_and_deployments_commands_manage_it(app: Any, committed_client: Any, cli: Cli):
    project, model, _ = await _built_model(app, committed_client)
    # A format the servers cannot guess: the API's 422 reaches the user readably.
    failed = await cli("deploy", f"{model['name']}:v1", "--project", project["name"], "--timeout", "30")
    assert failed.exit_code == 1 and "set `server` explicitly" in failed.output

    result = await cli(
        "deploy",
        f"{model['name']}:v1",
        "--project",
        project["name"],
        "--name",
        "chat",
        "--server",
        "llama-cpp",
        "--timeout",
        "30",
    )
    assert result.exit_code == 0, result.output
    assert "chat: Ready" in result.output

    listed = await cli("deployments", "list", "--project", project["name"])
    assert listed.exit_code == 0 and "chat" in listed.output and "Ready" in listed.output
    redeploy = await cli("deployments", "redeploy", "chat", "--project", project["name"])
    assert redeploy.exit_code == 0 and "generation 1" in redeploy.output
    show = await cli("deployments", "show", "chat", "--project", project["name"])
    assert show.exit_code == 0 and "replica" in show.output
    deleted = await cli("deployments", "delete", "chat", "--project", project["name"], "--yes")
    assert deleted.exit_code == 0
    missing = await cli("deployments", "show", "nope", "--project", project["name"])
    assert missing.exit_code == 1 and "No deployment 'nope'" in missing.output


async def test_models_revoke_dry_run_names_the_deployments_and_a_reason_is_required(
    app: Any, committed_client: Any, cli: Cli
):
    project, model, version = await _built_model(app, committed_client)
    spec = {
        "name": f"rv-{uuid.uuid4().hex[:6]}",
        "model_version_id": version["id"],
        "server": "llama-cpp",
        "resources": {"cpu": 1, "memory_bytes": 1 << 30},
    }
    created = await committed_client.post(
        "/deployments", params={"project": project["id"]}, json=spec, headers=ADMIN
    )
    assert created.status_code == 201, created.text

    plan = await cli("models", "revoke", model["name"], "v1", "--dry-run")
    no_reason = await cli("models", "revoke", model["name"], "v1")
    still = (await committed_client.get(f"/models/{model['id']}", headers=ADMIN)).json()["versions"][0]
    revoked = await cli("models", "revoke", model["name"], "v1", "--reason", "licence withdrawn")

    assert plan.exit_code == 0, plan.output
    assert (
        "would stop 1 deployment(s) in 1 project(s)" in plan.output and "Nothing was changed" in plan.output
    )
    assert project["name"] in plan.output and spec["name"] in plan.output
    assert no_reason.exit_code == 1 and "--reason" in no_reason.output
    assert still["state"] == "approved"
    assert revoked.exit_code == 0, revoked.output
    assert f"{model['name']} v1: revoked" in revoked.output
    gone = (await committed_client.get(f"/models/{model['id']}", headers=ADMIN)).json()["versions"][0]
    assert gone["state_reason"] == "licence withdrawn"


async def test_the_log_of_an_unknown_build_is_a_readable_404(cli: Cli):
    result = await cli("builds", "logs", str(uuid.uuid4()))

    assert result.exit_code == 1, result.output
    assert "Error 404" in result.stderr and "Traceback" not in result.output
