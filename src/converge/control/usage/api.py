"""HTTP for usage: what the gateway served, aggregated."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from converge.control.projects.auth import PrincipalDep
from converge.control.usage import service
from converge.control.usage.schemas import UsageQuery, UsageReport
from converge.deps import SessionDep
from converge.errors import PROBLEM_RESPONSES

router = APIRouter(tags=["usage"], responses=PROBLEM_RESPONSES)


@router.get("/usage", response_model=UsageReport, response_model_exclude_unset=True)
async def usage(
    query: Annotated[UsageQuery, Query()], session: SessionDep, principal: PrincipalDep
) -> UsageReport:
    """Requests, errors, tokens and latency percentiles per group, with totals for the window.

    Needs `project:read` on the project (admins may omit `project` to see every project). Each
    row holds only the fields named in `group_by`, then the measures.
    """
    return await service.report(session, principal, query=query)
