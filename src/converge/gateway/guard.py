"""Rulesets on the data path: the request stage (system instructions, input guardrails, the
output token cap) and the response stage (output guardrails on JSON answers and on streams).

It runs right after the governance hooks (`Gateway.hooks`), for a request to a deployment with
a default ruleset (`deployment_rulesets`) or an in-process call that names one (RAG models,
chat sessions, agents): a raw OpenAI client is held to the same rules as /chat. A deployment
without a ruleset pays one attribute read per request and nothing on its stream.

A refusal is a 400 `guardrail_refused` naming the rule, the ruleset and its version (the
request, or the answer, breaks a rule the project set: it is the request that is refused, not
the caller's permissions, hence 400 and not 403). Mid-stream, where the status has gone out,
a refused answer ends with `finish_reason: "content_filter"` and a `converge.guardrail` field.
Every hit (never the matched text) is counted and written as a `guardrail.hit` event.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

import orjson

from converge.core import guardrails
from converge.core.guardrails import Compiled, StreamRedactor
from converge.gateway.errors import GatewayError
from converge.gateway.usage import whole_events

if TYPE_CHECKING:
    from converge.gateway.auth import Caller
    from converge.gateway.dataplane import DataPlane, Route
    from converge.gateway.hits import HitLog
    from converge.gateway.metrics import GatewayMetrics
    from converge.gateway.params import Ask


def refused(ruleset: Compiled, rule: str, *, where: str) -> GatewayError:
    said = "The request" if where == "input" else "The answer"
    return GatewayError(
        400,
        f"{said} was refused by rule '{rule}' of ruleset '{ruleset.name}' v{ruleset.version}",
        param="messages" if where == "input" else None,
        code="guardrail_refused",
    )


class Guardrails:
    """Finds the ruleset of a request and makes its per-request `Guard`."""

    def __init__(self, *, dataplane: DataPlane, metrics: GatewayMetrics, hits: HitLog | None) -> None:
        self.dataplane, self.metrics, self.hits = dataplane, metrics, hits

    async def ruleset(self, route: Route, ruleset_id: uuid.UUID | None) -> Compiled | None:
        """The explicit ruleset (of the route's project, else 404), or the route's default."""
        wanted = ruleset_id or route.ruleset_id
        if wanted is None:
            return None
        found = self.dataplane.snapshot.rulesets.get(wanted)
        if found is None:  # made or attached a moment ago: its reload may be on its way
            self.dataplane.mark_dirty()
            await self.dataplane.wait_for_change(2.0)
            found = self.dataplane.snapshot.rulesets.get(wanted)
        if found is None or found.project_id != route.project_id:
            if ruleset_id is None:  # an attached ruleset always exists (RESTRICT): fail closed
                raise GatewayError(
                    503, f"'{route.name}': its ruleset is loading; retry", type_="server_error"
                )
            raise GatewayError(
                404, f"Ruleset {ruleset_id} not found", param="ruleset_id", code="ruleset_not_found"
            )
        return found.compiled

    def guard(self, ruleset: Compiled, *, caller: Caller, route: Route) -> Guard:
        return Guard(self, ruleset, caller=caller, route=route)


class Guard:
    """One request's ruleset and the hits it made."""

    __slots__ = ("owner", "ruleset", "caller", "route", "hits")

    def __init__(self, owner: Guardrails, ruleset: Compiled, *, caller: Caller, route: Route) -> None:
        self.owner, self.ruleset, self.caller, self.route = owner, ruleset, caller, route
        self.hits: list[dict[str, Any]] = []

    def hit(self, rule: str, *, action: str, where: guardrails.Where) -> None:
        ruleset = self.ruleset
        hit = ruleset.hit(rule, action=action, where=where)
        self.hits.append(hit)
        label = f"{self.caller.project.name}/{ruleset.name}"
        self.owner.metrics.guardrail_hits.labels(label, rule, action).inc()
        if self.owner.hits is not None:
            self.owner.hits.record(
                project_id=self.route.project_id,
                ruleset_id=ruleset.id,
                data={
                    **hit,
                    "deployment": self.route.name,
                    "deployment_id": str(self.route.deployment_id),
                    "key_id": str(self.caller.key.id) if self.caller.key else None,
                },
            )

    # -- request ------------------------------------------------------------------------------

    def request(self, body: dict[str, Any], *, endpoint: str, ask: Ask) -> None:
        """Apply the ruleset to the body in place (or raise the refusal); sets the token cap."""
        ruleset = self.ruleset
        if endpoint == "chat":
            messages = body.get("messages")
            if isinstance(messages, list):
                if ruleset.input.active:
                    self._checked(guardrails.check_messages(ruleset.input, messages))
                if ruleset.system:
                    body["messages"] = [{"role": "system", "content": ruleset.system}, *messages]
        elif endpoint == "completions" and ruleset.input.active:
            prompt, checked = guardrails.check_prompt(ruleset.input, body.get("prompt"))
            self._checked(checked)
            body["prompt"] = prompt
        if ruleset.max_tokens is not None and endpoint != "embeddings":
            cap = guardrails.token_cap(ask.completion_limit, ruleset.max_tokens)
            field = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
            body[field] = cap
            if field == "max_completion_tokens":
                ask.max_completion_tokens = cap
            else:
                ask.max_tokens = cap

    def _checked(self, checked: guardrails.Checked) -> None:
        if checked.refused is not None:
            self.hit(checked.refused, action="refused", where="input")
            raise refused(self.ruleset, checked.refused, where="input")
        for kind in checked.redacted:
            self.hit(f"redact:{kind}", action="redacted", where="input")

    # -- response -----------------------------------------------------------------------------

    def answer(self, data: bytes, endpoint: str) -> tuple[int, bytes]:
        """A unary answer after the output guardrails: (status, body)."""
        side = self.ruleset.output
        if not side.active or endpoint not in ("chat", "completions"):
            return 200, data
        try:
            answer = orjson.loads(data)
        except orjson.JSONDecodeError:
            return 200, data
        found: list[str] = []
        for choice in answer.get("choices") or ():
            holder, key = (choice.get("message") or {}, "content") if endpoint == "chat" else (choice, "text")
            text = holder.get(key)
            if not isinstance(text, str) or not text:
                continue
            rule = side.blocked(text)
            if rule is not None:
                self.hit(rule, action="refused", where="output")
                error = refused(self.ruleset, rule, where="output")
                return error.status, error.body()
            holder[key], kinds = side.redacted(text)
            found += [k for k in kinds if k not in found]
        for kind in found:
            self.hit(f"redact:{kind}", action="redacted", where="output")
        return 200, orjson.dumps(answer) if found else data

    def stream(self, endpoint: str) -> StreamGuard | None:
        side = self.ruleset.output
        return StreamGuard(self, endpoint) if side.active and endpoint in ("chat", "completions") else None


class StreamGuard:
    """Output guardrails over SSE bytes: whole events in, rewritten events out (one redactor
    per choice), the tail of a possible value held back until the next chunk shows its end."""

    __slots__ = ("guard", "key", "held", "redactors", "finished", "stopped", "last")

    def __init__(self, guard: Guard, endpoint: str) -> None:
        self.guard, self.key = guard, "content" if endpoint == "chat" else "text"
        self.held = b""
        self.redactors: dict[int, StreamRedactor] = {}
        self.finished: set[int] = set()
        self.stopped: str | None = None  # the rule that ended the answer
        self.last: dict[str, Any] = {}  # the last chunk's id, created, model (for chunks we add)

    def feed(self, data: bytes) -> bytes:
        data, self.held = self.held + data, b""
        cut = whole_events(data)
        data, self.held = data[:cut], data[cut:]
        if not data:
            return b""
        out = bytearray()
        for event in data.replace(b"\r\n", b"\n").split(b"\n\n"):
            if event.strip():
                out += self._event(event.strip(b"\n"))
        return bytes(out)

    def end(self) -> bytes:
        """What is still held once the upstream ended without [DONE]."""
        rest = self.feed(b"\n\n") if self.held else b""
        return rest + self._flush_all()

    def _event(self, event: bytes) -> bytes:
        if not event.startswith(b"data:"):
            return event + b"\n\n"
        payload = event[5:].strip()
        if payload == b"[DONE]":
            return self._flush_all() + event + b"\n\n"
        try:
            chunk = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return event + b"\n\n"
        if not isinstance(chunk, dict):
            return event + b"\n\n"
        self.last = {k: chunk.get(k) for k in ("id", "object", "created", "model")}
        choices = chunk.get("choices")
        if not choices:  # the usage chunk
            return event + b"\n\n"
        if self.stopped is not None:
            return b""  # the answer was ended: the rest of it is dropped
        for choice in choices:
            index = choice.get("index", 0)
            redactor = self.redactors.get(index)
            if redactor is None:
                redactor = self.redactors[index] = StreamRedactor(self.guard.ruleset.output)
            holder = choice.get("delta") if self.key == "content" else choice
            if not isinstance(holder, dict):
                continue
            text = holder.get(self.key)
            if isinstance(text, str) and text:
                holder[self.key] = redactor.feed(text)
            if choice.get("finish_reason") is not None and index not in self.finished:
                self.finished.add(index)
                holder[self.key] = (holder.get(self.key) or "") + redactor.flush()
                self._hits(redactor)
            if redactor.refused is not None:
                return self._stop(redactor.refused, index)
        return b"data: " + orjson.dumps(chunk) + b"\n\n"

    def _flush_all(self) -> bytes:
        out = bytearray()
        for index, redactor in self.redactors.items():
            if index in self.finished or self.stopped is not None:
                continue
            self.finished.add(index)
            text = redactor.flush()
            self._hits(redactor)
            if redactor.refused is not None:
                return bytes(out) + self._stop(redactor.refused, index)
            if text:
                delta = {self.key: text}
                choice = (
                    {"index": index, "delta": delta} if self.key == "content" else {"index": index, **delta}
                )
                out += b"data: " + orjson.dumps({**self.last, "choices": [choice]}) + b"\n\n"
        return bytes(out)

    def _hits(self, redactor: StreamRedactor) -> None:
        for kind in redactor.found:
            self.guard.hit(f"redact:{kind}", action="redacted", where="output")
        redactor.found = []

    def _stop(self, rule: str, index: int) -> bytes:
        self.stopped = rule
        self.guard.hit(rule, action="refused", where="output")
        error = refused(self.guard.ruleset, rule, where="output")
        choice: dict[str, Any] = {"index": index, "finish_reason": "content_filter"}
        choice["delta" if self.key == "content" else "text"] = {} if self.key == "content" else ""
        chunk = {
            **self.last,
            "choices": [choice],
            "converge": {"guardrail": {**self.guard.ruleset.ref, "rule": rule, "message": error.message}},
        }
        return b"data: " + orjson.dumps(chunk) + b"\n\n"
