"""The OpenAI request parameters, per model server and endpoint: honoured, translated or refused.

Every standard parameter of /v1/chat/completions, /v1/completions and /v1/embeddings has an
entry in the table of the server that answers it, marked

  pass        forwarded unchanged; the model server applies it
  translated  the gateway rewrites it into what the server reads, or does it itself
  accepted    forwarded; it changes nothing in the answer (an end-user id, a cache hint)
  refused     a 400 naming the parameter, for the values the entry says (others pass)

so that nothing a caller sends is silently dropped. What llama.cpp accepts is what
`llama-server` (run by `serving/llama.py`) reads of a request (`tools/server/server-task.cpp`'s
params_from_json, and its OpenAI chat/completions parsing): the table keeps to the fields it
honours as OpenAI means them; what the embeddings server accepts is `serving/embeddings.py`.

Parameters in no table: for llama.cpp and embeddings replicas, whose every field is known, a 400
`unknown_parameter`, as OpenAI answers "Unrecognized request argument": both servers ignore a
field they do not know, so passing it on would drop it silently (`max_token` for `max_tokens`
would generate to the end of the context). Their own extensions (llama.cpp's `top_k`, `min_p`,
`grammar`, ...: what the OpenAI SDK's `extra_body` sends) are in the table and pass. A server
kind with no table here is assumed to speak OpenAI itself and gets every field (LiteLLM's
`extra_body` behaviour): only it knows what it accepts.

A body is read once, in one pass over its keys with one dict lookup each; it is re-serialised
only when a parameter had to be translated.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

PASS, TRANSLATED, ACCEPTED, REFUSED = "pass", "translated", "accepted", "refused"


class Invalid(ValueError):
    """A request the gateway answers with a 400 naming `param`."""

    def __init__(self, param: str, message: str, code: str = "invalid_value") -> None:
        super().__init__(message)
        self.param, self.message, self.code = param, message, code


class Ask:
    """What the gateway needs of a request body, read in one pass."""

    __slots__ = (
        "model",
        "stream",
        "max_tokens",
        "max_completion_tokens",
        "choices",
        "include_usage",
        "rewrite",
    )

    def __init__(self, model: str) -> None:
        self.model = model
        self.stream = False
        self.max_tokens: int | None = None
        self.max_completion_tokens: int | None = None
        self.choices = 1
        self.include_usage: bool | None = None  # None: no stream_options
        self.rewrite = False  # the body changed: forward it re-serialised

    @property
    def completion_limit(self) -> int | None:
        """The completion tokens asked for: max_completion_tokens wins over max_tokens."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


Rule = Callable[[Ask, dict[str, Any], str, Any], None]


@dataclass(frozen=True, slots=True)
class Param:
    how: str  # pass | translated | accepted | refused
    note: str = ""
    rule: Rule | None = None  # checks (and translates) the value; None: taken as it is


# -- rules --------------------------------------------------------------------------------------


def _positive(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise Invalid(name, f"'{name}' must be a positive integer, got {value!r}")
    return value


def _max_tokens(ask: Ask, body: dict[str, Any], name: str, value: Any) -> None:
    ask.max_tokens = _positive(name, value)


def _max_completion_tokens(ask: Ask, body: dict[str, Any], name: str, value: Any) -> None:
    ask.max_completion_tokens = _positive(name, value)


def _choices(ask: Ask, body: dict[str, Any], name: str, value: Any) -> None:
    ask.choices = _positive(name, value) or 1


def _stream(ask: Ask, body: dict[str, Any], name: str, value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, bool):
        raise Invalid(name, f"'{name}' must be true or false, got {value!r}")
    ask.stream = value


def _stream_options(ask: Ask, body: dict[str, Any], name: str, value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, dict):
        raise Invalid(name, "'stream_options' must be an object, such as {\"include_usage\": true}")
    for key, option in value.items():
        if key not in ("include_usage", "include_obfuscation"):
            raise Invalid(
                f"stream_options.{key}",
                f"Unknown stream option '{key}': the gateway knows include_usage and include_obfuscation",
                "unknown_parameter",
            )
        if option is not None and not isinstance(option, bool):
            raise Invalid(f"stream_options.{key}", f"'stream_options.{key}' must be true or false")
    ask.include_usage = value.get("include_usage") is True


def _each_message(value: Any) -> bool:
    """Check a messages list; True when one of them has OpenAI's `developer` role."""
    if not isinstance(value, list) or not value:
        raise Invalid("messages", "'messages' is required: a non-empty list of {role, content} objects")
    developer = False
    for i, message in enumerate(value):
        role = message.get("role") if isinstance(message, dict) else None
        if not isinstance(role, str):
            raise Invalid(f"messages[{i}]", f"messages[{i}] must be an object with a 'role'")
        developer = developer or role == "developer"
    return developer


def _messages(ask: Ask, body: dict[str, Any], name: str, value: Any) -> None:
    _each_message(value)


def _llama_messages(ask: Ask, body: dict[str, Any], name: str, value: Any) -> None:
    if _each_message(value):  # OpenAI's newer name for the system role, which llama.cpp reads
        for message in value:
            if message["role"] == "developer":
                message["role"] = "system"
        ask.rewrite = True


def _prompt(ask: Ask, body: dict[str, Any], name: str, value: Any) -> None:
    if not isinstance(value, str | list) or (isinstance(value, list) and not value):
        raise Invalid(name, "'prompt' is required: a string or a non-empty list")


def _llama_prompt(ask: Ask, body: dict[str, Any], name: str, value: Any) -> None:
    _prompt(ask, body, name, value)
    if isinstance(value, list):
        if len(value) > 1:
            raise Invalid(
                name,
                f"'prompt' holds {len(value)} prompts; llama.cpp serves one prompt per request: "
                "send one request per prompt",
                "unsupported_value",
            )
        if not isinstance(value[0], str):
            raise Invalid(name, "'prompt' must be text: llama.cpp takes no token ids", "unsupported_value")


def _input(ask: Ask, body: dict[str, Any], name: str, value: Any) -> None:
    if not isinstance(value, str | list) or (isinstance(value, list) and not value):
        raise Invalid(name, "'input' is required: a string or a non-empty list of strings")


def _llama_response_format(ask: Ask, body: dict[str, Any], name: str, value: Any) -> None:
    if value is None:
        return
    kind = value.get("type") if isinstance(value, dict) else None
    if kind in ("text", "json_object"):
        return
    if kind == "json_schema":
        # OpenAI's structured outputs, as llama.cpp's JSON mode constrained by the same schema.
        spec = value.get("json_schema") or {}
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(spec, dict) or not isinstance(schema, dict | None):
            raise Invalid(
                "response_format.json_schema",
                "'response_format.json_schema' must be an object with a 'schema'",
            )
        body[name] = {"type": "json_object", "schema": schema} if schema else {"type": "json_object"}
        ask.rewrite = True
        return
    raise Invalid(
        "response_format.type" if isinstance(value, dict) else name,
        "'response_format' must be an object whose 'type' is text, json_object or json_schema",
    )


def _llama_tool_choice(ask: Ask, body: dict[str, Any], name: str, value: Any) -> None:
    if value == "required":
        raise Invalid(
            name,
            "tool_choice 'required' is not supported: llama.cpp forces a tool call only when "
            "tool_choice names the function; name it, or use auto",
            "unsupported_value",
        )


def _only_one(why: str) -> Rule:
    def rule(ask: Ask, body: dict[str, Any], name: str, value: Any) -> None:
        if _positive(name, value) not in (None, 1):
            raise Invalid(name, f"'{name}' must be 1: {why}", "unsupported_value")

    return rule


def _refused(why: str, allowed: tuple[Any, ...] = (None,)) -> Rule:
    """Refuse the parameter unless its value is one of `allowed` (None: not sent)."""
    whole = allowed == (None,)
    code = "unsupported_parameter" if whole else "unsupported_value"

    def rule(ask: Ask, body: dict[str, Any], name: str, value: Any) -> None:
        if value not in allowed:
            shown = "" if whole or isinstance(value, dict | list) else f" = {value!r}"
            raise Invalid(name, f"'{name}'{shown} is not supported: {why}; remove it", code)

    return rule


def _refuse(why: str, allowed: tuple[Any, ...] = (None,), *, when: str = "") -> Param:
    return Param(REFUSED, f"{when}: {why}" if when else why, _refused(why, allowed))


def _unknown(server: str, known: Iterable[str]) -> Rule:
    names = sorted(known)

    def rule(ask: Ask, body: dict[str, Any], name: str, value: Any) -> None:
        close = difflib.get_close_matches(name, names, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise Invalid(
            name,
            f"Unrecognized request argument supplied: '{name}'. This deployment's {server} model "
            f"server would ignore it (the gateway's parameter table lists what it honours){hint}",
            "unknown_parameter",
        )

    return rule


# -- the tables ---------------------------------------------------------------------------------

_NO_LOGPROBS = "this deployment's llama.cpp replicas compute no logprobs (they run with logits_all off)"
_TEXT_ONLY = "the models answer text only"

# What llama.cpp applies itself, in chat and completions alike.
_LLAMA_COMMON: dict[str, Param] = {
    "model": Param(PASS, "names the deployment (GET /v1/models); the replica serves that one model"),
    "max_tokens": Param(PASS, "integer >= 1; reserved by the limiter", _max_tokens),
    "temperature": Param(PASS),
    "top_p": Param(PASS),
    "stop": Param(PASS),
    "stream": Param(PASS, "true or false", _stream),
    "stream_options": Param(
        TRANSLATED,
        "include_usage: the gateway ends the stream with OpenAI's usage chunk (llama.cpp sends"
        " none); include_obfuscation accepted (no obfuscation is added); only with stream",
        _stream_options,
    ),
    "presence_penalty": Param(PASS),
    "frequency_penalty": Param(PASS),
    "logit_bias": Param(PASS),
    "seed": Param(PASS),
    "user": Param(ACCEPTED, "an end-user id: forwarded, llama.cpp does not use it"),
    "n": Param(
        REFUSED,
        "unless 1: llama.cpp answers one choice per request",
        _only_one("llama.cpp answers one choice per request; send n requests instead"),
    ),
    # llama.cpp's own extensions (the OpenAI SDK sends them with extra_body)
    **{
        name: Param(PASS, "llama.cpp extension")
        for name in (
            "top_k",
            "min_p",
            "repeat_penalty",
            "min_tokens",
            "mirostat_mode",
            "mirostat_tau",
            "mirostat_eta",
            "grammar",
            "logit_bias_type",
        )
    },
}

LLAMA_CHAT: dict[str, Param] = {
    "messages": Param(PASS, "required; role 'developer' is sent as 'system'", _llama_messages),
    **_LLAMA_COMMON,
    "max_completion_tokens": Param(
        TRANSLATED,
        "sent as max_tokens (it wins over max_tokens); integer >= 1; reserved by the limiter",
        _max_completion_tokens,
    ),
    "logprobs": _refuse(_NO_LOGPROBS, (None, False), when="when true"),
    "top_logprobs": _refuse(_NO_LOGPROBS, (None, 0), when="when > 0"),
    "response_format": Param(
        TRANSLATED,
        "text and json_object pass; json_schema is sent as llama.cpp's json_object with that schema",
        _llama_response_format,
    ),
    "tools": Param(PASS, "rendered by the model's chat template"),
    "tool_choice": Param(
        PASS,
        "none, auto, or a named function (forced by a grammar); 'required' is refused",
        _llama_tool_choice,
    ),
    "functions": Param(PASS, "the deprecated form of tools"),
    "function_call": Param(PASS, "the deprecated form of tool_choice"),
    "parallel_tool_calls": _refuse(
        "llama.cpp cannot be held to one tool call", (None, True), when="when false"
    ),
    "safety_identifier": Param(ACCEPTED, "an end-user id, like user"),
    "prompt_cache_key": Param(
        ACCEPTED, "a caching hint: llama.cpp reuses the previous prompt's cache itself"
    ),
    "prompt_cache_options": Param(ACCEPTED, "a caching hint, like prompt_cache_key"),
    "prompt_cache_retention": Param(ACCEPTED, "a caching hint, like prompt_cache_key"),
    "moderation": _refuse("the gateway runs no moderation (governance rulesets refuse requests instead)"),
    "store": _refuse("the gateway stores no completions", (None, False), when="when true"),
    "metadata": _refuse(
        "it tags stored completions, and the gateway stores none", (None, {}), when="unless empty"
    ),
    "service_tier": _refuse(
        "there is one service tier", (None, "auto", "default"), when="unless auto or default"
    ),
    "reasoning_effort": _refuse(
        "llama.cpp deployments take no reasoning effort", (None, "none"), when="unless none"
    ),
    "verbosity": _refuse("llama.cpp has no verbosity control"),
    "modalities": _refuse(_TEXT_ONLY, (None, ["text"]), when='unless ["text"]'),
    "audio": _refuse(_TEXT_ONLY),
    "prediction": _refuse("llama.cpp has no predicted outputs"),
    "web_search_options": _refuse("the gateway has no web search"),
}

LLAMA_COMPLETIONS: dict[str, Param] = {
    "prompt": Param(PASS, "required; a string, or a list of one string", _llama_prompt),
    **_LLAMA_COMMON,
    "suffix": Param(PASS),
    "echo": Param(PASS),
    "logprobs": _refuse(_NO_LOGPROBS, when="when set"),
    "best_of": Param(
        REFUSED,
        "unless 1: llama.cpp generates one candidate per request",
        _only_one("llama.cpp generates one candidate per request"),
    ),
    "max_completion_tokens": _refuse("the completions endpoint takes 'max_tokens'"),
}

EMBEDDINGS: dict[str, Param] = {
    "input": Param(PASS, "required; a string or a list of strings", _input),
    "model": Param(PASS, "names the deployment (GET /v1/models)"),
    "encoding_format": Param(PASS, "float or base64"),
    "dimensions": _refuse("the embeddings server returns the model's own dimensions and cannot shorten them"),
    "user": Param(ACCEPTED, "an end-user id: forwarded, not used"),
    "stream": _refuse("embeddings are not streamed", (None, False), when="when true"),
}

# A server kind with no table of its own speaks OpenAI itself: the gateway reads what it needs
# (limits, streaming) and forwards every field unchanged.
_OPEN_COMMON: dict[str, Param] = {
    "model": Param(PASS),
    "max_tokens": Param(PASS, rule=_max_tokens),
    "max_completion_tokens": Param(PASS, rule=_max_completion_tokens),
    "n": Param(PASS, rule=_choices),
    "stream": Param(PASS, rule=_stream),
    "stream_options": Param(
        PASS, "the gateway adds the usage chunk if the server sends none", _stream_options
    ),
}
OPEN_CHAT = {"messages": Param(PASS, rule=_messages), **_OPEN_COMMON}
OPEN_COMPLETIONS = {"prompt": Param(PASS, rule=_prompt), **_OPEN_COMMON}
OPEN_EMBEDDINGS = {"input": Param(PASS, rule=_input), "model": Param(PASS), "stream": EMBEDDINGS["stream"]}


class Table:
    """One server's parameters for one endpoint, compiled to a name -> rule lookup."""

    __slots__ = ("server", "endpoint", "params", "required", "rules", "unknown", "renames")

    def __init__(
        self,
        server: str,
        endpoint: str,
        params: Mapping[str, Param],
        *,
        strict: bool,
        renames_max_completion_tokens: bool = False,
    ) -> None:
        self.server, self.endpoint, self.params = server, endpoint, params
        self.required = REQUIRED[endpoint][0]
        self.rules = {name: param.rule for name, param in params.items()}
        self.unknown = _unknown(server, params) if strict else None  # strict: refuse what is not listed
        self.renames = renames_max_completion_tokens


REQUIRED = {
    "chat": ("messages", "'messages' is required: a non-empty list of {role, content} objects"),
    "completions": ("prompt", "'prompt' is required: a string or a non-empty list"),
    "embeddings": ("input", "'input' is required: a string or a non-empty list of strings"),
}
TABLES: dict[tuple[str, str], Table] = {
    ("llama-cpp", "chat"): Table(
        "llama-cpp", "chat", LLAMA_CHAT, strict=True, renames_max_completion_tokens=True
    ),
    ("llama-cpp", "completions"): Table("llama-cpp", "completions", LLAMA_COMPLETIONS, strict=True),
    ("embeddings", "embeddings"): Table("embeddings", "embeddings", EMBEDDINGS, strict=True),
}
OPEN: dict[str, Table] = {
    "chat": Table("OpenAI-compatible", "chat", OPEN_CHAT, strict=False),
    "completions": Table("OpenAI-compatible", "completions", OPEN_COMPLETIONS, strict=False),
    "embeddings": Table("OpenAI-compatible", "embeddings", OPEN_EMBEDDINGS, strict=False),
}


# -- reading a body -----------------------------------------------------------------------------


def model_of(body: Any) -> str:
    """The deployment a body names (read before the rest: it decides which table applies)."""
    if not isinstance(body, dict):
        raise Invalid("body", "The request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise Invalid("model", "'model' is required: the name of a deployment (see GET /v1/models)")
    return model


def read(body: dict[str, Any], *, endpoint: str, server: str, model: str) -> Ask:
    """Check every parameter of `body` against the server's table, translating in place."""
    table = TABLES.get((server, endpoint)) or OPEN[endpoint]
    if body.get(table.required) is None:
        raise Invalid(table.required, REQUIRED[endpoint][1])
    ask = Ask(model)
    rules, unknown = table.rules, table.unknown
    for name, value in body.items():
        rule = rules.get(name, unknown)
        if rule is not None:
            rule(ask, body, name, value)
    if ask.include_usage is not None and not ask.stream:
        raise Invalid("stream_options", "'stream_options' is only allowed when 'stream' is true")
    if table.renames and ask.max_completion_tokens is not None:
        del body["max_completion_tokens"]
        body["max_tokens"] = ask.max_completion_tokens
        ask.rewrite = True
    return ask
