"""Publishes the Model Library to the cluster: a `Model` object (converge.dev/v1alpha1) for every
approved version in the namespace of every project that may use it, and none for anything else.

Which projects may use a version is the library's visibility rule, the one admission applies
first (`deployments.admission.load_version`): a public model's versions are for every project, a
restricted model's for the projects it lists. The `deployment` policies are not evaluated here:
they judge a concrete deployment (profile, replicas, a finished build), and a `Model` says what a
project may deploy, not that any particular deployment of it will be admitted.

Level-triggered, one leader at a time (its own advisory lock, not the controller's): every pass
reads the library and the cluster's `Model` objects, applies the missing or changed ones and
deletes the ones Converge wrote that are no longer wanted (version revoked, deprecated or
deleted, model restricted away from a project, project deleted). A pass runs every `interval_s`
and at once when a library, project or deployment event commits. Objects Converge did not
write (no `converge` apply entry in their managed fields) are never changed or deleted.

Namespaces are not created here: a project's namespace comes with its quota, limits and network
policies, which the deployment backend renders and applies as one bundle on the project's first
deployment. A bare namespace made here would run without them. Until it exists, the project's
objects wait (a pass skips it; a deployment event wakes the next one).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import structlog
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from converge.control.library import repository as library_repo
from converge.control.projects import repository as projects_repo
from converge.models import LibraryModel, ModelVersion
from converge.runtime.kubernetes.client import (
    MANAGED_BY_LABEL,
    ApiRejected,
    KubeClient,
    Manifest,
    ObjectRef,
)
from converge.runtime.kubernetes.config import KubernetesConfig
from converge.runtime.kubernetes.labels import LABEL_PROJECT_ID
from converge.runtime.kubernetes.manifests import namespace_name
from converge.runtime.kubernetes.model_cr import (
    API_VERSION,
    KIND,
    LABEL_VERSION_ID,
    MANAGED_BY,
    ApprovedVersion,
    VersionApproval,
    render_model,
)
from converge.runtime.kubernetes.specs import ClusterProfile, ProjectRef
from converge.workers.cluster_sync import ClusterSync

log = structlog.get_logger(__name__)

LEADER_LOCK_KEY = 0x4D_6F_64_6C  # "Modl"; the controller holds "Ctrl"
# Event kinds (and their sub-kinds) after which the objects may differ: a version's state, a
# model's visibility, a project created or deleted, a deployment (its namespace appears).
WAKE_KINDS = ("model", "model_version", "project", "deployment")
MAX_APPROVALS = 64  # the CRD's `approvals.maxItems`: the latest ones are kept
MAX_NOTE = 2000  # the CRD's `approvals[].note.maxLength`
_PAGE = 500


@dataclass(kw_only=True)
class PassResult:
    """What one pass did; `waiting` are project namespaces that do not exist yet."""

    applied: list[ObjectRef] = field(default_factory=list)
    deleted: list[ObjectRef] = field(default_factory=list)
    unchanged: int = 0
    waiting: list[str] = field(default_factory=list)
    foreign: list[ObjectRef] = field(default_factory=list)  # where a `Model` of someone else's is
    refused: list[str] = field(default_factory=list)  # versions or objects that cannot be written


class ModelObjects(ClusterSync):
    name = "model-objects"
    lock_key = LEADER_LOCK_KEY
    wake_kinds = WAKE_KINDS

    def __init__(
        self,
        *,
        sessions: async_sessionmaker[AsyncSession],
        kube: KubeClient | KubernetesConfig,
        cluster: ClusterProfile,
        conninfo: str,
        artifact_base_uri: str,
        interval_s: float = 30.0,
        retry_s: float = 5.0,
    ) -> None:
        super().__init__(sessions=sessions, conninfo=conninfo, interval_s=interval_s, retry_s=retry_s)
        self._cluster, self._base_uri = cluster, artifact_base_uri
        self._config = kube if isinstance(kube, KubernetesConfig) else None
        self._client = kube if isinstance(kube, KubeClient) else None
        self._said: dict[str, dict[str, Any]] = {}

    @property
    def client(self) -> KubeClient:
        if self._client is None:
            raise RuntimeError("model-objects is not started: start() it first")
        return self._client

    async def start(self) -> None:
        if self._client is None and self._config is not None:
            self._client = KubeClient(self._config)
        await super().start()

    async def stop(self) -> None:
        await super().stop()
        if self._config is not None and self._client is not None:  # made here, closed here
            await self._client.close()
            self._client = None

    # -- one pass --------------------------------------------------------------------------

    async def sync(self) -> PassResult:
        """One full pass: desired objects from the library, observed ones from the cluster, and
        the difference applied. Raises `KubeError` when the API cannot be reached (nothing is
        assumed about what the pass did not get to; the next pass compares again)."""
        desired, refused = await self.desired()
        result = PassResult(refused=refused)
        try:
            observed, _ = await self.client.list_objects(API_VERSION, KIND)
        except ApiRejected as exc:
            if exc.code == 404:  # the CRD is not installed: nothing to publish into
                self._once(
                    "model_crd_not_served", hint="kubectl apply -f deploy/crds/models.converge.dev.yaml"
                )
                return result
            raise
        namespaces = await self._namespaces()
        by_ref = {ObjectRef.of(obj, api_version=API_VERSION, kind=KIND): obj for obj in observed}
        missing: set[str] = set()
        for ref, manifest in sorted(desired.items(), key=lambda item: item[0]):  # a stable order
            assert ref.namespace is not None
            if ref.namespace not in namespaces or ref.namespace in missing:
                missing.add(ref.namespace)
                continue
            current = by_ref.get(ref)
            if current is not None and not self._ours(current):
                result.foreign.append(ref)
            elif current is not None and _same(current, manifest):
                result.unchanged += 1
            else:
                await self._apply(ref, manifest, result=result, missing=missing)
        for ref, obj in sorted(by_ref.items()):
            if ref not in desired and self._ours(obj) and LABEL_VERSION_ID in _labels(obj):
                if await self.client.delete(ref):
                    log.info("model_object_deleted", object=str(ref))
                    result.deleted.append(ref)
        result.waiting.extend(sorted(missing))
        self._once("model_objects_not_ours", objects=[str(r) for r in result.foreign])
        self._once("model_versions_without_object", versions=result.refused)
        self.passes += 1
        return result

    def _once(self, event: str, **said: Any) -> None:
        """A warning when what it says changes, not on every pass (nor when it is empty)."""
        if self._said.get(event) != said:
            self._said[event] = said
            if any(said.values()):
                log.warning(event, **said)

    async def _apply(
        self, ref: ObjectRef, manifest: Manifest, *, result: PassResult, missing: set[str]
    ) -> None:
        try:
            await self.client.apply(manifest)
        except ApiRejected as exc:
            if exc.code == 404:  # the namespace went since it was listed
                assert ref.namespace is not None
                missing.add(ref.namespace)
                return
            # 403, 422: this object cannot be written as it is; the others still can.
            result.refused.append(f"{ref}: {exc.message}")
            return
        log.info("model_object_applied", object=str(ref))
        result.applied.append(ref)

    async def _namespaces(self) -> set[str]:
        """The project namespaces the deployment backend has created (they carry its labels)."""
        labels: dict[str, str | None] = {MANAGED_BY_LABEL: MANAGED_BY, LABEL_PROJECT_ID: None}
        items, _ = await self.client.list_objects("v1", "Namespace", labels=labels)
        return {obj["metadata"]["name"] for obj in items}

    def _ours(self, obj: Manifest) -> bool:
        return self.client.owns(obj, labels={})

    async def desired(self) -> tuple[dict[ObjectRef, Manifest], list[str]]:
        """The `Model` objects the library asks for, and why any version cannot have one."""
        async with self._sessions() as session:
            rows = await library_repo.approved_versions(session)
            approvals = await library_repo.approvals_for(session, [v.id for v, _, _ in rows]) if rows else []
            projects = await _all_projects(session)
        by_version: dict[uuid.UUID, list[VersionApproval]] = {}
        for a in approvals:
            if a.verdict == "approve":
                note = a.note[:MAX_NOTE]
                by_version.setdefault(a.version_id, []).append(
                    VersionApproval(approver=a.approver, approved_at=a.created_at, note=note)
                )
        namespaces = self._project_namespaces(projects)
        desired: dict[ObjectRef, Manifest] = {}
        refused: list[str] = []
        for version, model, size in rows:
            approved = _approved(version, model, size=size, approvals=by_version.get(version.id, []))
            users = namespaces if model.visibility == "public" else _only(namespaces, model.projects)
            for project_id, namespace in users.items():
                # A restricted model names only the namespace's own project: the others' ids are
                # not this project's to read (restricted models' events are for admins only).
                own = replace(approved, projects=(project_id,)) if approved.projects else approved
                try:
                    manifest = render_model(own, namespace=namespace, artifact_base_uri=self._base_uri)
                except ValueError as exc:  # a name the CRD cannot hold: no object, said once a pass
                    refused.append(f"{model.name}:{version.version}: {exc}")
                    break
                desired[ObjectRef.of(manifest)] = manifest
        return desired, refused

    def _project_namespaces(self, projects: Sequence[tuple[uuid.UUID, str]]) -> dict[uuid.UUID, str]:
        out: dict[uuid.UUID, str] = {}
        for project_id, name in projects:
            try:
                out[project_id] = namespace_name(
                    ProjectRef(project_id=project_id, name=name), cluster=self._cluster
                )
            except ValueError:  # not a DNS label (older data): no namespace of its own either
                log.warning("project_without_namespace", project_id=str(project_id), name=name)
        return out


async def _all_projects(session: AsyncSession) -> list[tuple[uuid.UUID, str]]:
    out: list[tuple[uuid.UUID, str]] = []
    after: uuid.UUID | None = None
    while True:
        page = await projects_repo.list_projects(session, visible=None, after=after, limit=_PAGE)
        out += [(p.id, p.name) for p in page[:_PAGE]]
        if len(page) <= _PAGE:
            return out
        after = page[_PAGE - 1].id


def _only(namespaces: Mapping[uuid.UUID, str], project_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, str]:
    return {pid: namespaces[pid] for pid in project_ids if pid in namespaces}


def _approved(
    version: ModelVersion, model: LibraryModel, *, size: int, approvals: list[VersionApproval]
) -> ApprovedVersion:
    approvals.sort(key=lambda a: (a.approved_at, a.approver))
    kept = tuple(approvals[-MAX_APPROVALS:])
    # No column records the moment of approval: the last approval that counted is it; a version
    # approved without approvals (none required, or a policy's) was approved as it registered.
    approved_at = kept[-1].approved_at if kept else version.created_at
    return ApprovedVersion(
        model_id=model.id,
        model_name=model.name,
        version_id=version.id,
        version=version.version,
        state=version.state,
        format=version.format,
        sha256=version.artifact_sha256,
        size_bytes=size,
        approved_at=approved_at,
        inspection=version.inspection or {},
        approvals=kept,
        visibility=model.visibility,
        projects=tuple(model.projects or ()) if model.visibility == "restricted" else (),
    )


def _labels(obj: Manifest) -> dict[str, str]:
    labels: dict[str, str] = obj.get("metadata", {}).get("labels") or {}
    return labels


def _same(current: Manifest, desired: Manifest) -> bool:
    """Whether applying `desired` would change nothing Converge sets (a hand edit would)."""
    have, want = current.get("metadata", {}), desired["metadata"]
    return (
        current.get("spec") == desired["spec"]
        and all((have.get("labels") or {}).get(k) == v for k, v in want["labels"].items())
        and all((have.get("annotations") or {}).get(k) == v for k, v in want["annotations"].items())
    )
