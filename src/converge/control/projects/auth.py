"""Authentication: API keys, the bootstrap token and OIDC bearer tokens -> a Principal."""

from __future__ import annotations

import hmac
from datetime import UTC, datetime, timedelta
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.ext.asyncio import AsyncSession

from converge.control.projects import repository
from converge.control.projects.principal import Principal, merge_role
from converge.core import apikeys as keys
from converge.core.rbac import ORG_ROLES, PROJECT_ROLES, Role
from converge.deps import SessionDep, get_state, unit_of_work
from converge.errors import Forbidden, Unauthorized
from converge.state import State

api_key_scheme = HTTPBearer(
    scheme_name="apiKey",
    bearerFormat="cvg_<prefix>_<secret>",
    description="A Converge API key (or the bootstrap token) as a bearer token",
    auto_error=False,
)
oidc_scheme = HTTPBearer(
    scheme_name="oidc",
    bearerFormat="JWT",
    description="An OIDC access token from the configured issuer",
    auto_error=False,
)


async def authenticate(session: AsyncSession, state: State, token: str) -> Principal:
    bootstrap = state.settings.bootstrap_token
    if bootstrap is not None and hmac.compare_digest(token.encode(), bootstrap.get_secret_value().encode()):
        return Principal(subject="bootstrap", kind="bootstrap", is_admin=True)
    if (parts := keys.split(token)) is not None:
        return await _from_api_key(session, state, *parts)
    if state.oidc is not None and token.count(".") == 2:
        return await _from_oidc(session, state, token)
    raise Unauthorized("Unrecognised credential: send a Converge API key (cvg_...) or an OIDC token")


async def _from_api_key(session: AsyncSession, state: State, prefix: str, secret: str) -> Principal:
    key = await repository.key_by_prefix(session, prefix)
    pepper = state.settings.auth.secret_key.get_secret_value()
    if key is None or not keys.matches(secret, key.secret_hash, pepper=pepper):
        raise Unauthorized("Invalid API key")
    now = datetime.now(UTC)
    if key.revoked_at is not None:
        raise Unauthorized(f"API key {key.prefix} was revoked at {key.revoked_at.isoformat()}")
    if key.expires_at is not None and key.expires_at <= now:
        raise Unauthorized(f"API key {key.prefix} expired at {key.expires_at.isoformat()}")
    resolution = timedelta(seconds=state.settings.auth.key_last_used_resolution_s)
    if key.last_used_at is None or now - key.last_used_at > resolution:
        await repository.touch_key(session, key.id, now)
    subject = f"key:{key.prefix}"
    if key.project_id is None:  # an organisation key: `admin`, or an organisation role below it
        if key.role == Role.ADMIN:
            return Principal(subject=subject, kind="key", is_admin=True, key_id=key.id)
        return Principal(subject=subject, kind="key", org_roles=frozenset({Role(key.role)}), key_id=key.id)
    return Principal(subject=subject, kind="key", roles={key.project_id: Role(key.role)}, key_id=key.id)


async def _from_oidc(session: AsyncSession, state: State, token: str) -> Principal:
    assert state.oidc is not None
    settings = state.settings.auth
    claims = await state.oidc.verify(token)
    subject = str(claims[settings.oidc_subject_claim])
    raw = claims.get(settings.oidc_roles_claim) or []
    values = [raw] if isinstance(raw, str) else [str(v) for v in raw]
    roles: dict = {}
    for project_id, role in await repository.memberships(session, subject):
        merge_role(roles, project_id, Role(role))
    # Claim values "<project-name>:<role>" grant project roles; the admin value grants admin, and
    # an organisation role's own name (`library-approver`) grants that role.
    wanted = dict(v.rsplit(":", 1) for v in values if ":" in v)
    named = await repository.project_ids_by_names(session, wanted) if wanted else {}
    for name, pid in named.items():
        if wanted[name] in {r.value for r in PROJECT_ROLES}:
            merge_role(roles, pid, Role(wanted[name]))
    is_admin = settings.oidc_admin_value in values
    org_roles = frozenset(r for r in ORG_ROLES if r != Role.ADMIN and r.value in values)
    return Principal(
        subject=f"oidc:{subject}", kind="oidc", is_admin=is_admin, roles=roles, org_roles=org_roles
    )


def _token(cred: HTTPAuthorizationCredentials | None) -> str:
    if cred is None or not cred.credentials:
        raise Unauthorized("Missing credential: send 'Authorization: Bearer <API key or OIDC token>'")
    return cred.credentials


async def get_principal(
    request: Request,
    session: SessionDep,
    key_cred: Annotated[HTTPAuthorizationCredentials | None, Depends(api_key_scheme)],
    _oidc_cred: Annotated[HTTPAuthorizationCredentials | None, Depends(oidc_scheme)],
) -> Principal:
    principal = await authenticate(session, get_state(request), _token(key_cred))
    request.state.principal = principal
    return principal


async def get_principal_detached(
    request: Request,
    key_cred: Annotated[HTTPAuthorizationCredentials | None, Depends(api_key_scheme)],
    _oidc_cred: Annotated[HTTPAuthorizationCredentials | None, Depends(oidc_scheme)],
) -> Principal:
    """Authenticate in a transaction of its own, for routes that manage their transactions."""
    state = get_state(request)
    async with unit_of_work(state) as session:
        principal = await authenticate(session, state, _token(key_cred))
    request.state.principal = principal
    return principal


PrincipalDep = Annotated[Principal, Depends(get_principal)]
DetachedPrincipalDep = Annotated[Principal, Depends(get_principal_detached)]


def require(permission: str):  # noqa: ANN201 - returns a FastAPI dependency
    """The principal holds `permission` in some role (a project's or the organisation's)."""

    async def dependency(principal: PrincipalDep) -> Principal:
        if not principal.can(permission):
            raise Forbidden(f"This action needs the '{permission}' permission")
        return principal

    return Depends(dependency)
