"""Who may govern the Model Library: every library mutation, for every kind of principal, against
the organisation's model, a project's own model (public and restricted), and a project's model that
another project deploys. Then the revocation dry run, its required reason, and where it is told.

The rule under test: approvals, rejections, deprecations, revocations and changes to a model are
organisation governance (`library:approve` / `library:govern`: a library approver or an admin).
The exception: the project that submitted a model manages it (everything but approval) while no
other project deploys any version of it. Everything runs in the rolled-back `client` transaction.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from support import ADMIN, make_key, make_project

from converge.models import Build

Headers = dict[str, str]
ROLES = ("a-viewer", "a-developer", "a-owner", "b-viewer", "b-developer", "b-owner", "approver", "admin")
# The permission a refusal names, per action.
NAMES = {
    "update": "library:govern",
    "visibility": "library:govern",
    "upload": "library:submit",
    "approve": "library:approve",
    "reject": "library:approve",
    "deprecate": "library:govern",
    "revoke": "library:govern",
}

# Expected outcome per action, one column per role in ROLES:
#              a-viewer a-dev a-owner b-viewer b-dev b-owner approver admin
ORGANISATION_MODEL = {  # created by an admin: nobody in a project governs it
    "update": (403, 403, 403, 403, 403, 403, 200, 200),
    "visibility": (403, 403, 403, 403, 403, 403, 200, 200),
    "upload": (403, 403, 403, 403, 403, 403, 403, 201),
    "approve": (403, 403, 403, 403, 403, 403, 200, 200),
    "reject": (403, 403, 403, 403, 403, 403, 200, 200),
    "deprecate": (403, 403, 403, 403, 403, 403, 200, 200),
    "revoke": (403, 403, 403, 403, 403, 403, 200, 200),
}
OWN_MODEL = {  # submitted by project A, which alone uses it: A's submitters manage it, but never approve
    "update": (403, 200, 200, 403, 403, 403, 200, 200),
    "visibility": (403, 200, 200, 403, 403, 403, 200, 200),
    "upload": (403, 201, 201, 403, 403, 403, 403, 201),
    "approve": (403, 403, 403, 403, 403, 403, 200, 200),
    "reject": (403, 200, 200, 403, 403, 403, 200, 200),
    "deprecate": (403, 200, 200, 403, 403, 403, 200, 200),
    "revoke": (403, 200, 200, 403, 403, 403, 200, 200),
}
OWN_RESTRICTED_MODEL = {  # the same, restricted to project A: project B cannot even see it
    "update": (403, 200, 200, 404, 404, 404, 200, 200),
    "visibility": (403, 200, 200, 404, 404, 404, 200, 200),
    "upload": (403, 201, 201, 404, 404, 404, 403, 201),
    "approve": (403, 403, 403, 404, 404, 404, 200, 200),
    "reject": (403, 200, 200, 404, 404, 404, 200, 200),
    "deprecate": (403, 200, 200, 404, 404, 404, 200, 200),
    "revoke": (403, 200, 200, 404, 404, 404, 200, 200),
}
DEPLOYED_ELSEWHERE = {  # submitted by A, deployed by B: governed by the organisation again
    "update": (403, 403, 403, 403, 403, 403, 200, 200),
    "visibility": (403, 403, 403, 403, 403, 403, 200, 200),
    "upload": (403, 201, 201, 403, 403, 403, 403, 201),  # a new version changes nothing B runs
    "approve": (403, 403, 403, 403, 403, 403, 200, 200),
    "reject": (403, 403, 403, 403, 403, 403, 200, 200),
    "deprecate": (403, 403, 403, 403, 403, 403, 200, 200),
    "revoke": (403, 403, 403, 403, 403, 403, 200, 200),
}


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


async def _org_key(client: httpx.AsyncClient, role: str) -> Headers:
    resp = await client.post("/keys", json={"name": f"{role}-key", "role": role}, headers=ADMIN)
    assert resp.status_code == 201, resp.text
    assert resp.json()["project_id"] is None and resp.json()["role"] == role
    return {"Authorization": f"Bearer {resp.json()['token']}"}


@dataclass
class World:
    client: httpx.AsyncClient
    app: Any
    a: dict[str, Any]
    b: dict[str, Any]
    keys: dict[str, Headers]
    uploader: Headers  # a second admin (an organisation key), so the admin may approve its uploads
    model: dict[str, Any] = field(default_factory=dict)
    submitter: Headers = field(default_factory=dict)

    async def create_model(self, headers: Headers, **fields: Any) -> dict[str, Any]:
        resp = await self.client.post("/models", json={"name": _unique("gov"), **fields}, headers=headers)
        assert resp.status_code == 201, resp.text
        return resp.json()

    async def upload(self, headers: Headers, version: str | None = None) -> httpx.Response:
        return await self.client.post(
            f"/models/{self.model['id']}/versions/upload",
            params={"version": version or _unique("v"), "filename": "weights.dat"},
            content=b"no model format, only bytes: " + uuid.uuid4().bytes,
            headers={**headers, "Content-Type": "application/octet-stream"},
        )

    async def pending(self) -> dict[str, Any]:
        resp = await self.upload(self.submitter)
        assert resp.status_code == 201 and resp.json()["state"] == "pending_approval", resp.text
        return resp.json()

    async def approved(self) -> dict[str, Any]:
        version = await self.pending()
        resp = await self.verdict(version, "approve", self.keys["approver"])
        assert resp.status_code == 200 and resp.json()["state"] == "approved", resp.text
        return resp.json()

    async def verdict(
        self, version: dict[str, Any], action: str, headers: Headers, body: dict[str, Any] | None = None
    ) -> httpx.Response:
        path = f"/models/{version['model_id']}/versions/{version['id']}/{action}"
        return await self.client.post(path, json=body or {"note": "by the governance test"}, headers=headers)

    async def deploy(self, project: dict[str, Any], version: dict[str, Any], name: str) -> dict[str, Any]:
        """A deployment of `version` in `project` (its build is recorded as done: nothing runs)."""
        async with self.app.state.converge.session_factory() as session, session.begin():
            session.add(
                Build(
                    project_id=uuid.UUID(project["id"]),
                    model_version_id=uuid.UUID(version["id"]),
                    profile="cpu",
                    server="llama-cpp",
                    state="succeeded",
                    results={},
                    created_by="test",
                )
            )
        spec = {
            "name": name,
            "model_version_id": version["id"],
            "server": "llama-cpp",
            "resources": {"cpu": 1, "memory_bytes": 1 << 30},
        }
        resp = await self.client.post(
            "/deployments", params={"project": project["id"]}, json=spec, headers=ADMIN
        )
        assert resp.status_code == 201, resp.text
        return resp.json()


@pytest.fixture
async def world(client: httpx.AsyncClient, app: Any) -> World:
    a, b = await make_project(client), await make_project(client)
    keys = {}
    for letter, project in (("a", a), ("b", b)):
        for role in ("viewer", "developer", "owner"):
            keys[f"{letter}-{role}"] = await make_key(client, project["id"], role)
    keys["approver"] = await _org_key(client, "library-approver")
    keys["admin"] = ADMIN
    return World(client=client, app=app, a=a, b=b, keys=keys, uploader=await _org_key(client, "admin"))


async def organisation_model(w: World) -> None:
    w.model, w.submitter = await w.create_model(ADMIN), w.uploader


async def own_model(w: World) -> None:
    w.model, w.submitter = await w.create_model(w.keys["a-developer"]), w.keys["a-developer"]


async def own_restricted_model(w: World) -> None:
    dev = w.keys["a-developer"]
    w.model = await w.create_model(dev, visibility="restricted", projects=[w.a["id"]])
    w.submitter = dev


async def deployed_elsewhere(w: World) -> None:
    await own_model(w)
    await w.deploy(w.b, await w.approved(), "b-uses-it")


class Walk:
    """Each action against a fresh object of the state it needs; a success uses the object up."""

    def __init__(self, w: World) -> None:
        self.w = w
        self.original = {k: w.model[k] for k in ("visibility", "projects")}
        self.description = w.model["description"]
        self.objects: dict[str, dict[str, Any]] = {}

    async def _unchanged(self) -> None:
        """After a refusal: the model is as it was (the versions prove it by the next success)."""
        now = (await self.w.client.get(f"/models/{self.w.model['id']}", headers=ADMIN)).json()
        assert {k: now[k] for k in self.original} == self.original
        assert now["description"] == self.description

    async def _object(self, action: str) -> dict[str, Any]:
        if action not in self.objects:
            wants_approved = action in ("deprecate", "revoke")
            self.objects[action] = await (self.w.approved() if wants_approved else self.w.pending())
        return self.objects[action]

    async def run(self, action: str, headers: Headers) -> httpx.Response:
        w, model_path = self.w, f"/models/{self.w.model['id']}"
        if action == "update":
            description = _unique("changed")
            resp = await w.client.patch(model_path, json={"description": description}, headers=headers)
            if resp.status_code == 200:
                self.description = description
            else:
                await self._unchanged()
            return resp
        if action == "visibility":
            if self.original["visibility"] == "public":
                change = {"visibility": "restricted", "projects": [w.a["id"]]}
            else:
                change = {"visibility": "public"}
            resp = await w.client.patch(model_path, json=change, headers=headers)
            if resp.status_code == 200:  # put it back, so the next principal meets the same model
                back = await w.client.patch(model_path, json=self.original, headers=ADMIN)
                assert back.status_code == 200, back.text
            else:
                await self._unchanged()
            return resp
        if action == "upload":
            return await w.upload(headers)
        target = await self._object(action)
        body = {"reason": "withdrawn by the governance test"} if action == "revoke" else None
        resp = await w.verdict(target, action, headers, body)
        if resp.status_code < 300:
            self.objects.pop(action)
        return resp


@pytest.mark.parametrize(
    ("build", "expected"),
    [
        (organisation_model, ORGANISATION_MODEL),
        (own_model, OWN_MODEL),
        (own_restricted_model, OWN_RESTRICTED_MODEL),
        (deployed_elsewhere, DEPLOYED_ELSEWHERE),
    ],
    ids=["organisation-model", "own-model", "own-restricted-model", "deployed-by-another-project"],
)
async def test_every_library_mutation_for_every_principal(world: World, build, expected) -> None:
    await build(world)
    walk = Walk(world)
    observed: dict[str, tuple[int, ...]] = {}
    unclear: list[tuple[str, str, int, str]] = []
    for action in expected:
        statuses = []
        for role in ROLES:
            resp = await walk.run(action, world.keys[role])
            statuses.append(resp.status_code)
            if resp.status_code >= 400:
                problem = resp.json()
                if resp.headers["content-type"] != "application/problem+json":
                    unclear.append((action, role, resp.status_code, "not problem+json"))
                elif resp.status_code == 403 and NAMES[action] not in problem["detail"]:
                    unclear.append((action, role, 403, problem["detail"]))
        observed[action] = tuple(statuses)

    assert observed == expected
    assert unclear == [], "refusals must be problem+json and name the permission they need"


@pytest.mark.parametrize(
    ("role", "status"),
    [
        ("a-viewer", 403),
        ("a-developer", 201),
        ("a-owner", 201),
        ("approver", 403),
        ("admin", 201),
    ],
)
async def test_creating_a_model_needs_library_submit_and_records_the_submitting_project(
    world: World, role: str, status: int
) -> None:
    resp = await world.client.post("/models", json={"name": _unique("new")}, headers=world.keys[role])

    assert resp.status_code == status, resp.text
    if status == 403:
        assert "library:submit" in resp.json()["detail"]
    elif role == "admin":
        assert resp.json()["submitting_project_id"] is None  # the organisation's own
    else:
        assert resp.json()["submitting_project_id"] == world.a["id"]


async def test_a_model_cannot_be_submitted_for_a_project_the_caller_has_no_part_in(world: World) -> None:
    body = {"name": _unique("m"), "submitting_project_id": world.b["id"]}

    resp = await world.client.post("/models", json=body, headers=world.keys["a-developer"])

    assert resp.status_code == 404, resp.text


async def test_the_built_in_catalogue_is_governed_by_the_organisation(world: World) -> None:
    """The hostile case that started this: a project owner revoking the organisation's MiniLM."""
    await organisation_model(world)
    version = await world.approved()
    await world.deploy(world.b, version, "b-embeddings")
    a_owner = world.keys["a-owner"]

    revoke = await world.verdict(version, "revoke", a_owner, {"reason": "mine now"})
    restrict = await world.client.patch(
        f"/models/{world.model['id']}",
        json={"visibility": "restricted", "projects": [world.a["id"]]},
        headers=a_owner,
    )

    assert revoke.status_code == restrict.status_code == 403
    model = (await world.client.get(f"/models/{world.model['id']}", headers=world.keys["b-viewer"])).json()
    assert model["visibility"] == "public"
    assert [v["state"] for v in model["versions"]] == ["approved"]


async def test_a_project_that_gave_its_model_to_another_gets_it_back_when_that_one_stops(
    world: World,
) -> None:
    await own_model(world)
    version = await world.approved()
    deployment = await world.deploy(world.b, version, "b-borrows")
    dev = world.keys["a-developer"]
    assert (await world.verdict(version, "deprecate", dev)).status_code == 403

    deleted = await world.client.delete(f"/deployments/{deployment['id']}", headers=world.keys["b-developer"])
    assert deleted.status_code == 202, deleted.text

    assert (await world.verdict(version, "deprecate", dev)).status_code == 200


async def test_a_library_approver_key_holds_nothing_in_any_project(world: World) -> None:
    approver = world.keys["approver"]

    me = (await world.client.get("/auth/whoami", headers=approver)).json()
    project = await world.client.get(f"/projects/{world.a['id']}", headers=approver)
    created = await world.client.post("/models", json={"name": _unique("m")}, headers=approver)

    assert me["is_admin"] is False and me["roles"] == {} and me["org_roles"] == ["library-approver"]
    assert project.status_code == 404
    assert created.status_code == 403


async def test_a_restricted_model_is_visible_to_library_approvers(world: World) -> None:
    await own_restricted_model(world)
    listed = await world.client.get(
        "/models", params={"name": world.model["name"]}, headers=world.keys["approver"]
    )
    assert [m["id"] for m in listed.json()["items"]] == [world.model["id"]]


@pytest.mark.parametrize("role", ["owner", "library-approver"])
async def test_only_organisation_keys_carry_organisation_roles(world: World, role: str) -> None:
    project_key = await world.client.post(
        f"/projects/{world.a['id']}/keys", json={"name": "k", "role": "library-approver"}, headers=ADMIN
    )
    member = await world.client.post(
        f"/projects/{world.a['id']}/members", json={"subject": "s", "role": "library-approver"}, headers=ADMIN
    )
    org_owner = await world.client.post("/keys", json={"name": "k", "role": "owner"}, headers=ADMIN)
    by_approver = await world.client.post(
        "/keys", json={"name": "k", "role": role}, headers=world.keys["approver"]
    )

    assert project_key.status_code == member.status_code == 403
    assert "organisation role" in member.json()["detail"]
    assert org_owner.status_code == 422
    assert by_approver.status_code == 403  # organisation keys are for admins to issue


# --- revocation: the dry run, the reason, and who hears of it ----------------------------------


@pytest.fixture
async def widely_deployed(world: World) -> tuple[World, dict[str, Any], dict[str, Any]]:
    """The organisation's model, one version deployed once in A and twice in B; a bystander C."""
    await organisation_model(world)
    version = await world.approved()
    await world.deploy(world.a, version, "a-chat")
    await world.deploy(world.b, version, "b-chat")
    await world.deploy(world.b, version, "b-batch")
    other = await world.approved()
    await world.deploy(world.b, other, "b-other-version")  # not this version's: keeps running
    c = await make_project(world.client)
    return world, version, {"project": c, "viewer": await make_key(world.client, c["id"], "viewer")}


async def _events(client: httpx.AsyncClient, headers: Headers, kind: str, **params: Any) -> list[dict]:
    resp = await client.get("/events", params={"kind": kind, "limit": 500, **params}, headers=headers)
    assert resp.status_code == 200, resp.text
    return resp.json()["items"]


async def test_the_dry_run_names_the_deployments_per_project_and_changes_nothing(widely_deployed) -> None:
    w, version, _ = widely_deployed
    path = f"/models/{version['model_id']}/versions/{version['id']}/revoke"

    resp = await w.client.post(path, params={"dry_run": "true"}, headers=w.keys["approver"])

    assert resp.status_code == 200, resp.text
    plan = resp.json()
    assert plan["dry_run"] is True and plan["state"] == "approved" and plan["deployment_count"] == 3
    by_project = {p["id"]: (p["name"], sorted(d["name"] for d in p["deployments"])) for p in plan["projects"]}
    assert by_project == {
        w.a["id"]: (w.a["name"], ["a-chat"]),
        w.b["id"]: (w.b["name"], ["b-batch", "b-chat"]),
    }
    after = (
        await w.client.get(f"/models/{version['model_id']}/versions/{version['id']}", headers=ADMIN)
    ).json()
    assert after["state"] == "approved"
    assert [
        e for e in await _events(w.client, ADMIN, "model_version.revoked") if e["object_id"] == version["id"]
    ] == []
    audit = await w.client.get("/audit", params={"action": "model_version.revoked"}, headers=ADMIN)
    assert version["id"] not in {r["object_id"] for r in audit.json()["items"]}


async def test_the_dry_run_needs_the_same_permission_as_the_revocation(widely_deployed) -> None:
    """Otherwise it would show one project the names of another's deployments."""
    w, version, _ = widely_deployed
    path = f"/models/{version['model_id']}/versions/{version['id']}/revoke"

    resp = await w.client.post(path, params={"dry_run": "true"}, headers=w.keys["b-owner"])

    assert resp.status_code == 403
    assert "library:govern" in resp.json()["detail"]


@pytest.mark.parametrize("body", [None, {}, {"reason": ""}, {"reason": "   "}])
async def test_a_revocation_without_a_reason_is_422_and_revokes_nothing(widely_deployed, body) -> None:
    w, version, _ = widely_deployed
    path = f"/models/{version['model_id']}/versions/{version['id']}/revoke"

    resp = await w.client.post(path, json=body, headers=w.keys["approver"])

    assert resp.status_code == 422, resp.text
    assert resp.headers["content-type"] == "application/problem+json"
    assert "reason" in resp.json()["detail"]
    after = (
        await w.client.get(f"/models/{version['model_id']}/versions/{version['id']}", headers=ADMIN)
    ).json()
    assert after["state"] == "approved"


async def test_note_is_still_accepted_as_the_reason(widely_deployed) -> None:
    w, version, _ = widely_deployed

    resp = await w.verdict(version, "revoke", w.keys["approver"], {"note": "licence withdrawn"})

    assert resp.status_code == 200, resp.text
    assert resp.json()["state"] == "revoked" and resp.json()["state_reason"] == "licence withdrawn"


async def test_a_revocation_is_audited_and_emitted_to_the_organisation_and_each_affected_project(
    widely_deployed,
) -> None:
    w, version, bystander = widely_deployed
    reason = "licence withdrawn by the vendor"

    resp = await w.verdict(version, "revoke", w.keys["approver"], {"reason": reason})

    assert resp.status_code == 200, resp.text
    assert resp.json()["state"] == "revoked" and resp.json()["state_reason"] == reason
    # Organisation-wide: any project sees it, with counts but no other project's deployment names.
    [event] = [
        e
        for e in await _events(w.client, bystander["viewer"], "model_version.revoked")
        if e["object_id"] == version["id"]
    ]
    assert event["project_id"] is None
    assert event["data"]["reason"] == reason
    assert (event["data"]["deployments_stopped"], event["data"]["projects_affected"]) == (3, 2)
    assert "deployments" not in event["data"] and "b-chat" not in str(event["data"])
    # The audit record (organisation-wide, for admins) names every deployment that stops.
    audit = await w.client.get("/audit", params={"action": "model_version.revoked"}, headers=ADMIN)
    [entry] = [r for r in audit.json()["items"] if r["object_id"] == version["id"]]
    assert entry["project_id"] is None and entry["actor"].startswith("key:")
    assert entry["changes"]["reason"] == reason
    assert sorted((d["project"], d["name"]) for d in entry["changes"]["deployments"]) == sorted(
        [(w.a["name"], "a-chat"), (w.b["name"], "b-batch"), (w.b["name"], "b-chat")]
    )
    # Each affected project hears about its own deployments, and only about those.
    kind = "deployment.model_version_revoked"
    seen_by_b = await _events(w.client, w.keys["b-viewer"], kind, project=w.b["id"])
    assert sorted(e["data"]["deployment"] for e in seen_by_b) == ["b-batch", "b-chat"]
    assert {e["data"]["reason"] for e in seen_by_b} == {reason}
    seen_by_a = await _events(w.client, w.keys["a-viewer"], kind)
    assert [e["data"]["deployment"] for e in seen_by_a] == ["a-chat"]
    assert await _events(w.client, bystander["viewer"], kind) == []


async def test_revoking_a_version_nobody_deploys_names_nothing(world: World) -> None:
    await own_model(world)
    version = await world.approved()
    path = f"/models/{version['model_id']}/versions/{version['id']}/revoke"

    plan = await world.client.post(path, params={"dry_run": "true"}, headers=world.keys["a-owner"])

    assert plan.status_code == 200, plan.text
    assert plan.json()["projects"] == [] and plan.json()["deployment_count"] == 0


async def test_the_dry_run_of_an_invalid_revocation_is_409_like_the_real_one(world: World) -> None:
    await own_model(world)
    version = await world.approved()
    assert (
        await world.verdict(version, "revoke", world.keys["approver"], {"reason": "gone"})
    ).status_code == 200
    path = f"/models/{version['model_id']}/versions/{version['id']}/revoke"

    again = await world.client.post(path, params={"dry_run": "true"}, headers=world.keys["approver"])

    assert again.status_code == 409
    assert "cannot become 'revoked'" in again.json()["detail"]


async def test_new_models_audit_their_submitting_project(world: World) -> None:
    model = await world.create_model(world.keys["a-developer"])
    audit = await world.client.get("/audit", params={"action": "model.created"}, headers=ADMIN)
    [entry] = [r for r in audit.json()["items"] if r["object_id"] == model["id"]]
    assert entry["changes"]["submitting_project_id"] == world.a["id"]
