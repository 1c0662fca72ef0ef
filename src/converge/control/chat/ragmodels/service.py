"""RAG models: create, read, update (each change a revision), delete.

The stored spec names what it uses by id and name (`{"id", "name"}`), resolved in the project
when written: another project's deployment, knowledge base or ruleset answers exactly like one
that does not exist. The gateway's snapshot lists each RAG model as a virtual model of its project
(`converge.gateway.virtual`), reloaded on the event every change writes.
"""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from converge.control.chat import refs as lookups  # `refs` names the knowledge bases asked for
from converge.control.chat.ragmodels import repository
from converge.control.chat.ragmodels.schemas import (
    RagModelCreate,
    RagModelRead,
    RagModelRevisionRead,
    RagModelUpdate,
    RetrievalSpec,
)
from converge.control.deployments.service import current_spec
from converge.control.events.service import record
from converge.control.projects.principal import Principal
from converge.control.projects.service import visible_project
from converge.control.rag.service import invalid
from converge.errors import Conflict, NotFound
from converge.gateway.auth import SERVES
from converge.kit.unique import flush_or_conflict
from converge.models import Agent, Project, RagModel, RagModelRevision


async def visible_rag_model(
    session: AsyncSession,
    principal: Principal,
    *,
    rag_model_id: uuid.UUID,
    permission: str,
    lock: bool = False,
) -> RagModel:
    """The RAG model if the caller sees its project (else 404, like a missing one) and holds
    `permission` there (else 403)."""
    found = await lookups.get(session, RagModel, object_id=rag_model_id, lock=lock)
    if found is None or not principal.sees(found.project_id):
        raise NotFound(f"RAG model {rag_model_id} not found")
    await visible_project(session, principal, found.project_id, permission=permission)
    return found


def read(row: RagModel) -> RagModelRead:
    return RagModelRead.model_validate(
        {name: getattr(row, name) for name in RagModelRead.model_fields if hasattr(row, name)}
    )


def read_revision(row: RagModelRevision) -> RagModelRevisionRead:
    return RagModelRevisionRead.model_validate(row)


# -- resolving what a spec names ---------------------------------------------------------------


def absent(field: str, message: str) -> NotFound:
    """What a spec names and the project lacks (another project's answers the same): a 404
    naming the field."""
    return NotFound(f"{field}: {message}", extra={"field": field})


async def _chat_deployment(session: AsyncSession, project: Project, *, ref: str) -> dict[str, Any]:
    deployment = await lookups.deployment(session, project.id, ref=ref)
    if deployment is None:
        raise absent("chat_deployment", f"project '{project.name}' has no deployment '{ref}' (by id or name)")
    server = (await current_spec(session, deployment)).get("server", "llama-cpp")
    if "chat" not in SERVES.get(server, frozenset({"chat"})):
        raise invalid(
            "chat_deployment",
            f"deployment '{deployment.name}' runs the '{server}' server, which does not answer "
            "/v1/chat/completions; name a chat deployment (llama-cpp)",
        )
    return {"id": str(deployment.id), "name": deployment.name}


async def _knowledge_bases(
    session: AsyncSession, project: Project, *, refs: list[str], retrieval: RetrievalSpec
) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    keys: set[str] = set()
    for i, ref in enumerate(refs):
        kb = await lookups.knowledge_base(session, project.id, ref=ref)
        if kb is None:
            raise absent(
                f"knowledge_bases.{i}",
                f"project '{project.name}' has no knowledge base '{ref}' (by id or name)",
            )
        if any(f["id"] == str(kb.id) for f in found):
            raise invalid(f"knowledge_bases.{i}", f"knowledge base '{kb.name}' is named twice")
        found.append({"id": str(kb.id), "name": kb.name})
        keys |= set(kb.metadata_keys)
    unknown = sorted(set(retrieval.filters) - keys)
    if unknown:
        known = ", ".join(sorted(keys)) or "none yet"
        raise invalid(
            f"retrieval.filters.{unknown[0]}",
            f"no chunk of these knowledge bases has a metadata field '{unknown[0]}'; known fields: {known}",
            known=sorted(keys),
        )
    return found


async def _ruleset(session: AsyncSession, project: Project, *, ref: str | None) -> dict[str, Any] | None:
    if ref is None:
        return None
    ruleset = await lookups.ruleset(session, project.id, ref=ref)
    if ruleset is None:
        raise absent("ruleset", f"project '{project.name}' has no ruleset '{ref}' (by id or name)")
    return {"id": str(ruleset.id), "name": ruleset.name}


async def _name_free(session: AsyncSession, project: Project, *, name: str) -> None:
    """The gateway resolves `model` to a deployment or alias first: a RAG model under such a
    name could never be reached, so it is refused; so is an agent's name."""
    taken = await repository.name_taken_by_deployment(session, project.id, name=name)
    if taken is not None:
        raise Conflict(
            f"name: deployment '{taken}' of project '{project.name}' already answers to '{name}' "
            "(as its name or an alias); choose another name",
            extra={"field": "name"},
        )
    agent = await session.scalar(select(Agent.id).where(Agent.project_id == project.id, Agent.name == name))
    if agent is not None:
        raise Conflict(
            f"name: project '{project.name}' already has an agent named '{name}'; choose another name",
            extra={"field": "name"},
        )


# -- create, update, delete --------------------------------------------------------------------


async def create(
    session: AsyncSession, principal: Principal, *, project: Project, body: RagModelCreate
) -> RagModel:
    await _name_free(session, project, name=body.name)
    spec = {
        "chat_deployment": await _chat_deployment(session, project, ref=body.chat_deployment),
        "knowledge_bases": await _knowledge_bases(
            session, project, refs=body.knowledge_bases, retrieval=body.retrieval
        ),
        "ruleset": await _ruleset(session, project, ref=body.ruleset),
        "retrieval": body.retrieval.model_dump(mode="json"),
        "prompt_template": body.prompt_template,
    }
    row = RagModel(
        project_id=project.id,
        name=body.name,
        description=body.description,
        revision=1,
        spec=spec,
        created_by=principal.subject,
    )
    session.add(row)
    await flush_or_conflict(session, f"Project '{project.name}' already has a RAG model named '{body.name}'")
    session.add(RagModelRevision(rag_model_id=row.id, revision=1, spec=spec, author=principal.subject))
    await session.flush()
    await record(
        session,
        principal,
        action="rag_model.created",
        project_id=project.id,
        object_type="rag_model",
        object_id=row.id,
        changes={"name": row.name, "revision": 1, "spec": spec},
    )
    return row


async def update(
    session: AsyncSession, principal: Principal, *, rag_model_id: uuid.UUID, body: RagModelUpdate
) -> RagModel:
    row = await visible_rag_model(
        session, principal, rag_model_id=rag_model_id, permission="rag-models:write", lock=True
    )
    project = await visible_project(session, principal, row.project_id, permission="rag-models:write")
    spec = dict(row.spec)
    retrieval = RetrievalSpec.model_validate(body.retrieval or spec["retrieval"])
    if body.chat_deployment is not None:
        spec["chat_deployment"] = await _chat_deployment(session, project, ref=body.chat_deployment)
    if body.knowledge_bases is not None or body.retrieval is not None:
        refs = body.knowledge_bases or [kb["id"] for kb in spec["knowledge_bases"]]
        spec["knowledge_bases"] = await _knowledge_bases(session, project, refs=refs, retrieval=retrieval)
        spec["retrieval"] = retrieval.model_dump(mode="json")
    if "ruleset" in body.model_fields_set:
        spec["ruleset"] = await _ruleset(session, project, ref=body.ruleset)
    if body.prompt_template is not None:
        spec["prompt_template"] = body.prompt_template
    described = body.description is not None and body.description != row.description
    if spec == row.spec and not described:
        return row
    if described:
        row.description = body.description or ""
    if spec != row.spec:
        row.revision += 1
        row.spec = spec
        session.add(
            RagModelRevision(rag_model_id=row.id, revision=row.revision, spec=spec, author=principal.subject)
        )
    await session.flush()
    await record(
        session,
        principal,
        action="rag_model.updated",
        project_id=row.project_id,
        object_type="rag_model",
        object_id=row.id,
        changes={"revision": row.revision, "spec": spec, "description": row.description},
    )
    return row


async def delete(session: AsyncSession, principal: Principal, *, rag_model_id: uuid.UUID) -> None:
    row = await visible_rag_model(
        session, principal, rag_model_id=rag_model_id, permission="rag-models:write", lock=True
    )
    name, project_id = row.name, row.project_id
    await repository.delete_model(session, row)
    await record(
        session,
        principal,
        action="rag_model.deleted",
        project_id=project_id,
        object_type="rag_model",
        object_id=rag_model_id,
        changes={"name": name},
    )
