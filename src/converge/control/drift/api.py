"""HTTP for input drift: a V2 deployment's drift report and its training reference."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Response

from converge.control.drift import service
from converge.control.drift.schemas import DriftReport, ReferenceIn, ReferenceRead
from converge.control.projects.auth import PrincipalDep
from converge.deps import SessionDep, StateDep
from converge.errors import PROBLEM_RESPONSES

router = APIRouter(prefix="/deployments", tags=["deployments"], responses=PROBLEM_RESPONSES)


@router.get("/{deployment_id}/drift", response_model=DriftReport)
async def drift_report(
    *, deployment_id: uuid.UUID, session: SessionDep, principal: PrincipalDep, state: StateDep
) -> DriftReport:
    """Input drift of a V2 deployment: per feature, the PSI and KS statistic of the last closed
    window against the reference, window counts and means, and `drifting` (PSI over the
    threshold). Needs `deployments:read` on its project; the windows are the gateway's, written
    every `CONVERGE_GATEWAY__DRIFT__FLUSH_S`."""
    return await service.report(
        session, principal, deployment_id=deployment_id, config=state.settings.gateway.drift
    )


@router.put("/{deployment_id}/drift/reference", response_model=ReferenceRead)
async def put_drift_reference(
    *,
    deployment_id: uuid.UUID,
    body: ReferenceIn,
    session: SessionDep,
    principal: PrincipalDep,
    state: StateDep,
) -> ReferenceRead:
    """Compare the deployment's inputs with its training data from now on: per-feature
    histograms (numpy.histogram's edges and counts) or sample rows (quantile bins are taken).
    Needs `deployments:write`; audited. Replaces the first-window reference, and stays across
    revisions until replaced or deleted."""
    row = await service.put_reference(
        session, principal, deployment_id=deployment_id, body=body, config=state.settings.gateway.drift
    )
    return service.reference_read(row)


@router.delete("/{deployment_id}/drift/reference", status_code=204)
async def delete_drift_reference(
    *, deployment_id: uuid.UUID, session: SessionDep, principal: PrincipalDep
) -> Response:
    """Remove the reference (`deployments:write`, audited): the next full window the gateway
    sees becomes the new one."""
    await service.clear_reference(session, principal, deployment_id=deployment_id)
    return Response(status_code=204)
