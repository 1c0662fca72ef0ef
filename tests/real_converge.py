"""A real Converge on this machine for end-to-end tests, as `make run` starts one: the app with
the local runtime (supervised replica processes) on a database of its own, seeding the built-in
catalogue and deploying the defaults (SmolLM2 on llama.cpp's server, MiniLM), served on a
loopback port. Its deployments are deleted and no replica outlives it."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import psutil
from support import ADMIN, LiveServer, free_port, make_settings, own_database

from converge.app import create_app
from converge.runtime.local import LocalBackend, LocalConfig


@contextlib.asynccontextmanager
async def real_converge(
    pg_url: str, tmp_path: Path, **overrides: Any
) -> AsyncIterator[tuple[str, httpx.AsyncClient]]:
    """(its URL, an HTTP client on it); `overrides` are settings, as `make_settings` takes them."""
    with own_database(pg_url, "real") as url:
        backend = LocalBackend(LocalConfig(state_dir=tmp_path / "runtime", health_interval_s=0.2))
        settings = make_settings(
            url, tmp_path, library={"seed_catalogue": True}, deploy_defaults=True, **overrides
        )
        app = create_app(settings, on_first_key=None, runtime=backend)
        try:
            async with app.router.lifespan_context(app), LiveServer(app, free_port()) as server:
                async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
                    yield server.url, client
                    for d in (await client.get("/deployments", headers=ADMIN)).json()["items"]:
                        await client.delete(f"/deployments/{d['id']}", headers=ADMIN)
        finally:
            for proc in psutil.Process().children(recursive=True):  # never leave a replica behind
                with contextlib.suppress(psutil.Error):  # gone, or a zombie not yet reaped
                    if "converge.serving" in " ".join(proc.cmdline()):
                        proc.kill()


async def defaults_ready(client: httpx.AsyncClient, timeout: float) -> dict[str, Any]:
    """The default deployments by name, once `smollm2` and `minilm` are both Ready."""
    deadline = time.monotonic() + timeout
    while True:
        items = (await client.get("/deployments", headers=ADMIN)).json()["items"]
        phases = {d["name"]: d["phase"] for d in items}
        if phases.get("smollm2") == "Ready" and phases.get("minilm") == "Ready":
            return {d["name"]: d for d in items}
        assert time.monotonic() < deadline, f"default deployments not ready: {phases}"
        await asyncio.sleep(1.0)
