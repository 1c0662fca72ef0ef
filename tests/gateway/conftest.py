"""Gateway fixtures: deployments created through the API (committed, so the gateway's snapshot
sees them) whose fake-backend replicas report the endpoints of real test upstreams."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from support import ADMIN, make_key, make_project
from upstream import Upstream

from converge.models import Build


@dataclass
class Deployed:
    id: str
    name: str
    project: dict[str, Any]
    key: dict[str, str]  # a developer key of the project (Authorization header)
    version: dict[str, Any] = field(default_factory=dict)  # the version served (with model_id)
    upstreams: list[Upstream] = field(default_factory=list)


class Env:
    def __init__(self, app: Any, client: httpx.AsyncClient) -> None:
        self.app, self.client = app, client
        self.state = app.state.converge
        self.gateway = self.state.gateway
        self.upstreams: list[Upstream] = []
        self.deployed: list[Deployed] = []
        self._approver: dict[str, str] | None = None

    async def approver(self) -> dict[str, str]:
        """The organisation's library approver (approvals are not a project owner's to give)."""
        if self._approver is None:
            resp = await self.client.post(
                "/keys", json={"name": "library-approver", "role": "library-approver"}, headers=ADMIN
            )
            assert resp.status_code == 201, resp.text
            self._approver = {"Authorization": f"Bearer {resp.json()['token']}"}
        return self._approver

    async def project(self) -> dict[str, Any]:
        return await make_project(self.client)

    async def version(self, project_id: str, *, server: str) -> dict[str, Any]:
        model = (
            await self.client.post("/models", json={"name": f"m-{uuid.uuid4().hex[:8]}"}, headers=ADMIN)
        ).json()
        version = (
            await self.client.post(
                f"/models/{model['id']}/versions/upload",
                params={"version": "v1", "filename": "weights.bin"},
                # Unique bytes of no known format (random bytes can look like a pickle).
                content=f"converge test weights {uuid.uuid4().hex}\n".encode(),
                headers={**ADMIN, "content-type": "application/octet-stream"},
            )
        ).json()
        approved = await self.client.post(
            f"/models/{model['id']}/versions/{version['id']}/approve", json={}, headers=await self.approver()
        )
        assert approved.json()["state"] == "approved", approved.text
        async with self.state.sessions() as session, session.begin():
            session.add(
                Build(
                    project_id=uuid.UUID(project_id),
                    model_version_id=uuid.UUID(version["id"]),
                    profile="cpu",
                    server=server,
                    state="succeeded",
                    results={},
                    created_by="test",
                )
            )
        return {**approved.json(), "model_id": model["id"]}

    async def deploy(
        self,
        *,
        replicas: int = 1,
        server: str = "llama-cpp",
        project: dict[str, Any] | None = None,
        name: str = "chat",
        aliases: list[str] | None = None,
        **spec: Any,
    ) -> Deployed:
        project = project or await self.project()
        version = await self.version(project["id"], server=server)
        upstreams = [await Upstream(name=f"{name}-{i}").start() for i in range(replicas)]
        self.upstreams += upstreams
        body = {
            "name": name,
            "model_version_id": version["id"],
            "server": server,
            "resources": {"cpu": 0.1, "memory_bytes": 1 << 20},
            "replicas": {"min": replicas, "max": replicas},
            "aliases": aliases or [],
            **spec,
        }
        resp = await self.client.post(
            "/deployments", params={"project": project["id"]}, json=body, headers=ADMIN
        )
        assert resp.status_code == 201, resp.text
        deployment = resp.json()
        self.state.runtime.serve_at(uuid.UUID(deployment["id"]), [u.url for u in upstreams])
        key = await make_key(self.client, project["id"], "developer")
        deployed = Deployed(
            id=deployment["id"], name=name, project=project, key=key, upstreams=upstreams, version=version
        )
        self.deployed.append(deployed)
        await self.until_routed(deployed, replicas)
        return deployed

    async def until_routed(self, deployed: Deployed, ready: int, timeout: float = 15.0) -> None:
        """Wait until the gateway's snapshot routes to `ready` replicas of the deployment."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            route = self.gateway.dataplane.snapshot.by_id.get(uuid.UUID(deployed.id))
            if route is not None and len(route.endpoints) == ready:
                return
            assert asyncio.get_running_loop().time() < deadline, f"not routed: {route}"
            await asyncio.sleep(0.05)

    async def chat_until(self, status: int, body: dict[str, Any], headers: dict[str, str]) -> httpx.Response:
        """Chat until the answer has `status` (a change reaches the gateway within moments); the last answer."""
        for _ in range(100):
            resp = await self.client.post("/v1/chat/completions", json=body, headers=headers)
            if resp.status_code == status:
                break
            await asyncio.sleep(0.05)
        return resp

    def chat_model(self, deployed: Deployed, **options: Any) -> Any:
        """langchain-openai's ChatOpenAI talking to the gateway in process, as the deployment's key."""
        langchain_openai = pytest.importorskip("langchain_openai")
        http = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://test")
        return langchain_openai.ChatOpenAI(
            model=deployed.name,
            base_url="http://test/v1",
            api_key=deployed.key["Authorization"].removeprefix("Bearer "),
            http_async_client=http,
            max_retries=0,
            **options,
        )

    def pool(self, deployed: Deployed) -> Any:
        """The gateway's replica pool of a deployment (made on first use, like a request does)."""
        return self.gateway.forwarder.pool(self.gateway.dataplane.snapshot.by_id[uuid.UUID(deployed.id)])

    async def close(self) -> None:
        for d in self.deployed:
            await self.client.delete(f"/deployments/{d.id}", headers=ADMIN)
        for u in self.upstreams:
            await u.stop()


@pytest.fixture
async def env(app: Any, committed_client: httpx.AsyncClient) -> AsyncIterator[Env]:
    e = Env(app, committed_client)
    try:
        yield e
    finally:
        await e.close()
