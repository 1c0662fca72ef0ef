"""The price catalogue (seeded from prices.yaml, then versioned, audited edits) and estimates."""

from __future__ import annotations

import copy
import dataclasses
import functools
import uuid
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy.ext.asyncio import AsyncSession

from converge.control.cost import repository
from converge.control.cost.schemas import EstimateRead, EstimateRequest
from converge.control.cost.views import estimate_read
from converge.control.deployments.service import current_spec, visible_deployment
from converge.control.events.service import record
from converge.control.library.service import visible_model
from converge.control.projects.principal import Principal
from converge.core import costs
from converge.core.costs import Ask, CatalogueError, PriceCatalogue
from converge.errors import Conflict, NotFound, Unprocessable
from converge.models import LibraryModel, ModelVersion, PriceCatalogueVersion

SHIPPED = Path(__file__).with_name("prices.yaml")
SEED_NOTE = "seeded from the shipped prices.yaml (example list prices, to be edited)"
MAX_AUDITED_CHANGES = 200


def shipped_catalogue() -> dict[str, Any]:
    """The catalogue that ships with Converge, validated (a broken file fails the start)."""
    return copy.deepcopy(_shipped())


@functools.cache
def _shipped() -> dict[str, Any]:
    return validate(yaml.safe_load(SHIPPED.read_text(encoding="utf-8"))).model_dump(mode="json")


def validate(data: Any) -> PriceCatalogue:
    """The catalogue, or a 422 naming every bad field (the request validator's own shape)."""
    try:
        return costs.validate_catalogue(data)
    except CatalogueError as exc:
        errors = [{"field": p.field, "message": p.message, "type": "invalid_catalogue"} for p in exc.problems]
        raise Unprocessable(f"Invalid price catalogue: {exc}", extra={"errors": errors}) from exc


async def seed(session: AsyncSession) -> bool:
    """Version 1 from prices.yaml on the first start; nothing when any version exists."""
    if await repository.latest(session) is not None:
        return False
    inserted = await repository.insert_first(session, catalogue=shipped_catalogue(), note=SEED_NOTE)
    if inserted:
        await record(
            session,
            None,
            action="price_catalogue.seeded",
            project_id=None,
            object_type="price_catalogue",
            object_id=1,
            changes={"version": 1, "note": SEED_NOTE},
        )
    return inserted


async def current(session: AsyncSession) -> PriceCatalogueVersion:
    row = await repository.latest(session)
    if row is None:  # a process that serves the API without having seeded (roles split differently)
        await seed(session)
        row = await repository.latest(session)
    assert row is not None
    return row


async def get(session: AsyncSession, *, version: int | None) -> PriceCatalogueVersion:
    if version is None:
        return await current(session)
    row = await repository.get(session, version)
    if row is None:
        latest = await current(session)
        raise NotFound(f"Price catalogue version {version} not found; versions run 1 to {latest.version}")
    return row


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7396 JSON merge patch: objects merge, null removes, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    merged = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = merge_patch(merged.get(key), value)
    return merged


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat |= _flatten(item, f"{prefix}.{key}" if prefix else str(key))
        return flat
    return {prefix: value}


def changed_paths(old: dict[str, Any], new: dict[str, Any]) -> dict[str, list[Any]]:
    """dotted path -> [before, after] for every leaf that differs (None: absent)."""
    before, after = _flatten(old), _flatten(new)
    return {
        path: [before.get(path), after.get(path)]
        for path in sorted(before.keys() | after.keys())
        if before.get(path) != after.get(path)
    }


async def _store(
    session: AsyncSession,
    principal: Principal,
    *,
    catalogue: PriceCatalogue,
    note: str,
    base_version: int | None,
) -> PriceCatalogueVersion:
    await repository.lock(session)
    latest = await current(session)
    if base_version is not None and base_version != latest.version:
        raise Conflict(
            f"The catalogue is at version {latest.version}, not {base_version}: someone changed it; "
            "read it again and reapply your change",
            extra={"version": latest.version},
        )
    data = catalogue.model_dump(mode="json")
    changes = changed_paths(latest.catalogue, data)
    if not changes:
        return latest  # nothing changed: no new version
    row = PriceCatalogueVersion(
        version=latest.version + 1, catalogue=data, note=note, created_by=principal.subject
    )
    repository.add(session, row)
    await session.flush()
    shown = dict(list(changes.items())[:MAX_AUDITED_CHANGES])
    await record(
        session,
        principal,
        action="price_catalogue.updated",
        project_id=None,
        object_type="price_catalogue",
        object_id=row.version,
        changes={"version": row.version, "previous": latest.version, "note": note, "changed": shown},
        event_data={"version": row.version, "previous": latest.version, "changed": len(changes)},
    )
    return row


async def replace(
    session: AsyncSession, principal: Principal, *, body: dict[str, Any], note: str, base_version: int | None
) -> PriceCatalogueVersion:
    return await _store(session, principal, catalogue=validate(body), note=note, base_version=base_version)


async def patch(
    session: AsyncSession, principal: Principal, *, body: dict[str, Any], note: str, base_version: int | None
) -> PriceCatalogueVersion:
    latest = await current(session)
    merged = merge_patch(latest.catalogue, body)
    return await _store(session, principal, catalogue=validate(merged), note=note, base_version=base_version)


# -- estimates ----------------------------------------------------------------------------------


async def _visible(
    session: AsyncSession, principal: Principal, *, version: ModelVersion | None, label: str
) -> tuple[LibraryModel, ModelVersion]:
    if version is None:
        raise NotFound(f"Model version {label} not found")
    model = await visible_model(session, principal, version.model_id)
    return model, version


async def resolve_version(
    session: AsyncSession, principal: Principal, *, ref: str | None, version_id: uuid.UUID | None
) -> tuple[LibraryModel, ModelVersion]:
    """A library version by id or NAME[:VERSION] (newest approved, else newest), if the caller sees it."""
    if version_id is not None:
        found = await repository.get_version(session, version_id)
        return await _visible(session, principal, version=found, label=str(version_id))
    assert ref is not None
    name, _, wanted = ref.partition(":")
    model = await repository.model_by_name(session, name)
    if model is None:
        raise NotFound(f"Model '{name}' not found in the library")
    model = await visible_model(session, principal, model.id)
    version = (
        await repository.version_by_name(session, model_id=model.id, version=wanted)
        if wanted
        else await repository.newest_version(session, model.id)
    )
    if version is None:
        raise NotFound(
            f"Model '{name}' has no version '{wanted}'" if wanted else f"Model '{name}' has no versions"
        )
    return model, version


def _gpu_type(catalogue: PriceCatalogue, name: str | None, *, field: str) -> str | None:
    if name is None:
        return None
    found = costs.resolve_gpu_type(catalogue, name)
    if found is None:
        known = sorted(catalogue.gpu_types)
        raise Unprocessable(
            f"Unknown GPU type '{name}'; known: {', '.join(known)}", extra={"field": field, "known": known}
        )
    return found


async def estimate(session: AsyncSession, principal: Principal, *, body: EstimateRequest) -> EstimateRead:
    row = await current(session)
    catalogue = PriceCatalogue.model_validate(row.catalogue)
    subject: dict[str, Any]
    if body.deployment_id is not None:
        project, deployment = await visible_deployment(
            session, principal, body.deployment_id, permission="deployments:read"
        )
        spec = await current_spec(session, deployment)
        found = await repository.get_version(session, deployment.model_version_id)
        model, version = await _visible(session, principal, version=found, label="of the deployment")
        ask, notes = _deployment_ask(catalogue, body, spec=spec, replicas=deployment.desired_replicas)
        subject = {
            "kind": "deployment",
            "deployment_id": deployment.id,
            "deployment": deployment.name,
            "project_id": project.id,
        }
    else:
        model, version = await resolve_version(
            session, principal, ref=body.model, version_id=body.model_version_id
        )
        ask, notes = _spec_ask(catalogue, body), []
        subject = {"kind": "spec"}
    storage = await repository.artifact_size(session, version.artifact_sha256)
    ask = dataclasses.replace(ask, storage_bytes=storage)
    shape = costs.model_shape(version.inspection or {})
    result = _run(catalogue, ask=ask, shape=shape)
    result.notes[:0] = notes
    subject |= {"model": model.name, "version": version.version, "model_version_id": version.id}
    return estimate_read(result, subject=subject, catalogue_version=row.version)


def _run(catalogue: PriceCatalogue, *, ask: Ask, shape: Any) -> costs.Estimate:
    try:
        return costs.estimate(catalogue, ask=ask, shape=shape)
    except costs.UnknownName as exc:
        field = {"zone": "zone", "GPU type": "gpu_type", "MIG profile": "mig_profile"}[exc.kind]
        raise Unprocessable(str(exc), extra={"field": field, "known": exc.known}) from exc
    except costs.NeedsFacts as exc:
        missing = [{"fact": m.fact, "needed_for": m.needed_for} for m in exc.missing]
        raise Unprocessable(str(exc), extra={"field": "model", "missing": missing}) from exc
    except costs.DoesNotFit as exc:
        raise Unprocessable(str(exc), extra={"field": "model", "need_bytes": exc.need.total_bytes}) from exc


def _spec_ask(catalogue: PriceCatalogue, body: EstimateRequest) -> Ask:
    return Ask(
        zone=body.zone,
        spot=body.spot,
        replicas=1 if body.replicas is None else body.replicas,
        context=body.context,
        concurrency=body.concurrency,
        choose=True,
        cpu_only=body.cpu_only,
        gpu_type=_gpu_type(catalogue, body.gpu_type, field="gpu_type"),
        mig_profile=body.mig_profile,
        gpus=body.gpus or 0,
        cpu=body.cpu or costs.DEFAULT_CPU,
        memory_bytes=None if body.memory_gib is None else round(body.memory_gib * costs.GIB),
    )


def _deployment_ask(
    catalogue: PriceCatalogue, body: EstimateRequest, *, spec: dict[str, Any], replicas: int
) -> tuple[Ask, list[str]]:
    """Price exactly what the deployment asks for; its runtime zones ("local") are not price
    zones unless the catalogue has one of that name."""
    notes = []
    resources = spec.get("resources") or {}
    zone = body.zone
    if zone is None:
        zone = next((z for z in spec.get("zones") or [] if z in catalogue.zones), None)
        if zone is None:
            notes.append(
                f"The deployment's zones ({', '.join(spec.get('zones') or []) or 'none'}) have no prices of their own:"
                f" priced at zone '{catalogue.default_zone}'"
            )
    named = resources.get("gpu_type")
    if (
        named
        and body.gpu_type
        and costs.resolve_gpu_type(catalogue, body.gpu_type) != costs.resolve_gpu_type(catalogue, named)
    ):
        raise Unprocessable(
            f"gpu_type: the deployment names its own GPU type ('{named}'); leave gpu_type out",
            extra={"field": "gpu_type"},
        )
    gpu_type = _gpu_type(catalogue, named or body.gpu_type, field="gpu_type")
    if body.replicas is None and replicas == 0:
        notes.append("The deployment is scaled to zero: only its stored artifact costs anything now")
    ask = Ask(
        zone=zone,
        spot=body.spot,
        replicas=replicas if body.replicas is None else body.replicas,
        context=body.context,
        concurrency=body.concurrency,
        choose=False,
        gpu_type=gpu_type,
        mig_profile=resources.get("mig_profile"),
        gpus=int(resources.get("gpus") or 0),
        cpu=float(resources.get("cpu") or costs.DEFAULT_CPU),
        memory_bytes=int(resources.get("memory_bytes") or costs.DEFAULT_MEMORY_BYTES),
    )
    return ask, notes
