"""Traces in process (observability/tracing.py), read back with the SDK's in-memory exporter: a
chat request through the gateway, an API request, agents' tool calls; and tracing off."""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from support import ADMIN, eventually, free_port, make_key, make_project

from converge.control.chat.tools.base import Tool, Toolbox, ToolFailed
from converge.models import Build
from converge.observability import tracing
from converge.runtime.base import DeploymentSpec, ReplicaTemplate, ServerKind
from converge.runtime.local import LocalBackend, LocalConfig

GATEWAY_SPANS = ("gateway.auth", "gateway.limits", "gateway.routing", "gateway.upstream")


class RecordingUpstream:
    """A replica stand-in on a loopback port: answers chat completions, keeps each request's headers."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.headers: list[dict[str, str]] = []
        self._runner: web.AppRunner | None = None

    async def start(self) -> RecordingUpstream:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.1)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _chat(self, request: web.Request) -> web.Response:
        self.headers.append({k.lower(): v for k, v in request.headers.items()})
        await request.read()
        return web.json_response(
            {
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "created": 0,
                "model": "m",
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}
                ],
                "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
            }
        )


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Tracing on for the test (every span exported at once to memory), off again after it."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.install(provider)
    try:
        yield exporter
    finally:
        tracing.shutdown()


async def _approved_version(client: httpx.AsyncClient, project_id: str) -> dict[str, Any]:
    approver = await client.post(
        "/keys", json={"name": "library-approver", "role": "library-approver"}, headers=ADMIN
    )
    assert approver.status_code == 201, approver.text
    model = (await client.post("/models", json={"name": f"m-{uuid.uuid4().hex[:8]}"}, headers=ADMIN)).json()
    version = (
        await client.post(
            f"/models/{model['id']}/versions/upload",
            params={"version": "v1", "filename": "weights.bin"},
            content=f"converge test weights {uuid.uuid4().hex}\n".encode(),
            headers={**ADMIN, "content-type": "application/octet-stream"},
        )
    ).json()
    approved = await client.post(
        f"/models/{model['id']}/versions/{version['id']}/approve",
        json={},
        headers={"Authorization": f"Bearer {approver.json()['token']}"},
    )
    assert approved.json()["state"] == "approved", approved.text
    return version


@pytest.fixture
async def chat(app: Any, committed_client: httpx.AsyncClient) -> AsyncIterator[dict[str, Any]]:
    """A committed chat deployment whose one replica is a RecordingUpstream, and a key for it."""
    state = app.state.converge
    client = committed_client
    upstream = await RecordingUpstream().start()
    project = await make_project(client)
    version = await _approved_version(client, project["id"])
    async with state.sessions() as session, session.begin():
        session.add(
            Build(
                project_id=uuid.UUID(project["id"]),
                model_version_id=uuid.UUID(version["id"]),
                profile="cpu",
                server="llama-cpp",
                state="succeeded",
                results={},
                created_by="test",
            )
        )
    body = {
        "name": "chat",
        "model_version_id": version["id"],
        "server": "llama-cpp",
        "resources": {"cpu": 0.1, "memory_bytes": 1 << 20},
    }
    resp = await client.post("/deployments", params={"project": project["id"]}, json=body, headers=ADMIN)
    assert resp.status_code == 201, resp.text
    deployment = resp.json()
    state.runtime.serve_at(uuid.UUID(deployment["id"]), [upstream.url])
    key = await make_key(client, project["id"], "developer")

    async def routed() -> bool:
        route = state.gateway.dataplane.snapshot.by_id.get(uuid.UUID(deployment["id"]))
        return route is not None and route.endpoints == (upstream.url,)

    await eventually(routed, timeout=15)
    try:
        yield {"key": key, "upstream": upstream, "deployment": deployment}
    finally:
        await client.delete(f"/deployments/{deployment['id']}", headers=ADMIN)
        await upstream.stop()


def _hex(span: ReadableSpan) -> tuple[str, str]:
    ctx = span.get_span_context()
    assert ctx is not None
    return f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}"


def _parent(span: ReadableSpan) -> str | None:
    return f"{span.parent.span_id:016x}" if span.parent is not None else None


def _of_trace(exporter: InMemorySpanExporter, trace_id: str) -> dict[str, ReadableSpan]:
    found = [s for s in exporter.get_finished_spans() if _hex(s)[0] == trace_id]
    return {s.name: s for s in found}


async def test_a_chat_request_is_traced_through_auth_limits_routing_and_upstream_under_the_clients_trace(
    committed_client: httpx.AsyncClient, chat: dict[str, Any], spans: InMemorySpanExporter
) -> None:
    sent = tracing.new_traceparent()
    trace_id, client_span = sent.split("-")[1:3]
    body = {"model": "chat", "messages": [{"role": "user", "content": "hello"}]}
    resp = await committed_client.post(
        "/v1/chat/completions", json=body, headers={**chat["key"], "traceparent": sent}
    )
    assert resp.status_code == 200, resp.text

    by_name = _of_trace(spans, trace_id)
    server = by_name["POST /v1/chat/completions"]
    assert {*GATEWAY_SPANS} <= set(by_name), sorted(by_name)
    assert _parent(server) == client_span  # the client's trace, continued
    server_id = _hex(server)[1]
    for name in ("gateway.auth", "gateway.limits", "gateway.upstream"):
        assert _parent(by_name[name]) == server_id, name
    upstream_id = _hex(by_name["gateway.upstream"])[1]
    assert _parent(by_name["gateway.routing"]) == upstream_id
    assert by_name["gateway.upstream"].attributes["http.response.status_code"] == 200
    assert by_name["gateway.upstream"].attributes["gen_ai.usage.output_tokens"] == 1
    # The answer names the trace and the gateway's server span; the replica was sent the
    # upstream span, so its own span continues the trace under it.
    assert tracing.parse_traceparent(resp.headers["traceparent"]) == (trace_id, server_id)
    (seen,) = chat["upstream"].headers
    assert tracing.parse_traceparent(seen["traceparent"]) == (trace_id, upstream_id)


async def test_a_request_without_a_traceparent_starts_a_trace_that_its_answer_names(
    committed_client: httpx.AsyncClient, chat: dict[str, Any], spans: InMemorySpanExporter
) -> None:
    body = {"model": "chat", "messages": [{"role": "user", "content": "hello"}]}
    resp = await committed_client.post("/v1/chat/completions", json=body, headers=chat["key"])
    assert resp.status_code == 200, resp.text
    parsed = tracing.parse_traceparent(resp.headers["traceparent"])
    assert parsed is not None
    by_name = _of_trace(spans, parsed[0])
    assert _parent(by_name["POST /v1/chat/completions"]) is None  # a root: not a child of the test's context
    assert {*GATEWAY_SPANS} <= set(by_name)


async def test_a_refused_request_is_traced_with_its_status_and_the_answer_still_names_the_trace(
    committed_client: httpx.AsyncClient, chat: dict[str, Any], spans: InMemorySpanExporter
) -> None:
    body = {"model": "no-such-model", "messages": [{"role": "user", "content": "hello"}]}
    resp = await committed_client.post("/v1/chat/completions", json=body, headers=chat["key"])
    assert resp.status_code == 404
    trace_id, span_id = tracing.parse_traceparent(resp.headers["traceparent"]) or ("", "")
    server = _of_trace(spans, trace_id)["POST /v1/chat/completions"]
    assert _hex(server)[1] == span_id
    assert server.attributes["http.response.status_code"] == 404
    assert "gateway.upstream" not in _of_trace(spans, trace_id)  # nothing was forwarded


async def test_with_tracing_off_the_gateway_reads_and_sends_no_traceparent(
    committed_client: httpx.AsyncClient, chat: dict[str, Any]
) -> None:
    assert not tracing.ENABLED
    body = {"model": "chat", "messages": [{"role": "user", "content": "hello"}]}
    resp = await committed_client.post(
        "/v1/chat/completions", json=body, headers={**chat["key"], "traceparent": tracing.new_traceparent()}
    )
    assert resp.status_code == 200, resp.text
    assert "traceparent" not in resp.headers
    (seen,) = chat["upstream"].headers
    assert "traceparent" not in seen  # neither made nor passed on
    assert tracing.span("anything", a=1) is tracing.span("else")  # one shared no-op, no span objects
    assert tracing.traceparent() is None and tracing.ids() is None


async def test_an_api_request_span_is_named_by_its_route_template_and_continues_the_client_trace(
    client: httpx.AsyncClient, spans: InMemorySpanExporter
) -> None:
    sent = tracing.new_traceparent()
    trace_id, client_span = sent.split("-")[1:3]
    resp = await client.get(f"/deployments/{uuid.uuid4()}", headers={**ADMIN, "traceparent": sent})
    assert resp.status_code == 404
    (server,) = _of_trace(spans, trace_id).values()
    assert server.name == "GET /deployments/{deployment_id}"  # the template, never the id
    assert _parent(server) == client_span
    assert server.attributes["http.response.status_code"] == 404
    assert tracing.parse_traceparent(resp.headers["traceparent"]) == (trace_id, _hex(server)[1])


async def test_an_agents_tool_calls_are_spans_with_the_tools_name_and_error(
    spans: InMemorySpanExporter,
) -> None:
    async def fine(arguments: dict[str, Any]) -> str:
        return f"found {arguments['q']}"

    async def broken(_arguments: dict[str, Any]) -> str:
        raise ToolFailed("the index is offline")

    box = Toolbox()
    schema = {"type": "object", "properties": {"q": {"type": "string"}}}
    box.add(Tool(name="lookup", description="", parameters=schema, run=fine, timeout_s=5))
    box.add(Tool(name="broken", description="", parameters=schema, run=broken, timeout_s=5))
    with tracing.span("agent.run") as run:
        assert run is not None
        assert (await box.call("lookup", '{"q": "x"}')).result == "found x"
        assert (await box.call("broken", "{}")).error == "the index is offline"
    calls = [s for s in spans.get_finished_spans() if s.name == "agent.tool_call"]
    assert [c.attributes["gen_ai.tool.name"] for c in calls] == ["lookup", "broken"]
    assert all(_parent(c) == f"{run.get_span_context().span_id:016x}" for c in calls)
    assert "converge.tool_error" not in calls[0].attributes
    assert calls[1].attributes["converge.tool_error"] == "the index is offline"


def test_an_endpoint_is_the_collectors_base_url_or_its_traces_url() -> None:
    assert tracing.traces_url("http://otel:4318") == "http://otel:4318/v1/traces"
    assert tracing.traces_url("http://otel:4318/") == "http://otel:4318/v1/traces"
    assert tracing.traces_url("http://otel:4318/v1/traces") == "http://otel:4318/v1/traces"
    assert not tracing.configure(endpoint=None, service_name="converge")
    assert not tracing.ENABLED


async def test_the_local_runtime_gives_each_replica_the_collector_and_its_deployments_service_name(
    tmp_path: Path,
) -> None:
    # A "server" that prints what it was given to export with, then idles (its log is its stdout).
    script = (
        "import json, os, time; "
        "print(json.dumps({k: v for k, v in os.environ.items() if 'OTEL' in k}), flush=True); time.sleep(60)"
    )
    config = LocalConfig(
        state_dir=tmp_path,
        server_command=[sys.executable, "-c", script],
        health_interval_s=0.1,
        memory_limit=False,
        otel_endpoint="http://127.0.0.1:4318",
        otel_sample_ratio=0.25,
    )
    backend = LocalBackend(config)
    deployment_id = uuid.uuid4()
    template = ReplicaTemplate(server=ServerKind.EMBEDDINGS, model_name="m", artifact_path=str(tmp_path))
    await backend.start()
    try:
        await backend.apply(
            spec=DeploymentSpec(
                deployment_id=deployment_id, name="minilm", revision=1, replicas=1, template=template
            )
        )

        def printed() -> dict[str, str] | None:
            for log in (tmp_path / "logs").glob("*.log"):
                for line in log.read_text().splitlines():
                    if line.startswith("{"):
                        return dict(json.loads(line))
            return None

        env = await eventually(printed, timeout=15)
    finally:
        await backend.stop()
    assert env["CONVERGE_OTEL__ENDPOINT"] == "http://127.0.0.1:4318"
    assert env["CONVERGE_OTEL__SAMPLE_RATIO"] == "0.25"
    assert env["OTEL_SERVICE_NAME"] == "converge-replica-minilm"
    assert f"converge.deployment.id={deployment_id}" in env["OTEL_RESOURCE_ATTRIBUTES"]


def test_gateway_span_names_are_route_templates_never_the_names_in_the_path() -> None:
    from converge.gateway.api import route_template

    assert route_template("/v1/chat/completions") == "/v1/chat/completions"
    assert route_template("/v1/models/my-secret-model") == "/v1/models/{model}"
    assert route_template("/v2/models/iris/infer") == "/v2/models/{name}/infer"
    assert route_template("/v2/models/iris/versions/3/ready") == "/v2/models/{name}/versions/{version}/ready"
    assert route_template("/v2/models/iris") == "/v2/models/{name}"
    assert route_template("/v2/models/iris/anything-else") == "unmatched"
    assert route_template("/v1/unknown/123") == "unmatched"
