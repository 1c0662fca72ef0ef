"""What a model server's answer used, and the usage chunk the gateway adds to a stream.

Unary answers carry `usage`. Streams from llama.cpp carry none: the gateway counts one token
per content delta (llama.cpp sends one token per delta) and, when the caller asked with
`stream_options.include_usage`, ends the stream the way OpenAI does: one last chunk with
`choices: []` and `usage`, just before `data: [DONE]`. An upstream that sends its own usage
chunk is passed through unchanged and no second one is added.

All of this works on the raw bytes the upstream sends: nothing is parsed per chunk except the
one event that carries usage.
"""

from __future__ import annotations

import orjson

DONE_MARKERS = (b"data: [DONE]", b"data:[DONE]")
EMPTY_CONTENT = (b'"content": ""', b'"content":""', b'"content": null', b'"content":null')
CHUNK_OBJECT = {"chat": "chat.completion.chunk", "completions": "text_completion"}


def usage_of(data: bytes) -> tuple[int, int] | None:
    """(prompt, completion) tokens of an answer's `usage`, or None when it has none."""
    try:
        usage = orjson.loads(data).get("usage")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    if not isinstance(usage, dict):
        return None
    prompt = usage.get("prompt_tokens") or 0
    completion = usage.get("completion_tokens") or 0
    return (prompt, completion) if isinstance(prompt, int) and isinstance(completion, int) else None


def content_tokens(chunk: bytes) -> int:
    """Streamed tokens in a chunk of SSE events: llama.cpp sends one token per content delta."""
    count = chunk.count(b'"content":') + chunk.count(b'"text":')
    if not count:
        return 0
    return count - sum(chunk.count(e) for e in EMPTY_CONTENT)


def stream_usage(chunk: bytes) -> tuple[int, int] | None:
    """The usage an OpenAI-style upstream sends in its last event (stream_options.include_usage)."""
    for line in chunk.split(b"\n"):
        if b'"usage"' in line and line.startswith(b"data:"):
            usage = usage_of(line[5:].strip())
            if usage is not None and (usage[0] or usage[1]):
                return usage
    return None


def whole_events(data: bytes) -> int:
    """How many leading bytes of `data` are complete SSE events (the rest waits for more)."""
    lf, crlf = data.rfind(b"\n\n"), data.rfind(b"\r\n\r\n")
    return max(lf + 2 if lf >= 0 else 0, crlf + 4 if crlf >= 0 else 0)


def done_at(chunk: bytes) -> int:
    """Where `data: [DONE]` starts in a chunk of whole events, or -1."""
    for marker in DONE_MARKERS:
        at = chunk.find(marker)
        if at >= 0:
            return at
    return -1


def usage_event(first: bytes, *, endpoint: str, prompt: int, completion: int) -> bytes:
    """OpenAI's usage chunk, with the id, created time and model of the stream's first event."""
    head: dict[str, object] = {}
    for line in first.split(b"\n"):
        if line.startswith(b"data:") and b"[DONE]" not in line:
            try:
                parsed = orjson.loads(line[5:].strip())
            except orjson.JSONDecodeError:
                continue
            if isinstance(parsed, dict):
                head = parsed
            break
    event = {
        "id": head.get("id"),
        "object": head.get("object") or CHUNK_OBJECT.get(endpoint, "chat.completion.chunk"),
        "created": head.get("created"),
        "model": head.get("model"),
        "choices": [],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        },
    }
    return b"data: " + orjson.dumps(event) + b"\n\n"


class StreamUsage:
    """A stream's token count, kept as its chunks go by; with `owed`, the usage chunk added.

    `feed` returns what to send of each chunk: while a usage chunk is owed, only whole events
    (the end of an unfinished one waits for the next chunk, so a `[DONE]` that arrives in pieces
    is still found), and the usage chunk goes in just before `[DONE]`.
    """

    __slots__ = ("owed", "endpoint", "estimate", "prompt", "completion", "first", "held")

    def __init__(self, *, owed: bool, endpoint: str, prompt_estimate: int) -> None:
        self.owed, self.endpoint, self.estimate = owed, endpoint, prompt_estimate
        self.prompt = self.completion = 0
        self.first = self.held = b""  # the first events (the usage chunk's id); an unfinished event

    def feed(self, chunk: bytes) -> bytes:
        if self.held:
            chunk, self.held = self.held + chunk, b""
        if self.owed:
            cut = whole_events(chunk)
            if cut < len(chunk):
                chunk, self.held = chunk[:cut], chunk[cut:]
                if not chunk:
                    return chunk
        self.completion += content_tokens(chunk)
        if b'"usage"' in chunk and (used := stream_usage(chunk)) is not None:
            self.prompt, self.completion = used
            self.owed = False  # the upstream sent its own: it goes on as it is
        if self.owed:
            self.first = self.first or chunk
            if (at := done_at(chunk)) >= 0:
                return chunk[:at] + self._usage_event() + chunk[at:]
        return chunk

    def end(self) -> bytes:
        """What is left to send once the upstream has ended (without [DONE], the usage chunk)."""
        rest, self.held = self.held, b""
        if self.owed:  # no [DONE] came: the usage chunk still comes last
            rest += self._usage_event(rest)
        return rest

    def used(self) -> tuple[int, int]:
        """(prompt, completion) tokens, the prompt estimated when the upstream counted none."""
        if self.prompt == 0 and self.completion:
            self.prompt = self.estimate
        return self.prompt, self.completion

    def _usage_event(self, fallback: bytes = b"") -> bytes:
        self.owed = False
        self.prompt = self.prompt or self.estimate  # what the chunk says is what gets metered
        return usage_event(
            self.first or fallback, endpoint=self.endpoint, prompt=self.prompt, completion=self.completion
        )
