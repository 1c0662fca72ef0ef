"""HTTP for the Model Library: models, versions, uploads, approvals."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from starlette.requests import ClientDisconnect

from converge.control.library import acquire, repository, service
from converge.control.library.schemas import (
    AffectedProject,
    ApprovalRead,
    ModelCreate,
    ModelDetail,
    ModelRead,
    ModelUpdate,
    RevocationPlan,
    RevokeBody,
    StoppedDeployment,
    VerdictBody,
    VersionName,
    VersionRead,
    VersionRegister,
)
from converge.control.projects.auth import DetachedPrincipalDep, PrincipalDep
from converge.control.projects.principal import Principal
from converge.core.lifecycle import VersionState
from converge.deps import SessionDep, StateDep, unit_of_work
from converge.errors import PROBLEM_RESPONSES, BadRequest, PayloadTooLarge
from converge.kit.pagination import Page, PageDep, encode_cursor, page_of, uuid_after
from converge.models import Deployment, ModelVersion
from converge.storage.artifacts import ArtifactTooLarge, DigestMismatch

router = APIRouter(prefix="/models", tags=["library"], responses=PROBLEM_RESPONSES)
UPLOAD_PATH_SUFFIX = "/versions/upload"  # exempt from the body limit; capped by max_upload_bytes


async def _versions_read(session: SessionDep, versions: list[ModelVersion]) -> list[VersionRead]:
    approvals = await repository.approvals_for(session, [v.id for v in versions])
    out = []
    for v in versions:
        read = VersionRead.model_validate(v)
        read.approvals = [ApprovalRead.model_validate(a) for a in approvals if a.version_id == v.id]
        out.append(read)
    return out


@router.post("", response_model=ModelRead, status_code=201)
async def create_model(body: ModelCreate, session: SessionDep, principal: PrincipalDep) -> ModelRead:
    return ModelRead.model_validate(await service.create_model(session, principal, body=body))


@router.get("", response_model=Page[ModelRead])
async def list_models(
    session: SessionDep,
    principal: PrincipalDep,
    page: PageDep,
    name: Annotated[str | None, Query(description="Substring of the model name")] = None,
    tag: Annotated[str | None, Query(description="Models carrying this tag")] = None,
    format: Annotated[
        str | None, Query(description="Models with a version of this format, e.g. gguf")
    ] = None,
    state: Annotated[VersionState | None, Query(description="Models with a version in this state")] = None,
) -> Page[ModelRead]:
    rows = await repository.list_models(
        session,
        visible=service.library_scope(principal),
        name=name,
        tag=tag,
        format=format,
        state=state.value if state else None,
        after=uuid_after(page),
        limit=page.limit,
    )
    return page_of(rows, limit=page.limit, schema=ModelRead)


@router.get("/{model_id}", response_model=ModelDetail)
async def get_model(model_id: uuid.UUID, session: SessionDep, principal: PrincipalDep) -> ModelDetail:
    model = await service.visible_model(session, principal, model_id)
    versions = await repository.list_versions(session, model.id, limit=1000)
    return ModelDetail.model_validate(
        {**ModelRead.model_validate(model).model_dump(), "versions": await _versions_read(session, versions)}
    )


@router.patch("/{model_id}", response_model=ModelRead)
async def update_model(
    model_id: uuid.UUID, body: ModelUpdate, session: SessionDep, principal: PrincipalDep
) -> ModelRead:
    return ModelRead.model_validate(
        await service.update_model(session, principal, model_id=model_id, body=body)
    )


@router.get("/{model_id}/versions", response_model=Page[VersionRead])
async def list_versions(
    model_id: uuid.UUID,
    session: SessionDep,
    principal: PrincipalDep,
    page: PageDep,
    state: Annotated[VersionState | None, Query()] = None,
) -> Page[VersionRead]:
    model = await service.visible_model(session, principal, model_id)
    rows = await repository.list_versions(
        session, model.id, state=state.value if state else None, after=uuid_after(page), limit=page.limit
    )
    shown = rows[: page.limit]
    return Page(
        items=await _versions_read(session, shown),
        next_cursor=encode_cursor(shown[-1].id) if len(rows) > page.limit else None,
    )


@router.get("/{model_id}/versions/{version_id}", response_model=VersionRead)
async def get_version(
    model_id: uuid.UUID, version_id: uuid.UUID, session: SessionDep, principal: PrincipalDep
) -> VersionRead:
    _, version = await service.visible_version(session, principal, model_id, version_id)
    return (await _versions_read(session, [version]))[0]


async def _record(
    state: StateDep,
    principal: Principal,
    *,
    model_id: uuid.UUID,
    version: str,
    acquired: acquire.Acquired,
    provenance: dict[str, Any],
) -> VersionRead:
    """Inspect and scan with no transaction open, then record the version in a short one."""
    inspected = await service.inspect_and_scan(acquired)
    async with unit_of_work(state) as session:
        model = await service.visible_model(session, principal, model_id)
        row = await service.register_version(
            session,
            principal,
            model=model,
            version=version,
            acquired=acquired,
            source=provenance,
            approvals_required=state.settings.library.approvals_required,
            inspected=inspected,
        )
        return (await _versions_read(session, [row]))[0]


async def _admit(state: StateDep, principal: Principal, model_id: uuid.UUID, version: str, uri: str | None):  # noqa: ANN202
    """Checks before any bytes move: the model is visible, the caller may submit, the name is free."""
    async with unit_of_work(state) as session:
        model = await service.visible_model(session, principal, model_id)
        service.require_submit(principal, model)
        await service.ensure_new_version(session, model, version)
        source = await repository.source_for_uri(session, uri) if uri else None
        return (source.name, dict(source.options)) if source else None


@router.post("/{model_id}/versions", response_model=VersionRead, status_code=201)
async def register_version(
    model_id: uuid.UUID, body: VersionRegister, principal: DetachedPrincipalDep, state: StateDep
) -> VersionRead:
    """Register a version from a URI: `s3://`, `oci://`, `mlflow://models/NAME/VERSION`, or (admins)
    a path on the server."""
    source = await _admit(state, principal, model_id, body.version, body.uri)
    try:
        acquired = await acquire.from_uri(
            state.artifacts,
            state.settings,
            body.uri,
            expected_sha256=body.sha256,
            may_read_server_paths=principal.is_admin,
            options=source[1] if source else None,
        )
    except DigestMismatch as exc:
        raise _digest_problem(exc) from exc
    provenance = {
        "kind": acquired.kind,
        "uri": body.uri,
        "known": source is not None,
        "name": source[0] if source else None,
        **acquired.details,
    }
    return await _record(
        state, principal, model_id=model_id, version=body.version, acquired=acquired, provenance=provenance
    )


def _digest_problem(exc: DigestMismatch) -> BadRequest:
    return BadRequest(
        f"Digest mismatch: you declared sha256 {exc.expected} but the bytes received hash to {exc.actual}; "
        "nothing was registered",
        extra={"expected_sha256": exc.expected, "actual_sha256": exc.actual},
    )


@router.post(
    "/{model_id}" + UPLOAD_PATH_SUFFIX,
    response_model=VersionRead,
    status_code=201,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        }
    },
)
async def upload_version(
    model_id: uuid.UUID,
    request: Request,
    principal: DetachedPrincipalDep,
    state: StateDep,
    version: Annotated[VersionName, Query(description="Version name, e.g. v1")],
    filename: Annotated[str, Query(min_length=1, max_length=255, description="Original file name")],
    sha256: Annotated[
        str | None, Query(pattern=r"^(sha256:)?[0-9a-f]{64}$", description="Expected digest")
    ] = None,
) -> VersionRead:
    """Upload the artifact as the raw request body (streamed, constant memory, size-limited).

    No database transaction is open while the body streams in or the files are inspected."""
    await _admit(state, principal, model_id, version, None)
    declared = request.headers.get("content-length")

    async def chunks() -> AsyncIterator[bytes]:
        received = 0
        try:
            async for chunk in request.stream():
                received += len(chunk)
                yield chunk
        except ClientDisconnect as exc:
            raise BadRequest(f"Upload interrupted after {received} bytes; nothing was registered") from exc
        if declared is not None and received != int(declared):
            raise BadRequest(
                f"Truncated upload: {received} of {declared} bytes arrived; nothing was registered"
            )

    try:
        acquired = await acquire.from_stream(
            state.artifacts, state.settings, chunks(), filename=filename, expected_sha256=sha256
        )
    except DigestMismatch as exc:
        raise _digest_problem(exc) from exc
    except ArtifactTooLarge as exc:
        raise PayloadTooLarge(f"Upload exceeds the limit of {exc.limit} bytes") from exc
    provenance = {"kind": "upload", "uri": f"upload:{filename}", "known": True, "name": None}
    return await _record(
        state, principal, model_id=model_id, version=version, acquired=acquired, provenance=provenance
    )


@router.post("/{model_id}/versions/{version_id}/approve", response_model=VersionRead)
async def approve_version(
    model_id: uuid.UUID,
    version_id: uuid.UUID,
    body: VerdictBody,
    session: SessionDep,
    principal: PrincipalDep,
    state: StateDep,
) -> VersionRead:
    """Approve (needs `library:approve` at organisation level: a library approver or an admin;
    never your own submission)."""
    version = await service.approve(
        session,
        principal,
        model_id=model_id,
        version_id=version_id,
        note=body.note,
        approvals_required=state.settings.library.approvals_required,
    )
    return (await _versions_read(session, [version]))[0]


@router.post("/{model_id}/versions/{version_id}/reject", response_model=VersionRead)
async def reject_version(
    model_id: uuid.UUID,
    version_id: uuid.UUID,
    body: VerdictBody,
    session: SessionDep,
    principal: PrincipalDep,
) -> VersionRead:
    """Reject (final): a library approver or an admin, or the submitting project while no other
    project deploys the model."""
    version = await service.reject(
        session, principal, model_id=model_id, version_id=version_id, note=body.note
    )
    return (await _versions_read(session, [version]))[0]


@router.post(
    "/{model_id}/versions/{version_id}/revoke",
    response_model=VersionRead | RevocationPlan,
    responses={200: {"description": "The revoked version, or with `dry_run` what revoking would stop"}},
)
async def revoke_version(
    model_id: uuid.UUID,
    version_id: uuid.UUID,
    session: SessionDep,
    principal: PrincipalDep,
    body: RevokeBody | None = None,
    dry_run: Annotated[
        bool, Query(description="Answer the deployments, per project, that would stop; change nothing")
    ] = False,
) -> VersionRead | RevocationPlan:
    """Revoke (final; a reason is required): emits `model_version.revoked`, and the deployments of
    the version stop. Needs `library:govern` at organisation level, or the submitting project while
    no other project deploys the model."""
    version, stopped = await service.revoke(
        session,
        principal,
        model_id=model_id,
        version_id=version_id,
        reason=body.reason if body else "",
        dry_run=dry_run,
    )
    if dry_run:
        return _revocation_plan(version, stopped)
    return (await _versions_read(session, [version]))[0]


def _revocation_plan(version: ModelVersion, stopped: list[tuple[Deployment, str]]) -> RevocationPlan:
    projects: dict[uuid.UUID, AffectedProject] = {}
    for deployment, project_name in stopped:
        entry = projects.setdefault(
            deployment.project_id,
            AffectedProject(id=deployment.project_id, name=project_name, deployments=[]),
        )
        entry.deployments.append(StoppedDeployment.model_validate(deployment))
    return RevocationPlan(
        model_id=version.model_id,
        version_id=version.id,
        version=version.version,
        state=VersionState(version.state),
        projects=list(projects.values()),
        deployment_count=len(stopped),
    )


@router.post("/{model_id}/versions/{version_id}/deprecate", response_model=VersionRead)
async def deprecate_version(
    model_id: uuid.UUID,
    version_id: uuid.UUID,
    body: VerdictBody,
    session: SessionDep,
    principal: PrincipalDep,
) -> VersionRead:
    """Deprecate an approved version: still deployable, flagged as old."""
    version = await service.deprecate(
        session, principal, model_id=model_id, version_id=version_id, note=body.note
    )
    return (await _versions_read(session, [version]))[0]
