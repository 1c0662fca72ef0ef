"""Reconciles the `RAGModel` objects (converge.dev/v1alpha1) people `kubectl apply` into RAG models,
the same desired state `POST /rag/models` writes, through the same service and its admission.

The project of an object is the one whose namespace it is in: a namespace the deployment backend
made (Converge's labels, the project id among them) and whose name is that project's namespace
name (a label copied onto another namespace names no project). Objects anywhere else are ignored.

Every pass, for every object in a project namespace:

- the parser's refusal (`ragmodel_cr.parse_ragmodel`) is `Accepted=False` reason `InvalidSpec`;
- otherwise the project's RAG model of the object's name is created or updated (a change is a new
  revision; the same spec writes nothing) as a principal that acts for that one object and holds
  the developer role in that one project, the subject `kubernetes:<namespace>/<name>`; what the
  service refuses (an unknown knowledge base, a name a deployment answers to: 404, 409, 422) is
  `Accepted=False` with its message and reason `NotFound`, `Conflict` or `Refused`;
- a RAG model of that name that something else made (the API: another creator's subject) is never
  taken over: `Accepted=False` reason `NameTaken`;
- success is `Accepted=True` reason `Applied`, its message naming the revision.

`status.observedGeneration` is the generation judged. The status is written (server-side apply on
the status subresource) only when it differs from what the object shows, so a pass over nothing
new writes nothing. A RAG model this reconciler made whose object is gone is deleted; a refused
object keeps the RAG model of its last accepted spec.

Level-triggered, one leader at a time (its own advisory lock): a pass runs every `interval_s`, at
once when a `RAGModel` changes (a watch, once the CRD is served) and when a RAG model, knowledge
base, deployment, ruleset or project event commits (what was refused may be admitted now). An API
outage or a database error fails the pass; the next one starts over.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import structlog
from pydantic import ValidationError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from converge.control.chat.ragmodels import repository as ragmodels_repo
from converge.control.chat.ragmodels import service as ragmodels
from converge.control.chat.ragmodels.schemas import DEFAULT_TEMPLATE, RagModelCreate, RagModelUpdate
from converge.control.projects import repository as projects_repo
from converge.control.projects.principal import Principal
from converge.core.rbac import Role
from converge.errors import AppError, Conflict, NotFound
from converge.models import RagModel
from converge.runtime.kubernetes.client import (
    MANAGED_BY_LABEL,
    ApiRejected,
    Informer,
    KubeClient,
    Manifest,
    ObjectRef,
)
from converge.runtime.kubernetes.labels import LABEL_PROJECT_ID
from converge.runtime.kubernetes.manifests import namespace_name
from converge.runtime.kubernetes.model_cr import MANAGED_BY
from converge.runtime.kubernetes.ragmodel_cr import (
    API_VERSION,
    CONDITION_ACCEPTED,
    KIND,
    REASON_INVALID,
    RAGModelSpec,
    Refused,
    parse_ragmodel,
    refused_condition,
)
from converge.runtime.kubernetes.specs import ClusterProfile, ProjectRef
from converge.workers.cluster_sync import ClusterSync

log = structlog.get_logger(__name__)

LEADER_LOCK_KEY = 0x52_41_47_4D  # "RAGM"; the controller holds "Ctrl", model-objects "Modl"
WAKE_KINDS = ("rag_model", "knowledge_base", "deployment", "ruleset", "project")
SUBJECT_PREFIX = "kubernetes:"
REASON_APPLIED = "Applied"
REASON_NAME_TAKEN = "NameTaken"
REASON_NOT_FOUND = "NotFound"
REASON_CONFLICT = "Conflict"
REASON_REFUSED = "Refused"
# The API's field names as the object spells them, for what the API's schemas refuse.
_FIELDS = {
    "name": "metadata.name",
    "chat_deployment": "spec.chatDeployment",
    "knowledge_bases": "spec.knowledgeBases",
    "ruleset": "spec.ruleset",
    "retrieval": "spec.retrieval",
    "min_score": "minScore",
    "prompt_template": "spec.promptTemplate",
}


def subject_for(*, namespace: str, name: str) -> str:
    return f"{SUBJECT_PREFIX}{namespace}/{name}"


def principal_for(project_id: uuid.UUID, *, namespace: str, name: str) -> Principal:
    """Who writes for one object: a developer of its project, nothing anywhere else."""
    return Principal(
        subject=subject_for(namespace=namespace, name=name),
        kind="kubernetes",
        roles={project_id: Role.DEVELOPER},
    )


@dataclass(frozen=True, kw_only=True)
class Outcome:
    """The judgement of one object: its `Accepted` condition's status, reason and message."""

    accepted: bool
    reason: str
    reasons: tuple[str, ...]


@dataclass(kw_only=True)
class PassResult:
    applied: list[ObjectRef] = field(default_factory=list)  # accepted (written or already so)
    refused: dict[ObjectRef, str] = field(default_factory=dict)  # object -> the condition's reason
    ignored: list[ObjectRef] = field(default_factory=list)  # not in a project namespace
    deleted: list[str] = field(default_factory=list)  # "<project id>/<name>" of RAG models deleted
    statuses_written: int = 0


class RagModelObjects(ClusterSync):
    name = "ragmodel-objects"
    lock_key = LEADER_LOCK_KEY
    wake_kinds = WAKE_KINDS

    def __init__(
        self,
        *,
        sessions: async_sessionmaker[AsyncSession],
        kube: KubeClient,
        cluster: ClusterProfile,
        conninfo: str,
        interval_s: float = 30.0,
        retry_s: float = 5.0,
    ) -> None:
        super().__init__(sessions=sessions, conninfo=conninfo, interval_s=interval_s, retry_s=retry_s)
        self.client, self._cluster = kube, cluster
        self.served = False  # whether the last pass found the CRD served
        self._watcher: asyncio.Task[None] | None = None
        self._said: dict[str, dict[str, Any]] = {}

    # -- leadership and wakes --------------------------------------------------------------

    async def after_pass(self, *, ok: bool) -> None:
        if ok and self.served and self._watcher is None:  # no watch of a kind not served
            self._watcher = asyncio.create_task(self._watch(), name="ragmodel-objects-watch")

    async def on_lost_leadership(self) -> None:
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

    async def _watch(self) -> None:
        """Wakes a pass when a `RAGModel` is added, changed or deleted (a pass re-lists anyway)."""
        informer = Informer(self.client, api_version=API_VERSION, kind=KIND)
        runner = asyncio.create_task(informer.run(), name="ragmodel-objects-informer")
        try:
            while True:
                await informer.changed()
                self.wake()
        finally:
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner

    # -- one pass --------------------------------------------------------------------------

    async def sync(self) -> PassResult:
        """One full pass over every `RAGModel` object and every RAG model made from one. Raises
        `KubeError` when the API cannot be reached, and whatever the database raises."""
        result = PassResult()
        try:
            objects, _ = await self.client.list_objects(API_VERSION, KIND)
        except ApiRejected as exc:
            if exc.code == 404:  # the CRD is not installed: no object can exist
                self.served = False
                self._once(
                    "ragmodel_crd_not_served", hint="kubectl apply -f deploy/crds/ragmodels.converge.dev.yaml"
                )
                return result
            raise
        self.served = True
        projects = await self._project_namespaces()
        present: set[tuple[str, str]] = set()
        for obj in sorted(objects, key=Informer.key):
            ref = ObjectRef.of(obj, api_version=API_VERSION, kind=KIND)
            assert ref.namespace is not None
            present.add((ref.namespace, ref.name))
            project_id = projects.get(ref.namespace)
            if project_id is None:
                result.ignored.append(ref)
                continue
            outcome = await self.judge(obj, project_id=project_id)
            if outcome.accepted:
                result.applied.append(ref)
            else:
                result.refused[ref] = outcome.reason
            if await self._report(obj, outcome):
                result.statuses_written += 1
        await self._collect(present, result)
        self._once("ragmodel_objects_outside_projects", objects=[str(r) for r in result.ignored])
        self.passes += 1
        return result

    def _once(self, event: str, **said: Any) -> None:
        """A warning when what it says changes, not on every pass (nor when it is empty)."""
        if self._said.get(event) != said:
            self._said[event] = said
            if any(said.values()):
                log.warning(event, **said)

    async def _project_namespaces(self) -> dict[str, uuid.UUID]:
        """Namespace -> project, for the namespaces the deployment backend made for a project."""
        labels: dict[str, str | None] = {MANAGED_BY_LABEL: MANAGED_BY, LABEL_PROJECT_ID: None}
        items, _ = await self.client.list_objects("v1", "Namespace", labels=labels)
        claimed: dict[str, uuid.UUID] = {}
        for obj in items:
            with contextlib.suppress(ValueError):
                claimed[obj["metadata"]["name"]] = uuid.UUID(obj["metadata"]["labels"][LABEL_PROJECT_ID])
        out: dict[str, uuid.UUID] = {}
        async with self._sessions() as session:
            for namespace, project_id in claimed.items():
                project = await projects_repo.get_project(session, project_id)
                if project is not None and self._namespace_of(project_id, project.name) == namespace:
                    out[namespace] = project_id
        return out

    def _namespace_of(self, project_id: uuid.UUID, name: str) -> str | None:
        try:
            return namespace_name(ProjectRef(project_id=project_id, name=name), cluster=self._cluster)
        except ValueError:  # not a DNS label (older data): no namespace of its own either
            return None

    # -- one object ------------------------------------------------------------------------

    async def judge(self, obj: Manifest, *, project_id: uuid.UUID) -> Outcome:
        """Parse the object and write its RAG model if it is admitted (one transaction)."""
        parsed = parse_ragmodel(obj)
        if isinstance(parsed, Refused):
            return Outcome(accepted=False, reason=REASON_INVALID, reasons=parsed.reasons)
        principal = principal_for(project_id, namespace=parsed.namespace, name=parsed.name)
        try:
            async with self._sessions.begin() as session:
                return await self._write(session, principal, spec=parsed, project_id=project_id)
        except ValidationError as exc:  # what the API's schemas refuse and the CRD does not
            return Outcome(accepted=False, reason=REASON_INVALID, reasons=_validation_reasons(exc))
        except AppError as exc:
            return Outcome(accepted=False, reason=_reason(exc), reasons=(exc.detail,))

    async def _write(
        self, session: AsyncSession, principal: Principal, *, spec: RAGModelSpec, project_id: uuid.UUID
    ) -> Outcome:
        project = await projects_repo.get_project(session, project_id)
        if project is None:
            raise NotFound(f"project {project_id} no longer exists")
        row = await ragmodels_repo.by_name(session, project.id, name=spec.name)
        if row is not None and row.created_by != principal.subject:
            message = (
                f"project '{project.name}' already has a RAG model '{spec.name}' made through the "
                "API, not from this object; it is not taken over: delete it there (DELETE "
                f"/rag/models/{row.id}), or give this object another name"
            )
            return Outcome(accepted=False, reason=REASON_NAME_TAKEN, reasons=(message,))
        fields = _api_fields(spec)
        if row is None:
            body = RagModelCreate.model_validate({"name": spec.name, **fields})
            row = await ragmodels.create(session, principal, project=project, body=body)
            log.info("ragmodel_object_created", object=principal.subject, rag_model_id=str(row.id))
        else:
            before = row.revision
            update = RagModelUpdate.model_validate(fields)
            row = await ragmodels.update(session, principal, rag_model_id=row.id, body=update)
            if row.revision != before:
                log.info("ragmodel_object_updated", object=principal.subject, revision=row.revision)
        return Outcome(accepted=True, reason=REASON_APPLIED, reasons=(_applied(row, project.name),))

    async def _report(self, obj: Manifest, outcome: Outcome) -> bool:
        """Write the object's status if it differs from the outcome; whether it was written."""
        meta, have = obj["metadata"], obj.get("status") or {}
        generation = int(meta.get("generation") or 0)
        previous = [c for c in have.get("conditions") or [] if isinstance(c, Mapping)]
        condition = accepted_condition(
            outcome, generation=generation, now=datetime.now(UTC), previous=previous
        )
        current = next((c for c in previous if c.get("type") == CONDITION_ACCEPTED), None)
        if have.get("observedGeneration") == generation and current == condition:
            return False
        status = {"observedGeneration": generation, "conditions": [condition]}
        try:
            await self.client.apply_status({**obj, "status": status})
        except ApiRejected as exc:
            # 404: deleted since it was listed (the next pass collects it); 403 or 422: this
            # status cannot be written, the other objects' still can (said, not retried at once).
            if exc.code != 404:
                log.warning(
                    "ragmodel_object_status_refused", object=str(ObjectRef.of(obj)), error=exc.message
                )
            return False
        return True

    # -- RAG models without their object ---------------------------------------------------

    async def _collect(self, present: set[tuple[str, str]], result: PassResult) -> None:
        """Delete the RAG models made from an object that the cluster no longer has."""
        async with self._sessions() as session:
            made = await ragmodels_repo.made_by(session, prefix=SUBJECT_PREFIX)
        for row in made:
            namespace, _, name = row.created_by.removeprefix(SUBJECT_PREFIX).partition("/")
            if (namespace, name) in present:
                continue
            if await self._delete(row, namespace=namespace, name=name):
                result.deleted.append(f"{row.project_id}/{row.name}")

    async def _delete(self, row: RagModel, *, namespace: str, name: str) -> bool:
        principal = principal_for(row.project_id, namespace=namespace, name=name)
        try:
            async with self._sessions.begin() as session:
                await ragmodels.delete(session, principal, rag_model_id=row.id)
        except NotFound:  # deleted meanwhile (through the API, or with its project)
            return False
        log.info("ragmodel_object_deleted", object=principal.subject, rag_model_id=str(row.id))
        return True


# --- pure helpers -------------------------------------------------------------------------


def _api_fields(spec: RAGModelSpec) -> dict[str, Any]:
    """The object's spec as the API's create and update bodies spell it (every field: an update
    sets the whole desired state, `ruleset: None` included)."""
    retrieval = spec.retrieval
    return {
        "chat_deployment": spec.chat_deployment,
        "knowledge_bases": list(spec.knowledge_bases),
        "ruleset": spec.ruleset,
        "retrieval": {
            "k": retrieval.k,
            "mode": retrieval.mode,
            "filters": dict(retrieval.filters),
            "min_score": retrieval.min_score if retrieval.min_score is not None else 0.0,
        },
        "prompt_template": spec.prompt_template if spec.prompt_template is not None else DEFAULT_TEMPLATE,
    }


def _applied(row: RagModel, project: str) -> str:
    return f"RAG model '{row.name}' of project '{project}' is at revision {row.revision} (id {row.id})"


def _reason(exc: AppError) -> str:
    if isinstance(exc, NotFound):
        return REASON_NOT_FOUND
    if isinstance(exc, Conflict):
        return REASON_CONFLICT
    return REASON_REFUSED


def _validation_reasons(exc: ValidationError) -> tuple[str, ...]:
    reasons = []
    for error in exc.errors():
        path = ".".join(_FIELDS.get(str(part), str(part)) for part in error["loc"]) or "spec"
        reasons.append(f"{path}: {error['msg']}")
    return tuple(reasons)


def accepted_condition(
    outcome: Outcome, *, generation: int, now: datetime, previous: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    """The `Accepted` condition for `outcome`; `lastTransitionTime` moves only when its status does."""
    if not outcome.accepted:
        return refused_condition(
            outcome.reasons, generation=generation, now=now, previous=previous, reason=outcome.reason
        )
    since = _timestamp(now)
    for condition in previous:
        if condition.get("type") == CONDITION_ACCEPTED and condition.get("status") == "True":
            since = str(condition.get("lastTransitionTime") or since)
    return {
        "type": CONDITION_ACCEPTED,
        "status": "True",
        "observedGeneration": generation,
        "lastTransitionTime": since,
        "reason": outcome.reason,
        "message": "; ".join(outcome.reasons),
    }


def _timestamp(moment: datetime) -> str:
    return moment.astimezone(UTC).replace(microsecond=0, tzinfo=None).isoformat() + "Z"
