"""Model Library rules: registration (scan, inspect, decide), approvals, the lifecycle."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from converge.control.deployments import repository as deployments_repo
from converge.control.events.service import record
from converge.control.library import repository
from converge.control.library.acquire import Acquired
from converge.control.library.inspection import inspect_artifact, scan_artifact
from converge.control.library.schemas import ModelCreate, ModelUpdate
from converge.control.policies.service import rules_for
from converge.control.projects import repository as projects_repo
from converge.control.projects.principal import Principal
from converge.core.lifecycle import InvalidTransition, VersionState, transition
from converge.core.policy import Decision, evaluate, version_facts
from converge.errors import Conflict, Forbidden, NotFound, PolicyDenied, Unprocessable
from converge.kit.unique import flush_or_conflict
from converge.models import Deployment, LibraryModel, ModelVersion

S = VersionState
SYSTEM = "system:policy"


def library_scope(principal: Principal) -> set[uuid.UUID] | None:
    """The projects whose restricted models the principal sees; None: the whole library (admins
    and library approvers, who read the library organisation-wide)."""
    return None if principal.can_org("library:read") else set(principal.roles)


def _can_see(principal: Principal | None, model: LibraryModel) -> bool:
    if principal is None or model.visibility == "public":
        return True
    scope = library_scope(principal)
    return scope is None or bool(set(model.projects) & scope)


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


def require_submit(principal: Principal, model: LibraryModel) -> None:
    """Adding a version: `library:submit` in the project that submitted the model; the
    organisation's own models (no submitting project) take it at organisation level (admins)."""
    project_id = model.submitting_project_id
    if project_id is None and not principal.can_org("library:submit"):
        raise Forbidden(
            f"Model '{model.name}' is the organisation's: adding versions to it needs the "
            "'library:submit' permission at organisation level (an admin)"
        )
    if project_id is not None and not principal.can("library:submit", project_id):
        raise Forbidden(
            f"Adding versions to model '{model.name}' needs the 'library:submit' permission in the "
            "project that submitted it (a developer or owner there)"
        )


async def _submitting_project(
    session: AsyncSession, principal: Principal, requested: uuid.UUID | None
) -> uuid.UUID | None:
    """The project a new model is submitted for: the one asked for, or the caller's only project
    where it may submit; admins submit for the organisation unless they name a project."""
    if requested is not None:
        if not principal.sees(requested) or await projects_repo.get_project(session, requested) is None:
            raise NotFound(f"Project {requested} not found")
        if not principal.can("library:submit", requested):
            raise Forbidden("Your role in that project does not include 'library:submit'")
        return requested
    if principal.is_admin:
        return None
    candidates = sorted(p for p in principal.roles if principal.can("library:submit", p))
    if not candidates:
        raise Forbidden(
            "Creating a model needs the 'library:submit' permission (a developer or owner of a project)"
        )
    if len(candidates) > 1:
        raise Unprocessable(
            "You may submit in several projects: name the one submitting this model in "
            "'submitting_project_id'",
            extra={"field": "submitting_project_id", "projects": [str(p) for p in candidates]},
        )
    return candidates[0]


async def authorize_governance(
    session: AsyncSession, principal: Principal, model: LibraryModel, *, permission: str, doing: str
) -> None:
    """Organisation governance (`permission` at organisation level), or the exception: whoever
    holds `library:submit` in the project that submitted the model manages it while no other
    project deploys any version of it (then it affects nobody else)."""
    if principal.can_org(permission):
        return
    project_id = model.submitting_project_id
    needs = f"{doing} needs the '{permission}' permission (a library approver or an admin)"
    if project_id is None:
        raise Forbidden(f"{needs}: model '{model.name}' is the organisation's")
    if not principal.can("library:submit", project_id):
        raise Forbidden(
            f"{needs}, or 'library:submit' in the project that submitted model '{model.name}' "
            "while no other project deploys it"
        )
    if await deployments_repo.using_model(session, model_id=model.id, other_than=project_id, limit=1):
        raise Forbidden(
            f"{needs}: another project deploys a version of model '{model.name}', so your project "
            "no longer manages it alone"
        )


async def create_model(
    session: AsyncSession, principal: Principal | None, *, body: ModelCreate
) -> LibraryModel:
    project_id = None
    if principal is not None:
        project_id = await _submitting_project(session, principal, body.submitting_project_id)
    model = LibraryModel(
        name=body.name,
        description=body.description,
        tags=body.tags,
        visibility=body.visibility,
        projects=body.projects,
        submitting_project_id=project_id,
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
        changes={
            "name": model.name,
            "visibility": model.visibility,
            "tags": model.tags,
            "submitting_project_id": str(project_id) if project_id else None,
        },
    )
    return model


async def update_model(
    session: AsyncSession, principal: Principal, *, model_id: uuid.UUID, body: ModelUpdate
) -> LibraryModel:
    model = await visible_model(session, principal, model_id)
    visibility = bool({"visibility", "projects"} & body.model_fields_set)
    doing = "Changing a model's visibility" if visibility else "Changing a model"
    await authorize_governance(session, principal, model, permission="library:govern", doing=doing)
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
    model = await repository.get_model(session, model_id)
    return model is not None and model.visibility == "restricted"


def _check_transition(version: ModelVersion, target: S) -> S:
    try:
        return transition(version.state, target)
    except InvalidTransition as exc:
        raise Conflict(str(exc)) from exc


async def _move(
    session: AsyncSession,
    principal: Principal | None,
    version: ModelVersion,
    target: S,
    *,
    reason: str = "",
    audit: dict[str, Any] | None = None,
    event: dict[str, Any] | None = None,
) -> None:
    """Change state; `audit` adds to the audit record, `event` to the event (default: the same)."""
    version.state = _check_transition(version, target)
    version.state_reason = reason
    await session.flush()
    changes = {"model_id": str(version.model_id), "version": version.version, "reason": reason}
    await record(
        session,
        principal,
        action=f"model_version.{target.value}",
        project_id=None,
        restricted=await _restricted(session, version.model_id),
        object_type="model_version",
        object_id=version.id,
        changes={**changes, **(audit or {})},
        event_data={**changes, **event} if event is not None else None,
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
        require_submit(principal, model)
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
    model, version = await visible_version(session, principal, model_id, version_id, lock=True)
    # Never the exception for a submitting project: an approval is what lets every project that
    # sees the model deploy the version, and visibility can widen later.
    if not principal.can_org("library:approve"):
        raise Forbidden(
            "Approving a version needs the 'library:approve' permission (a library approver or an admin)"
        )
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
    model, version = await visible_version(session, principal, model_id, version_id, lock=True)
    await authorize_governance(
        session, principal, model, permission="library:approve", doing="Rejecting a version"
    )
    await _add_approval(session, principal, version, verdict="reject", note=note)
    await _move(session, principal, version, S.REJECTED, reason=note or f"rejected by {principal.subject}")
    return version


async def deprecate(
    session: AsyncSession, principal: Principal, *, model_id: uuid.UUID, version_id: uuid.UUID, note: str
) -> ModelVersion:
    """An approved version stays deployable, flagged as old."""
    model, version = await visible_version(session, principal, model_id, version_id, lock=True)
    await authorize_governance(
        session, principal, model, permission="library:govern", doing="Deprecating a version"
    )
    await _move(
        session, principal, version, S.DEPRECATED, reason=note or f"deprecated by {principal.subject}"
    )
    return version


async def revoke(
    session: AsyncSession,
    principal: Principal,
    *,
    model_id: uuid.UUID,
    version_id: uuid.UUID,
    reason: str,
    dry_run: bool = False,
) -> tuple[ModelVersion, list[tuple[Deployment, str]]]:
    """Revoke (final): the controller stops every deployment of the version. Returns the version
    and the deployments that stop, with their projects' names; a dry run only answers them.

    A dry run needs the same permission as the revocation: it names other projects' deployments.
    """
    model, version = await visible_version(session, principal, model_id, version_id, lock=not dry_run)
    await authorize_governance(
        session, principal, model, permission="library:govern", doing="Revoking a version"
    )
    _check_transition(version, S.REVOKED)
    if not dry_run and not reason:
        raise Unprocessable(
            "A revocation needs a reason ('reason'): it is final, and the reason is recorded and sent "
            "to every project whose deployments it stops",
            extra={"field": "reason"},
        )
    stopped = await deployments_repo.using_model(session, model_id=model.id, version_id=version.id)
    if not dry_run:
        await _revoke_and_tell(session, principal, model, version, stopped=stopped, reason=reason)
    return version, stopped


async def _revoke_and_tell(
    session: AsyncSession,
    principal: Principal,
    model: LibraryModel,
    version: ModelVersion,
    *,
    stopped: list[tuple[Deployment, str]],
    reason: str,
) -> None:
    """The organisation-wide event counts what stops (it must not name one project's deployments
    to the others); the audit record names them, and each affected project hears of its own."""
    counts = {
        "deployments_stopped": len(stopped),
        "projects_affected": len({d.project_id for d, _ in stopped}),
    }
    named = [
        {"id": str(d.id), "name": d.name, "project_id": str(d.project_id), "project": project}
        for d, project in stopped
    ]
    audit = {**counts, "deployments": named}
    await _move(session, principal, version, S.REVOKED, reason=reason, audit=audit, event=counts)
    for deployment, _ in stopped:
        await record(
            session,
            principal,
            action="deployment.model_version_revoked",
            project_id=deployment.project_id,
            object_type="deployment",
            object_id=deployment.id,
            changes={
                "deployment": deployment.name,
                "model": model.name,
                "version": version.version,
                "model_version_id": str(version.id),
                "reason": reason,
            },
        )
