"""Input drift: put or clear a deployment's reference, and report its last window against it.

The gateway counts and writes the windows (gateway/drift.py); this side only reads them. With
several gateway replicas, each writes its own windows: the report sums the newest closed window
of every replica (against the current reference) and compares the sum, with the same maths
(core/drift.py) the gateway's gauges use.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
from sqlalchemy.ext.asyncio import AsyncSession

from converge.config import DriftSettings
from converge.control.deployments.service import current_spec, visible_deployment
from converge.control.drift import repository
from converge.control.drift.schemas import (
    DriftReport,
    FeatureDrift,
    FeatureReferenceRead,
    ReferenceIn,
    ReferenceRead,
    WindowRead,
)
from converge.control.events.service import record
from converge.control.projects.principal import Principal
from converge.core import drift
from converge.errors import Conflict, NotFound, Unprocessable
from converge.kit.ids import new_id
from converge.models import Deployment, DriftReference, DriftWindow


def _features(body: ReferenceIn, *, max_features: int) -> tuple[list[dict[str, Any]], int]:
    """The stored form of the reference a person put, and the training rows it stands for."""
    if body.features is not None:
        if len(body.features) > max_features:
            raise Unprocessable(
                f"features: at most {max_features} (CONVERGE_GATEWAY__DRIFT__MAX_FEATURES), not {len(body.features)}",
                extra={"field": "features"},
            )
        features = []
        for f in body.features:
            edges, counts = drift.numpy_histogram(f.edges, f.counts)
            features.append({"name": f.name, "edges": edges.tolist(), "counts": counts.tolist()})
        return features, max(int(sum(f.counts)) for f in body.features)
    assert body.rows is not None  # the schema holds one of the two
    matrix = np.asarray(body.rows, dtype=np.float64)
    if matrix.shape[1] > max_features:
        raise Unprocessable(
            f"rows: at most {max_features} features (CONVERGE_GATEWAY__DRIFT__MAX_FEATURES), not {matrix.shape[1]}",
            extra={"field": "rows"},
        )
    names = body.names or [str(j) for j in range(matrix.shape[1])]
    features = drift.reference_features({name: matrix[:, j] for j, name in enumerate(names)}, bins=body.bins)
    return features, matrix.shape[0]


async def put_reference(
    session: AsyncSession,
    principal: Principal,
    *,
    deployment_id: uuid.UUID,
    body: ReferenceIn,
    config: DriftSettings,
) -> DriftReference:
    """Replace the deployment's reference with one from its training data (kept across
    revisions until replaced or cleared); gateways adopt it at their next flush."""
    project, deployment = await visible_deployment(
        session, principal, deployment_id, permission="deployments:write", lock=True
    )
    server = (await current_spec(session, deployment)).get("server")
    if server != "v2":
        raise Conflict(f"Input drift is counted for V2 deployments (server v2); this one serves {server}")
    features, rows = _features(body, max_features=config.max_features)
    row = await repository.reference(session, deployment.id, lock=True)
    if row is None:
        row = DriftReference(deployment_id=deployment.id)
        repository.add(session, row)
    row.version, row.source, row.revision, row.rows = new_id(), "training", None, rows
    row.features, row.created_by, row.created_at = features, principal.subject, datetime.now(UTC)
    await session.flush()
    await record(
        session,
        principal,
        action="deployment.drift_reference_set",
        project_id=project.id,
        object_type="deployment",
        object_id=deployment.id,
        changes={"source": "training", "features": [f["name"] for f in features], "rows": rows},
    )
    return row


async def clear_reference(session: AsyncSession, principal: Principal, *, deployment_id: uuid.UUID) -> None:
    """Remove the reference: the next full window the gateway sees becomes the new one."""
    project, deployment = await visible_deployment(
        session, principal, deployment_id, permission="deployments:write", lock=True
    )
    if not await repository.delete_reference(session, deployment.id):
        raise NotFound(f"Deployment {deployment_id} has no drift reference")
    await record(
        session,
        principal,
        action="deployment.drift_reference_cleared",
        project_id=project.id,
        object_type="deployment",
        object_id=deployment.id,
    )


def current_reference(row: DriftReference | None, deployment: Deployment) -> DriftReference | None:
    """A first window taken under an earlier revision is no reference for this one."""
    if row is None or (row.source == "first_window" and row.revision != deployment.revision):
        return None
    return row


def reference_read(row: DriftReference) -> ReferenceRead:
    return ReferenceRead(
        source=row.source,  # type: ignore[arg-type]  # the two literals are all that is written
        version=row.version,
        revision=row.revision,
        rows=row.rows,
        created_by=row.created_by,
        created_at=row.created_at,
        features=[FeatureReferenceRead.model_validate(f) for f in row.features],
    )


def _window_read(windows: Sequence[DriftWindow]) -> WindowRead | None:
    if not windows:
        return None
    return WindowRead(
        started_at=min(w.started_at for w in windows),
        ended_at=max(w.ended_at for w in windows),
        rows=sum(w.rows for w in windows),
        gateways=len(windows),
    )


def _summed(windows: Sequence[DriftWindow], *, name: str, bins: int) -> tuple[np.ndarray, int, float | None]:
    """One feature's counts, count and mean over every replica's window."""
    counts = np.zeros(bins, dtype=np.float64)
    total, weighted = 0, 0.0
    for window in windows:
        for feature in window.features:
            if feature.get("name") == name and len(feature.get("counts", ())) == bins:
                counts += np.asarray(feature["counts"], dtype=np.float64)
                total += int(feature.get("count") or 0)
                if feature.get("mean") is not None:
                    weighted += feature["mean"] * int(feature.get("count") or 0)
    mean = weighted / total if total and np.isfinite(weighted) else None
    return counts, total, mean


def _feature_drift(
    reference: dict[str, Any], windows: Sequence[DriftWindow], *, threshold: float
) -> FeatureDrift:
    ref_counts = np.asarray(reference["counts"], dtype=np.float64)
    counts, count, mean = _summed(windows, name=reference["name"], bins=ref_counts.size)
    found = drift.compare(ref_counts, counts)
    return FeatureDrift(
        name=reference["name"],
        psi=found.psi if found else None,
        ks=found.ks if found else None,
        drifting=found is not None and found.drifting(threshold),
        window_count=count,
        window_mean=mean,
        reference_count=int(reference.get("count") or ref_counts.sum()),
        reference_mean=reference.get("mean"),
    )


async def report(
    session: AsyncSession, principal: Principal, *, deployment_id: uuid.UUID, config: DriftSettings
) -> DriftReport:
    """The deployment's reference, its last closed window's PSI and KS per feature, and the
    window being counted now. Needs `deployments:read` on the deployment's project."""
    _, deployment = await visible_deployment(session, principal, deployment_id, permission="deployments:read")
    reference = current_reference(await repository.reference(session, deployment.id), deployment)
    empty = DriftReport(
        deployment_id=deployment.id,
        revision=deployment.revision,
        threshold=config.psi_threshold,
        reference=None,
        window=None,
        current=None,
        drifting=False,
        features=[],
    )
    if reference is None:
        return empty
    # A replica that stopped writing long ago (scaled away) no longer speaks for the present.
    since = datetime.now(UTC) - timedelta(seconds=config.window_max_s + 2 * config.flush_s)
    version, revision = reference.version, deployment.revision
    closed = await repository.latest_windows(
        session, deployment.id, reference_version=version, revision=revision, complete=True, since=since
    )
    newest = max((w.ended_at for w in closed), default=None)
    if newest is not None:  # the replicas' last windows, not one replica's last and another's old one
        closed = [w for w in closed if w.ended_at >= newest - timedelta(seconds=config.window_max_s)]
    current = await repository.latest_windows(
        session, deployment.id, reference_version=version, revision=revision, complete=False, since=since
    )
    features = [_feature_drift(f, closed, threshold=config.psi_threshold) for f in reference.features]
    return empty.model_copy(
        update={
            "reference": reference_read(reference),
            "window": _window_read(closed),
            "current": _window_read(current),
            "drifting": any(f.drifting for f in features),
            "features": features,
        }
    )
