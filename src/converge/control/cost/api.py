"""HTTP for cost: the price catalogue (read by anyone, changed by organisation admins) and estimates."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Query

from converge.control.cost import repository, service
from converge.control.cost.schemas import (
    CatalogueBody,
    CatalogueRead,
    CatalogueVersionSummary,
    EstimateRead,
    EstimateRequest,
    Note,
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
