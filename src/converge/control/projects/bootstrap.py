"""First start: make sure somebody can log in."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncSession

from converge.config import Settings
from converge.control.projects import repository, service
from converge.control.projects.schemas import OrgKeyCreate
from converge.storage.db import MIGRATION_LOCK_KEY, advisory_xact_lock


async def ensure_admin_key(session: AsyncSession, settings: Settings) -> str | None:
    """Create the first organisation admin key unless one exists or a bootstrap token is set.

    Returns the new key (to be shown once) or None. The transaction-level advisory lock makes
    two processes starting together create at most one key.
    """
    if settings.bootstrap_token is not None:
        return None
    await advisory_xact_lock(session, MIGRATION_LOCK_KEY)
    if await repository.has_org_admin_key(session):
        return None
    _, token = await service.create_org_key(
        session,
        None,
        body=OrgKeyCreate(name="bootstrap-admin"),
        pepper=settings.auth.secret_key.get_secret_value(),
    )
    return token
