"""A real Prometheus (Debian's /usr/bin/prometheus, on loopback) scrapes a running Converge with
deploy/prometheus's configuration and rules: the target is up, every rule evaluates without an
error, and the dashboards' queries answer. Converge serves a chat deployment whose replica is a
scripted OpenAI server, and the test sends it traffic first, so the gateway's series exist."""

from __future__ import annotations

import asyncio
import math
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from observed import RULES
from scripted_llm import ScriptedLlm, chat_deployment, routed
from support import ADMIN, LiveServer, eventually, free_port, make_key, make_project

from converge.observability.dashboards import all_dashboards, overview
from converge.observability.promql import fill_variables, selectors

# One Prometheus for the module's tests, on one xdist worker.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("prometheus")]

JOB = "converge"
SCRAPE_S = 1


@dataclass
class Prometheus:
    http: httpx.AsyncClient
    deployment: str  # the chat deployment's label, "<project>/<name>"
    log: Path

    async def query(self, expr: str) -> list[dict[str, Any]]:
        resp = await self.http.get("/api/v1/query", params={"query": expr})
        assert resp.status_code == 200, f"{expr}: {resp.text}"
        return list(resp.json()["data"]["result"])

    def variables(self) -> dict[str, str]:
        # Windows longer than the module runs: rates cover all the traffic, however slow the run.
        return {"job": JOB, "deployment": self.deployment, "__rate_interval": "5m", "__range": "5m"}


def _config(*, target: str) -> dict[str, Any]:
    """deploy/prometheus/prometheus.yml, scraping `target` every second."""
    config = yaml.safe_load((RULES.parent / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": f"{SCRAPE_S}s", "evaluation_interval": f"{SCRAPE_S}s"}
    config["rule_files"] = [str(RULES.parent / name) for name in config["rule_files"]]
    (job,) = config["scrape_configs"]
    assert job["job_name"] == JOB
    job["static_configs"] = [{"targets": [target]}]
    return config


async def _traffic(client: httpx.AsyncClient, *, model: str, key: dict[str, str]) -> None:
    chat = {"model": model, "messages": [{"role": "user", "content": "hello"}]}
    for _ in range(3):
        resp = await client.post("/v1/chat/completions", json=chat, headers=key)
        assert resp.status_code == 200, resp.text
    for _ in range(2):
        async with client.stream(
            "POST", "/v1/chat/completions", json={**chat, "stream": True}, headers=key
        ) as r:
            assert r.status_code == 200
            await r.aread()
    for path in ("/health", "/readiness"):  # what probes ask on a cluster
        assert (await client.get(path)).status_code == 200


@pytest.fixture(scope="module")
async def prometheus(app: Any, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Prometheus]:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus not installed (apt-get install -y prometheus, or `make system-deps`)")
    root = tmp_path_factory.mktemp("prometheus")
    transport = httpx.ASGITransport(app=app)
    name = f"chat-{uuid.uuid4().hex[:8]}"
    async with (
        httpx.AsyncClient(transport=transport, base_url="http://test") as client,
        ScriptedLlm() as llm,
        LiveServer(app, free_port()) as server,
    ):
        project = await make_project(client)
        deployment = await chat_deployment(app, client, project_id=project["id"], llm=llm, name=name)
        try:
            await routed(app, deployment, llm)
            key = await make_key(client, project["id"], "developer")
            await _traffic(client, model=name, key=key)
            config = root / "prometheus.yml"
            config.write_text(yaml.safe_dump(_config(target=server.url.removeprefix("http://"))))
            address = f"127.0.0.1:{free_port()}"
            log = root / "prometheus.log"
            with log.open("wb") as out:
                proc = await asyncio.create_subprocess_exec(
                    binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={root / 'data'}",
                    f"--web.listen-address={address}",
                    "--log.level=warn",
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            try:
                async with httpx.AsyncClient(base_url=f"http://{address}", timeout=10) as http:

                    async def ready() -> bool:
                        assert proc.returncode is None, log.read_text()
                        try:
                            return (await http.get("/-/ready")).status_code == 200
                        except httpx.TransportError:
                            return False

                    await eventually(ready, timeout=30)
                    prom = Prometheus(http=http, deployment=f"{project['name']}/{name}", log=log)
                    # Traffic between scrapes, so rates are not 0: once scraped, more, scraped again.
                    await _scraped(prom, 2)
                    await _traffic(client, model=name, key=key)
                    await _scraped(prom, await _scrapes(prom) + 2)
                    yield prom
            finally:
                proc.terminate()
                try:
                    await asyncio.wait_for(proc.wait(), timeout=10)
                except TimeoutError:
                    proc.kill()
                    await proc.wait()
        finally:
            await client.delete(f"/deployments/{deployment['id']}", headers=ADMIN)


async def _scrapes(prom: Prometheus) -> int:
    """How many scrapes of Converge Prometheus holds (from the last 5 minutes: all of them)."""
    found = await prom.query(f'count_over_time(up{{job="{JOB}"}}[5m])')
    return int(float(found[0]["value"][1])) if found else 0


async def _scraped(prom: Prometheus, times: int) -> None:
    """Until Prometheus holds `times` scrapes of Converge (rate() needs two)."""

    async def enough() -> bool:
        return await _scrapes(prom) >= times

    await eventually(enough, timeout=20)


async def test_prometheus_scrapes_converge(prometheus: Prometheus) -> None:
    async def target() -> dict[str, Any] | None:
        resp = await prometheus.http.get("/api/v1/targets")
        active = resp.json()["data"]["activeTargets"]
        return next((t for t in active if t["labels"]["job"] == JOB and t["health"] != "unknown"), None)

    found = await eventually(target, timeout=20)
    assert found["health"] == "up", found["lastError"]
    assert found["lastError"] == ""
    [up] = await prometheus.query(f'up{{job="{JOB}"}}')
    assert up["value"][1] == "1"


async def test_rules_load_and_evaluate_without_errors(prometheus: Prometheus) -> None:
    expected = sum(len(g["rules"]) for g in yaml.safe_load(RULES.read_text())["groups"])

    async def evaluated() -> list[dict[str, Any]] | None:
        groups = (await prometheus.http.get("/api/v1/rules")).json()["data"]["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        return rules if rules and all(r["health"] != "unknown" for r in rules) else None

    rules = await eventually(evaluated, timeout=20)
    assert len(rules) == expected
    broken = {r["name"]: r.get("lastError") for r in rules if r["health"] != "ok"}
    assert not broken, broken


async def test_recording_rules_compute_from_the_real_series(prometheus: Prometheus) -> None:
    label = f'{{deployment="{prometheus.deployment}"}}'

    async def recorded() -> list[dict[str, Any]]:
        return await prometheus.query(f"deployment:converge_gateway_time_to_first_token_slo_seconds{label}")

    [objective] = await eventually(recorded, timeout=20)
    assert float(objective["value"][1]) == 2.0  # the fixed objective, for the deployment that streamed
    # No request failed: the error ratio is 0, not absent.
    [ratio] = await eventually(lambda: prometheus.query(f"deployment:converge_gateway_errors:rate5m{label}"))
    assert float(ratio["value"][1]) == 0.0


async def test_every_platform_overview_query_returns_data(prometheus: Prometheus) -> None:
    empty = []
    for title, expr in overview().queries():
        if not await prometheus.query(fill_variables(expr, prometheus.variables())):
            empty.append(f"{title}: {expr}")
    assert not empty, "overview panels without data:\n" + "\n".join(empty)


async def test_dashboard_queries_answer_wherever_their_series_exist(prometheus: Prometheus) -> None:
    """Every query of every dashboard is valid PromQL; one whose selectors all have series
    answers with data (one selecting, say, guardrail hits that never happened may not)."""
    variables = prometheus.variables()
    answered, without_series, empty = 0, [], []
    for file, dashboard in all_dashboards().items():
        for title, expr in dashboard.queries():
            filled = fill_variables(expr, variables)
            result = await prometheus.query(filled)  # a 400 (bad PromQL) fails here
            lacking = [s.text for s in selectors(filled) if not await prometheus.query(f"count({s.text})")]
            if result:
                answered += 1
            elif lacking:
                without_series.append(f"{file} / {title}: {lacking}")
            else:
                empty.append(f"{file} / {title}: {filled}")
    assert not empty, "queries without data although their series exist:\n" + "\n".join(empty)
    # The deployment dashboard is about the chat deployment that got traffic: all of it answers
    # but the failed attempts (none failed).
    assert all("upstream_errors" in line for line in without_series if line.startswith("deployment.json")), (
        without_series
    )
    assert answered > len(without_series)


async def test_the_deployment_dashboard_shows_the_traffic_it_got(prometheus: Prometheus) -> None:
    panels = {p.title: p for p in all_dashboards()["deployment.json"].panels()}

    async def answer(title: str) -> list[dict[str, Any]]:
        (target, *_) = panels[title].targets
        return await prometheus.query(fill_variables(target.expr, prometheus.variables()))

    by_status = {r["metric"].get("status"): float(r["value"][1]) for r in await answer("Requests by status")}
    assert set(by_status) == {"200"} and by_status["200"] > 0
    tokens = {r["metric"].get("kind"): float(r["value"][1]) for r in await answer("Tokens per second")}
    assert set(tokens) == {"prompt", "completion"} and min(tokens.values()) > 0
    [ttft_p50] = await answer("Time to first token (streaming)")
    assert math.isfinite(float(ttft_p50["value"][1]))  # streamed requests were seen in the window
    [in_flight] = await answer("In flight and queued")
    assert float(in_flight["value"][1]) == 0  # every request was answered
