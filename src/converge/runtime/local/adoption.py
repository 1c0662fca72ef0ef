"""Taking over what a previous LocalBackend on the same state_dir left running.

A recorded replica is adopted when its pid is alive *and* is the same process (start time and
command line match): a pid reused by an unrelated program is never adopted nor signalled. An
adopted replica whose deployment is no longer wanted (deleted while no controller ran) or that
was draining is an orphan: the caller stops it. A record whose process is gone is dropped (the
supervisor starts a replacement if its deployment still wants one).
"""

from __future__ import annotations

import uuid

import structlog

from converge.runtime.base import ReplicaPhase
from converge.runtime.local.ports import PortAllocator
from converge.runtime.local.process import is_same_process
from converge.runtime.local.replica import DeploymentState, ReplicaState
from converge.runtime.local.state import StateDoc

log = structlog.get_logger(__name__)

Orphan = tuple[DeploymentState, ReplicaState]


def adopt(
    doc: StateDoc, *, ports: PortAllocator, now: float
) -> tuple[dict[uuid.UUID, DeploymentState], list[Orphan]]:
    deployments = {spec.deployment_id: DeploymentState(spec.deployment_id, spec) for spec in doc.deployments}
    orphans: list[Orphan] = []
    for rec in doc.replicas:
        r = ReplicaState.from_record(rec)
        dep = deployments.get(rec.deployment_id)
        if r.handle is None:
            if rec.phase == ReplicaPhase.BACKOFF and dep is not None:  # was waiting to restart: still is
                r.phase, r.retry_at = ReplicaPhase.BACKOFF, now
                dep.replicas[r.id] = r
            continue
        if not is_same_process(r.handle.identity):
            log.info("local_replica_gone", replica=r.id, pid=rec.pid)
            continue
        if r.port is not None:
            ports.reserve(r.port)
        if dep is None:
            dep = deployments[rec.deployment_id] = DeploymentState(rec.deployment_id, None)
        dep.replicas[r.id] = r
        if dep.spec is None or rec.phase == ReplicaPhase.DRAINING:
            log.info("local_orphan_stopped", replica=r.id, pid=rec.pid)
            orphans.append((dep, r))
        else:
            # Not READY until the first probe says so (right away, in start()); never restarted.
            r.phase, r.since = ReplicaPhase.STARTING, now
            log.info("local_replica_adopted", replica=r.id, pid=rec.pid, port=r.port)
    return deployments, orphans
