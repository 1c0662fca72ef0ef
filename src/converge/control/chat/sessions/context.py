"""Fitting a conversation into the model's context: the length read from the library, the
tokens counted (or estimated), the oldest turns dropped first.

The context length of a deployment is the smallest of what its model version's inspection read
from the artifact (`context_length`: the GGUF header, config.json) and, for llama.cpp, the
context the replica is started with (`--n-ctx` in the deployment's args, else the server's
default of 2048). A conversation is sent with at most that many tokens minus the answer's
`max_tokens` (the request's, else the gateway's default) and a small allowance for the chat
template. Tokens are counted with the model's own `tokenizer.json` when its artifact has one,
else estimated at one token per 3 bytes of UTF-8 plus 8 per message (above what BPE tokenizers
produce for prose, so an estimate errs on the side of trimming).

Trimming drops the oldest messages first, keeping every system message, and never leaves a tool
result without the assistant message that asked for it. The newest message always stays: when
it (with the system messages) does not fit on its own, the turn is refused with a 400 that
names the limit, rather than sent to overflow.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from converge.control.deployments.service import current_spec
from converge.control.rag import tokens
from converge.errors import AppError
from converge.models import Deployment, ModelVersion
from converge.storage.artifacts import ArtifactStore

LLAMA_DEFAULT_CTX = 2048  # converge.serving.llama's --n-ctx default
TEMPLATE_ALLOWANCE = 16  # the chat template's own tokens around the messages
PER_MESSAGE = 8  # estimated tokens of a message's role markers


class ContextOverflow(AppError):
    status_code, type, title = 400, "context-length-exceeded", "Over the model's context length"


@dataclass(frozen=True, slots=True)
class Budget:
    context: int  # the deployment's context length in tokens
    answer: int  # reserved for the answer (max_tokens)
    count: Callable[[str], int]
    counted: str  # "tokenizer" or "estimate"

    @property
    def prompt(self) -> int:
        return self.context - self.answer - TEMPLATE_ALLOWANCE

    def tokens(self, message: dict[str, Any]) -> int:
        content = message.get("content")
        text = content if isinstance(content, str) else str(content or "")
        calls = message.get("tool_calls")
        if calls:
            text += str(calls)
        return self.count(text) + PER_MESSAGE


def estimate(text: str) -> int:
    return -(-len(text.encode()) // 3)


async def context_length(session: AsyncSession, deployment_id: uuid.UUID) -> int:
    deployment = await session.get(Deployment, deployment_id)
    if deployment is None:
        return LLAMA_DEFAULT_CTX
    version = await session.get(ModelVersion, deployment.model_version_id)
    known = (version.inspection or {}).get("context_length") if version is not None else None
    spec = await current_spec(session, deployment)
    limits = [int(known)] if isinstance(known, int) and known > 0 else []
    if spec.get("server", "llama-cpp") == "llama-cpp":
        limits.append(_n_ctx(spec.get("args") or []))
    return min(limits) if limits else LLAMA_DEFAULT_CTX


def _n_ctx(args: list[str]) -> int:
    for i, arg in enumerate(args):
        value = arg.split("=", 1)[1] if arg.startswith("--n-ctx=") else None
        if arg == "--n-ctx" and i + 1 < len(args):
            value = args[i + 1]
        if value is not None and value.isdigit() and int(value) > 0:
            return int(value)
    return LLAMA_DEFAULT_CTX


async def budget(
    session: AsyncSession, store: ArtifactStore, *, deployment_id: uuid.UUID, answer_tokens: int
) -> Budget:
    context = await context_length(session, deployment_id)
    try:
        tokenizer = await tokens.model_tokenizer(session, store, deployment_id=deployment_id)
    except AppError:  # a GGUF file or a model without tokenizer.json: estimated
        return Budget(context=context, answer=answer_tokens, count=estimate, counted="estimate")

    def count(text: str) -> int:
        return len(tokenizer.tokenizer.encode(text, add_special_tokens=False).ids)

    return Budget(context=context, answer=answer_tokens, count=count, counted="tokenizer")


@dataclass(frozen=True, slots=True)
class Fitted:
    messages: list[dict[str, Any]]
    dropped: int  # messages trimmed away, oldest first
    tokens: int  # the prompt's counted (or estimated) tokens


def fit(messages: list[dict[str, Any]], budget: Budget) -> Fitted:
    """`messages` with the oldest non-system ones dropped until they fit `budget.prompt`."""
    if budget.prompt <= 0:
        raise ContextOverflow(
            f"max_tokens ({budget.answer}) leaves no room for the conversation in the model's context "
            f"of {budget.context} tokens; ask for fewer",
            extra={"field": "max_tokens", "context_length": budget.context},
        )
    sizes = [budget.tokens(m) for m in messages]
    system = [i for i, m in enumerate(messages) if m.get("role") == "system"]
    fixed = sum(sizes[i] for i in system) + sizes[-1]
    if fixed > budget.prompt:
        raise ContextOverflow(
            f"The message is about {sizes[-1]} tokens ({budget.counted}); with the system messages it "
            f"needs {fixed}, over the {budget.prompt} tokens the model's context of {budget.context} "
            f"leaves beside max_tokens {budget.answer}; send a shorter message",
            extra={
                "field": "messages",
                "context_length": budget.context,
                "limit": budget.prompt,
                "tokens": fixed,
            },
        )
    total = sum(sizes)
    keep = [True] * len(messages)
    i = 0
    while total > budget.prompt and i < len(messages) - 1:
        if messages[i].get("role") != "system":
            keep[i] = False
            total -= sizes[i]
        i += 1
    # A tool result whose assistant message was dropped means nothing to the model.
    for j in range(len(messages) - 1):
        if keep[j] and messages[j].get("role") == "tool" and not _asked(messages, keep=keep, j=j):
            keep[j] = False
            total -= sizes[j]
    kept = [m for m, k in zip(messages, keep, strict=True) if k]
    return Fitted(messages=kept, dropped=len(messages) - len(kept), tokens=total)


def _asked(messages: list[dict[str, Any]], *, keep: list[bool], j: int) -> bool:
    """Whether the tool result at `j` follows a kept assistant message with tool calls."""
    for i in range(j - 1, -1, -1):
        role = messages[i].get("role")
        if role == "tool":
            continue
        return bool(keep[i] and role == "assistant" and messages[i].get("tool_calls"))
    return False
