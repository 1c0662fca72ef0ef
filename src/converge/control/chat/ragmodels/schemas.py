"""RAG models over HTTP: a chat deployment, knowledge bases, a ruleset, retrieval parameters and a
prompt template under one name that OpenAI clients use as `model`."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any

from pydantic import Field, StringConstraints, field_validator

from converge.control.deployments.schemas import DeploymentName
from converge.control.rag.schemas import FieldName, FilterValue, SearchMode
from converge.kit.schemas import Input, Output

MAX_K = 50
MAX_KNOWLEDGE_BASES = 8
Ref = Annotated[str, StringConstraints(min_length=1, max_length=63)]  # a name or an id
Description = Annotated[str, StringConstraints(max_length=4096)]
Template = Annotated[str, StringConstraints(min_length=1, max_length=16384)]
# The template's two placeholders, replaced literally (other braces are left alone).
CONTEXT, QUESTION = "{context}", "{question}"
DEFAULT_TEMPLATE = (
    "Answer the question using only the numbered sources below, and cite the sources you use as "
    "[1], [2] and so on. If the sources do not hold the answer, say that you do not know.\n\n"
    "Sources:\n{context}\n\nQuestion: {question}"
)


class RetrievalSpec(Input):
    k: int = Field(default=5, ge=1, le=MAX_K, description="Chunks retrieved per question (over all bases)")
    mode: SearchMode = Field(default="hybrid", description="vector, keyword or hybrid (RRF)")
    filters: dict[FieldName, FilterValue] = Field(
        default_factory=dict,
        max_length=32,
        description="Metadata equality filters {field: value}; every field must be in the "
        "metadata_keys of each knowledge base",
    )
    min_score: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="Chunks whose relevance is below this are not used: the cosine similarity of "
        "chunk and question in vector and hybrid mode (a hybrid hit found by keywords only "
        "passes only at 0), the full-text rank in keyword mode",
    )


def _template(value: str) -> str:
    missing = [p for p in (CONTEXT, QUESTION) if p not in value]
    if missing:
        raise ValueError(f"must contain {' and '.join(missing)} (where the sources and the question go)")
    return value


class RagModelCreate(Input):
    name: DeploymentName
    description: Description = ""
    chat_deployment: Ref = Field(
        description="Name or id of a deployment in the same project whose server answers chat"
    )
    knowledge_bases: list[Ref] = Field(
        min_length=1, max_length=MAX_KNOWLEDGE_BASES, description="Names or ids of the project's bases"
    )
    ruleset: Ref | None = Field(default=None, description="Name or id of a ruleset of the project")
    retrieval: RetrievalSpec = RetrievalSpec()
    prompt_template: Template = Field(
        default=DEFAULT_TEMPLATE,
        description="The user turn sent to the model: {context} becomes the numbered sources, "
        "{question} the last user message",
    )

    _check_template = field_validator("prompt_template")(_template)


class RagModelUpdate(Input):
    """Fields to change; every change is a new revision. `ruleset: null` removes the ruleset."""

    description: Description | None = None
    chat_deployment: Ref | None = None
    knowledge_bases: list[Ref] | None = Field(default=None, min_length=1, max_length=MAX_KNOWLEDGE_BASES)
    ruleset: Ref | None = None
    retrieval: RetrievalSpec | None = None
    prompt_template: Template | None = None

    @field_validator("prompt_template")
    @classmethod
    def _check_template(cls, value: str | None) -> str | None:
        return None if value is None else _template(value)


class NamedRef(Output):
    id: uuid.UUID
    name: str


class RagModelSpec(Output):
    chat_deployment: NamedRef
    knowledge_bases: list[NamedRef]
    ruleset: NamedRef | None
    retrieval: dict[str, Any]
    prompt_template: str


class RagModelRead(Output):
    id: uuid.UUID
    project_id: uuid.UUID
    name: str
    description: str
    revision: int
    spec: RagModelSpec
    created_by: str
    created_at: datetime
    updated_at: datetime


class RagModelRevisionRead(Output):
    revision: int
    spec: RagModelSpec
    author: str
    created_at: datetime
