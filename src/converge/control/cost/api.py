"""HTTP for cost: the price catalogue (read by anyone, changed by organisation admins), estimates,
measured cost reports and project budgets."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Body, Path, Query, Response

from converge.control.cost import budgets, recommendations, repository, service
from converge.control.cost import report as reports
from converge.control.cost.schemas import (
    BudgetBody,
    BudgetRead,
    CatalogueBody,
    CatalogueRead,
    CatalogueVersionSummary,
    CostReport,
    CostReportQuery,
    EstimateRead,
    EstimateRequest,
    Note,
    RecommendationsRead,
)
from converge.control.projects.auth import PrincipalDep, require
from converge.control.projects.principal import Principal
from converge.deps import SessionDep
from converge.errors import PROBLEM_RESPONSES
from converge.kit.pagination import Page, PageDep, int_after, page_of
from converge.kit.schemas import INT32_MAX

router = APIRouter(prefix="/cost", tags=["cost"], responses=PROBLEM_RESPONSES)
CostRead = Annotated[Principal, require("cost:read")]
CostWrite = Annotated[Principal, require("cost:write")]
Version = Annotated[int, Query(ge=1, le=INT32_MAX)]
NoteQuery = Annotated[Note, Query(description="Why the prices changed (kept with the version and the audit)")]
BaseVersion = Annotated[
    int | None,
    Query(ge=1, le=INT32_MAX, description="Refuse (409) unless this is still the current version"),
]


@router.get("/prices", response_model=CatalogueRead)
async def get_prices(
    *, session: SessionDep, principal: PrincipalDep, version: Version | None = None
) -> CatalogueRead:
    """The price catalogue in force, or an earlier `version`."""
    return CatalogueRead.model_validate(await service.get(session, version=version))


@router.put("/prices", response_model=CatalogueRead)
async def put_prices(
    *,
    body: CatalogueBody,
    session: SessionDep,
    principal: CostWrite,
    note: NoteQuery = "",
    base_version: BaseVersion = None,
) -> CatalogueRead:
    """Replace the whole catalogue: a new version (unless nothing changed), audited."""
    row = await service.replace(
        session, principal, body=body.model_dump(mode="json"), note=note, base_version=base_version
    )
    return CatalogueRead.model_validate(row)


@router.patch("/prices", response_model=CatalogueRead)
async def patch_prices(
    *,
    body: Annotated[
        dict[str, Any],
        Body(description="A JSON merge patch (RFC 7396) of the catalogue: objects merge, null removes"),
    ],
    session: SessionDep,
    principal: CostWrite,
    note: NoteQuery = "",
    base_version: BaseVersion = None,
) -> CatalogueRead:
    """Change part of the catalogue, e.g. `{"zones": {"default": {"gpus": {"H100": {"spot": 1.8}}}}}`."""
    row = await service.patch(session, principal, body=body, note=note, base_version=base_version)
    return CatalogueRead.model_validate(row)


@router.get("/prices/versions", response_model=Page[CatalogueVersionSummary])
async def price_versions(
    *, session: SessionDep, principal: PrincipalDep, page: PageDep
) -> Page[CatalogueVersionSummary]:
    """Every version of the catalogue, newest first."""
    await service.current(session)  # the first read of a fresh installation seeds version 1
    rows = await repository.versions(session, before=int_after(page, minimum=1), limit=page.limit)
    return page_of(rows, limit=page.limit, schema=CatalogueVersionSummary, key="version")


@router.post("/estimate", response_model=EstimateRead)
async def estimate(*, body: EstimateRequest, session: SessionDep, principal: CostRead) -> EstimateRead:
    """Hourly and monthly cost, line by line, of a spec (a library version, context length,
    concurrency, optionally a GPU type, MIG profile, zone, replicas, spot) or of a deployment.

    The memory maths (weights + KV cache + overhead) comes from the version's library facts and
    picks the smallest GPU or MIG profile that fits, showing the working. When the maths is
    needed and facts are missing, the answer is a 422 whose `missing` lists them; a deployment's
    own resources are priced without it, with `missing` in the answer."""
    return await service.estimate(session, principal, body=body)


@router.get("/report", response_model=CostReport)
async def cost_report(
    *, query: Annotated[CostReportQuery, Query()], session: SessionDep, principal: PrincipalDep
) -> CostReport:
    """Measured cost per deployment (or per deployment and day): the replica-seconds the
    controller counted x the price of a replica-hour of the deployment's resources in the
    catalogue in force that day, with the requests and tokens metered and the cost per million
    tokens (null without tokens). Needs `cost:read` in the project; admins may omit `project`.
    Replica time lags by the meter's flush (10 s), usage older than yesterday comes from the
    daily roll-ups (kept beyond the raw usage retention)."""
    return await reports.report(session, principal, query=query)


@router.get("/recommendations", response_model=RecommendationsRead)
async def get_recommendations(
    *,
    session: SessionDep,
    principal: PrincipalDep,
    project: Annotated[
        str | None,
        Query(max_length=63, description="Project id or name; required unless the caller is an admin"),
    ] = None,
) -> RecommendationsRead:
    """Where the project's deployments could cost less, largest saving first, each with why and
    the numbers: a cheaper GPU or MIG profile that the memory fit says holds the model
    (right_size), and scale to zero for replicas that ran all day for requests in few hours
    (scale_to_zero). `not_checked` says what could not be checked. Needs `cost:read`."""
    return await recommendations.recommend(session, principal, project_ref=project)


ProjectRef = Annotated[str, Path(max_length=63, description="Project id or name")]


@router.get("/budgets/{project}", response_model=BudgetRead)
async def get_budget(*, project: ProjectRef, session: SessionDep, principal: PrincipalDep) -> BudgetRead:
    """The project's monthly budget and the month's measured cost against it (`cost:read`)."""
    found = await reports.project_of(session, principal, ref=project)
    assert found is not None
    return await budgets.get(session, project=found)


@router.put("/budgets/{project}", response_model=BudgetRead)
async def put_budget(
    *, project: ProjectRef, body: BudgetBody, session: SessionDep, principal: PrincipalDep
) -> BudgetRead:
    """Set the project's monthly budget in money (`project:write`, audited). `budget.alert`
    events fire at 80 % and 100 % of the month's measured cost, once each a month; with
    `enforce`, the gateway answers 429 `insufficient_quota` once 100 % is reached."""
    found = await reports.project_of(session, principal, ref=project, permission="project:write")
    assert found is not None
    return await budgets.put(session, principal, project=found, body=body, today=datetime.now(UTC).date())


@router.delete("/budgets/{project}", status_code=204)
async def delete_budget(*, project: ProjectRef, session: SessionDep, principal: PrincipalDep) -> Response:
    """Remove the project's budget (`project:write`, audited): nothing is refused for cost."""
    found = await reports.project_of(session, principal, ref=project, permission="project:write")
    assert found is not None
    await budgets.delete(session, principal, project=found)
    return Response(status_code=204)
