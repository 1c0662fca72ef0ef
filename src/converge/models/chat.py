"""The Gen AI runtime's tables: rulesets, RAG models, agents, MCP servers, chat sessions.

Rulesets, RAG models and agents are versioned the way policies and deployments are: the row
holds the current `spec` (what the data path reads) and its number, and every change adds an
immutable `*_revisions` row, so a recorded chat turn names exactly what answered it.

A chat session holds every message in order. An assistant message carries its `trace`: what
served it (model or RAG model and revision, deployment revision, ruleset version), what was
retrieved (chunk ids and scores), tool calls with arguments, results and durations, guardrail
hits, token counts and latency; enough to replay the turn.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Identity,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.orm import Mapped, mapped_column

from converge.models.base import Base, Timestamped, UUIDPk, utcnow


class Ruleset(UUIDPk, Timestamped, Base):
    """System instructions and guardrails (blocked terms and patterns, PII redaction, an output
    token cap), for a project's RAG models, chat sessions and deployments."""

    __tablename__ = "rulesets"
    __table_args__ = (UniqueConstraint("project_id", "name"),)

    project_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(63))
    description: Mapped[str] = mapped_column(Text, default="")
    version: Mapped[int] = mapped_column(Integer, default=1)  # the current version's number
    spec: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)  # the current version's spec
    created_by: Mapped[str] = mapped_column(String(255))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)


class RulesetVersion(UUIDPk, Timestamped, Base):
    __tablename__ = "ruleset_versions"
    __table_args__ = (UniqueConstraint("ruleset_id", "version"),)

    ruleset_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("rulesets.id", ondelete="CASCADE"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    spec: Mapped[dict[str, Any]] = mapped_column(JSONB)
    author: Mapped[str] = mapped_column(String(255))


class DeploymentRuleset(Base):
    """A deployment's default ruleset: the gateway holds every request to the deployment to it,
    from any client (an OpenAI SDK, /chat, an agent), unless a RAG model or session names its own."""

    __tablename__ = "deployment_rulesets"

    deployment_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("deployments.id", ondelete="CASCADE"), primary_key=True
    )
    # RESTRICT: a ruleset in use is not deleted from under its deployments (409 names them).
    ruleset_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("rulesets.id", ondelete="RESTRICT"), index=True)
    project_id: Mapped[uuid.UUID] = mapped_column(index=True)
    created_by: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class RagModel(UUIDPk, Timestamped, Base):
    """A chat deployment, knowledge bases, a ruleset, retrieval parameters and a prompt
    template under one name that OpenAI clients use as `model`."""

    __tablename__ = "rag_models"
    __table_args__ = (UniqueConstraint("project_id", "name"),)

    project_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(63))
    description: Mapped[str] = mapped_column(Text, default="")
    revision: Mapped[int] = mapped_column(Integer, default=1)
    spec: Mapped[dict[str, Any]] = mapped_column(JSONB)  # the current revision's spec
    created_by: Mapped[str] = mapped_column(String(255))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)


class RagModelRevision(UUIDPk, Timestamped, Base):
    __tablename__ = "rag_model_revisions"
    __table_args__ = (UniqueConstraint("rag_model_id", "revision"),)

    rag_model_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("rag_models.id", ondelete="CASCADE"), index=True
    )
    revision: Mapped[int] = mapped_column(Integer)
    spec: Mapped[dict[str, Any]] = mapped_column(JSONB)
    author: Mapped[str] = mapped_column(String(255))


class Agent(UUIDPk, Timestamped, Base):
    """A chat model with a ruleset, tools (built-in and MCP servers'), a step limit and a token
    budget per run."""

    __tablename__ = "agents"
    __table_args__ = (UniqueConstraint("project_id", "name"),)

    project_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(63))
    description: Mapped[str] = mapped_column(Text, default="")
    revision: Mapped[int] = mapped_column(Integer, default=1)
    spec: Mapped[dict[str, Any]] = mapped_column(JSONB)  # the current revision's spec
    created_by: Mapped[str] = mapped_column(String(255))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)


class AgentRevision(UUIDPk, Timestamped, Base):
    __tablename__ = "agent_revisions"
    __table_args__ = (UniqueConstraint("agent_id", "revision"),)

    agent_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("agents.id", ondelete="CASCADE"), index=True)
    revision: Mapped[int] = mapped_column(Integer)
    spec: Mapped[dict[str, Any]] = mapped_column(JSONB)
    author: Mapped[str] = mapped_column(String(255))


class McpServer(UUIDPk, Timestamped, Base):
    """A project's MCP tool server: a stdio command or a streamable-HTTP URL."""

    __tablename__ = "mcp_servers"
    __table_args__ = (UniqueConstraint("project_id", "name"),)

    project_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(63))
    transport: Mapped[str] = mapped_column(String(16))  # "stdio" | "http"
    command: Mapped[list[str] | None] = mapped_column(ARRAY(Text))  # stdio: argv
    url: Mapped[str | None] = mapped_column(Text)  # http: the streamable-HTTP endpoint
    env: Mapped[dict[str, str]] = mapped_column(JSONB, default=dict)  # stdio: extra environment
    timeout_s: Mapped[float] = mapped_column(Float, default=30.0)  # per call (and for start-up)
    created_by: Mapped[str] = mapped_column(String(255))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)


class ChatSession(UUIDPk, Timestamped, Base):
    """A conversation of one principal in one project with a deployment, a RAG model or an agent."""

    __tablename__ = "chat_sessions"
    __table_args__ = (
        Index("ix_chat_sessions_project_id_principal", "project_id", "principal", "updated_at"),
    )

    project_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    principal: Mapped[str] = mapped_column(String(255))  # who owns it, as the audit log names them
    title: Mapped[str] = mapped_column(String(200), default="")
    target_kind: Mapped[str] = mapped_column(String(16))  # "deployment" | "rag_model" | "agent"
    target_id: Mapped[uuid.UUID] = mapped_column()
    ruleset_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("rulesets.id", ondelete="SET NULL"))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)


class ChatMessage(Base):
    """One message of a session, in order (`turn`). Tool calls and tool results are messages too
    (role "assistant" with `tool_calls`, role "tool" with `tool_call_id`), as in the OpenAI API."""

    __tablename__ = "chat_messages"
    __table_args__ = (UniqueConstraint("session_id", "turn"),)

    id: Mapped[int] = mapped_column(BigInteger, Identity(always=True), primary_key=True)
    session_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("chat_sessions.id", ondelete="CASCADE"))
    turn: Mapped[int] = mapped_column(Integer)
    role: Mapped[str] = mapped_column(String(16))  # system | user | assistant | tool
    content: Mapped[str] = mapped_column(Text, default="")
    tool_calls: Mapped[list[dict[str, Any]] | None] = mapped_column(JSONB)
    tool_call_id: Mapped[str | None] = mapped_column(String(255))
    trace: Mapped[dict[str, Any] | None] = mapped_column(JSONB)  # an assistant turn's record
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
