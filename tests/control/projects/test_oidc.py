"""OIDC bearer tokens, end to end: RS256 tokens minted here, verified by the app against a JWKS
served over real HTTP, mapped to admin, claim roles and project memberships."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from support import ADMIN, LiveServer, free_port, make_project, make_settings

from converge.app import create_app

ISSUER = "https://issuer.test"
AUDIENCE = "converge"


def new_rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@dataclass
class Issuer:
    """A stand-in identity provider: signing keys, and the JWKS that publishes their public halves."""

    keys: dict[str, rsa.RSAPrivateKey] = field(default_factory=dict)
    published: set[str] = field(default_factory=set)  # kids the JWKS endpoint currently lists

    def jwks(self) -> dict[str, Any]:
        out = []
        for kid in sorted(self.published):
            jwk = jwt.algorithms.RSAAlgorithm.to_jwk(self.keys[kid].public_key(), as_dict=True)
            out.append({**jwk, "kid": kid, "alg": "RS256", "use": "sig"})
        return {"keys": out}

    def token(
        self, sub: str, *, kid: str = "main", key: rsa.RSAPrivateKey | None = None, **claims: Any
    ) -> str:
        now = int(time.time())
        body = {"sub": sub, "iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + 600, **claims}
        body = {k: v for k, v in body.items() if v is not None}
        return jwt.encode(body, key or self.keys[kid], algorithm="RS256", headers={"kid": kid})


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def new_sub() -> str:
    return f"user-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
async def issuer() -> AsyncIterator[tuple[Issuer, str]]:
    """The issuer and the URL of its JWKS, served by uvicorn on a loopback port."""
    idp = Issuer(keys={"main": new_rsa_key()}, published={"main"})

    async def jwks(_: Request) -> JSONResponse:
        return JSONResponse(idp.jwks())

    async with LiveServer(Starlette(routes=[Route("/jwks", jwks)]), free_port()) as srv:
        yield idp, f"{srv.url}/jwks"


@pytest.fixture(scope="module")
async def oidc_app(
    issuer: tuple[Issuer, str], pg_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Any]:
    auth = {"oidc_jwks_url": issuer[1], "oidc_issuer": ISSUER, "oidc_audience": AUDIENCE}
    application = create_app(
        make_settings(pg_url, tmp_path_factory.mktemp("oidc"), auth=auth), on_first_key=None
    )
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture
async def oidc(oidc_app: Any) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the OIDC-enabled app whose database writes are rolled back after the test."""
    state = oidc_app.state.converge
    async with state.engine.connect() as conn:
        outer = await conn.begin()
        state.session_factory = lambda: AsyncSession(
            bind=conn, expire_on_commit=False, join_transaction_mode="create_savepoint"
        )
        try:
            transport = httpx.ASGITransport(app=oidc_app)
            async with httpx.AsyncClient(transport=transport, base_url="http://oidc") as c:
                yield c
        finally:
            state.session_factory = None
            await outer.rollback()


@pytest.fixture
def idp(issuer: tuple[Issuer, str]) -> Issuer:
    return issuer[0]


# --- verification ------------------------------------------------------------------------------


async def test_a_valid_admin_token_is_accepted(oidc, idp):
    sub = new_sub()
    resp = await oidc.get("/auth/whoami", headers=bearer(idp.token(sub, converge_roles=["admin"])))

    assert resp.status_code == 200, resp.text
    assert resp.json() == {
        "subject": f"oidc:{sub}",
        "kind": "oidc",
        "is_admin": True,
        "roles": {},
        "org_roles": [],
    }


def _expired(idp: Issuer) -> str:
    long_ago = int(time.time()) - 3600
    return idp.token(new_sub(), iat=long_ago - 600, exp=long_ago, converge_roles=["admin"])


REJECTED = {
    "wrong audience": (lambda idp: idp.token(new_sub(), aud="someone-else"), "audience"),
    "wrong issuer": (lambda idp: idp.token(new_sub(), iss="https://evil.test"), "issuer"),
    "expired": (_expired, "expired"),
    "unknown key id": (lambda idp: idp.token(new_sub(), kid="never-published", key=new_rsa_key()), "key id"),
    "bad signature": (lambda idp: idp.token(new_sub(), kid="main", key=new_rsa_key()), "signature"),
    "no subject": (lambda idp: idp.token(None), "sub"),  # type: ignore[arg-type]
}


@pytest.mark.parametrize("case", list(REJECTED))
async def test_an_invalid_token_is_a_401_problem_that_says_why(oidc, idp, case):
    make_token, reason = REJECTED[case]

    resp = await oidc.get("/auth/whoami", headers=bearer(make_token(idp)))

    assert resp.status_code == 401, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    assert resp.headers["www-authenticate"] == "Bearer"
    problem = resp.json()
    assert problem["status"] == 401
    assert "OIDC token" in problem["detail"]
    assert reason in problem["detail"].lower()


async def test_a_key_published_after_the_jwks_was_cached_is_picked_up(oidc, idp):
    warm = await oidc.get("/auth/whoami", headers=bearer(idp.token(new_sub())))
    assert warm.status_code == 200  # the app now holds a cached JWKS without "rotated"
    idp.keys["rotated"] = new_rsa_key()
    idp.published.add("rotated")
    try:
        resp = await oidc.get("/auth/whoami", headers=bearer(idp.token(new_sub(), kid="rotated")))
    finally:
        idp.published.discard("rotated")

    assert resp.status_code == 200, resp.text


async def test_without_a_reachable_jwks_tokens_are_refused_with_a_401(pg_url, tmp_path, idp):
    auth = {
        "oidc_jwks_url": f"http://127.0.0.1:{free_port()}/jwks",
        "oidc_issuer": ISSUER,
        "oidc_audience": AUDIENCE,
    }
    application = create_app(make_settings(pg_url, tmp_path, auth=auth), on_first_key=None)
    async with (
        application.router.lifespan_context(application),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=application), base_url="http://x") as c,
    ):
        resp = await c.get("/auth/whoami", headers=bearer(idp.token(new_sub(), converge_roles=["admin"])))

    assert resp.status_code == 401
    assert "JWKS" in resp.json()["detail"]


# --- roles from the claim ----------------------------------------------------------------------


async def test_a_viewer_claim_reads_its_project_only(oidc, idp):
    project = await make_project(oidc)
    other = await make_project(oidc)
    token = bearer(idp.token(new_sub(), converge_roles=[f"{project['name']}:viewer"]))

    whoami = await oidc.get("/auth/whoami", headers=token)
    read = await oidc.get(f"/projects/{project['id']}", headers=token)
    write = await oidc.post(
        f"/projects/{project['id']}/keys", json={"name": "k", "role": "viewer"}, headers=token
    )
    hidden = await oidc.get(f"/projects/{other['id']}", headers=token)

    assert whoami.json()["is_admin"] is False
    assert whoami.json()["roles"] == {project["id"]: "viewer"}
    assert read.status_code == 200 and read.json()["your_role"] == "viewer"
    assert write.status_code == 403, write.text
    assert hidden.status_code == 404, hidden.text
    listed = (await oidc.get("/projects", headers=token)).json()["items"]
    assert [p["id"] for p in listed] == [project["id"]]


async def test_a_claim_cannot_grant_admin_or_unknown_roles_in_a_project(oidc, idp):
    project = await make_project(oidc)
    claims = [f"{project['name']}:admin", f"{project['name']}:superuser", "no-such-project:owner"]
    token = bearer(idp.token(new_sub(), converge_roles=claims))

    whoami = (await oidc.get("/auth/whoami", headers=token)).json()
    read = await oidc.get(f"/projects/{project['id']}", headers=token)

    assert whoami["is_admin"] is False and whoami["roles"] == {}
    assert read.status_code == 404


async def _admin_upload(oidc: httpx.AsyncClient) -> dict[str, Any]:
    model = (await oidc.post("/models", json={"name": f"m-{uuid.uuid4().hex[:8]}"}, headers=ADMIN)).json()
    resp = await oidc.post(
        f"/models/{model['id']}/versions/upload",
        params={"version": "v1", "filename": "w.bin"},
        content=uuid.uuid4().bytes,
        headers={**ADMIN, "content-type": "application/octet-stream"},
    )
    assert resp.status_code == 201, resp.text
    return resp.json()


async def test_the_library_approver_claim_grants_the_organisation_role_and_nothing_in_projects(oidc, idp):
    project = await make_project(oidc)
    token = bearer(idp.token(new_sub(), converge_roles=["library-approver"]))
    version = await _admin_upload(oidc)

    whoami = (await oidc.get("/auth/whoami", headers=token)).json()
    approved = await oidc.post(
        f"/models/{version['model_id']}/versions/{version['id']}/approve", json={}, headers=token
    )

    assert whoami["is_admin"] is False and whoami["roles"] == {}
    assert whoami["org_roles"] == ["library-approver"]
    assert approved.status_code == 200 and approved.json()["state"] == "approved", approved.text
    assert (await oidc.get(f"/projects/{project['id']}", headers=token)).status_code == 404


async def test_library_approver_is_not_a_project_role_in_the_claim(oidc, idp):
    project = await make_project(oidc)
    token = bearer(idp.token(new_sub(), converge_roles=[f"{project['name']}:library-approver"]))
    version = await _admin_upload(oidc)

    whoami = (await oidc.get("/auth/whoami", headers=token)).json()
    approve = await oidc.post(
        f"/models/{version['model_id']}/versions/{version['id']}/approve", json={}, headers=token
    )

    assert whoami["roles"] == {} and whoami["org_roles"] == []
    assert approve.status_code == 403


async def test_an_approver_who_also_develops_never_approves_their_own_submission(oidc, idp):
    project = await make_project(oidc)
    claims = ["library-approver", f"{project['name']}:developer"]
    token = bearer(idp.token(new_sub(), converge_roles=claims))
    model = await oidc.post("/models", json={"name": f"m-{uuid.uuid4().hex[:8]}"}, headers=token)
    assert model.status_code == 201, model.text
    assert model.json()["submitting_project_id"] == project["id"]
    version = await oidc.post(
        f"/models/{model.json()['id']}/versions/upload",
        params={"version": "v1", "filename": "w.bin"},
        content=uuid.uuid4().bytes,
        headers={**token, "content-type": "application/octet-stream"},
    )
    assert version.status_code == 201, version.text

    own = await oidc.post(
        f"/models/{model.json()['id']}/versions/{version.json()['id']}/approve", json={}, headers=token
    )

    assert own.status_code == 403
    assert "separation of duties" in own.json()["detail"].lower()


async def test_a_submitter_in_several_projects_names_the_project_a_model_is_for(oidc, idp):
    first, second = await make_project(oidc), await make_project(oidc)
    claims = [f"{first['name']}:developer", f"{second['name']}:owner"]
    token = bearer(idp.token(new_sub(), converge_roles=claims))

    unnamed = await oidc.post("/models", json={"name": f"m-{uuid.uuid4().hex[:8]}"}, headers=token)
    named = await oidc.post(
        "/models",
        json={"name": f"m-{uuid.uuid4().hex[:8]}", "submitting_project_id": second["id"]},
        headers=token,
    )

    assert unnamed.status_code == 422, unnamed.text
    assert "submitting_project_id" in unnamed.json()["detail"]
    assert named.status_code == 201, named.text
    assert named.json()["submitting_project_id"] == second["id"]


# --- roles from membership ---------------------------------------------------------------------


async def test_a_member_added_by_subject_gets_that_role(oidc, idp):
    project = await make_project(oidc)
    other = await make_project(oidc)
    sub = new_sub()
    added = await oidc.post(
        f"/projects/{project['id']}/members", json={"subject": sub, "role": "developer"}, headers=ADMIN
    )
    assert added.status_code == 201, added.text
    token = bearer(idp.token(sub))

    read = await oidc.get(f"/projects/{project['id']}", headers=token)
    key = await oidc.post(
        f"/projects/{project['id']}/keys", json={"name": "ci", "role": "developer"}, headers=token
    )
    above = await oidc.post(
        f"/projects/{project['id']}/keys", json={"name": "boss", "role": "owner"}, headers=token
    )
    members = await oidc.post(
        f"/projects/{project['id']}/members", json={"subject": "x", "role": "viewer"}, headers=token
    )
    hidden = await oidc.get(f"/projects/{other['id']}", headers=token)

    assert read.status_code == 200 and read.json()["your_role"] == "developer"
    assert key.status_code == 201, key.text
    assert key.json()["created_by"] == f"oidc:{sub}"
    assert above.status_code == 403, above.text
    assert members.status_code == 403, members.text
    assert hidden.status_code == 404, hidden.text


async def test_membership_and_claim_roles_merge_to_the_higher(oidc, idp):
    project = await make_project(oidc)
    sub = new_sub()
    added = await oidc.post(
        f"/projects/{project['id']}/members", json={"subject": sub, "role": "viewer"}, headers=ADMIN
    )
    assert added.status_code == 201, added.text
    token = bearer(idp.token(sub, converge_roles=[f"{project['name']}:owner"]))

    read = await oidc.get(f"/projects/{project['id']}", headers=token)

    assert read.json()["your_role"] == "owner"


async def test_an_oidc_user_who_creates_a_project_owns_it_by_their_subject(oidc, idp):
    sub = new_sub()
    as_admin = bearer(idp.token(sub, converge_roles=["admin"]))
    created = await oidc.post("/projects", json={"name": f"p-{uuid.uuid4().hex[:10]}"}, headers=as_admin)
    assert created.status_code == 201, created.text
    project = created.json()["id"]

    # The same person, once no longer an organisation admin, still owns what they created.
    as_user = bearer(idp.token(sub))
    read = await oidc.get(f"/projects/{project}", headers=as_user)
    members = (await oidc.get(f"/projects/{project}/members", headers=ADMIN)).json()["items"]
    again = await oidc.post(
        f"/projects/{project}/members", json={"subject": sub, "role": "viewer"}, headers=ADMIN
    )

    assert read.status_code == 200, read.text
    assert read.json()["your_role"] == "owner"
    # Stored by the bare claim, the form POST /members takes, so the same person is one member.
    assert [(m["subject"], m["role"]) for m in members] == [(sub, "owner")]
    assert again.status_code == 409, again.text
