"""create_app runs the roles `settings.roles` names (`converge serve ROLE...`), and only those:
routes, the data path, background services and the runtime."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError
from support import ADMIN, make_settings

from converge.app import create_app
from converge.config import Settings
from converge.kit.roles import ALL_ROLES, Role, parse_roles
from converge.runtime.fake import FakeBackend

WORKER_SERVICES = {"registry-sync", "controller", "build-runner", "ingestion-runner"}


@contextlib.asynccontextmanager
async def serving(settings: Settings) -> AsyncIterator[tuple[Any, FakeBackend, httpx.AsyncClient]]:
    runtime = FakeBackend()
    app = create_app(settings, on_first_key=None, runtime=runtime)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield app.state.converge, runtime, client


def _services(state: Any) -> set[str]:
    return {service.name for service in state.services}


async def test_a_gateway_serves_the_data_path_and_no_rest_api(pg_url: str, tmp_path: Path) -> None:
    async with serving(make_settings(pg_url, tmp_path, roles=["gateway"])) as (state, runtime, client):
        v1 = await client.get("/v1/models")
        assert v1.status_code == 401 and v1.json()["error"]["type"] == "authentication_error"
        assert (await client.get("/models", headers=ADMIN)).status_code == 404
        assert (await client.get("/projects", headers=ADMIN)).status_code == 404
        assert (await client.get("/health")).status_code == 200
        ready = await client.get("/readiness")
        assert ready.status_code == 200 and "gateway" in ready.json()["checks"]
        assert not _services(state) & WORKER_SERVICES
        assert not runtime.running


async def test_the_api_serves_rest_but_not_the_data_path_and_runs_no_workers(
    pg_url: str, tmp_path: Path
) -> None:
    async with serving(make_settings(pg_url, tmp_path, roles=["api"])) as (state, runtime, client):
        assert (await client.get("/models", headers=ADMIN)).status_code == 200
        v1 = await client.get("/v1/models", headers=ADMIN)
        assert v1.status_code == 404 and v1.headers["content-type"].startswith("application/problem+json")
        # Knowledge-base queries embed through a gateway in this process, though /v1 is not served.
        assert state.gateway is not None
        assert not _services(state) & WORKER_SERVICES
        assert not runtime.running  # the local/fake runtimes are observed by the controller only


async def test_controller_and_worker_run_the_background_services(pg_url: str, tmp_path: Path) -> None:
    settings = make_settings(pg_url, tmp_path, roles=["controller", "worker"], gateway={"enabled": False})
    async with serving(settings) as (state, runtime, client):
        assert _services(state) >= WORKER_SERVICES
        assert runtime.running
        assert (await client.get("/models", headers=ADMIN)).status_code == 404
        assert (await client.get("/readiness")).status_code == 200


async def test_only_a_worker_runs_builds_and_only_a_controller_reconciles(
    pg_url: str, tmp_path: Path
) -> None:
    async with serving(make_settings(pg_url, tmp_path, roles=["worker"])) as (state, runtime, _):
        assert _services(state) & WORKER_SERVICES == {"build-runner", "ingestion-runner"}
        assert not runtime.running
        assert state.gateway is not None  # ingestion embeds through it


def test_roles_come_from_the_environment_as_a_comma_separated_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVERGE_ROLES", "api, gateway")
    assert Settings().roles == {Role.API, Role.GATEWAY}
    monkeypatch.setenv("CONVERGE_ROLES", "all")
    assert Settings().roles == ALL_ROLES
    monkeypatch.setenv("CONVERGE_ROLES", "api,scheduler")
    with pytest.raises(ValidationError, match="Unknown role"):
        Settings()


def test_every_role_runs_by_default_and_the_old_switches_still_turn_parts_off() -> None:
    assert Settings().roles == ALL_ROLES
    settings = Settings(run_workers=False, gateway={"enabled": False})
    assert [r for r in Role if settings.runs(r)] == [Role.API]


def test_parse_roles_needs_at_least_one() -> None:
    with pytest.raises(ValueError, match="at least one"):
        parse_roles(" , ")
    assert parse_roles([Role.WORKER, "controller"]) == {Role.WORKER, Role.CONTROLLER}
