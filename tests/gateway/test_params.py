"""OpenAI parameters: each one passes, is translated, or is refused with a 400 naming it.

The first tests read bodies with `params.read` alone; the rest go through the gateway to the
fake upstream, which like llama-cpp-python stops at `max_tokens` and ignores any field it does
not know, and with the official OpenAI SDK and langchain-openai as the callers.
"""

from __future__ import annotations

import copy
from typing import Any

import httpx
import openai
import pytest
from support import ADMIN

from converge.gateway import params
from converge.gateway.params import ACCEPTED, PASS, REFUSED, TRANSLATED, Invalid

SAY_HI = [{"role": "user", "content": "hi"}]


def read(body: dict[str, Any], endpoint: str = "chat", server: str = "llama-cpp") -> params.Ask:
    return params.read(body, endpoint=endpoint, server=server, model=body.get("model", "chat"))


def refusal(body: dict[str, Any], endpoint: str = "chat", server: str = "llama-cpp") -> Invalid:
    with pytest.raises(Invalid) as info:
        read(body, endpoint, server)
    return info.value


def chat(**extra: Any) -> dict[str, Any]:
    return {"model": "chat", "messages": copy.deepcopy(SAY_HI), **extra}


# -- the tables ---------------------------------------------------------------------------------


def _sdk_parameters(module: Any, name: str) -> set[str]:
    return set(getattr(module, name).__annotations__)


def test_every_parameter_the_openai_sdk_can_send_has_an_entry():
    """A new SDK parameter fails here until someone decides what the gateway does with it."""
    from openai.types import completion_create_params, embedding_create_params
    from openai.types.chat import completion_create_params as chat_params

    sdk = {
        ("llama-cpp", "chat"): _sdk_parameters(chat_params, "CompletionCreateParamsBase") | {"stream"},
        ("llama-cpp", "completions"): _sdk_parameters(completion_create_params, "CompletionCreateParamsBase")
        | {"stream"},
        ("embeddings", "embeddings"): _sdk_parameters(embedding_create_params, "EmbeddingCreateParams"),
    }
    for key, names in sdk.items():
        table = params.TABLES[key].params
        assert names - set(table) == set(), key
        for name, param in table.items():
            assert param.how in (PASS, TRANSLATED, ACCEPTED, REFUSED), name
            # What is refused (for some values) always has a rule that refuses it.
            assert param.how != REFUSED or param.rule is not None, name


# -- max_tokens and max_completion_tokens ----------------------------------------------------------


def test_max_completion_tokens_is_sent_as_max_tokens_and_wins():
    body = chat(max_tokens=64, max_completion_tokens=4)
    ask = read(body)
    assert ask.completion_limit == 4 and ask.rewrite
    assert body["max_tokens"] == 4 and "max_completion_tokens" not in body
    # A server that speaks OpenAI itself gets it as it was sent.
    body = chat(max_completion_tokens=4)
    assert read(body, server="openai-compatible").completion_limit == 4
    assert body["max_completion_tokens"] == 4


def test_a_plain_body_is_forwarded_as_it_came():
    body = chat(max_tokens=8, temperature=0, seed=1, top_k=20)
    before = copy.deepcopy(body)
    ask = read(body)
    assert not ask.rewrite and body == before
    assert (ask.completion_limit, ask.stream, ask.choices, ask.include_usage) == (8, False, 1, None)


@pytest.mark.parametrize("value", [0, -1, "4", 4.0, True])
@pytest.mark.parametrize("name", ["max_tokens", "max_completion_tokens"])
def test_token_limits_must_be_positive_integers(name, value):
    error = refusal(chat(**{name: value}))
    assert error.param == name and "positive integer" in error.message


# -- refused, translated, accepted ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"n": 2}, "n"),
        ({"logprobs": True}, "logprobs"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"prediction": {"type": "content", "content": "x"}}, "prediction"),
        ({"store": True}, "store"),
        ({"metadata": {"team": "a"}}, "metadata"),
        ({"service_tier": "priority"}, "service_tier"),
        ({"reasoning_effort": "high"}, "reasoning_effort"),
        ({"parallel_tool_calls": False}, "parallel_tool_calls"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"web_search_options": {}}, "web_search_options"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),  # without stream
        ({"stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
        ({"stream": True, "stream_options": {"usage": True}}, "stream_options.usage"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
    ],
)
def test_chat_parameters_llama_cpp_cannot_honour_are_refused(extra, param):
    error = refusal(chat(**extra))
    assert error.param == param
    assert error.code in ("invalid_value", "unsupported_parameter", "unsupported_value", "unknown_parameter")


@pytest.mark.parametrize(
    "extra",
    [
        {"n": 1},
        {"logprobs": False},
        {"modalities": ["text"]},
        {"store": False},
        {"metadata": {}},
        {"service_tier": "auto"},
        {"parallel_tool_calls": True},
        {"tool_choice": {"type": "function", "function": {"name": "f"}}},
        {"user": "u-1", "safety_identifier": "s", "prompt_cache_key": "k"},
        {"stop": ["\n"], "presence_penalty": 0.5, "frequency_penalty": 0.5, "logit_bias": {"1": -100}},
        {"top_k": 10, "min_p": 0.1, "repeat_penalty": 1.2, "grammar": 'root ::= "x"'},
        {"stream": False, "stream_options": None, "max_tokens": None},
    ],
)
def test_values_llama_cpp_honours_pass_unchanged(extra):
    body = chat(**extra)
    before = copy.deepcopy(body)
    assert not read(body).rewrite and body == before


def test_structured_outputs_become_llama_cpp_json_mode_with_the_schema():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    body = chat(response_format={"type": "json_schema", "json_schema": {"name": "A", "schema": schema}})
    assert read(body).rewrite
    assert body["response_format"] == {"type": "json_object", "schema": schema}


def test_the_developer_role_is_sent_as_system():
    body = chat()
    body["messages"].insert(0, {"role": "developer", "content": "be brief"})
    assert read(body).rewrite
    assert [m["role"] for m in body["messages"]] == ["system", "user"]


def test_unknown_parameters_are_refused_for_llama_cpp_and_passed_to_openai_servers():
    error = refusal(chat(max_token=4))
    assert (error.param, error.code) == ("max_token", "unknown_parameter")
    assert "did you mean 'max_tokens'" in error.message
    body = chat(max_token=4, some_extension={"x": 1})
    assert not read(body, server="openai-compatible").rewrite and body["some_extension"] == {"x": 1}


def test_completions_take_one_prompt_and_max_tokens():
    one = {"model": "m", "prompt": ["Once"], "max_tokens": 3, "echo": True}
    assert read(one, "completions").completion_limit == 3
    for body, param in [
        ({"model": "m", "prompt": ["a", "b"]}, "prompt"),
        ({"model": "m", "prompt": [[1, 2]]}, "prompt"),
        ({"model": "m", "prompt": "a", "best_of": 2}, "best_of"),
        ({"model": "m", "prompt": "a", "logprobs": 0}, "logprobs"),
        ({"model": "m", "prompt": "a", "max_completion_tokens": 3}, "max_completion_tokens"),
        ({"model": "m"}, "prompt"),
    ]:
        assert refusal(body, "completions").param == param, body


def test_embeddings_refuse_dimensions_and_streaming():
    ok = {"model": "e", "input": ["a"], "encoding_format": "base64", "user": "u"}
    assert read(dict(ok), "embeddings", "embeddings").completion_limit is None
    assert refusal({**ok, "dimensions": 64}, "embeddings", "embeddings").param == "dimensions"
    assert refusal({**ok, "stream": True}, "embeddings", "embeddings").param == "stream"
    assert refusal({**ok, "input": []}, "embeddings", "embeddings").param == "input"


def test_the_body_and_model_are_checked_first():
    for body, param in [([], "body"), ({"messages": SAY_HI}, "model"), ({"model": ""}, "model")]:
        with pytest.raises(Invalid) as info:
            params.model_of(body)
        assert info.value.param == param


# -- through the gateway ----------------------------------------------------------------------------


def sdk(env: Any, key: dict[str, str]) -> openai.AsyncOpenAI:
    """The official SDK, talking to the app in-process."""
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=env.app), base_url="http://test")
    token = key["Authorization"].removeprefix("Bearer ")
    return openai.AsyncOpenAI(base_url="http://test/v1", api_key=token, http_client=http, max_retries=0)


async def test_the_sdk_s_max_completion_tokens_caps_the_answer(env):
    d = await env.deploy()
    client = sdk(env, d.key)
    done = await client.chat.completions.create(model="chat", messages=SAY_HI, max_completion_tokens=4)
    assert done.usage is not None and 0 < done.usage.completion_tokens <= 4
    assert done.choices[0].finish_reason == "length"
    seen = d.upstreams[0].bodies[-1]
    assert seen["max_tokens"] == 4 and "max_completion_tokens" not in seen
    both = await client.chat.completions.create(
        model="chat", messages=SAY_HI, max_tokens=2, max_completion_tokens=3
    )
    assert both.usage is not None and both.usage.completion_tokens == 3
    # Without either the upstream answers at its own length.
    whole = await client.chat.completions.create(model="chat", messages=SAY_HI)
    assert whole.usage is not None and whole.usage.completion_tokens == d.upstreams[0].FULL


async def test_max_completion_tokens_is_reserved_by_the_limiter(env):
    d = await env.deploy()
    created = await env.client.post(
        f"/projects/{d.project['id']}/keys", json={"name": "tpm", "limits": {"tpm": 100}}, headers=ADMIN
    )
    key = {"Authorization": f"Bearer {created.json()['token']}"}
    with pytest.raises(openai.RateLimitError) as info:
        await sdk(env, key).chat.completions.create(model="chat", messages=SAY_HI, max_completion_tokens=500)
    assert "reserves" in info.value.body["message"] and "max_completion_tokens" in info.value.body["message"]
    assert d.upstreams[0].requests == 0


async def test_refusals_name_the_parameter_and_reach_no_replica(env):
    d = await env.deploy()
    client = sdk(env, d.key)
    cases: list[tuple[dict[str, Any], str, str]] = [
        ({"max_completion_tokens": 0}, "max_completion_tokens", "invalid_value"),
        ({"n": 3}, "n", "unsupported_value"),
        ({"modalities": ["text", "audio"]}, "modalities", "unsupported_value"),
        ({"extra_body": {"max_token": 4}}, "max_token", "unknown_parameter"),
    ]
    for extra, param, code in cases:
        with pytest.raises(openai.BadRequestError) as info:
            await client.chat.completions.create(model="chat", messages=SAY_HI, **extra)
        assert (info.value.body["param"], info.value.body["code"]) == (param, code), extra
        assert info.value.body["message"]
    assert d.upstreams[0].requests == 0
    emb = await env.deploy(server="embeddings", name="embed", project=d.project)
    with pytest.raises(openai.BadRequestError) as info:
        await client.embeddings.create(model="embed", input="a", dimensions=64)
    assert info.value.body["param"] == "dimensions"
    assert emb.upstreams[0].requests == 0


async def test_parameters_llama_cpp_applies_reach_it_unchanged(env):
    d = await env.deploy()
    await sdk(env, d.key).chat.completions.create(
        model="chat",
        messages=SAY_HI,
        temperature=0,
        top_p=0.5,
        seed=7,
        stop=["\n"],
        response_format={"type": "json_object"},
        user="end-user-1",
        extra_body={"top_k": 5, "min_p": 0.1},
    )
    seen = d.upstreams[0].bodies[-1]
    assert {k: seen[k] for k in ("temperature", "top_p", "seed", "stop", "top_k", "min_p", "user")} == {
        "temperature": 0,
        "top_p": 0.5,
        "seed": 7,
        "stop": ["\n"],
        "top_k": 5,
        "min_p": 0.1,
        "user": "end-user-1",
    }
    assert seen["response_format"] == {"type": "json_object"}


async def test_langchain_openai_max_tokens_caps_the_answer(env):
    """langchain-openai sends max_tokens as max_completion_tokens: the cap still holds."""
    d = await env.deploy()
    llm = env.chat_model(d, max_tokens=4)
    answer = await llm.ainvoke("hi")
    assert answer.usage_metadata is not None and 0 < answer.usage_metadata["output_tokens"] <= 4
    seen = d.upstreams[0].bodies[-1]
    assert seen["max_tokens"] == 4 and "max_completion_tokens" not in seen
