"""The roles a Converge process runs: `converge up` runs all four in one process, and on a cluster
each runs as its own Deployment (`converge serve ROLE...`, `converge render platform`).

Every role can run as several replicas at once: the API and the gateway keep no state of their
own, the controller leads through a PostgreSQL advisory lock (the other replicas wait to take
over), and builds and ingestion jobs are claimed with `FOR UPDATE SKIP LOCKED`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from enum import StrEnum


class Role(StrEnum):
    API = "api"
    GATEWAY = "gateway"
    CONTROLLER = "controller"
    WORKER = "worker"


ALL_ROLES = frozenset(Role)
_NAMES = frozenset(role.value for role in Role)

ROLE_HELP: Mapping[Role, str] = {
    Role.API: "the REST API (projects, library, deployments, knowledge bases, usage) and the console's "
    "backend; it embeds knowledge-base queries through an in-process gateway",
    Role.GATEWAY: "the data path: /v1 (OpenAI-compatible) and /v2 (Open Inference Protocol)",
    Role.CONTROLLER: "reconciles deployments with the runtime, syncs model registries, seeds the "
    "catalogue and deploys the defaults (one replica leads, the others stand by); on Kubernetes it "
    "also runs builds as Jobs and writes Model objects into project namespaces",
    Role.WORKER: "runs knowledge-base ingestion, and builds (fetch, verify, scan, smoke-load, "
    "benchmark) with the local runtime (each job is claimed by one replica)",
}


def parse_roles(value: object) -> frozenset[Role]:
    """Roles from `api,gateway` (CONVERGE_ROLES), `all`, or a collection of names or Roles."""
    if isinstance(value, str):
        items: Iterable[object] = [part.strip() for part in value.split(",") if part.strip()]
    elif isinstance(value, Iterable):
        items = value
    else:
        raise ValueError(f"roles must be a list of role names, got {value!r}")
    names = [str(item).strip().lower() for item in items]
    names = [name for name in names if name]
    if names == ["all"]:
        return ALL_ROLES
    unknown = sorted({name for name in names if name not in _NAMES})
    if unknown:
        known = ", ".join(role.value for role in Role)
        raise ValueError(
            f"Unknown role(s) {', '.join(unknown)}: a process runs one or more of {known} (or all)"
        )
    if not names:
        raise ValueError(f"Name at least one role ({', '.join(r.value for r in Role)}), or all")
    return frozenset(Role(name) for name in names)
