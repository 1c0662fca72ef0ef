"""Policies over HTTP: validated CEL, revisions, admin-only writes, the facts reference, dry runs.

Everything runs in the rolled-back `client` transaction, so the seeded defaults stay as they are.
"""

from __future__ import annotations

import os
import pickle
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from support import ADMIN, make_key, make_project

DEFAULTS = {
    "deny-unsafe-pickles": ("deny", "registration"),
    "deny-unknown-sources": ("deny", "registration"),
    "warn-missing-license": ("warn", "registration"),
    "auto-approve-builtin-catalogue": ("approve", "registration"),
    "deployment-requires-approved": ("deny", "deployment"),
}
FACT_SECTIONS = {
    "model",
    "version",
    "artifact",
    "inspection",
    "scan",
    "benchmarks",
    "source",
    "approvals",
    "request",
}


class _RunsShell:
    """Unpickling this would run a shell command; the tests only ever pickle it."""

    def __reduce__(self) -> tuple[Callable[[str], int], tuple[str]]:
        return (os.system, ("echo pwned",))


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def _body(**fields: Any) -> dict[str, Any]:
    return {
        "name": _unique("pol"),
        "expression": 'version.format != "pickle"',
        "message": "pickles are not accepted",
        "effect": "deny",
        "scope": "registration",
    } | fields


async def _create(client: httpx.AsyncClient, **fields: Any) -> dict[str, Any]:
    resp = await client.post("/policies", json=_body(**fields), headers=ADMIN)
    assert resp.status_code == 201, resp.text
    return resp.json()


async def _by_name(client: httpx.AsyncClient, name: str) -> dict[str, Any]:
    items = (await client.get("/policies", params={"limit": 500}, headers=ADMIN)).json()["items"]
    return next(p for p in items if p["name"] == name)


async def _register(
    client: httpx.AsyncClient, data: bytes, *, filename: str = "weights.dat", tags: list[str] | None = None
) -> dict[str, Any]:
    """A model with one uploaded version, submitted by a developer of a fresh project."""
    project = await make_project(client)
    dev = await make_key(client, project["id"], "developer")
    model = await client.post("/models", json={"name": _unique("m"), "tags": tags or []}, headers=dev)
    assert model.status_code == 201, model.text
    resp = await client.post(
        f"/models/{model.json()['id']}/versions/upload",
        params={"version": "v1", "filename": filename},
        content=data,
        headers=dev | {"Content-Type": "application/octet-stream"},
    )
    assert resp.status_code == 201, resp.text
    return resp.json()


def _unknown_bytes() -> bytes:
    return b"plain bytes that are no model format: " + uuid.uuid4().hex.encode()


@pytest.fixture
async def no_raise_client(app: Any, client: httpx.AsyncClient) -> AsyncIterator[httpx.AsyncClient]:
    """Shares `client`'s rolled-back transaction but returns a 500 instead of raising the error."""
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        yield c


# --- validation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expression", "line", "column"),
    [
        ("source.known &&", 1, 16),
        ('version.format == "gguf" )', 1, 26),
        ("true &&\n  (source.known ||)", 2, 19),
    ],
    ids=["dangling-operator", "stray-paren", "second-line"],
)
async def test_cel_syntax_error_is_422_with_line_and_column(client, expression, line, column):
    resp = await client.post("/policies", json=_body(expression=expression), headers=ADMIN)

    assert resp.status_code == 422
    problem = resp.json()
    assert (problem["line"], problem["column"]) == (line, column)
    assert problem["field"] == "expression"
    assert f"line {line}, column {column}" in problem["detail"]


async def test_expression_reading_a_fact_that_does_not_exist_is_422(client):
    resp = await client.post("/policies", json=_body(expression="nosuch.fact == 1"), headers=ADMIN)

    assert resp.status_code == 422
    assert "not a fact" in resp.json()["detail"]
    assert "nosuch" in resp.json()["detail"]


async def test_approve_effect_at_deployment_scope_is_422(no_raise_client):
    body = _body(expression="true", effect="approve", scope="deployment")

    resp = await no_raise_client.post("/policies", json=body, headers=ADMIN)

    assert resp.status_code == 422


async def test_patch_to_an_approve_effect_at_deployment_scope_is_422(client):
    policy = await _create(client, scope="deployment", expression='version.state == "approved"')

    resp = await client.patch(f"/policies/{policy['id']}", json={"effect": "approve"}, headers=ADMIN)

    assert resp.status_code == 422
    assert "approve rules" in resp.json()["detail"]


# --- create, update, revisions ------------------------------------------------------------


async def test_create_valid_policy(client):
    body = _body()

    resp = await client.post("/policies", json=body, headers=ADMIN)

    assert resp.status_code == 201, resp.text
    created = resp.json()
    assert {k: created[k] for k in body} == body
    assert (created["revision"], created["builtin"], created["enabled"]) == (1, False, True)
    assert created["updated_by"] == "bootstrap"
    fetched = await client.get(f"/policies/{created['id']}", headers=ADMIN)
    assert fetched.json() == created


async def test_duplicate_policy_name_is_409(client):
    policy = await _create(client)

    resp = await client.post("/policies", json=_body(name=policy["name"]), headers=ADMIN)

    assert resp.status_code == 409


async def test_patch_bumps_the_revision_and_keeps_every_revision(client):
    policy = await _create(client, expression='version.format != "pickle"')

    resp = await client.patch(
        f"/policies/{policy['id']}", json={"expression": 'version.format == "gguf"'}, headers=ADMIN
    )

    assert resp.status_code == 200, resp.text
    assert resp.json()["revision"] == 2
    assert resp.json()["expression"] == 'version.format == "gguf"'
    revisions = (await client.get(f"/policies/{policy['id']}/revisions", headers=ADMIN)).json()
    assert [(r["revision"], r["expression"]) for r in revisions] == [
        (1, 'version.format != "pickle"'),
        (2, 'version.format == "gguf"'),
    ]
    assert {r["author"] for r in revisions} == {"bootstrap"}


async def test_patch_with_a_syntax_error_is_422_and_changes_nothing(client):
    policy = await _create(client)

    resp = await client.patch(f"/policies/{policy['id']}", json={"expression": "true &&"}, headers=ADMIN)

    assert resp.status_code == 422
    assert resp.json()["line"] == 1
    assert (await client.get(f"/policies/{policy['id']}", headers=ADMIN)).json() == policy
    assert len((await client.get(f"/policies/{policy['id']}/revisions", headers=ADMIN)).json()) == 1


@pytest.mark.parametrize("role", ["viewer", "developer", "owner"])
async def test_only_admins_write_policies(client, role):
    project = await make_project(client)
    key = await make_key(client, project["id"], role)
    policy = await _create(client)

    created = await client.post("/policies", json=_body(), headers=key)
    patched = await client.patch(f"/policies/{policy['id']}", json={"enabled": False}, headers=key)
    deleted = await client.delete(f"/policies/{policy['id']}", headers=key)

    assert (created.status_code, patched.status_code, deleted.status_code) == (403, 403, 403)
    assert "policies:write" in created.json()["detail"]
    assert (await client.get(f"/policies/{policy['id']}", headers=key)).json() == policy


async def test_unknown_policy_is_404(client):
    missing = uuid.uuid4()
    assert (await client.get(f"/policies/{missing}", headers=ADMIN)).status_code == 404
    assert (await client.patch(f"/policies/{missing}", json={}, headers=ADMIN)).status_code == 404
    assert (await client.get(f"/policies/{missing}/revisions", headers=ADMIN)).status_code == 404
    assert (await client.post(f"/policies/{missing}/dry-run", json={}, headers=ADMIN)).status_code == 404


# --- the defaults and the facts reference -------------------------------------------------


async def test_defaults_are_seeded_visible_and_marked_builtin(client):
    project = await make_project(client)
    viewer = await make_key(client, project["id"], "viewer")

    items = (await client.get("/policies", params={"limit": 500}, headers=viewer)).json()["items"]

    seeded = {p["name"]: p for p in items if p["name"] in DEFAULTS}
    assert {n: (p["effect"], p["scope"]) for n, p in seeded.items()} == DEFAULTS
    assert all(p["builtin"] and p["enabled"] for p in seeded.values())


async def test_policies_filter_by_scope_and_paginate(client):
    deployment = (await client.get("/policies", params={"scope": "deployment"}, headers=ADMIN)).json()
    assert deployment["items"] and {p["scope"] for p in deployment["items"]} == {"deployment"}
    assert "deployment-requires-approved" in {p["name"] for p in deployment["items"]}

    first = (await client.get("/policies", params={"limit": 2}, headers=ADMIN)).json()
    second = (
        await client.get("/policies", params={"limit": 2, "cursor": first["next_cursor"]}, headers=ADMIN)
    ).json()
    assert len(first["items"]) == 2 and first["next_cursor"]
    assert not {p["id"] for p in first["items"]} & {p["id"] for p in second["items"]}


async def test_switching_off_a_policy_is_a_new_revision(client):
    policy = await _by_name(client, "auto-approve-builtin-catalogue")

    resp = await client.patch(f"/policies/{policy['id']}", json={"enabled": False}, headers=ADMIN)

    assert resp.status_code == 200
    assert (resp.json()["enabled"], resp.json()["revision"]) == (False, policy["revision"] + 1)
    revisions = (await client.get(f"/policies/{policy['id']}/revisions", headers=ADMIN)).json()
    assert [r["enabled"] for r in revisions][-2:] == [True, False]


async def test_facts_reference_lists_every_section(client):
    project = await make_project(client)
    viewer = await make_key(client, project["id"], "viewer")

    resp = await client.get("/policies/facts", headers=viewer)

    assert resp.status_code == 200
    facts = resp.json()
    assert set(facts) == FACT_SECTIONS
    assert {"architecture", "parameter_count", "quantization", "context_length", "license"} <= set(
        facts["inspection"]
    )
    assert {"status", "findings"} <= set(facts["scan"])
    assert {"kind", "known"} <= set(facts["source"])


# --- policies decide registrations ------------------------------------------------------------


async def test_a_new_deny_policy_rejects_matching_registrations(client):
    await _create(
        client, expression='!("blocked" in model.tags)', message="models tagged 'blocked' are not accepted"
    )

    blocked = await _register(client, _unknown_bytes(), tags=["blocked"])
    other = await _register(client, _unknown_bytes(), tags=["fine"])

    assert blocked["state"] == "rejected"
    assert "models tagged 'blocked' are not accepted" in blocked["state_reason"]
    assert other["state"] == "pending_approval"


async def test_a_disabled_policy_decides_nothing(client):
    await _create(client, expression='!("blocked" in model.tags)', enabled=False)

    version = await _register(client, _unknown_bytes(), tags=["blocked"])

    assert version["state"] == "pending_approval"


# --- dry runs -------------------------------------------------------------------------------


async def test_dry_run_of_a_draft_counts_passes_and_failures_and_changes_nothing(client):
    unknown = await _register(client, _unknown_bytes())
    unsafe = await _register(client, pickle.dumps(_RunsShell(), protocol=4), filename="model.pkl")
    policy = await _by_name(client, "warn-missing-license")
    revisions_before = (await client.get(f"/policies/{policy['id']}/revisions", headers=ADMIN)).json()

    resp = await client.post(
        f"/policies/{policy['id']}/dry-run",
        json={"expression": 'version.format != "pickle"', "message": "no pickles"},
        headers=ADMIN,
    )

    assert resp.status_code == 200, resp.text
    result = resp.json()
    assert result["policy"] == "warn-missing-license"
    assert (
        result["evaluated"]
        == len(result["results"])
        == result["passed"] + result["failed"] + result["errors"]
    )
    rows = {r["version_id"]: r for r in result["results"]}
    assert (rows[unknown["id"]]["outcome"], rows[unknown["id"]]["message"]) == ("pass", None)
    assert (rows[unsafe["id"]]["outcome"], rows[unsafe["id"]]["message"]) == ("fail", "no pickles")
    assert rows[unsafe["id"]]["state"] == "rejected"
    assert result["passed"] >= 1 and result["failed"] >= 1
    # Nothing changed: not the policy, its revisions, nor the versions it was tried on.
    assert (await client.get(f"/policies/{policy['id']}", headers=ADMIN)).json() == policy
    assert (await client.get(f"/policies/{policy['id']}/revisions", headers=ADMIN)).json() == revisions_before
    for version in (unknown, unsafe):
        path = f"/models/{version['model_id']}/versions/{version['id']}"
        assert (await client.get(path, headers=ADMIN)).json()["state"] == version["state"]


async def test_dry_run_without_a_draft_uses_the_current_expression(client):
    unknown = await _register(client, _unknown_bytes())
    unsafe = await _register(client, pickle.dumps(_RunsShell(), protocol=4), filename="model.pkl")
    policy = await _by_name(client, "deny-unsafe-pickles")

    result = (await client.post(f"/policies/{policy['id']}/dry-run", json={}, headers=ADMIN)).json()

    rows = {r["version_id"]: r["outcome"] for r in result["results"]}
    assert rows[unknown["id"]] == "pass"
    assert rows[unsafe["id"]] == "fail"


async def test_dry_run_limit_takes_the_newest_versions(client):
    await _register(client, _unknown_bytes())
    newest = await _register(client, _unknown_bytes())
    policy = await _by_name(client, "deny-unsafe-pickles")

    result = (await client.post(f"/policies/{policy['id']}/dry-run", json={"limit": 1}, headers=ADMIN)).json()

    assert result["evaluated"] == 1
    assert result["results"][0]["version_id"] == newest["id"]


async def test_dry_run_shows_the_catalogue_rule_would_not_approve_uploads(client):
    version = await _register(client, _unknown_bytes())
    policy = await _by_name(client, "auto-approve-builtin-catalogue")

    result = (await client.post(f"/policies/{policy['id']}/dry-run", json={}, headers=ADMIN)).json()

    row = next(r for r in result["results"] if r["version_id"] == version["id"])
    assert row["outcome"] == "fail"
    assert row["message"] == "not from the built-in catalogue; needs a manual approval"


async def test_dry_run_with_a_syntax_error_is_422(client):
    policy = await _by_name(client, "deny-unsafe-pickles")

    resp = await client.post(
        f"/policies/{policy['id']}/dry-run", json={"expression": "scan.status =="}, headers=ADMIN
    )

    assert resp.status_code == 422
    assert resp.json()["line"] == 1


async def test_dry_run_of_an_invalid_draft_effect_is_422(no_raise_client):
    items = (await no_raise_client.get("/policies", params={"scope": "deployment"}, headers=ADMIN)).json()
    policy = next(p for p in items["items"] if p["name"] == "deployment-requires-approved")

    resp = await no_raise_client.post(
        f"/policies/{policy['id']}/dry-run", json={"effect": "approve"}, headers=ADMIN
    )

    assert resp.status_code == 422


async def test_dry_run_does_not_reveal_restricted_models_to_other_projects(client):
    project_a, project_b = await make_project(client), await make_project(client)
    key_a = await make_key(client, project_a["id"], "developer")
    key_b = await make_key(client, project_b["id"], "viewer")
    secret = await client.post(
        "/models",
        json={"name": _unique("secret"), "visibility": "restricted", "projects": [project_a["id"]]},
        headers=key_a,
    )
    model_id = secret.json()["id"]
    await client.post(
        f"/models/{model_id}/versions/upload",
        params={"version": "v1", "filename": "w.dat"},
        content=_unknown_bytes(),
        headers=key_a | {"Content-Type": "application/octet-stream"},
    )
    assert (await client.get(f"/models/{model_id}", headers=key_b)).status_code == 404
    policy = await _by_name(client, "deny-unsafe-pickles")

    resp = await client.post(f"/policies/{policy['id']}/dry-run", json={}, headers=key_b)

    # Dry runs see every version, so they are for policy authors only.
    assert resp.status_code == 403
    assert secret.json()["name"] not in resp.text
