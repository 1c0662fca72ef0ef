"""Knowledge bases over HTTP: bases, their documents, ingestion jobs, search and the recall probe."""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, StringConstraints, field_validator

from converge.control.deployments.schemas import DeploymentName
from converge.kit.schemas import Input, Output

SearchMode = Literal["vector", "keyword", "hybrid"]
MAX_K = 100
DEFAULT_TOKENS = 256  # per chunk, unless the model reads fewer
DEFAULT_OVERLAP = 32
MIN_TOKENS = 8  # below this a chunk holds too little text to retrieve anything by

KnowledgeBaseName = DeploymentName  # a DNS label, like deployments
DeploymentRef = Annotated[str, StringConstraints(min_length=1, max_length=63)]
Description = Annotated[str, StringConstraints(max_length=4096)]
# A metadata filter is equality on one scalar field (`metadata @> {field: value}`).
FilterValue = Annotated[str, StringConstraints(max_length=1024)] | bool | int | float
FieldName = Annotated[str, StringConstraints(min_length=1, max_length=128)]


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINAL_JOB_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})


class ChunkingIn(Input):
    tokens: int | None = Field(
        default=None,
        ge=MIN_TOKENS,
        le=8192,
        description=f"Tokens per chunk, in the embedding model's tokenizer; default min({DEFAULT_TOKENS}, "
        "the model's maximum sequence length), never more than that maximum",
    )
    overlap: int | None = Field(
        default=None,
        ge=0,
        le=8191,
        description=f"Tokens shared by consecutive chunks; default {DEFAULT_OVERLAP} (a quarter of "
        "`tokens` when that is smaller), always fewer than `tokens`",
    )


class RetrievalIn(Input):
    k: int | None = Field(default=None, ge=1, le=MAX_K, description="Results per search; default 5")
    mode: SearchMode | None = Field(default=None, description="Default search mode; default hybrid")


class KnowledgeBaseCreate(Input):
    name: KnowledgeBaseName
    description: Description = ""
    embedding_deployment: DeploymentRef = Field(
        description="Id or name of a deployment in the same project whose server answers /v1/embeddings"
    )
    chunking: ChunkingIn = ChunkingIn()
    retrieval: RetrievalIn = RetrievalIn()


class KnowledgeBaseUpdate(Input):
    """Fields to change. Chunking applies to what is ingested from now on; documents already in
    the base keep their chunks until they are ingested again."""

    description: Description | None = None
    embedding_deployment: DeploymentRef | None = Field(
        default=None, description="Rebind: only to a model of the same dimension"
    )
    chunking: ChunkingIn | None = None
    retrieval: RetrievalIn | None = None


class Chunking(Output):
    tokens: int
    overlap: int


class Retrieval(Output):
    k: int
    mode: SearchMode


class KbStats(Output):
    documents: int = 0
    chunks: int = 0
    bytes: int = 0


class KbIndex(Output):
    state: str = Field(description="exact (small: searched by an exact scan) or indexed (HNSW)")
    ef_search: int


class KnowledgeBaseRead(Output):
    id: uuid.UUID
    project_id: uuid.UUID
    name: str
    description: str
    embedding_deployment_id: uuid.UUID | None
    embedding_deployment: str | None = Field(default=None, description="The deployment's name")
    dimension: int
    max_tokens: int
    chunking: Chunking
    retrieval: Retrieval
    stats: KbStats = KbStats()
    index: KbIndex
    probe: dict[str, Any] | None
    metadata_keys: list[str]
    last_ingested_at: datetime | None
    created_by: str
    created_at: datetime
    updated_at: datetime


class DocumentRead(Output):
    id: uuid.UUID
    kb_id: uuid.UUID
    source: str
    title: str
    media_type: str
    content_hash: str
    bytes: int
    pages: int | None
    chunk_count: int
    metadata: dict[str, Any] = Field(validation_alias=AliasChoices("meta", "metadata"))
    created_at: datetime
    updated_at: datetime


class IngestionJobRead(Output):
    id: uuid.UUID
    kb_id: uuid.UUID
    project_id: uuid.UUID
    state: JobState
    source: dict[str, Any] = Field(
        description='{"kind": "upload", "files": [{name, key, bytes, sha256}]} or {"kind": "s3", "url"}'
    )
    progress: dict[str, Any]
    errors: list[dict[str, Any]]
    reason: str
    cancel_requested: bool
    created_by: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime


class IngestFromUrl(Input):
    url: Annotated[str, StringConstraints(min_length=1, max_length=1024)] = Field(
        description="s3://bucket/prefix: every object under the prefix, read with the library's "
        "S3 credentials"
    )

    @field_validator("url")
    @classmethod
    def _s3_prefix(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme != "s3":
            raise ValueError("must be an s3://bucket/prefix URL")
        bucket = parts.netloc
        if not 3 <= len(bucket) <= 63 or not all(c.isalnum() or c in ".-" for c in bucket):
            raise ValueError(f"'{bucket}' is not an S3 bucket name (3-63 letters, digits, dots, hyphens)")
        if parts.query or parts.fragment:
            raise ValueError("must not carry a query or fragment: s3://bucket/prefix")
        return value


class SearchIn(Input):
    query: Annotated[str, StringConstraints(min_length=1, max_length=65536)]
    k: int | None = Field(default=None, ge=1, le=MAX_K, description="Default: the base's retrieval.k")
    mode: SearchMode | None = Field(default=None, description="Default: the base's retrieval.mode")
    filters: dict[FieldName, FilterValue] = Field(
        default_factory=dict,
        max_length=32,
        description="Metadata equality filters: {field: value}; fields from the base's metadata_keys",
    )


class HitRead(Output):
    chunk_id: int
    document_id: uuid.UUID
    text: str
    score: float
    title: str
    source: str
    heading_path: list[str]
    page: int | None
    metadata: dict[str, Any]


class SearchRead(Output):
    results: list[HitRead]
    mode: SearchMode
    exact: bool = Field(description="True when the base was searched exactly (no approximate index)")
    ef_search: int | None
    took_ms: float


class ProbeIn(Input):
    queries: int = Field(default=50, ge=1, le=500, description="Query vectors sampled from the base's chunks")
    k: int = Field(default=10, ge=1, le=MAX_K)
