"""Chat sessions over HTTP: `POST /chat` (an OpenAI-like body plus `session_id`), the sessions,
their messages with each assistant turn's trace, and replay."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import Field, StringConstraints, model_validator

from converge.kit.schemas import Input, Output

Ref = Annotated[str, StringConstraints(min_length=1, max_length=128)]
MAX_MESSAGE_CHARS = 1 << 20


class MessageIn(Input):
    role: Literal["system", "user", "assistant", "tool"]
    content: Annotated[str, StringConstraints(max_length=MAX_MESSAGE_CHARS)] | None = ""
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: Annotated[str, StringConstraints(max_length=255)] | None = None
    name: Annotated[str, StringConstraints(max_length=128)] | None = None


class ChatIn(Input):
    """One turn. `messages` are this turn's new messages (usually one user message; a system
    message may open a session): a session's earlier messages are added from the record."""

    model: Ref | None = Field(
        default=None,
        description="A deployment (or alias), RAG model or agent of the project; default: the session's",
    )
    messages: list[MessageIn] = Field(min_length=1, max_length=64)
    session_id: uuid.UUID | None = Field(default=None, description="Continue this session; absent: a new one")
    ruleset: Ref | None = Field(
        default=None,
        description="A ruleset (name or id) for this session's turns, over the RAG model's own and the "
        "deployment's default (agents always use their own)",
    )
    title: Annotated[str, StringConstraints(max_length=200)] | None = None
    stream: bool = False
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    max_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)

    @model_validator(mode="after")
    def _last_is_user(self) -> ChatIn:
        if self.messages[-1].role != "user":
            raise ValueError("messages: the last message must be the user's (role 'user')")
        return self

    def params(self) -> dict[str, Any]:
        """The sampling parameters given, as sent to the model."""
        names = (
            "temperature", "top_p", "max_tokens", "max_completion_tokens", "stop", "seed",
            "presence_penalty", "frequency_penalty",
        )  # fmt: skip
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}


class ReplayIn(Input):
    turn: int = Field(ge=0, description="The `turn` of a recorded assistant answer (see .../messages)")
    model: Ref | None = Field(
        default=None, description="Another target to ask; default: the one that answered"
    )


class SessionRead(Output):
    id: uuid.UUID
    project_id: uuid.UUID
    principal: str
    title: str
    target_kind: str
    target_id: uuid.UUID
    ruleset_id: uuid.UUID | None
    created_at: datetime
    updated_at: datetime


class MessageRead(Output):
    turn: int
    role: str
    content: str
    tool_calls: list[dict[str, Any]] | None
    tool_call_id: str | None
    trace: dict[str, Any] | None
    created_at: datetime


class SessionDetail(SessionRead):
    messages: int = Field(description="How many messages the session holds")


class ReplayAnswer(Output):
    message: dict[str, Any]
    trace: dict[str, Any] | None
    converge: dict[str, Any] = Field(default_factory=dict)


class ReplayRead(Output):
    session_id: uuid.UUID
    turn: int
    messages: int = Field(description="The messages before the answer that both answers were given")
    original: ReplayAnswer
    replay: ReplayAnswer
