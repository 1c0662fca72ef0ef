"""Model Library rules: registration (scan, inspect, decide), approvals, the lifecycle."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from converge.control.events.service import record
from converge.control.library import repository
from converge.control.library.acquire import Acquired
from converge.control.library.inspection import inspect_artifact, scan_artifact
from converge.control.library.schemas import ModelCreate, ModelUpdate
from converge.control.policies.repository import rules_for
from converge.control.projects.principal import Principal
from converge.core.lifecycle import InvalidTransition, VersionState, transition
from converge.core.policy import Decision, build_facts, evaluate
from converge.errors import Conflict, Forbidden, NotFound, PolicyDenied
from converge.kit.unique import flush_or_conflict
from converge.models import LibraryModel, ModelVersion

S = VersionState
SYSTEM = "system:policy"


def _can_see(principal: Principal | None, model: LibraryModel) -> bool:
    if principal is None or principal.is_admin or model.visibility == "public":
        return True
    return bool(set(model.projects) & set(principal.roles))


async def visible_model(session: AsyncSession, principal: Principal, model_id: uuid.UUID) -> LibraryModel:
    model = await repository.get_model(session, model_id)
    if model is None or not _can_see(principal, model):
        raise NotFound(f"Model {model_id} not found")
    return model


async def visible_version(
    session: AsyncSession,
    principal: Principal,
    model_id: uuid.UUID,
    version_id: uuid.UUID,
    *,
    lock: bool = False,
) -> tuple[LibraryModel, ModelVersion]:
    model = await visible_model(session, principal, model_id)
    version = await repository.get_version(session, version_id, lock=lock)
    if version is None or version.model_id != model.id:
        raise NotFound(f"Version {version_id} not found in model '{model.name}'")
    return model, version


def require_submit(principal: Principal) -> None:
    _require(principal, "library:submit")


def _require(principal: Principal, permission: str) -> None:
    if not principal.can(permission):
        raise Forbidden(f"This action needs the '{permission}' permission")


async def create_model(
    session: AsyncSession, principal: Principal | None, *, body: ModelCreate
) -> LibraryModel:
    if principal is not None:
        _require(principal, "library:submit")
    model = LibraryModel(
        name=body.name,
        description=body.description,
        tags=body.tags,
        visibility=body.visibility,
        projects=body.projects,
        created_by=principal.subject if principal else "system",
    )
    session.add(model)
    await flush_or_conflict(session, f"A model named '{body.name}' already exists")
    await record(
        session,
        principal,
        action="model.created",
        project_id=None,
        restricted=model.visibility == "restricted",
        object_type="model",
        object_id=model.id,
        changes={"name": model.name, "visibility": model.visibility, "tags": model.tags},
    )
    return model


async def update_model(
    session: AsyncSession, principal: Principal, *, model_id: uuid.UUID, body: ModelUpdate
) -> LibraryModel:
    model = await visible_model(session, principal, model_id)
    if not (principal.can("library:approve") or model.created_by == principal.subject):
        raise Forbidden("Only the model's creator or a library approver can change it")
    changes: dict[str, Any] = {}
    for field in body.model_fields_set:
        value = getattr(body, field)
        if value is not None:
            setattr(model, field, value)
            changes[field] = [str(v) for v in value] if field == "projects" else value
    await session.flush()
    await record(
        session,
        principal,
        action="model.updated",
        project_id=None,
        restricted=model.visibility == "restricted",
        object_type="model",
        object_id=model.id,
        changes=changes,
    )
    return model


async def _restricted(session: AsyncSession, model_id: uuid.UUID) -> bool:
    """Events of a restricted model are for admins only: they would name it to every project."""
    model = await session.get(LibraryModel, model_id)
    return model is not None and model.visibility == "restricted"


async def _move(
    session: AsyncSession, principal: Principal | None, version: ModelVersion, target: S, *, reason: str = ""
) -> None:
    try:
        version.state = transition(version.state, target)
    except InvalidTransition as exc:
        raise Conflict(str(exc)) from exc
    version.state_reason = reason
    await session.flush()
    await record(
        session,
        principal,
        action=f"model_version.{target.value}",
        project_id=None,
        restricted=await _restricted(session, version.model_id),
        object_type="model_version",
        object_id=version.id,
        changes={"model_id": str(version.model_id), "version": version.version, "reason": reason},
    )


def version_facts(
    model: LibraryModel,
    version: ModelVersion,
    *,
    approvers: list[str],
    required: int,
    request: dict[str, Any] | None = None,
    artifact_size: int | None = None,
) -> dict[str, Any]:
    return build_facts(
        model={
            "name": model.name,
            "tags": model.tags,
            "visibility": model.visibility,
            "projects": [str(p) for p in model.projects],
        },
        version={
            "id": str(version.id),
            "version": version.version,
            "state": version.state,
            "submitted_by": version.submitted_by,
            "format": version.format,
            "created_at": version.created_at.isoformat() if version.created_at else None,
        },
        artifact={
            "sha256": version.artifact_sha256,
            "size_bytes": artifact_size,
            "files": version.inspection.get("files") or [],
        },
        inspection=version.inspection,
        scan=version.scan,
        benchmarks=version.benchmarks,
        source=version.source,
        approvals={"count": len(approvers), "required": required, "approvers": approvers},
        request=request or {},
    )


async def inspect_and_scan(acquired: Acquired) -> tuple[dict[str, Any], dict[str, Any]]:
    """Facts and scan of an acquired artifact (CPU-bound, in a thread; no database needed)."""
    return await asyncio.to_thread(_inspect_and_scan, acquired.local_path)


async def ensure_new_version(session: AsyncSession, model: LibraryModel, version: str) -> None:
    if await repository.version_by_name(session, model.id, version) is not None:
        raise Conflict(f"Model '{model.name}' already has a version '{version}'")


def _inspect_and_scan(path: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    try:
        inspection = inspect_artifact(path).to_dict()
    except ValueError as exc:  # a file that claims a format but cannot be read as it
        inspection = {"format": "unknown", "error": str(exc)}
    return inspection, scan_artifact(path).to_dict()


async def register_version(
    session: AsyncSession,
    principal: Principal | None,
    *,
    model: LibraryModel,
    version: str,
    acquired: Acquired,
    source: dict[str, Any],
    approvals_required: int,
    inspected: tuple[dict[str, Any], dict[str, Any]] | None = None,
) -> ModelVersion:
    """Record the version, scan and inspect its files, run the registration policies.

    Everything happens in the caller's transaction: a failure anywhere registers nothing.
    Callers that can should pass `inspected` (from `inspect_and_scan`, run before the
    transaction) so no transaction stays open during seconds of CPU work.
    """
    if principal is not None:
        _require(principal, "library:submit")
    await ensure_new_version(session, model, version)
    await repository.upsert_artifact(
        session,
        sha256=acquired.blob.sha256,
        size_bytes=acquired.blob.size_bytes,
        is_directory=acquired.is_directory,
        filename=acquired.filename,
    )
    submitter = principal.subject if principal else "system"
    row = ModelVersion(
        model_id=model.id,
        version=version,
        state=S.REGISTERED,
        artifact_sha256=acquired.blob.sha256,
        source=source,
        submitted_by=submitter,
    )
    session.add(row)
    await session.flush()
    await record(
        session,
        principal,
        action="model_version.registered",
        project_id=None,
        restricted=model.visibility == "restricted",
        object_type="model_version",
        object_id=row.id,
        changes={
            "model": model.name,
            "version": version,
            "sha256": acquired.blob.sha256,
            "source": {k: source.get(k) for k in ("kind", "uri")},
        },
    )
    await _move(session, principal, row, S.SCANNING)
    row.inspection, row.scan = inspected or await inspect_and_scan(acquired)
    row.format = row.inspection.get("format") or "unknown"
    if not acquired.is_directory:  # the cache names the file by digest; facts use its real name
        row.inspection = {**row.inspection, "files": [acquired.filename]}
    facts = version_facts(
        model,
        row,
        approvers=[],
        required=approvals_required,
        artifact_size=acquired.blob.size_bytes,
        request={"principal": submitter, "action": "register"},
    )
    decision = evaluate(await rules_for(session, "registration"), facts, scope="registration")
    row.decision = decision.to_dict()
    if not decision.allowed:
        await _move(session, principal, row, S.REJECTED, reason=_rejection(decision, row.scan))
        return row
    await _move(session, principal, row, S.PENDING_APPROVAL, reason=_warnings(decision))
    if decision.approve:
        await _add_approval(
            session, None, row, verdict="approve", note="approved by policy", decision=decision
        )
        await _maybe_approve(session, None, row, required=approvals_required)
    return row


def _rejection(decision: Decision, scan: dict[str, Any]) -> str:
    """The failed rules, and the scan findings that made them fail, as one readable reason."""
    reason = "; ".join(decision.reasons)
    dangerous = [f for f in scan.get("findings", []) if f.get("severity") in ("dangerous", "error")]
    if dangerous:
        found = ", ".join(f"{f.get('global') or f.get('message')} in {f.get('file')}" for f in dangerous[:5])
        reason += f" (scan findings: {found})"
    return reason


def _warnings(decision: Decision) -> str:
    return "; ".join(o.message or o.rule for o in decision.warnings)


async def _add_approval(
    session: AsyncSession,
    principal: Principal | None,
    version: ModelVersion,
    *,
    verdict: str,
    note: str,
    decision: Decision | None = None,
) -> None:
    from converge.models import Approval

    approver = principal.subject if principal else SYSTEM
    session.add(
        Approval(
            version_id=version.id,
            approver=approver,
            verdict=verdict,
            note=note,
            decision=decision.to_dict() if decision else {},
        )
    )
    await flush_or_conflict(session, f"{approver} has already given a verdict on this version")


async def _maybe_approve(
    session: AsyncSession, principal: Principal | None, version: ModelVersion, *, required: int
) -> None:
    approvals = [a for a in await repository.approvals_for(session, [version.id]) if a.verdict == "approve"]
    # A policy approval stands for the whole quorum: that is what switching it on means.
    if any(a.approver == SYSTEM for a in approvals) or len(approvals) >= required:
        await _move(session, principal, version, S.APPROVED, reason=f"{len(approvals)} approval(s)")


async def approve(
    session: AsyncSession,
    principal: Principal,
    *,
    model_id: uuid.UUID,
    version_id: uuid.UUID,
    note: str,
    approvals_required: int,
) -> ModelVersion:
    _require(principal, "library:approve")
    model, version = await visible_version(session, principal, model_id, version_id, lock=True)
    if version.submitted_by == principal.subject:
        raise Forbidden("Separation of duties: you submitted this version, so someone else must approve it")
    if version.state != S.PENDING_APPROVAL:
        raise Conflict(f"Only versions pending approval can be approved; this one is '{version.state}'")
    existing = await repository.approvals_for(session, [version.id])
    approvers = [a.approver for a in existing if a.verdict == "approve"] + [principal.subject]
    facts = version_facts(
        model,
        version,
        approvers=approvers,
        required=approvals_required,
        request={"principal": principal.subject, "action": "approve"},
    )
    decision = evaluate(await rules_for(session, "approval"), facts, scope="approval")
    if not decision.allowed:
        raise PolicyDenied(
            "Approval denied by policy: " + "; ".join(decision.reasons),
            extra={"decision": decision.to_dict()},
        )
    await _add_approval(session, principal, version, verdict="approve", note=note, decision=decision)
    await record(
        session,
        principal,
        action="model_version.approval_added",
        project_id=None,
        restricted=model.visibility == "restricted",
        object_type="model_version",
        object_id=version.id,
        changes={"note": note, "count": len(approvers), "required": approvals_required},
    )
    await _maybe_approve(session, principal, version, required=approvals_required)
    return version


async def reject(
    session: AsyncSession, principal: Principal, *, model_id: uuid.UUID, version_id: uuid.UUID, note: str
) -> ModelVersion:
    _require(principal, "library:approve")
    _, version = await visible_version(session, principal, model_id, version_id, lock=True)
    await _add_approval(session, principal, version, verdict="reject", note=note)
    await _move(session, principal, version, S.REJECTED, reason=note or f"rejected by {principal.subject}")
    return version


async def change_state(
    session: AsyncSession,
    principal: Principal,
    *,
    model_id: uuid.UUID,
    version_id: uuid.UUID,
    target: S,
    note: str,
) -> ModelVersion:
    """Deprecate, revoke or restore; revocation is what running deployments act on."""
    _require(principal, "library:approve")
    _, version = await visible_version(session, principal, model_id, version_id, lock=True)
    await _move(session, principal, version, target, reason=note or f"{target.value} by {principal.subject}")
    return version
