"""The outbox: every mutation records an audit entry and an event in its own transaction."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from converge.control.events import repository
from converge.control.projects.principal import Principal
from converge.kit.context import request_id_var
from converge.models import AuditRecord


async def record(
    session: AsyncSession,
    principal: Principal | None,
    *,
    action: str,
    project_id: uuid.UUID | None,
    object_type: str,
    object_id: object,
    changes: dict[str, Any] | None = None,
    event_data: dict[str, Any] | None = None,
    restricted: bool = False,
) -> None:
    """Write the audit record now and the event at commit (NOTIFY fires when it commits).

    `action` is `<object_type>.<verb>` and doubles as the event kind. `changes` must never
    hold secrets: it is shown to auditors and streamed to subscribers. `restricted` keeps an
    organisation-wide event (no project) for admins only.
    """
    changes = changes or {}
    repository.insert_audit(
        session,
        AuditRecord(
            actor=principal.subject if principal else "system",
            actor_kind=principal.kind if principal else "system",
            action=action,
            project_id=project_id,
            object_type=object_type,
            object_id=str(object_id),
            request_id=request_id_var.get(),
            changes=changes,
        ),
    )
    data = {"actor": principal.subject if principal else "system", **(event_data or changes)}
    repository.queue_event(
        session,
        project_id=project_id,
        kind=action,
        object_id=str(object_id),
        data=data,
        restricted=restricted,
    )
