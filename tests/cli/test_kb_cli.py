"""`converge kb` end to end: a folder of real documents (markdown, HTML, a PDF) ingested through
the CLI against a server with a real MiniLM replica behind the gateway and an ingestion worker,
followed to the end, then searched by meaning and by metadata; another project's key sees none
of it."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from cli_support import Cli, failed, ok, unique
from rag_documents import pdf_bytes
from rag_support import MiniLM, minilm, minilm_replica
from support import make_key, make_project

from converge.workers.ingestion import IngestionRunner

__all__ = ["minilm", "minilm_replica"]  # the fixtures

ROTATION = """# Operations guide

## Rotating API keys

Create the new key first, roll it out to every client, then revoke the old key.
A revoked key is refused at once by every gateway replica.
"""
PANTRY = """<html><head><title>Kitchen</title></head><body>
<h1>Pantry</h1><p>Flour, rice and dried beans keep for months in airtight jars.</p>
</body></html>"""


@pytest.fixture
async def ingestion(app: Any) -> AsyncIterator[None]:
    """The worker that runs ingestion jobs (the session app runs none of its own)."""
    state = app.state.converge
    settings = state.settings.model_copy(
        update={"rag": state.settings.rag.model_copy(update={"poll_interval_s": 0.05})}
    )
    runner = IngestionRunner(
        sessions=state.sessions, settings=settings, store=state.artifacts, gateway=state.gateway
    )
    await runner.start()
    yield
    await runner.stop()


def _token(headers: dict[str, str]) -> str:
    return headers["Authorization"].removeprefix("Bearer ")


async def test_kb_cli_ingests_a_folder_follows_the_job_and_searches_it(
    cli: Cli, minilm: MiniLM, ingestion: None, committed_client: Any, tmp_path: Path
) -> None:
    project, key = minilm.project["id"], _token(minilm.key)
    name = unique("docs")
    folder = tmp_path / "docs"
    (folder / "kitchen").mkdir(parents=True)
    (folder / "ops.md").write_text(ROTATION)
    (folder / "kitchen" / "pantry.html").write_text(PANTRY)
    (folder / "travel.pdf").write_bytes(
        pdf_bytes(["Trains to the coast leave every hour from platform four."], title="Travel")
    )
    (folder / "photo.png").write_bytes(b"\x89PNG\r\n\x1a\n")

    made = ok(await cli("kb", "create", name, "-p", project, "--embedding", "minilm", token=key))
    assert name in made.output and "384" in made.output  # the dimension, read from the model

    ingested = ok(await cli("kb", "ingest", name, str(folder), "-p", project, token=key))
    assert "skipped" in ingested.output and "photo.png" in ingested.output
    assert "succeeded" in ingested.output and "3 documents" in ingested.output

    found = ok(
        await cli("kb", "search", name, "how do I replace an API key?", "-p", project, "--json", token=key)
    )
    hits = json.loads(found.output)["results"]
    assert hits and hits[0]["source"] == "ops.md" and "revoke" in hits[0]["text"]
    assert hits[0]["heading_path"][-1] == "Rotating API keys"

    by_page = ok(await cli("kb", "search", name, "train timetable", "-p", project, "--json", token=key))
    top = json.loads(by_page.output)["results"][0]
    assert (top["source"], top["page"]) == ("travel.pdf", 1)

    table = ok(await cli("kb", "search", name, "storing dry food", "-p", project, "-k", "1", token=key))
    assert "pantry.html" in table.output and "ops.md" not in table.output

    jobs = ok(await cli("kb", "jobs", name, "-p", project, token=key))
    assert "succeeded" in jobs.output

    again = ok(await cli("kb", "ingest", name, str(folder), "-p", project, token=key))
    assert "3 unchanged" in again.output  # same content: nothing embedded twice

    other = await make_project(committed_client)
    stranger = _token(await make_key(committed_client, other["id"], "developer"))
    refused = failed(await cli("kb", "search", name, "keys", "-p", project, token=stranger))
    assert "revoke" not in refused.output
